"""The free-space scrub and the whole-disk secret scan on small ext4 disks the
test builds (mke2fs -d, sfdisk; no VM, no root): a deleted file's bytes are
found in free space, zeroed by the scrub, and live files are untouched."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

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
