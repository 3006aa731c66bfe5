"""The offline check of a generalized root file system, on an in-memory one."""

from __future__ import annotations

from vmbuild.cache import aptproxy
from vmbuild.diskfs.rootfs import Kind
from vmbuild.stages.generalize import Finding, verify

PUBKEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBuilderKeyBlob vmbuild-builder"


class MemoryView:
    """A FilesystemView over {path: content}; directories are implied."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files

    def listdir(self, path: str) -> dict[str, Kind] | None:
        prefix = path.rstrip("/") + "/"
        out: dict[str, Kind] = {}
        for name in self.files:
            if name.startswith(prefix):
                head, _, rest = name[len(prefix) :].partition("/")
                out[head] = "dir" if rest else "file"
        return out or None

    def read(self, path: str) -> bytes | None:
        return self.files.get(path)

    def readlink(self, path: str) -> str | None:
        return None


CLEAN = {
    "/etc/machine-id": b"",
    "/etc/passwd": b"root:x:0:0:root:/root:/bin/bash\nadmin:x:1000:1000::/home/admin:/bin/bash\n",
    "/etc/apt/sources.list.d/debian.sources": b"URIs: http://deb.debian.org/debian\n",
    "/etc/apt/apt.conf.d/70debconf": b'DPkg::Pre-Install-Pkgs {"/usr/sbin/dpkg-preconfigure";};\n',
    "/etc/environment": b"",
}


def test_a_clean_image_has_no_findings() -> None:
    assert verify(MemoryView(dict(CLEAN)), "vmbuild", PUBKEY) == []


def test_the_package_cache_left_anywhere_apt_or_a_login_reads_is_found() -> None:
    files = dict(CLEAN)
    # A component copied the build's proxy into its own apt.conf.d file, and one
    # rewrote the sources to go through the cache (apt-cacher-ng's URL form).
    files["/etc/apt/apt.conf.d/90corp"] = b'Acquire::http::Proxy "http://10.0.2.2:34567";\n'
    files["/etc/apt/sources.list.d/mirror.list"] = (
        b"deb http://10.0.2.2:34567/deb.debian.org/debian bookworm main\n"
    )
    files["/etc/environment"] = b"http_proxy=http://10.0.2.2:34567\n"
    files[aptproxy.GUEST_CONF] = b'Acquire::http::Proxy "http://10.0.2.2:34567";\n'
    assert verify(MemoryView(files), "vmbuild", PUBKEY) == [
        Finding(aptproxy.GUEST_CONF, "the build's apt settings left"),
        Finding(
            "/etc/apt/apt.conf.d/90corp", "the build's package cache (http://10.0.2.2:...) left"
        ),
        Finding(
            "/etc/apt/sources.list.d/mirror.list",
            "the build's package cache (http://10.0.2.2:...) left",
        ),
        Finding("/etc/environment", "the build's package cache (http://10.0.2.2:...) left"),
    ]


def test_a_proxy_of_the_users_own_is_theirs() -> None:
    files = dict(CLEAN)
    files["/etc/apt/apt.conf.d/90corp"] = b'Acquire::http::Proxy "http://proxy.corp:3128";\n'
    assert verify(MemoryView(files), "vmbuild", PUBKEY) == []
