"""Debian version ordering, as dpkg implements it (lib/dpkg/version.c).

`[epoch:]upstream[-revision]`: epochs compare as integers; upstream and revision
each alternate non-digit runs (letters before other characters, `~` before
everything, even the end of the string) and digit runs (numerically).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

_DIGITS = frozenset("0123456789")  # dpkg's c_isdigit: ASCII only, unlike str.isdigit


class DebVersion(NamedTuple):
    epoch: int
    upstream: str
    revision: str


def parse(version: str) -> DebVersion:
    """Split a version into epoch, upstream version and revision (as dpkg does)."""
    text = version.strip()
    if not text:
        raise ValueError("empty version")
    epoch = 0
    if ":" in text:
        head, text = text.split(":", 1)
        if not head or not set(head) <= _DIGITS:
            raise ValueError(f"invalid epoch in version {version!r}")
        epoch = int(head)
    upstream, sep, revision = text.rpartition("-")
    if not sep:
        upstream, revision = text, ""
    if not upstream:
        raise ValueError(f"empty upstream version in {version!r}")
    return DebVersion(epoch, upstream, revision)


def _order(c: str) -> int:
    """dpkg's order(): digits 0 (never compared here), letters their code, `~` -1,
    anything else after every letter; the end of the string is 0."""
    if not c or c in _DIGITS:
        return 0
    if c.isascii() and c.isalpha():
        return ord(c)
    if c == "~":
        return -1
    return ord(c) + 256


def _verrevcmp(a: str, b: str) -> int:
    i = j = 0
    while i < len(a) or j < len(b):
        first_diff = 0
        # A non-digit run, character by character ("" past the end orders 0).
        while (i < len(a) and a[i] not in _DIGITS) or (j < len(b) and b[j] not in _DIGITS):
            ac = _order(a[i] if i < len(a) else "")
            bc = _order(b[j] if j < len(b) else "")
            if ac != bc:
                return ac - bc
            i, j = i + 1, j + 1
        while i < len(a) and a[i] == "0":
            i += 1
        while j < len(b) and b[j] == "0":
            j += 1
        # A digit run: the longer number wins, else the first differing digit.
        while i < len(a) and a[i] in _DIGITS and j < len(b) and b[j] in _DIGITS:
            if not first_diff:
                first_diff = ord(a[i]) - ord(b[j])
            i, j = i + 1, j + 1
        if i < len(a) and a[i] in _DIGITS:
            return 1
        if j < len(b) and b[j] in _DIGITS:
            return -1
        if first_diff:
            return first_diff
    return 0


def compare(a: str, b: str) -> int:
    """<0, 0 or >0 as version `a` sorts before, equal to or after `b` (dpkg --compare-versions)."""
    va, vb = parse(a), parse(b)
    if va.epoch != vb.epoch:
        return -1 if va.epoch < vb.epoch else 1
    result = _verrevcmp(va.upstream, vb.upstream) or _verrevcmp(va.revision, vb.revision)
    return (result > 0) - (result < 0)


sort_key = functools.cmp_to_key(compare)
