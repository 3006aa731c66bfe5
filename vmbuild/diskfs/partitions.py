"""Stream the non-zero 512 KiB blocks of a raw disk, in index order, in bounded memory.

Holes are skipped without reading them (SEEK_DATA/SEEK_HOLE); allocated blocks that are all
zeros are read and dropped, because an EBS snapshot reads unwritten blocks as zeros anyway.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BLOCK_SIZE = 512 * 1024


@dataclass
class ScanStats:
    """What a scan saw: reported as "bytes sent versus bytes allocated"."""

    size: int = 0  # virtual size of the raw disk
    allocated: int = 0  # bytes in data extents (what the file system stores)
    blocks_total: int = 0  # blocks the volume has
    blocks_read: int = 0  # blocks that intersect a data extent
    blocks_zero: int = 0  # read, but all zeros: skipped
    blocks_data: int = 0  # non-zero blocks: the ones an upload sends


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) byte ranges holding data; the whole file where SEEK_DATA is unsupported."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos: the rest is a hole
                return
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield pos, size
                return
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, min(end, size)
        pos = end


def block_indexes(fd: int, size: int, block_size: int = BLOCK_SIZE) -> Iterator[int]:
    """Indexes of blocks that intersect a data extent, ascending, each once."""
    last = -1
    for start, end in data_extents(fd, size):
        first = max(start // block_size, last + 1)
        for index in range(first, (end - 1) // block_size + 1):
            yield index
            last = index


def scan_blocks(
    path: Path, stats: ScanStats | None = None, block_size: int = BLOCK_SIZE
) -> Iterator[tuple[int, bytes]]:
    """Yield (index, data) for every non-zero block, padded to `block_size`, ascending.

    Memory: one block at a time. `stats` is filled in as the scan proceeds.
    """
    stats = stats if stats is not None else ScanStats()
    zero = bytes(block_size)
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        stats.size = size
        stats.blocks_total = -(-size // block_size)
        stats.allocated = sum(end - start for start, end in data_extents(fd, size))
        for index in block_indexes(fd, size, block_size):
            data = os.pread(fd, block_size, index * block_size)
            stats.blocks_read += 1
            if len(data) < block_size:  # the last block of a size not a multiple of 512 KiB
                data += bytes(block_size - len(data))
            if data == zero:
                stats.blocks_zero += 1
                continue
            stats.blocks_data += 1
            yield index, data
    finally:
        os.close(fd)
