"""Read a raw disk image offline: partition table (MBR, GPT), file system superblocks, and
files inside ext2/3/4 through debugfs at the partition's byte offset.

No root, loop devices or NBD are needed: e2fsprogs' unix I/O manager opens
`disk.raw?offset=BYTES` directly. Only the parts of the image that are asked for are read.
"""

from __future__ import annotations

import os
import re
import stat
import struct
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from vmbuild.errors import CommandError, VmbuildError
from vmbuild.run import qemu_img, run

SECTOR = 512
Kind = Literal["file", "dir", "symlink", "other"]

GPT_LINUX = {
    "0fc63daf-8483-4772-8e79-3d69d8477de4",  # Linux filesystem data
    "4f68bce3-e8cd-4db1-96e7-fbcaf984b709",  # root (x86-64)
    "b921b045-1df0-41c3-af44-4c6f280d3fae",  # root (arm64)
    "44479540-f297-41b2-9af7-d131d5f0458a",  # root (x86)
}
GPT_ESP = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
GPT_BIOS_BOOT = "21686148-6449-6e6f-744e-656564454649"
MBR_LINUX = {0x83}
MBR_GPT_PROTECTIVE = 0xEE
MBR_EXTENDED = {0x05, 0x0F, 0x85}


@dataclass(frozen=True)
class Partition:
    """One partition: 1-based number, byte offset and size, type (MBR byte as 0xNN, or GUID)."""

    number: int
    start: int
    size: int
    type: str
    bootable: bool = False
    name: str = ""

    @property
    def is_linux(self) -> bool:
        return self.type in GPT_LINUX or self.type in {f"0x{t:02x}" for t in MBR_LINUX}


@dataclass(frozen=True)
class PartitionTable:
    """What the first sectors of the disk say."""

    kind: Literal["mbr", "gpt"]
    partitions: tuple[Partition, ...]
    disk_size: int
    boot_code: bytes  # the MBR's first 440 bytes (BIOS boot loader stage 1)


@dataclass(frozen=True)
class FsInfo:
    """A file system found at a partition's offset."""

    kind: str  # ext2 | ext3 | ext4 | xfs | btrfs | vfat | swap | lvm | unknown
    uuid: str = ""
    label: str = ""
    features: frozenset[str] = field(default_factory=frozenset)


def _guid(raw: bytes) -> str:
    return str(uuid.UUID(bytes_le=raw))


def image_partition_table(image: Path, image_format: str, scratch: Path) -> PartitionTable | None:
    """The partition table of a qcow2 or raw image, read from its first MiB (MBR, GPT
    header and entries), copied out as raw into `scratch` and removed again."""
    head = scratch / f"{image.name}-head.raw"
    try:
        qemu_img("dd", "-f", image_format, "-O", "raw", "bs=1M", "count=1",
                 f"if={image}", f"of={head}")  # fmt: skip
        return read_partition_table(head)
    finally:
        head.unlink(missing_ok=True)


def read_partition_table(path: Path) -> PartitionTable | None:
    """Parse the MBR, and the GPT behind a protective MBR; None when there is neither."""
    disk_size = path.stat().st_size
    with path.open("rb") as fh:
        mbr = fh.read(SECTOR)
        if len(mbr) < SECTOR or mbr[510:512] != b"\x55\xaa":
            return None
        entries = [mbr[446 + 16 * i : 462 + 16 * i] for i in range(4)]
        types = [e[4] for e in entries]
        if MBR_GPT_PROTECTIVE in types:
            fh.seek(SECTOR)
            header = fh.read(SECTOR)
            if header[:8] == b"EFI PART":
                entries_lba, count, entry_size = struct.unpack_from("<QII", header, 72)
                fh.seek(entries_lba * SECTOR)
                table = fh.read(min(count, 256) * entry_size)
                parts = []
                for i in range(min(count, 256)):
                    raw = table[i * entry_size : (i + 1) * entry_size]
                    if len(raw) < 128 or raw[:16] == bytes(16):
                        continue
                    first, last = struct.unpack_from("<QQ", raw, 32)
                    name = raw[56:128].decode("utf-16-le", "replace").rstrip("\0")
                    parts.append(
                        Partition(
                            i + 1,
                            first * SECTOR,
                            (last - first + 1) * SECTOR,
                            _guid(raw[:16]),
                            name=name,
                        )
                    )
                return PartitionTable("gpt", tuple(parts), disk_size, mbr[:440])
        parts = []
        for i, entry in enumerate(entries):
            status, ptype = entry[0], entry[4]
            lba, sectors = struct.unpack_from("<II", entry, 8)
            if ptype == 0 or sectors == 0:
                continue
            parts.append(
                Partition(
                    i + 1, lba * SECTOR, sectors * SECTOR, f"0x{ptype:02x}", bootable=status == 0x80
                )
            )
        return PartitionTable("mbr", tuple(parts), disk_size, mbr[:440])


_EXT_INCOMPAT = {
    0x4: "journal_dev",
    0x40: "extents",
    0x80: "64bit",
    0x200: "flex_bg",
    0x10000: "encrypt",
    0x8000: "inline_data",
    0x2000: "csum_seed",
}
_EXT_RO = {0x400: "metadata_csum", 0x8: "huge_file", 0x1000: "quota"}


def detect_filesystem(path: Path, offset: int) -> FsInfo:
    """Identify the file system at `offset` from its superblock magic."""
    with path.open("rb") as fh:
        fh.seek(offset)
        head = fh.read(0x10000 + 0x1000)
    if len(head) >= 2048 and head[1024 + 56 : 1024 + 58] == b"\x53\xef":
        sb = head[1024:2048]
        compat, incompat, ro = struct.unpack_from("<III", sb, 0x5C)
        features = {n for bit, n in _EXT_INCOMPAT.items() if incompat & bit}
        features |= {n for bit, n in _EXT_RO.items() if ro & bit}
        kind = "ext4" if incompat & 0x2C0 else "ext3" if compat & 0x4 else "ext2"
        label = sb[0x78:0x88].split(b"\0")[0].decode("utf-8", "replace")
        return FsInfo(kind, str(uuid.UUID(bytes=sb[0x68:0x78])), label, frozenset(features))
    if head[:4] == b"XFSB":
        label = head[108:120].split(b"\0")[0].decode("utf-8", "replace")
        return FsInfo("xfs", str(uuid.UUID(bytes=head[32:48])), label)
    btrfs = head[0x10000 : 0x10000 + 0x1000]
    if len(btrfs) > 0x200 and btrfs[0x40:0x48] == b"_BHRfS_M":
        label = btrfs[0x12B:0x22B].split(b"\0")[0].decode("utf-8", "replace")
        return FsInfo("btrfs", str(uuid.UUID(bytes=btrfs[0x20:0x30])), label)
    if head[0x52:0x57] == b"FAT32" or head[0x36:0x39] == b"FAT":
        return FsInfo("vfat")
    if head[4086:4096] == b"SWAPSPACE2":
        return FsInfo("swap")
    if head[512:520] == b"LABELONE":
        return FsInfo("lvm")
    return FsInfo("unknown")


class FilesystemView(Protocol):
    """Read-only access to a guest file system; paths are absolute, symlinks not followed."""

    def listdir(self, path: str) -> dict[str, Kind] | None:
        """Entries of a directory (None if it is missing or not a directory)."""
        ...

    def read(self, path: str) -> bytes | None:
        """Content of a regular file (None if missing)."""
        ...

    def readlink(self, path: str) -> str | None:
        """Target of a symlink (None if `path` is not one)."""
        ...


def kind_of(fs: FilesystemView, path: str) -> Kind | None:
    """The type of `path` without following a final symlink (None if missing)."""
    if path == "/":
        return "dir"
    parent, _, name = path.rstrip("/").rpartition("/")
    entries = fs.listdir(parent or "/")
    return None if entries is None else entries.get(name)


def resolve(fs: FilesystemView, path: str, *, follow_last: bool = True) -> str | None:
    """`path` with every symlink resolved inside the guest's root; None if it dangles.

    Debian's merged /usr makes /lib, /bin and /sbin symlinks: every lookup goes through here.
    """
    parts = [p for p in path.split("/") if p]
    current = ""
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            current = current.rpartition("/")[0]
            continue
        candidate = f"{current}/{part}"
        kind = kind_of(fs, candidate)
        if kind is None:
            return None
        if kind == "symlink" and (parts or follow_last):
            hops += 1
            target = fs.readlink(candidate)
            if target is None or hops > 40:
                return None
            if target.startswith("/"):
                current = ""
            parts = [p for p in target.split("/") if p] + parts
            continue
        current = candidate
    return current or "/"


def read_file(fs: FilesystemView, path: str) -> bytes | None:
    """Content of `path`, following symlinks like the guest's kernel would."""
    real = resolve(fs, path)
    return None if real is None else fs.read(real)


def exists(fs: FilesystemView, path: str) -> bool:
    """True if `path` exists once symlinks are followed (a dangling link does not count)."""
    return resolve(fs, path) is not None


def read_tree(fs: FilesystemView, top: str, max_file: int = 1 << 20) -> dict[str, bytes]:
    """Every regular file under the directory `top` up to `max_file` bytes, by
    guest path (symlinks not followed). A DebugfsView copies the tree out in one
    debugfs run; file by file, it would start a process for each file."""
    if isinstance(fs, DebugfsView):
        return fs.tree(top, max_file)
    out: dict[str, bytes] = {}
    for name, kind in sorted((fs.listdir(top) or {}).items()):
        path = f"{top.rstrip('/')}/{name}"
        if kind == "dir":
            out.update(read_tree(fs, path, max_file))
        elif kind == "file":
            data = fs.read(path)
            if data is not None and len(data) <= max_file:
                out[path] = data
    return out


def make_removable(top: Path) -> None:
    """Give every copied dir its owner's rwx back (a guest's 0555 dir blocks removal,
    a 0000 one reading); top-down, so each is opened after its mode is fixed."""
    for dirpath, dirs, _files in os.walk(top):
        for name in dirs:
            path = Path(dirpath) / name
            if not path.is_symlink():
                os.chmod(path, 0o700)


_LS_LINE = re.compile(r"^/(\d+)/(\d+)/\d+/\d+/(.*)/\d*/$")
_FAST_LINK = re.compile(r'Fast link dest: "(.*)"')


class DebugfsView:
    """FilesystemView of an ext2/3/4 file system inside a raw image, through debugfs."""

    def __init__(self, image: Path, offset: int, runner: Callable[..., object] = run) -> None:
        self.spec = f"{image}?offset={offset}" if offset else str(image)
        self._run = runner
        self._dirs: dict[str, dict[str, Kind] | None] = {}
        self._links: dict[str, str | None] = {}

    def _debugfs(self, request: str) -> str:
        try:
            proc = self._run(["debugfs", "-R", request, self.spec], timeout=120)
        except CommandError as exc:
            raise VmbuildError(f"cannot read the file system in {self.spec}: {exc}") from None
        return str(getattr(proc, "stdout", ""))

    @staticmethod
    def _quote(path: str) -> str:
        if any(c in path for c in '"\n'):
            raise VmbuildError(f"unsupported character in guest path {path!r}")
        return f'"{path}"'

    def listdir(self, path: str) -> dict[str, Kind] | None:
        if path in self._dirs:
            return self._dirs[path]
        out = self._debugfs(f"ls -p {self._quote(path)}")
        entries: dict[str, Kind] | None = None
        for line in out.splitlines():
            match = _LS_LINE.match(line)
            if not match:
                continue
            entries = entries if entries is not None else {}
            name, mode = match[3], int(match[2], 8)
            if name in (".", ".."):
                continue
            fmt = mode & 0o170000
            entries[name] = (
                "dir"
                if fmt == 0o040000
                else "file"
                if fmt == 0o100000
                else "symlink"
                if fmt == 0o120000
                else "other"
            )
        self._dirs[path] = entries
        return entries

    def _dump(self, path: str) -> bytes | None:
        with tempfile.TemporaryDirectory(prefix="vmbuild-debugfs-") as tmp:
            out = Path(tmp) / "file"
            self._debugfs(f"dump {self._quote(path)} {self._quote(str(out))}")
            return out.read_bytes() if out.exists() else None

    def rdump(self, paths: Sequence[str], dest: Path) -> None:
        """Copy the trees `paths` into `dest` in one debugfs run (a missing one is skipped)."""
        quoted = " ".join(self._quote(p) for p in (*paths, str(dest)))
        self._debugfs(f"rdump {quoted}")

    def tree(self, top: str, max_file: int) -> dict[str, bytes]:
        """read_tree's one-run copy: rdump into a private temp dir, read, removed."""
        out: dict[str, bytes] = {}
        with tempfile.TemporaryDirectory(prefix="vmbuild-debugfs-") as tmp:
            self.rdump([top], Path(tmp))  # a missing dir copies nothing
            make_removable(Path(tmp))  # the guest's modes came along: 0000 blocks reading
            for dirpath, _dirs, files in os.walk(tmp):
                here = Path(dirpath)
                for name in files:
                    path = here / name
                    st = path.lstat()
                    if not stat.S_ISREG(st.st_mode) or st.st_size > max_file:
                        continue
                    os.chmod(path, 0o600)
                    # rdump puts /etc/apt at tmp/apt: its last component.
                    rel = path.relative_to(tmp).parts[1:]
                    out["/".join((top.rstrip("/"), *rel))] = path.read_bytes()
        return out

    def read(self, path: str) -> bytes | None:
        if kind_of(self, path) != "file":
            return None
        return self._dump(path)

    def readlink(self, path: str) -> str | None:
        if path not in self._links:
            self._links[path] = self._readlink(path)
        return self._links[path]

    def _readlink(self, path: str) -> str | None:
        if kind_of(self, path) != "symlink":
            return None
        match = _FAST_LINK.search(self._debugfs(f"stat {self._quote(path)}"))
        if match:
            return match[1]
        data = self._dump(path)  # a slow symlink keeps its target in a data block
        return data.split(b"\0")[0].decode("utf-8", "replace") if data else None


def root_view(image: Path) -> DebugfsView:
    """The ext2/3/4 filesystem of the first Linux partition (or of a partitionless image)."""
    table = read_partition_table(image)
    if table is None:
        return DebugfsView(image, 0)
    for part in table.partitions:
        if part.is_linux:
            return DebugfsView(image, part.start)
    raise VmbuildError(f"{image}: no Linux partition in the {table.kind} partition table")
