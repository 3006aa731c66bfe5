"""Reading user files without trusting them: bounded size, regular files only,
and YAML whose nesting depth and alias expansion are limited before anything
builds Python objects from it.

The one YAML loader (vmbuild/yamlio.py), which every file kind goes through
(recipes, pipelines, distribution configs, component documents), reads with
`read_bytes()` and checks with `check_yaml()` before it builds any object:

* `/dev/zero`, a FIFO or a directory is refused from `stat()`, before `open()`
  (opening a FIFO for reading would block forever);
* a file larger than MAX_FILE_BYTES is refused without being read whole;
* the YAML event stream is walked iteratively (no recursion) to bound the
  depth (a 10,000-deep `[[[[...` would overflow the recursive composer) and
  the size of the document *with every alias expanded* (a "billion laughs"
  document is a few hundred bytes, and every consumer that walks it, from
  validation to rendering, would expand it);
* over-long scalars (a 5,000-digit integer hits Python's int-string limit)
  are refused with the same error as the rest.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import yaml

MAX_FILE_BYTES = 4 << 20
MAX_DEPTH = 64
MAX_NODES = 50_000  # scalars + collections, aliases expanded (real documents: a few thousand)
# libyaml's event parser, where PyYAML was built with it: the check reads the
# whole stream, and the C parser does that 25x faster than the Python one.
_EVENT_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
MAX_SCALAR = 1 << 20
MAX_NUMBER_DIGITS = 100


class UnsafeInput(ValueError):
    """The file or document exceeds a limit; the message says which."""


def read_bytes(path: Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """The content of a regular file of at most `limit` bytes."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise exc from None
    if stat.S_ISDIR(info.st_mode):
        raise UnsafeInput("is a directory, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeInput("not a regular file (a device, FIFO or socket)")
    if info.st_size > limit:
        raise UnsafeInput(f"larger than {limit >> 20} MiB")
    # O_NONBLOCK: if the path was swapped for a FIFO since stat(), open() must not hang.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafeInput("not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise UnsafeInput(f"larger than {limit >> 20} MiB")
    return data


def read_text(path: Path, limit: int = MAX_FILE_BYTES) -> str:
    """`read_bytes()` decoded as UTF-8 (UnicodeDecodeError is the caller's to report)."""
    return read_bytes(path, limit).decode("utf-8")


def check_yaml(text: str) -> None:
    """Raise UnsafeInput if parsing `text` into objects would exceed the limits.

    Syntax errors are left to the real parse (which reports them with a line).
    """
    if len(text) > MAX_FILE_BYTES:
        raise UnsafeInput(f"larger than {MAX_FILE_BYTES >> 20} MiB")
    # For each open collection: its anchor and its expanded size so far.
    open_anchors: list[str | None] = []
    open_sizes: list[int] = []
    anchors: dict[str, int] = {}
    total = 0

    def add(size: int, where: yaml.Event) -> None:
        nonlocal total
        if open_sizes:
            open_sizes[-1] += size
            grown = open_sizes[-1]
        else:
            total += size
            grown = total
        if grown > MAX_NODES:
            line = where.start_mark.line + 1 if where.start_mark else "?"
            raise UnsafeInput(
                f"line {line}: the document expands to more than {MAX_NODES} values "
                "(aliases of aliases?)"
            )

    try:
        for event in yaml.parse(text, Loader=_EVENT_LOADER):
            if isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent):
                open_anchors.append(event.anchor)
                open_sizes.append(1)
                if len(open_sizes) > MAX_DEPTH:
                    line = event.start_mark.line + 1 if event.start_mark else "?"
                    raise UnsafeInput(f"line {line}: nested deeper than {MAX_DEPTH} levels")
            elif isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
                anchor, size = open_anchors.pop(), open_sizes.pop()
                if anchor:
                    anchors[anchor] = size
                add(size, event)
            elif isinstance(event, yaml.ScalarEvent):
                _check_scalar(event)
                if event.anchor:
                    anchors[event.anchor] = 1
                add(1, event)
            elif isinstance(event, yaml.AliasEvent):
                add(anchors.get(event.anchor or "", 1), event)
    except yaml.YAMLError:
        return  # the real parse reports it, with its line and column


def _check_scalar(event: yaml.ScalarEvent) -> None:
    value = event.value
    line = event.start_mark.line + 1 if event.start_mark else "?"
    if len(value) > MAX_SCALAR:
        raise UnsafeInput(f"line {line}: a value longer than {MAX_SCALAR >> 20} MiB")
    # A plain scalar made of digits becomes an int: bound it before Python does
    # (int('9' * 5000) raises ValueError; a long one is a mistake anyway).
    if event.style is None and len(value) > MAX_NUMBER_DIGITS:
        digits = value.lstrip("+-").replace("_", "")
        if digits.isdigit() or digits.lower().startswith(("0x", "0o", "0b")):
            raise UnsafeInput(f"line {line}: a number with more than {MAX_NUMBER_DIGITS} digits")
