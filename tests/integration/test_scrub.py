"""The free-space scrub and the whole-disk secret scan on small ext4 disks the
test builds (mke2fs -d, sfdisk; no VM, no root): a deleted file's bytes are
found in free space, zeroed by the scrub, and live files are untouched."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmbuild.diskfs.rootfs import Kind
from vmbuild.diskfs.scrub import Needle, key_needles, scan_for_secrets, zero_free_space
from vmbuild.remote.keys import generate_ed25519

PARTITION_OFFSET = 1 << 20


def make_disk(tmp_path: Path, files: dict[str, bytes], *, partitioned: bool) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    for name, data in files.items():
        (root / name).write_bytes(data)
    disk = tmp_path / "disk.raw"
    size = 24 << 20
    subprocess.run(["truncate", "-s", str(size), disk], check=True)
    mke2fs = ["mke2fs", "-q", "-t", "ext4", "-b", "1024", "-d", root]
    if partitioned:
        subprocess.run(
            ["sfdisk", "-q", disk], input=b"label: dos\nstart=2048, type=83\n", check=True
        )
        fs_size = (size - PARTITION_OFFSET) // 1024
        mke2fs += ["-E", f"offset={PARTITION_OFFSET}", disk, str(fs_size)]
    else:
        mke2fs.append(disk)
    subprocess.run(mke2fs, check=True)
    return disk


def delete(disk: Path, name: str, *, partitioned: bool) -> None:
    spec = f"{disk}?offset={PARTITION_OFFSET}" if partitioned else str(disk)
    subprocess.run(["debugfs", "-w", "-R", f"rm /{name}", spec], check=True, capture_output=True)


def read_file(disk: Path, name: str, *, partitioned: bool) -> bytes:
    spec = f"{disk}?offset={PARTITION_OFFSET}" if partitioned else str(disk)
    return subprocess.run(
        ["debugfs", "-R", f"cat /{name}", spec], check=True, capture_output=True
    ).stdout


def locked_image(
    tmp_path: Path, files: dict[str, bytes], locked: str, links: dict[str, str] | None = None
) -> Path:
    """An ext4 image of `files` (and `links`) whose file `locked` is mode 0000 in
    a 0555 dir, as a guest may keep its secrets: a copy made as the owner must
    fix the modes before it can read or remove it."""
    root = tmp_path / "root"
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    for name, target in (links or {}).items():
        (root / name).symlink_to(target)
    (root / locked).chmod(0o000)
    (root / locked).parent.chmod(0o555)
    disk = tmp_path / "disk.raw"
    subprocess.run(["truncate", "-s", str(16 << 20), disk], check=True)
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-d", root, disk], check=True)
    (root / locked).parent.chmod(0o755)
    return disk


@pytest.mark.parametrize("partitioned", [True, False], ids=["mbr-partition", "whole-disk"])
def test_deleted_secrets_are_found_then_scrubbed(tmp_path: Path, partitioned: bool) -> None:
    host_key = generate_ed25519("vmbuild-host@test")
    secret = b"DbPassword=correct-horse-battery-staple"
    live = b"a live file that must survive the scrub\n" * 100
    # A deleted step script and a deleted copy of the seed's host key, padded so
    # their blocks are their own.
    disk = make_disk(
        tmp_path,
        {
            "live.txt": live,
            "step.sh": b"#!/bin/bash\necho " + secret + b"\n" + b"#" * 8000,
            "user-data.txt": host_key.private_openssh.encode() + b"\n" * 8000,
        },
        partitioned=partitioned,
    )
    delete(disk, "step.sh", partitioned=partitioned)
    delete(disk, "user-data.txt", partitioned=partitioned)
    needles = [
        Needle("secret parameter DbPassword", secret),
        *key_needles("builder host private key", host_key.private_openssh),
        *key_needles("builder host public key", host_key.public_openssh),
    ]
    before = scan_for_secrets(disk, needles)
    labels = {h.label for h in before}
    assert "secret parameter DbPassword" in labels
    assert any(label.startswith("builder host private key (line ") for label in labels)
    allocated_before = disk.stat().st_blocks

    stats = zero_free_space(disk)

    assert stats.filesystems == 1
    assert stats.free_bytes > 10 << 20
    assert scan_for_secrets(disk, needles) == []
    assert read_file(disk, "live.txt", partitioned=partitioned) == live
    assert disk.stat().st_blocks < allocated_before  # holes punched: the disk got smaller
    fsck = subprocess.run(
        ["e2fsck", "-fn", f"{disk}?offset={PARTITION_OFFSET}" if partitioned else disk],
        capture_output=True, text=True,
    )  # fmt: skip
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_short_values_are_not_searched_for(tmp_path: Path) -> None:
    disk = make_disk(tmp_path, {"a.txt": b"abc123\n"}, partitioned=False)
    assert scan_for_secrets(disk, [Needle("short secret", b"abc123")]) == []


def test_a_needle_across_chunk_boundaries_is_found(tmp_path: Path) -> None:
    from vmbuild.diskfs import scrub

    raw = tmp_path / "x.raw"
    value = b"0123456789-secret-value"
    boundary = scrub.CHUNK
    raw.write_bytes(b"\x01" * (boundary - 5) + value + b"\x01" * 100)
    (hit,) = scan_for_secrets(raw, [Needle("v", value)])
    assert hit.offset == boundary - 5


def test_short_values_are_found_as_whole_words_in_text_files(tmp_path: Path) -> None:
    """A secret too short for the raw-disk scan is still found where configuration
    puts values (a 0600 file in a 0555 dir, cloud-init's instance data), as a whole
    word in text; not inside a longer word, not in a binary, not outside the
    scanned dirs, and a value under MIN_TOKEN bytes is not searched for at all."""
    from vmbuild.diskfs.rootfs import root_view
    from vmbuild.diskfs.scrub import scan_text_files

    files = {
        "etc/app/db.conf": b"[db]\npassword = hunt3r\n",
        "etc/app/other.conf": b"user=hunt3rs\nx_hunt3r\n",  # inside longer words
        "etc/app/blob.bin": b"\0\x01hunt3r\0",  # binary: not text
        "var/lib/cloud/instance/user-data.txt": b"#cloud-config\npin: 4711x\n",
        "usr/share/doc/readme": b"hunt3r 4711x\n",  # outside the scanned dirs
        "etc/motd": b"on\n",
    }
    disk = locked_image(tmp_path, files, "etc/app/db.conf")
    work = tmp_path / "work"
    work.mkdir()

    hits = scan_text_files(
        root_view(disk),
        [
            Needle("DbPassword", b"hunt3r"),
            Needle("Pin", b"4711x"),
            Needle("Tiny", b"on"),
            Needle("Long enough for the raw scan", b"long-value-1"),
        ],
        work,
    )

    assert [(h.label, h.path) for h in hits] == [
        ("DbPassword", "/etc/app/db.conf"),
        ("Pin", "/var/lib/cloud/instance/user-data.txt"),
    ]
    assert list(work.iterdir()) == []  # the copy of the guest's files is gone


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    layout=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 300)), max_size=8),
    chunk=st.integers(16, 96),
)
def test_the_scan_reports_the_first_offset_of_every_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: list[tuple[int, int]], chunk: int
) -> None:
    """Against a plain search of the whole file: values placed anywhere (across
    chunk boundaries, overlapping, one inside another, repeated), small chunks."""
    from vmbuild.diskfs import scrub

    monkeypatch.setattr(scrub, "CHUNK", chunk)
    values = [b"secret-value-one", b"value-one", b"another-secret!", b"0123456789abcdefghij"]
    data = bytearray(b"\x01" * 400)
    for which, at in layout:
        data[at : at + len(values[which])] = values[which]
    raw = tmp_path / "x.raw"
    raw.write_bytes(bytes(data))
    needles = [Needle(f"v{i}", v) for i, v in enumerate(values)]
    expected = sorted(
        (scrub.Hit(f"v{i}", bytes(data).find(v)) for i, v in enumerate(values) if v in data),
        key=lambda h: h.offset,
    )
    assert sorted(scan_for_secrets(raw, needles), key=lambda h: (h.offset, h.label)) == sorted(
        expected, key=lambda h: (h.offset, h.label)
    )


def test_a_tree_is_read_in_one_debugfs_run_as_file_by_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """read_tree on a real ext4 image: the one-run copy (a 0555 dir holding a 0000
    file, a symlink not followed, a missing dir) reads what file-by-file reads."""
    from vmbuild.diskfs.rootfs import FilesystemView, read_tree, root_view

    files = {
        "etc/apt/apt.conf.d/90proxy": b'Acquire::http::Proxy "http://10.0.2.2:3142";\n',
        "etc/apt/sources.list.d/debian.sources": b"URIs: http://deb.debian.org/debian\n",
        "etc/apt/sources.list": b"",
        "etc/apt/big": b"x" * 4096,
    }
    disk = locked_image(
        tmp_path, files, "etc/apt/apt.conf.d/90proxy",
        links={"etc/apt/trusted.gpg.d": "/usr/share/keyrings"},
    )  # fmt: skip

    private = tmp_path / "tmp"  # where the copy is made: nothing is left there
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    view = root_view(disk)
    calls: list[str] = []
    debugfs = view._debugfs

    def counted(request: str) -> str:
        calls.append(request.split()[0])
        return debugfs(request)

    view._debugfs = counted  # type: ignore[method-assign]
    expected = {f"/{name}": data for name, data in files.items() if name != "etc/apt/big"}
    assert read_tree(view, "/etc/apt", max_file=1024) == expected
    assert calls == ["rdump"]

    class FileByFile:  # the same file system, through the protocol alone
        def __init__(self, inner: FilesystemView) -> None:
            self.inner = inner

        def listdir(self, path: str) -> dict[str, Kind] | None:
            return self.inner.listdir(path)

        def read(self, path: str) -> bytes | None:
            return self.inner.read(path)

        def readlink(self, path: str) -> str | None:
            return self.inner.readlink(path)

    assert read_tree(FileByFile(root_view(disk)), "/etc/apt", max_file=1024) == expected
    assert read_tree(view, "/no/such/dir") == {}
    assert list(private.iterdir()) == []
