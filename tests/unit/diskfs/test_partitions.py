"""Scanning a raw disk: holes skipped without reading, zero blocks dropped, memory bounded."""

from __future__ import annotations

import os
from pathlib import Path

from vmbuild.diskfs.partitions import ScanStats, block_indexes, data_extents, scan_blocks

BLOCK = 512 * 1024
MIB = 1024 * 1024


def seek_data_works(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_DATA) > 0
    except OSError:
        return False
    finally:
        os.close(fd)


def test_scan_yields_nonzero_blocks_in_order(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    with path.open("wb") as fh:
        fh.truncate(64 * MIB + 100)  # not a multiple of the block size
        fh.seek(3 * MIB + 10)
        fh.write(b"A" * BLOCK)  # straddles blocks 6 and 7
        fh.seek(10 * MIB)
        fh.write(bytes(2 * MIB))  # allocated zeros: 4 blocks read, none sent
        fh.seek(64 * MIB)
        fh.write(b"tail")  # in the last, partial block
    stats = ScanStats()
    blocks = list(scan_blocks(path, stats))
    assert [i for i, _ in blocks] == [6, 7, 128]
    assert all(len(data) == BLOCK for _, data in blocks)
    assert blocks[2][1][:4] == b"tail" and not any(blocks[2][1][4:])
    assert blocks[0][1][10:] == b"A" * (BLOCK - 10)
    assert stats.blocks_total == 129
    assert stats.blocks_data == 3
    assert stats.size == 64 * MIB + 100
    if seek_data_works(path):
        assert stats.blocks_zero == 4
        assert stats.blocks_read == 7  # the holes were never read
        assert 2 * MIB <= stats.allocated < 4 * MIB


def test_extents_and_indexes_never_repeat_a_block(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    with path.open("wb") as fh:
        fh.truncate(8 * MIB)
        for offset in (0, 64 * 1024, 300 * 1024, BLOCK + 4096):
            fh.seek(offset)
            fh.write(b"x" * 4096)
    fd = os.open(path, os.O_RDONLY)
    try:
        extents = list(data_extents(fd, 8 * MIB))
        indexes = list(block_indexes(fd, 8 * MIB))
    finally:
        os.close(fd)
    assert extents and all(a < b for a, b in extents)
    assert indexes == sorted(set(indexes))
    assert {0, 1} <= set(indexes)


def test_an_empty_sparse_disk_sends_nothing(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    with path.open("wb") as fh:
        fh.truncate(4 * 1024 * MIB)
    stats = ScanStats()
    assert list(scan_blocks(path, stats)) == []
    assert stats.blocks_total == 8192
    if seek_data_works(path) or stats.allocated == 0:
        assert stats.blocks_read == 0
