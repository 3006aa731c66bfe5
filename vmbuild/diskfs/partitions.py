"""Where a sparse raw disk file holds data (SEEK_DATA/SEEK_HOLE), in 512 KiB EBS blocks.

Which blocks an upload sends is decided by the file systems (`diskfs.allocation`), never by
their content: this module only tells where the file has data extents, so the bytes outside
every file system can be found without reading the holes.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

BLOCK_SIZE = 512 * 1024


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
