"""Which 512 KiB blocks of a raw disk hold something a machine booted from it can read.

An EBS snapshot must contain every block the guest may read, *whatever its content*: a block
missing from a snapshot reads as zeros only on an unencrypted volume, and as garbage on an
encrypted one (awslabs/coldsnap#395). So the choice of blocks comes from the file systems'
own allocation, never from the bytes:

- ext2/3/4: the block bitmaps (read by `dumpe2fs` at the partition's offset: libext2fs
  resolves BLOCK_UNINIT groups, flex_bg and 64-bit descriptors the way the kernel does).
  A block holding any file-system block in use is USED, zero or not (inode tables, the
  journal, zero-filled files that QEMU's discard turned into qcow2 holes).
- BIOS boot and EFI system partitions, and every partition vmbuild cannot read (XFS, Btrfs,
  LVM, swap, unknown): USED, whole.
- The partition tables themselves (the MBR, the GPT and its backup): USED.
- Everything else outside the file systems (the boot loader gap, unpartitioned space, the tail
  of a partition past its file system): PROBE, sent when it holds data, since no file system
  describes it and the boot loader may live there.
- Free space of a readable file system: FREE, never sent (nothing reads it as data, and
  deleted files there stay off the snapshot).
"""

from __future__ import annotations

import enum
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vmbuild.diskfs.partitions import BLOCK_SIZE, block_indexes
from vmbuild.diskfs.rootfs import (
    GPT_BIOS_BOOT,
    GPT_ESP,
    SECTOR,
    Partition,
    detect_filesystem,
    read_partition_table,
)
from vmbuild.errors import CommandError, VmbuildError
from vmbuild.run import run

log = logging.getLogger("vmbuild.diskfs")

EXT_KINDS = frozenset({"ext2", "ext3", "ext4"})
MBR_ESP = "0xef"
_FREE_LINE = re.compile(r"^\s+Free blocks:\s*(.*)$")
_HEADER = re.compile(r"^(Block count|Block size|First block):\s+(\d+)\s*$")
# GPT: header at LBA 1, entries normally LBA 2-33; the backup entries and header end the disk.
GPT_HEAD_BYTES = 34 * SECTOR


class BlockClass(enum.IntEnum):
    """What an upload does with one 512 KiB block."""

    FREE = 0  # only free space of readable file systems: skipped
    PROBE = 1  # outside every file system: sent when it holds data
    USED = 2  # holds something in use: always sent, zero or not


@dataclass(frozen=True)
class ExtAllocation:
    """The free space of one ext2/3/4 file system, in bytes relative to its start."""

    block_size: int
    block_count: int
    free: tuple[tuple[int, int], ...]  # (start, end) byte ranges, sorted, merged

    @property
    def size(self) -> int:
        return self.block_size * self.block_count

    @property
    def used_bytes(self) -> int:
        return self.size - sum(end - start for start, end in self.free)


@dataclass
class AllocationMap:
    """One class per block of the disk, plus a line per partition saying how it was read."""

    disk_size: int
    block_size: int
    classes: bytearray
    notes: list[str] = field(default_factory=list)

    @property
    def blocks_total(self) -> int:
        return len(self.classes)

    def count(self, cls: BlockClass) -> int:
        """How many blocks are of class `cls`."""
        return self.classes.count(cls)

    def mark(self, start: int, end: int, cls: BlockClass) -> None:
        """Raise every block touching bytes [start, end) to at least `cls`."""
        end = min(end, self.disk_size)
        if end <= start:
            return
        for index in range(start // self.block_size, (end - 1) // self.block_size + 1):
            if self.classes[index] < cls:
                self.classes[index] = cls

    def mark_free(self, ranges: list[tuple[int, int]]) -> None:
        """Lower to FREE the blocks lying entirely inside the (merged) byte ranges."""
        for start, end in _merge(ranges):
            first = -(-start // self.block_size)
            last = min(end, self.disk_size) // self.block_size  # exclusive
            for index in range(first, last):
                self.classes[index] = BlockClass.FREE

    @classmethod
    def uniform(
        cls, disk_size: int, what: BlockClass, block_size: int = BLOCK_SIZE
    ) -> AllocationMap:
        """Every block of the disk in one class (`upload_blocks: all` is uniform USED)."""
        blocks = -(-disk_size // block_size)
        return cls(disk_size, block_size, bytearray([what]) * blocks)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        elif end > start:
            merged.append((start, end))
    return merged


def parse_dumpe2fs(text: str) -> ExtAllocation:
    """The free byte ranges from `dumpe2fs` output (header plus per-group `Free blocks:`)."""
    header: dict[str, int] = {}
    free: list[tuple[int, int]] = []
    for line in text.splitlines():
        match = _HEADER.match(line)
        if match:
            header.setdefault(match[1], int(match[2]))
            continue
        match = _FREE_LINE.match(line)
        if match is None:
            continue
        for item in match[1].split(","):
            item = item.strip()
            if not item:
                continue
            first, _, last = item.partition("-")
            free.append((int(first), int(last or first) + 1))
    if "Block size" not in header or "Block count" not in header:
        raise ValueError("no block size or block count in dumpe2fs output")
    size = header["Block size"]
    return ExtAllocation(
        block_size=size,
        block_count=header["Block count"],
        free=tuple((start * size, end * size) for start, end in _merge(free)),
    )


def ext_allocation(raw: Path, offset: int, runner: Callable[..., object] = run) -> ExtAllocation:
    """Read the block bitmaps of the ext file system at byte `offset` of `raw`."""
    spec = f"{raw}?offset={offset}" if offset else str(raw)
    try:
        proc = runner(["dumpe2fs", spec], timeout=300, merge_stderr=False)
    except CommandError as exc:
        raise VmbuildError(f"cannot read the block bitmaps of {spec}: {exc}") from None
    try:
        return parse_dumpe2fs(str(getattr(proc, "stdout", "")))
    except ValueError as exc:
        raise VmbuildError(f"cannot read the block bitmaps of {spec}: {exc}") from None


def _whole_reason(part: Partition, kind: str) -> str | None:
    """Why a partition is sent whole (None: read its allocation)."""
    if part.type == GPT_BIOS_BOOT:
        return "BIOS boot partition"
    if part.type in (GPT_ESP, MBR_ESP):
        return "EFI system partition"
    if part.type in {"0x05", "0x0f", "0x85"}:
        return "extended partition (logical partitions are not read)"
    if kind not in EXT_KINDS:
        return f"{kind} file system: vmbuild cannot read its free space"
    return None


def _add_filesystem(
    amap: AllocationMap,
    raw: Path,
    start: int,
    limit: int,
    label: str,
    runner: Callable[..., object],
) -> None:
    """Classify the bytes [start, limit) holding one partition (or a partitionless disk)."""
    alloc = ext_allocation(raw, start, runner)
    fs_end = min(start + alloc.size, limit)
    amap.mark(start, fs_end, BlockClass.USED)
    # Only 512 KiB blocks lying wholly in free space go back to FREE: a block sharing a
    # single byte with a used file-system block stays USED.
    amap.mark_free([(start + s, min(start + e, fs_end)) for s, e in alloc.free])
    amap.notes.append(
        f"{label}: ext file system, {alloc.used_bytes >> 20} MiB of "
        f"{alloc.size >> 20} MiB in use (block bitmaps)"
    )


def allocation_map(
    raw: Path, *, block_size: int = BLOCK_SIZE, runner: Callable[..., object] = run
) -> AllocationMap:
    """Classify every block of the raw disk `raw` (see the module docstring)."""
    size = raw.stat().st_size
    amap = AllocationMap.uniform(size, BlockClass.PROBE, block_size)
    table = read_partition_table(raw)
    if table is None:
        kind = detect_filesystem(raw, 0).kind
        if kind in EXT_KINDS:
            _add_filesystem(amap, raw, 0, size, "whole disk", runner)
        else:
            amap.mark(0, size, BlockClass.USED)
            amap.notes.append(f"whole disk: no partition table, {kind}: sent whole")
        return amap
    amap.mark(0, SECTOR, BlockClass.USED)  # the MBR (boot code, partition table, signature)
    if table.kind == "gpt":
        amap.mark(0, GPT_HEAD_BYTES, BlockClass.USED)
        amap.mark(size - (GPT_HEAD_BYTES - SECTOR), size, BlockClass.USED)
    for part in table.partitions:
        start, end = part.start, min(part.start + part.size, size)
        if start >= size:
            continue
        label = f"partition {part.number}"
        kind = detect_filesystem(raw, start).kind
        reason = _whole_reason(part, kind)
        if reason is not None:
            amap.mark(start, end, BlockClass.USED)
            amap.notes.append(f"{label}: {reason}; sent whole ({(end - start) >> 20} MiB)")
            continue
        _add_filesystem(amap, raw, start, end, f"{label} ({kind})", runner)
    return amap


@dataclass
class SelectStats:
    """What a selection read: reported as blocks and bytes sent per reason."""

    size: int = 0  # virtual size of the raw disk
    allocated: int = 0  # bytes in the raw file's data extents
    blocks_total: int = 0
    blocks_used: int = 0  # in use by a file system or a partition sent whole: always sent
    blocks_outside: int = 0  # data outside every file system: sent
    blocks_free: int = 0  # file-system free space: never read


def select_blocks(
    raw: Path, amap: AllocationMap, stats: SelectStats | None = None
) -> Iterator[tuple[int, bytes | None]]:
    """(index, data) for every block that is not FREE, in index order, one at a time.

    USED blocks come with their bytes (a hole reads as zeros and is sent as zeros). PROBE
    blocks come with their bytes when they hold data, else with None: the caller decides
    (an incremental upload must still overwrite what its parent had there).
    """
    stats = stats if stats is not None else SelectStats()
    block = amap.block_size
    fd = os.open(raw, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size != amap.disk_size:
            raise VmbuildError(f"{raw}: the disk changed size since it was inspected")
        stats.size = size
        stats.blocks_total = amap.blocks_total
        has_data = bytearray(amap.blocks_total)
        for index in block_indexes(fd, size, block):
            has_data[index] = 1
        stats.allocated = _allocated(fd, size)
        zero = bytes(block)
        for index, cls in enumerate(amap.classes):
            if cls == BlockClass.FREE:
                stats.blocks_free += 1
                continue
            if cls == BlockClass.PROBE and not has_data[index]:
                yield index, None
                continue
            data = os.pread(fd, block, index * block).ljust(block, b"\0")
            if cls == BlockClass.USED:
                stats.blocks_used += 1
                yield index, data
            elif data != zero:
                stats.blocks_outside += 1
                yield index, data
            else:
                yield index, None
    finally:
        os.close(fd)


def _allocated(fd: int, size: int) -> int:
    from vmbuild.diskfs.partitions import data_extents

    return sum(end - start for start, end in data_extents(fd, size))
