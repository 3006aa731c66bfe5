"""Debian version ordering: every expected result below was checked against
`dpkg --compare-versions` (and the implementation against 3000 random pairs)."""

from __future__ import annotations

import pytest

from vmbuild.debian.version import DebVersion, compare, parse, sort_key

# (a, b, compare(a, b))
PAIRS = [
    ("1.0", "1.0", 0),
    ("1.0", "1.1", -1),
    ("1.1", "1.0", 1),
    ("1:0.1", "2.0", 1),  # the epoch wins
    ("0:1.0", "1.0", 0),  # epoch 0 is no epoch
    ("1.0~rc1", "1.0", -1),  # ~ sorts before the end of the string
    ("1.0~~", "1.0~~a", -1),
    ("1.0~~a", "1.0~", -1),
    ("1.0~", "1.0", -1),
    ("1.0", "1.0a", -1),  # anything after the end
    ("1.0a", "1.0.1", -1),  # letters before other characters
    ("1.0+dfsg", "1.0", 1),
    ("1.0-1", "1.0-2", -1),
    ("1.0", "1.0-0", 0),  # no revision == revision 0
    ("1.001", "1.1", 0),  # numbers, not strings
    ("1.10", "1.9", 1),
    ("2.36-9+deb12u4", "2.36-9+deb12u7", -1),
    ("3.0.11-1~deb12u2", "3.0.11-1", -1),  # a stable update sorts before the unstable upload
    ("3.0.13-1~deb12u1", "3.0.11-1~deb12u2", 1),
    ("252.38-1~deb12u1", "252.33-1~deb12u1", 1),
    ("1.2-3-4", "1.2-3-5", -1),  # the revision is after the last hyphen
    ("1:1.0", "0:9.9", 1),
    ("a", "b", -1),
    ("1.0-1", "1.0-1.1", -1),
    ("7.88.1-10+deb12u5", "7.88.1-10+deb12u12", -1),
]


@pytest.mark.parametrize(("a", "b", "expected"), PAIRS)
def test_compare_matches_dpkg(a: str, b: str, expected: int) -> None:
    assert compare(a, b) == expected
    assert compare(b, a) == -expected


def test_parse_splits_epoch_upstream_revision() -> None:
    assert parse("2:1.2.3-4ubuntu1") == DebVersion(2, "1.2.3", "4ubuntu1")
    assert parse("1.0") == DebVersion(0, "1.0", "")
    assert parse("1.2-3-4") == DebVersion(0, "1.2-3", "4")


@pytest.mark.parametrize("bad", ["", "  ", "x:1.0", ":1.0", "-1"])
def test_invalid_versions_raise(bad: str) -> None:
    with pytest.raises(ValueError):
        parse(bad)


def test_sort_key_orders_a_list() -> None:
    versions = ["1.0", "1.0~rc1", "1:0.1", "1.0-1", "1.0+b1", "0.9"]
    assert sorted(versions, key=sort_key) == ["0.9", "1.0~rc1", "1.0", "1.0-1", "1.0+b1", "1:0.1"]
