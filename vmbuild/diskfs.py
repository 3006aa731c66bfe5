"""Read a disk image offline: partition table and files of an ext2/3/4 root.

No root, loop devices or NBD (none work in CI containers): the partition
table is parsed in Python and files are read with debugfs at the
partition's byte offset (`image?offset=N`, e2fsprogs' unix io option).
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

from vmbuild.errors import VmbuildError
from vmbuild.run import run

SECTOR = 512
LINUX_MBR_TYPES = {0x83}
GPT_LINUX_FS = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")
GPT_ROOT_X86_64 = uuid.UUID("4f68bce3-e8cd-4db1-96e7-fbcaf984b709")


@dataclass(frozen=True)
class Partition:
    number: int  # 1-based, as the kernel names them
    start: int  # bytes
    size: int  # bytes
    type: str  # "0x83" or a GPT type GUID
    bootable: bool
    linux: bool


@dataclass(frozen=True)
class PartitionTable:
    kind: str  # "mbr" | "gpt" | "none"
    partitions: tuple[Partition, ...]


def read_partition_table(image: Path) -> PartitionTable:
    """Parse the MBR (and the GPT behind a protective MBR) of a raw image."""
    with image.open("rb") as f:
        mbr = f.read(SECTOR)
        if len(mbr) < SECTOR or mbr[510:512] != b"\x55\xaa":
            return PartitionTable("none", ())
        entries = [mbr[446 + 16 * i : 446 + 16 * (i + 1)] for i in range(4)]
        if any(e[4] == 0xEE for e in entries):
            f.seek(SECTOR)
            return _read_gpt(f.read(SECTOR), f)
        parts = []
        for i, e in enumerate(entries):
            ptype = e[4]
            start, count = struct.unpack("<II", e[8:16])
            if ptype == 0 or count == 0:
                continue
            parts.append(
                Partition(
                    number=i + 1, start=start * SECTOR, size=count * SECTOR,
                    type=f"0x{ptype:02x}", bootable=e[0] == 0x80,
                    linux=ptype in LINUX_MBR_TYPES,
                )
            )  # fmt: skip
        return PartitionTable("mbr", tuple(parts))


def _read_gpt(header: bytes, f: object) -> PartitionTable:
    import io

    assert isinstance(f, io.BufferedReader)
    if header[:8] != b"EFI PART":
        return PartitionTable("none", ())
    entries_lba, count, entry_size = struct.unpack("<QII", header[72:88])
    f.seek(entries_lba * SECTOR)
    table = f.read(count * entry_size)
    parts = []
    for i in range(count):
        e = table[i * entry_size : (i + 1) * entry_size]
        type_guid = uuid.UUID(bytes_le=e[:16])
        if type_guid.int == 0:
            continue
        first, last = struct.unpack("<QQ", e[32:48])
        parts.append(
            Partition(
                number=i + 1, start=first * SECTOR, size=(last - first + 1) * SECTOR,
                type=str(type_guid), bootable=False,
                linux=type_guid in (GPT_LINUX_FS, GPT_ROOT_X86_64),
            )
        )  # fmt: skip
    return PartitionTable("gpt", tuple(parts))


class ExtFS:
    """Read-only access to an ext2/3/4 filesystem at an offset in a raw image."""

    def __init__(self, image: Path, offset: int) -> None:
        self.image = image
        self.offset = offset

    @classmethod
    def root_of(cls, image: Path) -> ExtFS:
        """The filesystem of the first Linux partition (or of a partitionless image)."""
        table = read_partition_table(image)
        if table.kind == "none":
            return cls(image, 0)
        for part in table.partitions:
            if part.linux:
                return cls(image, part.start)
        raise VmbuildError(f"{image}: no Linux partition in the {table.kind} partition table")

    def _debugfs(self, request: str) -> tuple[str, str]:
        result = run(
            ["debugfs", "-R", request, f"{self.image}?offset={self.offset}"],
            timeout=60,
            merge_stderr=False,
        )
        return result.stdout, result.stderr

    def read(self, path: str) -> bytes | None:
        """File content, or None when the path does not exist."""
        if self.stat_type(path) != "file":
            return None
        out, _ = self._debugfs(f"cat {path}")
        return out.encode("utf-8", "surrogateescape")

    def read_text(self, path: str) -> str | None:
        data = self.read(path)
        return None if data is None else data.decode("utf-8", "replace")

    def listdir(self, path: str) -> list[str] | None:
        out, err = self._debugfs(f"ls -p {path}")
        if "not found" in err or "Ext2 inode is not a directory" in err:
            return None
        names = []
        for line in out.splitlines():
            # /inode/mode/uid/gid/name/size/
            fields = line.strip().strip("/").split("/")
            if len(fields) >= 5 and fields[4] not in (".", "..", ""):
                names.append(fields[4])
        return names

    def stat_type(self, path: str) -> str | None:
        """ "file", "dir", "symlink", "other", or None when missing."""
        out, err = self._debugfs(f"stat {path}")
        if "not found" in err or "Type:" not in out:
            return None
        kind = out.split("Type:", 1)[1].split()[0]
        return {"regular": "file", "directory": "dir", "symlink": "symlink"}.get(kind, "other")

    def exists(self, path: str) -> bool:
        return self.stat_type(path) is not None
