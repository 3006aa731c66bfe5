"""The block-allocation map: file systems' bitmaps decide, never the blocks' content."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from vmbuild.diskfs.allocation import (
    AllocationMap,
    BlockClass,
    SelectStats,
    allocation_map,
    parse_dumpe2fs,
    select_blocks,
)
from vmbuild.diskfs.partitions import block_indexes, data_extents

BLOCK = 512 * 1024
MIB = 1024 * 1024

# Real dumpe2fs 1.47.0 output (trimmed) of a 55 MiB ext4 with 1 KiB blocks: group 1 is
# BLOCK_UNINIT, its metadata lives in group 0 (flex_bg), and libext2fs still lists it exactly.
DUMPE2FS = """\
Filesystem volume name:   <none>
Filesystem magic number:  0xEF53
Block count:              56320
First block:              1
Block size:               1024
Group 0: (Blocks 1-8192) csum 0x41df [ITABLE_ZEROED]
  Primary superblock at 1, Group descriptors at 2-2
  1320 free blocks, 1995 free inodes, 2 directories, 1995 unused inodes
  Free blocks: 6873-8192
  Free inodes: 14-2008
Group 1: (Blocks 8193-16384) csum 0xd550 [INODE_UNINIT, BLOCK_UNINIT, ITABLE_ZEROED]
  Free blocks: 8451-16384
  Free inodes: 2009-4016
Group 2: (Blocks 16385-24576) csum 0x4c2b [INODE_UNINIT, ITABLE_ZEROED]
  Free blocks: 20481-24576
Group 3: (Blocks 24577-32768) [INODE_UNINIT, BLOCK_UNINIT, ITABLE_ZEROED]
  Free blocks: 24835-32768
Group 4: (Blocks 32769-40960) [INODE_UNINIT, BLOCK_UNINIT, ITABLE_ZEROED]
  Free blocks: 32769-40960
Group 5: (Blocks 40961-49152) [INODE_UNINIT, BLOCK_UNINIT, ITABLE_ZEROED]
  Free blocks: 41219-49152
Group 6: (Blocks 49153-56319) [INODE_UNINIT, ITABLE_ZEROED]
  Free blocks: 49153-56319
"""


def test_dumpe2fs_free_ranges_are_parsed_and_merged() -> None:
    alloc = parse_dumpe2fs(DUMPE2FS)
    assert (alloc.block_size, alloc.block_count) == (1024, 56320)
    k = 1024
    assert alloc.free == (
        (6873 * k, 8193 * k),
        (8451 * k, 16385 * k),  # group 1's backup superblock and GDT are in use
        (20481 * k, 24577 * k),
        (24835 * k, 40961 * k),  # groups 3 and 4 touch: one range
        (41219 * k, 56320 * k),
    )
    # The superblock's own count of free blocks for this file system was 44577.
    assert alloc.used_bytes == (56320 - 44577) * k


def test_dumpe2fs_without_header_is_an_error() -> None:
    with pytest.raises(ValueError, match="block size"):
        parse_dumpe2fs("  Free blocks: 1-2\n")


def test_mark_raises_and_mark_free_lowers_only_whole_blocks() -> None:
    amap = AllocationMap.uniform(8 * BLOCK, BlockClass.PROBE)
    amap.mark(BLOCK - 1, BLOCK + 1, BlockClass.USED)  # touches blocks 0 and 1
    assert list(amap.classes) == [2, 2, 1, 1, 1, 1, 1, 1]
    # Two adjacent free ranges cover block 3 together; block 5 is only partly free.
    amap.mark_free(
        [(3 * BLOCK, 3 * BLOCK + 100), (3 * BLOCK + 100, 4 * BLOCK), (5 * BLOCK, 5 * BLOCK + 1)]
    )
    assert list(amap.classes) == [2, 2, 1, 0, 1, 1, 1, 1]
    assert amap.count(BlockClass.FREE) == 1


def mbr(partitions: list[tuple[int, int, int]]) -> bytes:
    sector = bytearray(512)
    for i, (ptype, lba, sectors) in enumerate(partitions):
        struct.pack_into(
            "<B3xB3xII", sector, 446 + 16 * i, 0x80 if i == 0 else 0, ptype, lba, sectors
        )
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def ext_superblock_at(fh: Any, offset: int) -> None:
    fh.seek(offset + 1024 + 56)
    fh.write(b"\x53\xef")
    fh.seek(offset + 1024 + 0x60)
    fh.write(struct.pack("<I", 0x40))  # extents: reported as ext4


def test_map_of_an_mbr_disk_with_ext4_swap_and_unpartitioned_space(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    with raw.open("wb") as fh:
        fh.truncate(32 * MIB)
        fh.write(mbr([(0x83, 2048, 16 * 2048), (0x82, 18 * 2048, 4 * 2048)]))
        ext_superblock_at(fh, MIB)
    calls: list[list[str]] = []

    def dumpe2fs(argv: list[str], **_kw: Any) -> Any:
        calls.append(argv)
        # 4 KiB blocks, 16 MiB: in use 0-255 (1 MiB) and 1024-1026; the rest free.
        return SimpleNamespace(
            stdout="Block count: 4096\nBlock size: 4096\nFirst block: 0\n"
            "  Free blocks: 256-1023, 1027-4095\n"
        )

    amap = allocation_map(raw, runner=dumpe2fs)
    assert calls == [["dumpe2fs", f"{raw}?offset={MIB}"]]
    classes = list(amap.classes)
    assert len(classes) == 64
    assert classes[0] == BlockClass.USED  # the MBR
    assert classes[1] == BlockClass.PROBE  # the boot loader gap: sent if it holds data
    assert classes[2:4] == [BlockClass.USED] * 2  # ext4 blocks 0-255
    assert classes[4:10] == [BlockClass.FREE] * 6
    assert classes[10] == BlockClass.USED  # blocks 1024-1026, all zero or not
    assert classes[11:34] == [BlockClass.FREE] * 23
    assert classes[34] == BlockClass.PROBE  # 17-18 MiB: unpartitioned
    assert classes[36:44] == [BlockClass.USED] * 8  # swap: unreadable, sent whole
    assert classes[44:] == [BlockClass.PROBE] * 20
    assert any(n.startswith("partition 2: unknown") and "sent whole" in n for n in amap.notes)


def test_a_disk_without_partition_table_or_known_fs_is_sent_whole(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(os.urandom(3 * BLOCK))

    def no_process(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("nothing to run for an unknown disk")

    amap = allocation_map(raw, runner=no_process)
    assert list(amap.classes) == [BlockClass.USED] * 3


def test_select_sends_used_zero_blocks_and_probes_the_rest(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    with raw.open("wb") as fh:
        fh.truncate(8 * BLOCK + 100)  # not a multiple of the block size
        fh.seek(BLOCK)
        fh.write(bytes(BLOCK))  # allocated zeros, USED: sent as zeros
        fh.seek(3 * BLOCK)
        fh.write(b"A" * 10)  # data outside the file systems: sent
        fh.seek(4 * BLOCK)
        fh.write(bytes(BLOCK))  # allocated zeros outside: nothing to send
        fh.seek(6 * BLOCK)
        fh.write(b"secret")  # free space: never read
        fh.seek(8 * BLOCK)
        fh.write(b"tail")
    amap = AllocationMap(
        8 * BLOCK + 100,
        BLOCK,
        bytearray(
            [
                BlockClass.USED,
                BlockClass.USED,
                BlockClass.USED,
                BlockClass.PROBE,
                BlockClass.PROBE,
                BlockClass.PROBE,
                BlockClass.FREE,
                BlockClass.FREE,
                BlockClass.PROBE,
            ]
        ),
    )
    stats = SelectStats()
    got = list(select_blocks(raw, amap, stats))
    assert [i for i, _ in got] == [0, 1, 2, 3, 4, 5, 8]
    data = dict(got)
    assert data[0] == data[1] == data[2] == bytes(BLOCK)  # a hole in a used block: zeros
    assert data[3] is not None and data[3][:10] == b"A" * 10 and len(data[3]) == BLOCK
    assert data[4] is None and data[5] is None
    assert data[8] is not None and data[8][:4] == b"tail" and not any(data[8][4:])
    assert (stats.blocks_used, stats.blocks_outside, stats.blocks_free) == (3, 2, 2)
    assert stats.blocks_total == 9


def test_select_refuses_a_disk_that_changed_size(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(BLOCK))
    amap = AllocationMap.uniform(2 * BLOCK, BlockClass.USED)
    with pytest.raises(Exception, match="changed size"):
        list(select_blocks(raw, amap))


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
