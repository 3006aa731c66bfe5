"""Base image stage: mirrors, cache keys, checksums, the exact argv, the cache.

No processes: qemu-img is faked where fetch_base needs it (the real probe is
exercised by building and booting a base, see tests/vm).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from tests.support.reporting import RecordingReporter
from vmbuild.debian import bootstrap as debian_base
from vmbuild.debian import sources as aptsources
from vmbuild.debian.sources import AptSource, DebianMirrors
from vmbuild.errors import ConfigError, VmbuildError
from vmbuild.stages import base_image as bi

HOST_DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
# http://snapshot.debian.org/archive/debian-security/20250520T000000Z
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""

NODESOURCE_DEB822 = """\
Types: deb
URIs: https://deb.nodesource.com/node_20.x
Suites: nodistro
Components: main
Architectures: amd64
Signed-By: /usr/share/keyrings/nodesource.gpg
"""

# Third-party repos that name the codename itself, to tempt a naive parser.
DISTRACTING_LIST = """\
# deb http://commented.example/debian bookworm main
deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main
deb [arch=amd64 signed-by=/etc/apt/keyrings/docker.gpg] https://download.docker.com/linux/debian bookworm stable
deb https://deb.nodesource.com/node_18.x bookworm main
deb-src http://deb.debian.org/debian bookworm main
"""

ONE_LINE_DEBIAN = """\
deb http://ftp.de.debian.org/debian/ bookworm main contrib non-free-firmware
deb http://ftp.de.debian.org/debian/ bookworm-updates main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://security.debian.org/debian-security bookworm-security main
"""


# --- apt sources -----------------------------------------------------------------


def test_parse_sources_list_skips_comments_src_and_options() -> None:
    entries = aptsources.parse_sources_list(DISTRACTING_LIST + ONE_LINE_DEBIAN)
    assert [e.uri for e in entries] == [
        "https://packages.cloud.google.com/apt",
        "https://download.docker.com/linux/debian",
        "https://deb.nodesource.com/node_18.x",
        "http://ftp.de.debian.org/debian/",
        "http://ftp.de.debian.org/debian/",
        "http://security.debian.org/debian-security",
    ]
    assert entries[1] == AptSource(
        "https://download.docker.com/linux/debian", ("bookworm",), ("stable",)
    )


def test_parse_deb822_multi_suite_comments_and_disabled() -> None:
    text = (
        HOST_DEB822
        + "\n"
        + NODESOURCE_DEB822
        + "\nTypes: deb\nURIs: http://off.example/debian\nSuites: bookworm\n"
        + "Components: main\nEnabled: no\n"
        + "\nTypes: deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm\n"
        + "Components: main\n"
    )
    assert aptsources.parse_deb822_sources(text) == [
        AptSource("http://deb.debian.org/debian", ("bookworm", "bookworm-updates"), ("main",)),
        AptSource("http://deb.debian.org/debian-security", ("bookworm-security",), ("main",)),
        AptSource("https://deb.nodesource.com/node_20.x", ("nodistro",), ("main",)),
    ]


def test_parse_deb822_continuation_lines_and_several_uris() -> None:
    text = "types: deb\nURIs: http://a.example/debian\n http://b.example/debian\nSuites: bookworm\nComponents: main\n"
    assert [e.uri for e in aptsources.parse_deb822_sources(text)] == [
        "http://a.example/debian",
        "http://b.example/debian",
    ]


def test_pick_host_mirrors_from_deb822() -> None:
    sources = aptsources.parse_deb822_sources(HOST_DEB822 + "\n" + NODESOURCE_DEB822)
    assert aptsources.pick_debian_mirrors(sources, "bookworm") == DebianMirrors(
        "http://deb.debian.org/debian", "http://deb.debian.org/debian-security"
    )


def test_pick_ignores_third_party_repos_serving_the_codename() -> None:
    distracting = aptsources.parse_sources_list(DISTRACTING_LIST)
    assert aptsources.pick_debian_mirrors(distracting, "bookworm") is None
    mirrors = aptsources.pick_debian_mirrors(
        distracting + aptsources.parse_sources_list(ONE_LINE_DEBIAN), "bookworm"
    )
    assert mirrors == DebianMirrors(
        "http://ftp.de.debian.org/debian", "http://security.debian.org/debian-security"
    )


def test_pick_accepts_snapshot_and_local_mirrors_first_wins() -> None:
    sources = [
        AptSource("http://snapshot.debian.org/archive/debian/20250520T000000Z/", ("bookworm",),
                  ("main",)),
        AptSource("http://mirror.lan/debian", ("bookworm",), ("main",)),
    ]  # fmt: skip
    picked = aptsources.pick_debian_mirrors(sources, "bookworm")
    assert picked == DebianMirrors(
        "http://snapshot.debian.org/archive/debian/20250520T000000Z", None
    )
    assert aptsources.pick_debian_mirrors(sources[1:], "bookworm") == DebianMirrors(
        "http://mirror.lan/debian", None
    )
    # Another codename is not this one.
    assert aptsources.pick_debian_mirrors(sources, "trixie") is None


def test_host_debian_mirrors_reads_both_formats(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text("# empty since bookworm\n")
    (tmp_path / "sources.list.d" / "debian.sources").write_text(HOST_DEB822)
    (tmp_path / "sources.list.d" / "nodesource.sources").write_text(NODESOURCE_DEB822)
    (tmp_path / "sources.list.d" / "google-cloud-sdk.list").write_text(DISTRACTING_LIST)
    # apt ignores other suffixes; so do we.
    (tmp_path / "sources.list.d" / "x.list.disabled").write_text(ONE_LINE_DEBIAN)
    assert aptsources.host_debian_mirrors("bookworm", tmp_path) == DebianMirrors(
        "http://deb.debian.org/debian", "http://deb.debian.org/debian-security"
    )


def test_host_debian_mirrors_one_line_only(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text(ONE_LINE_DEBIAN)
    assert (
        aptsources.host_debian_mirrors("bookworm", tmp_path).mirror
        == "http://ftp.de.debian.org/debian"
    )


def test_host_debian_mirrors_none_found(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text(DISTRACTING_LIST)
    with pytest.raises(VmbuildError, match="no Debian mirror serving bookworm") as info:
        aptsources.host_debian_mirrors("bookworm", tmp_path)
    assert info.value.hint is not None and "--mirror" in info.value.hint


def test_explicit_mirror_gets_conventional_security() -> None:
    assert aptsources.mirrors_for("http://m.example/debian/", "bookworm") == DebianMirrors(
        "http://m.example/debian", "http://m.example/debian-security"
    )
    assert aptsources.mirrors_for("http://m.example/pub/deb", "bookworm") == DebianMirrors(
        "http://m.example/pub/deb", None
    )


def test_apt_source_lines() -> None:
    mirrors = DebianMirrors("http://m/debian", "http://m/debian-security")
    assert aptsources.apt_source_lines(mirrors, "bookworm") == [
        "deb http://m/debian bookworm main",
        "deb http://m/debian bookworm-updates main",
        "deb http://m/debian-security bookworm-security main",
    ]
    assert len(aptsources.apt_source_lines(DebianMirrors("http://m/debian", None), "bookworm")) == 2


# --- cache key -------------------------------------------------------------------


def test_cache_key_is_stable() -> None:
    key = bi.base_cache_key("debian-12", "http://m/debian", ["b", "a"])
    assert key == bi.base_cache_key("debian-12", "http://m/debian/", ("a", "b", "a"))
    assert len(key) == 64 and int(key, 16) >= 0


def test_cache_key_is_sensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    key = bi.base_cache_key("debian-12", "http://m/debian", ["a"])
    others = {
        bi.base_cache_key("debian-13", "http://m/debian", ["a"]),
        bi.base_cache_key("debian-12", "http://n/debian", ["a"]),
        bi.base_cache_key("debian-12", "http://m/debian", ["a", "b"]),
        bi.base_cache_key("debian-12", "http://m/debian", ["a"], security_mirror="http://s"),
    }
    monkeypatch.setattr(bi, "BUILD_METHOD_VERSION", bi.BUILD_METHOD_VERSION + 1)
    others.add(bi.base_cache_key("debian-12", "http://m/debian", ["a"]))
    assert key not in others and len(others) == 5


# --- checksum files --------------------------------------------------------------

SHA256 = "a" * 64
SHA512 = "B" * 128


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"{'0' * 64}  other.qcow2\n{SHA256}  disk.qcow2\n", ("sha256", SHA256)),
        (f"{SHA256} *disk.qcow2\n", ("sha256", SHA256)),
        (f"{SHA512}  ./disk.qcow2\n", ("sha512", SHA512.lower())),
        (f"SHA512 (disk.qcow2) = {SHA512}\n", ("sha512", SHA512.lower())),
        (f"-----BEGIN PGP SIGNED MESSAGE-----\n\n{SHA256}  disk.qcow2\n", ("sha256", SHA256)),
    ],
)
def test_parse_checksum_file(text: str, expected: tuple[str, str]) -> None:
    assert bi.parse_checksum_file(text, "disk.qcow2") == expected


def test_parse_checksum_file_matches_whole_names_only() -> None:
    with pytest.raises(VmbuildError, match=r"no checksum for 'disk\.qcow2'"):
        bi.parse_checksum_file(f"{SHA256}  disk.qcow2.tar.xz\n", "disk.qcow2")


def test_fetch_requires_a_wellformed_checksum() -> None:
    with pytest.raises(VmbuildError, match="without a checksum"):
        bi.fetch_base("file:///nonexistent.qcow2")
    with pytest.raises(VmbuildError, match="64 hex digits"):
        bi.fetch_base("file:///nonexistent.qcow2", sha256="abc")


# --- argv and file contents ------------------------------------------------------

UUID = "0b8ca0c5-5e2c-4b5f-9c1e-2d3f4a5b6c7d"


def test_mmdebstrap_argv() -> None:
    mirrors = DebianMirrors("http://m/debian", "http://m/debian-security")
    argv = debian_base.mmdebstrap_argv(
        "bookworm", Path("/w/rootfs"), mirrors, ["pkg-a", "pkg-b"],
        hook=Path("/d/hook.sh"), debs_in=Path("/c/debs"), debs_out=Path("/w/my debs"),
    )  # fmt: skip
    assert argv == [
        "mmdebstrap", "--mode=root", "--variant=minbase", "--format=directory",
        "--arch=amd64", "--include=pkg-a,pkg-b", "--skip=essential/unlink",
        '--setup-hook=mkdir -p "$1"/var/cache/apt/archives',
        "--setup-hook=sync-in /c/debs /var/cache/apt/archives/",
        '--essential-hook=sh /d/hook.sh essential "$1"',
        '--customize-hook=sh /d/hook.sh customize "$1"',
        "--customize-hook=sync-out /var/cache/apt/archives '/w/my debs'",
        "bookworm", "/w/rootfs",
        "deb http://m/debian bookworm main",
        "deb http://m/debian bookworm-updates main",
        "deb http://m/debian-security bookworm-security main",
    ]  # fmt: skip


def test_default_packages_cover_cloud_init_needs() -> None:
    for needed in ("linux-image-cloud-amd64", "grub-pc-bin", "cloud-init", "openssh-server",
                   "cloud-guest-utils", "systemd-resolved", "qemu-guest-agent"):  # fmt: skip
        assert needed in bi.DEBIAN_PACKAGES


def test_sfdisk() -> None:
    assert debian_base.sfdisk_argv(Path("/w/disk.raw")) == [
        "sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", "/w/disk.raw",
    ]  # fmt: skip
    assert debian_base.sfdisk_script(UUID) == (
        "label: dos\nlabel-id: 0x0b8ca0c5\nunit: sectors\n\nstart=2048, type=83, bootable\n"
    )


def test_mke2fs_argv() -> None:
    argv = debian_base.mke2fs_argv(Path("/w/disk.raw"), Path("/w/rootfs"), UUID)
    assert argv == [
        "mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-O", "^metadata_csum_seed",
        "-L", "root", "-U", UUID, "-E", "offset=1048576", "-d", "/w/rootfs", "/w/disk.raw",
        "524032",
    ]  # fmt: skip
    # The filesystem ends exactly at the end of the disk.
    assert 1048576 + 524032 * 4096 == 2 * 1024**3
    assert debian_base.mke2fs_argv(Path("d"), Path("r"), UUID, 4 * 1024**3)[-1] == "1048320"


def test_grub_mkimage_argv() -> None:
    argv = debian_base.grub_mkimage_argv(Path("/r/usr/lib/grub/i386-pc"), Path("/w/core.img"),
                                Path("/w/early.cfg"))  # fmt: skip
    assert argv[:11] == [
        "grub-mkimage", "-O", "i386-pc", "-d", "/r/usr/lib/grub/i386-pc", "-o", "/w/core.img",
        "-c", "/w/early.cfg", "-p", "/boot/grub",
    ]  # fmt: skip
    assert {"biosdisk", "part_msdos", "ext2", "search_fs_uuid", "normal", "linux",
            "serial"} <= set(argv[11:])  # fmt: skip


def test_dd_argv() -> None:
    assert debian_base.dd_argv(Path("/r/boot.img"), Path("/w/d.raw"), bs=440, count=1) == [
        "dd", "if=/r/boot.img", "of=/w/d.raw", "bs=440", "count=1", "conv=notrunc", "status=none",
    ]  # fmt: skip
    assert debian_base.dd_argv(Path("/w/core.img"), Path("/w/d.raw"), bs=512, seek=1) == [
        "dd", "if=/w/core.img", "of=/w/d.raw", "bs=512", "seek=1", "conv=notrunc", "status=none",
    ]  # fmt: skip


def test_grub_configs() -> None:
    assert debian_base.grub_early_config(UUID) == (
        f"search.fs_uuid {UUID} root\nset prefix=($root)/boot/grub\n"
    )
    cfg = debian_base.grub_config(UUID, "Debian GNU/Linux 12 (bookworm)")
    assert "terminal_output serial console\n" in cfg
    assert "set timeout=0\n" in cfg
    assert f"\tlinux /vmlinuz root=UUID={UUID} ro console=tty0 console=ttyS0,115200n8\n" in cfg
    assert "\tinitrd /initrd.img\n" in cfg


def test_customize_hook_is_packaged_and_strict() -> None:
    text = bi._HOOK.read_text()
    assert text.startswith("#!/bin/sh") and "set -eu" in text
    assert "datasource_list: [ NoCloud, Ec2, None ]" in text


# --- mounts ------------------------------------------------------------------------

MOUNTINFO = """\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
42 27 0:39 / /c/bases/.tmp-1/rootfs/dev/pts rw - devpts none rw
45 27 0:40 / /c/bases/.tmp-1/rootfs/proc ro - proc proc ro
46 27 0:41 / /c/bases/.tmp-10/rootfs/proc ro - proc proc ro
47 27 0:42 / /c/bases/.tmp-1/root\\040fs/sys ro - sysfs sys ro
"""


def test_mounts_under() -> None:
    assert bi.mounts_under(MOUNTINFO, Path("/c/bases/.tmp-1")) == [
        "/c/bases/.tmp-1/rootfs/dev/pts",
        "/c/bases/.tmp-1/root fs/sys",
        "/c/bases/.tmp-1/rootfs/proc",
    ]
    assert bi.mounts_under(MOUNTINFO, Path("/elsewhere")) == []


# --- the cache, resolve_base --------------------------------------------------------


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VMBUILD_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "bases"


def _fake_base(bases: Path, name: str, **meta: Any) -> Path:
    d = bases / name
    d.mkdir(parents=True)
    (d / "disk.qcow2").write_bytes(b"QFI\xfb")
    full = {"disk": "disk.qcow2", "format": "qcow2", "sha256": "0" * 64, "source": "s",
            "virtual_size": 1024, **meta}  # fmt: skip
    (d / "meta.json").write_text(json.dumps(full))
    return d


def test_list_bases_skips_temp_broken_and_incomplete(cache: Path) -> None:
    _fake_base(cache, "debian-12-0123456789abcdef", source="debian-12 (mirror http://m)")
    _fake_base(cache, ".tmp-1-url-xyz")
    (cache / "broken").mkdir()
    (cache / "broken" / "meta.json").write_text("{not json")
    (_fake_base(cache, "url-0000") / "disk.qcow2").unlink()
    (bases,) = bi.list_bases()
    assert bases == bi.BaseImage(
        "debian-12-0123456789abcdef", cache / "debian-12-0123456789abcdef" / "disk.qcow2",
        "qcow2", "0" * 64, "debian-12 (mirror http://m)", 1024,
    )  # fmt: skip


def test_list_bases_without_cache(cache: Path) -> None:
    assert bi.list_bases() == []


def test_resolve_url_must_be_fetched_first(cache: Path, tmp_path: Path) -> None:
    url = "https://cloud.example/debian-12-genericcloud-amd64.qcow2"
    with pytest.raises(VmbuildError, match="not in the cache") as info:
        bi.resolve_base(url, recipe_dir=tmp_path)
    assert info.value.hint == f"run `vmbuild base fetch {url} --sha256 HEX` first"
    _fake_base(cache, "url-1111", urls=[url], created="2026-01-01T00:00:00+00:00")
    newer = _fake_base(cache, "url-2222", urls=[url], created="2026-02-01T00:00:00+00:00")
    assert bi.resolve_base(url, recipe_dir=tmp_path).path == newer / "disk.qcow2"


def test_resolve_unknown_release_and_missing_file(cache: Path, tmp_path: Path) -> None:
    with pytest.raises(VmbuildError, match="unknown base 'debian-11'"):
        bi.resolve_base("debian-11", recipe_dir=tmp_path)
    with pytest.raises(ConfigError, match="base image not found") as info:
        bi.resolve_base("images/base.qcow2", recipe_dir=tmp_path)
    assert info.value.file == str(tmp_path / "images/base.qcow2")


def test_build_debian_rejects_unknown_release() -> None:
    with pytest.raises(VmbuildError, match="unknown release 'ubuntu-24'"):
        bi.build_debian("ubuntu-24")


# --- fetch over file:// (real urllib and files; qemu-img faked) ----------------------


@pytest.fixture
def fake_qemu_img(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    calls: list[tuple[str, ...]] = []

    def qemu_img(*args: Any, timeout: float | None = None) -> str:
        calls.append(tuple(str(a) for a in args))
        assert args[:3] == ("info", "-U", "--output=json")
        return json.dumps({"format": "qcow2", "virtual-size": 2 * 1024**3})

    monkeypatch.setattr(bi, "qemu_img", qemu_img)
    return calls


def _leftovers(bases: Path) -> list[str]:
    return sorted(p.name for p in bases.iterdir() if not p.name.endswith(".lock"))


def test_fetch_file_url_verified_and_cached(
    cache: Path, tmp_path: Path, fake_qemu_img: list[tuple[str, ...]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    payload = b"QFI\xfb" + bytes(range(256)) * 9000  # > 1 MiB: several chunks
    src = tmp_path / "disk image.qcow2"
    src.write_bytes(payload)
    url = src.as_uri()
    digest = hashlib.sha256(payload).hexdigest()
    reporter = RecordingReporter()
    progress = reporter.transfers

    base = bi.fetch_base(url, sha256=digest.upper(), on_progress=reporter)

    assert base.id == f"url-{digest[:16]}" and base.sha256 == digest
    assert base.path == cache / base.id / "disk.qcow2" and base.path.read_bytes() == payload
    assert (base.format, base.virtual_size, base.source) == ("qcow2", 2 * 1024**3, url)
    assert progress[-1] == (len(payload), len(payload)) and len(progress) == 3
    meta = json.loads((cache / base.id / "meta.json").read_text())
    assert meta["urls"] == [url] and meta["sha256"] == digest
    assert _leftovers(cache) == [base.id]
    assert bi.list_bases() == [base]
    assert bi.resolve_base(url, recipe_dir=tmp_path) == base

    # Cached: no second download.
    monkeypatch.setattr(bi, "_download", lambda *a: pytest.fail("downloaded again"))
    assert bi.fetch_base(url, sha256=digest) == base


def test_fetch_with_checksum_file(
    cache: Path, tmp_path: Path, fake_qemu_img: list[tuple[str, ...]]
) -> None:
    payload = b"disk bytes"
    (tmp_path / "d.qcow2").write_bytes(payload)
    sums = tmp_path / "SHA512SUMS"
    sums.write_text(f"{'1' * 128}  other.qcow2\n{hashlib.sha512(payload).hexdigest()}  d.qcow2\n")
    base = bi.fetch_base((tmp_path / "d.qcow2").as_uri(), checksum_url=sums.as_uri())
    assert base.sha256 == hashlib.sha256(payload).hexdigest()
    meta = json.loads((base.path.parent / "meta.json").read_text())
    assert meta["sha512"] == hashlib.sha512(payload).hexdigest()


def test_fetch_wrong_checksum_keeps_nothing(
    cache: Path, tmp_path: Path, fake_qemu_img: list[tuple[str, ...]]
) -> None:
    src = tmp_path / "d.qcow2"
    src.write_bytes(b"tampered")
    actual = hashlib.sha256(b"tampered").hexdigest()
    with pytest.raises(VmbuildError) as info:
        bi.fetch_base(src.as_uri(), sha256="f" * 64)
    assert f"expected sha256 {'f' * 64}, got {actual}" in str(info.value)
    assert _leftovers(cache) == []
    assert fake_qemu_img == []  # never probed what failed verification


def test_fetch_missing_file_url(cache: Path, tmp_path: Path) -> None:
    with pytest.raises(VmbuildError, match="cannot download"):
        bi.fetch_base((tmp_path / "nope.qcow2").as_uri(), sha256="0" * 64)
    assert _leftovers(cache) == []


def test_fetch_rejects_other_schemes() -> None:
    with pytest.raises(VmbuildError, match="unsupported URL scheme 'ftp'"):
        bi.fetch_base("ftp://example/x.qcow2", sha256="0" * 64)
