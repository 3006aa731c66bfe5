"""Leave no deleted data in an image, and prove it.

`zero_free_space()` reads each ext file system's block bitmaps (the one
allocation reader, `diskfs.allocation.ext_allocation`) and punches holes in
the raw disk file over every free range, so the blocks a guest deleted (step
scripts, host keys, cloud-init's copy of the seed) read back as zeros; a
later `qemu-img convert` then stores none of them, and the output shrinks.
fstrim inside the guest cannot do this: qcow2 clusters are 64 KiB and a
partly used cluster is never discarded.

`scan_for_secrets()` then reads the *whole* disk, used and free blocks alike,
for byte strings that must not be there (the builder's keys, every secret
parameter value) and says where each one was found.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from vmbuild.diskfs.allocation import EXT_KINDS, ext_allocation
from vmbuild.diskfs.partitions import data_extents
from vmbuild.diskfs.rootfs import (
    DebugfsView,
    detect_filesystem,
    make_removable,
    read_partition_table,
)
from vmbuild.run import run

log = logging.getLogger("vmbuild.diskfs.scrub")

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
CHUNK = 8 << 20
# A needle shorter than this is not searched for in the raw disk: a short value
# occurs by chance in a disk of binaries, and a "found" nobody can act on is
# noise. Shorter secret values get `scan_text_files()` instead.
MIN_NEEDLE = 8
# Short values (MIN_TOKEN..MIN_NEEDLE-1 bytes) are searched for as whole words
# in the text files where configuration writes values: a component that puts a
# password into a config file, a user's dotfile, cloud-init's instance data or a
# log. Free space needs no such scan, it is zeroed before (zero_free_space).
# Whole words, so `hunter2` is found in `password = hunter2` but a 5-byte value
# is not "found" inside a longer identifier; text files only, because binaries
# hold every short byte string somewhere. Below MIN_TOKEN even a whole word
# matches by chance (`on`, `yes`, `1`), so such values are reported as not
# verifiable (a warning at build start) rather than failing builds at random.
MIN_TOKEN = 4
TEXT_DIRS = ("/etc", "/root", "/home", "/srv", "/var/lib/cloud", "/var/log")
MAX_TEXT_FILE = 16 << 20  # bigger files are not configuration

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


@dataclass(frozen=True)
class ScrubStats:
    filesystems: int
    free_bytes: int  # bytes of free space made to read as zeros
    notes: tuple[str, ...]


def _zero_range(fd: int, start: int, length: int) -> None:
    """Make [start, start+length) read as zeros: a hole where the host fs allows, else writes."""
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, start, length) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        raise OSError(err, os.strerror(err))
    zero = bytes(min(CHUNK, length))
    done = 0
    while done < length:
        n = os.pwrite(fd, zero[: min(CHUNK, length - done)], start + done)
        done += n


def zero_free_space(raw: Path, runner: Callable[..., object] = run) -> ScrubStats:
    """Zero the free blocks of every ext file system on the raw disk `raw` (in place)."""
    table = read_partition_table(raw)
    size = raw.stat().st_size
    spans = (
        [(0, size, "whole disk")]
        if table is None
        else [(p.start, p.start + p.size, f"partition {p.number}") for p in table.partitions]
    )
    notes = []
    total = count = 0
    fd = os.open(raw, os.O_RDWR)
    try:
        for start, end, label in spans:
            if start >= size:
                continue
            kind = detect_filesystem(raw, start).kind
            if kind not in EXT_KINDS:
                notes.append(f"{label}: {kind}, free space not scrubbed")
                continue
            alloc = ext_allocation(raw, start, runner)
            freed = 0
            for s, e in alloc.free:
                a, b = start + s, min(start + e, end, size)
                if b > a:
                    _zero_range(fd, a, b - a)
                    freed += b - a
            count += 1
            total += freed
            notes.append(f"{label} ({kind}): {freed >> 20} MiB of free space zeroed")
        os.fsync(fd)
    finally:
        os.close(fd)
    for note in notes:
        log.info("scrub: %s", note)
    return ScrubStats(count, total, tuple(notes))


@dataclass(frozen=True)
class Needle:
    label: str  # what it is, for the message: never the value itself
    value: bytes


@dataclass(frozen=True)
class Hit:
    label: str
    offset: int  # byte offset in the raw disk


def key_needles(label: str, openssh_text: str) -> list[Needle]:
    """Every base64 line of a key file (a private key is found even in pieces),
    or the blob of a one-line public key."""
    lines = [ln.strip() for ln in openssh_text.strip().splitlines()]
    if len(lines) == 1:
        parts = lines[0].split()
        blob = parts[1] if len(parts) > 1 else parts[0]
        return [Needle(label, blob.encode())]
    return [
        Needle(f"{label} (line {i})", ln.encode())
        for i, ln in enumerate(lines, 1)
        if len(ln) >= MIN_NEEDLE and not ln.startswith("-----")
    ]


def scan_for_secrets(raw: Path, needles: Iterable[Needle]) -> list[Hit]:
    """Every needle found anywhere in the raw disk (first offset of each); holes are skipped.

    One `bytes.find` per value and chunk, not one regex alternation of them all:
    find is a vectorized substring search, measured 0.48 s against 3.0 s for a
    533 MiB Debian disk and the builder's 11 key lines. A value is no longer
    searched for once found (only its first offset is reported), and the scan
    ends when every value was found.
    """
    by_value: dict[bytes, str] = {}
    for n in needles:
        if len(n.value) >= MIN_NEEDLE:
            by_value.setdefault(n.value, n.label)
    if not by_value:
        return []
    overlap = max(len(v) for v in by_value) - 1
    found: dict[bytes, int] = {}
    fd = os.open(raw, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        for start, end in data_extents(fd, size):
            pos = start
            carry = b""
            while pos < end and len(found) < len(by_value):
                chunk = os.pread(fd, min(CHUNK, end - pos), pos)
                if not chunk:
                    break
                # The carry (the previous chunk's tail) holds no whole match not
                # already found there: a match found now starts at its offset.
                data = carry + chunk
                base = pos - len(carry)
                for value in by_value.keys() - found.keys():
                    at = data.find(value)
                    if at >= 0:
                        found[value] = base + at
                carry = data[-overlap:] if overlap else b""
                pos += len(chunk)
    finally:
        os.close(fd)
    return sorted((Hit(by_value[v], off) for v, off in found.items()), key=lambda h: h.offset)


@dataclass(frozen=True)
class FileHit:
    label: str
    path: str  # the guest path of the text file that holds the value


def _word(value: bytes) -> bytes:
    return rb"(?<![A-Za-z0-9_])" + re.escape(value) + rb"(?![A-Za-z0-9_])"


def scan_text_files(
    fs: DebugfsView, needles: Iterable[Needle], workdir: Path, dirs: Iterable[str] = TEXT_DIRS
) -> list[FileHit]:
    """Short needles (MIN_TOKEN..MIN_NEEDLE-1 bytes) found as whole words in the
    text files under `dirs` of the file system `fs` (see MIN_TOKEN for why)."""
    wanted: dict[bytes, str] = {}
    for n in needles:
        if MIN_TOKEN <= len(n.value) < MIN_NEEDLE:
            wanted.setdefault(n.value, n.label)
    if not wanted:
        return []
    patterns = {v: re.compile(_word(v)) for v in wanted}
    hits: dict[tuple[str, str], None] = {}
    # The copy holds the guest's /etc (shadow included): a private dir, gone on return.
    with tempfile.TemporaryDirectory(prefix="secret-scan-", dir=workdir) as tmp:
        try:
            for i, guest_dir in enumerate(dirs):
                top = Path(tmp) / str(i)
                top.mkdir()
                fs.rdump([guest_dir], top)  # a missing dir leaves `top` empty
                for path in _text_files(top):
                    data = path.read_bytes()
                    # rdump puts /var/lib/cloud at top/cloud: its last component.
                    rel = path.relative_to(top).parts[1:]
                    guest = "/".join((guest_dir.rstrip("/"), *rel))
                    for value, pattern in patterns.items():
                        if pattern.search(data):
                            hits.setdefault((wanted[value], guest), None)
        finally:
            make_removable(Path(tmp))
    return sorted((FileHit(label, path) for label, path in hits), key=lambda h: (h.path, h.label))


def _text_files(top: Path) -> Iterable[Path]:
    """Regular files under `top` that look like text (no NUL in their first 8 KiB)."""
    make_removable(top)  # rdump keeps the guest's modes; a 0700 or 0000 dir is unreadable
    for dirpath, _dirs, files in os.walk(top):
        for name in files:
            path = Path(dirpath) / name
            st = path.lstat()
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_TEXT_FILE:
                continue
            # rdump keeps the guest's modes: a 0000 or 0600 file may not be
            # readable by a non-root owner until given back its read bit.
            os.chmod(path, stat.S_IMODE(st.st_mode) | stat.S_IRUSR)
            with path.open("rb") as fh:
                if b"\0" in fh.read(8192):
                    continue
            yield path
