"""Debian version ordering, as dpkg implements it: python-debian's `Version`
(a port of dpkg's lib/dpkg/version.c) does the comparing and splitting.

Only dpkg's acceptance rules are added here, where python-debian is more lenient:
an epoch is digits only, and the upstream version is not empty (so `x:1.0`,
`:1.0` and `-1` are invalid, as `dpkg --compare-versions` says).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

from debian.debian_support import Version

_DIGITS = frozenset("0123456789")  # dpkg's c_isdigit: ASCII only, unlike str.isdigit


class DebVersion(NamedTuple):
    epoch: int
    upstream: str
    revision: str


def _version(text: str) -> Version:
    stripped = text.strip()
    if not stripped:
        raise ValueError("empty version")
    head, sep, rest = stripped.partition(":")
    if sep and (not head or not set(head) <= _DIGITS):
        raise ValueError(f"invalid epoch in version {text!r}")
    if (rest if sep else stripped).startswith("-"):
        raise ValueError(f"empty upstream version in {text!r}")
    try:
        return Version(stripped)
    except ValueError:
        raise ValueError(f"invalid version {text!r}") from None


def parse(version: str) -> DebVersion:
    """Split a version into epoch, upstream version and revision (as dpkg does)."""
    v = _version(version)
    return DebVersion(int(v.epoch or 0), v.upstream_version or "", v.debian_revision or "")


def compare(a: str, b: str) -> int:
    """-1, 0 or 1 as version `a` sorts before, equal to or after `b` (dpkg --compare-versions)."""
    va, vb = _version(a), _version(b)
    return (va > vb) - (va < vb)


sort_key = functools.cmp_to_key(compare)
