"""A Debian mirror's Release and Packages files, read over file:// and a local HTTP
server, verified against the Release, compared with an image's SBOM."""

from __future__ import annotations

import hashlib
import lzma
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.support.pipeline import T0, http_mirror, pkg, write_mirror
from vmbuild.debian import index as apt
from vmbuild.errors import VmbuildError

RELEASE = b"""Origin: Debian
Suite: oldstable
Codename: bookworm
Date: Sat, 11 Jul 2026 10:16:37 UTC
Architectures: all amd64
Components: main
MD5Sum:
 0123 10 main/binary-amd64/Packages
SHA256:
 AAAA 1234 main/binary-amd64/Packages
 bbbb 99 main/binary-amd64/Packages.xz
"""


def test_parse_release() -> None:
    r = apt.parse_release("http://m/dists/bookworm/Release", RELEASE)
    assert r.date == datetime(2026, 7, 11, 10, 16, 37, tzinfo=UTC)
    assert r.files == {
        "main/binary-amd64/Packages": ("aaaa", 1234),
        "main/binary-amd64/Packages.xz": ("bbbb", 99),
    }  # the MD5Sum list is not mistaken for SHA256
    assert r.sha256 == hashlib.sha256(RELEASE).hexdigest()


def test_parse_inrelease_strips_the_signature() -> None:
    signed = (
        b"-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA512\n\n" + RELEASE
        + b"-----BEGIN PGP SIGNATURE-----\n\nabc\n-----END PGP SIGNATURE-----\n"
    )  # fmt: skip
    r = apt.parse_release("x/InRelease", signed)
    assert r.date is not None and len(r.files) == 2


def test_stanzas_skip_continuation_lines() -> None:
    text = "Package: a\nVersion: 1\nDescription: x\n more\n .\n\n\nPackage: b\nVersion: 2\n"
    assert list(apt.iter_stanzas(text.splitlines())) == [
        {"Package": "a", "Version": "1", "Description": "x"},
        {"Package": "b", "Version": "2"},
    ]


def test_newest_in_index_keeps_the_highest_version_per_arch() -> None:
    text = (
        "Package: libc6\nVersion: 2.36-9+deb12u4\nArchitecture: amd64\n\n"
        "Package: libc6\nVersion: 2.36-9+deb12u10\nArchitecture: amd64\n\n"
        "Package: libc6\nVersion: 2.36-9+deb12u99\nArchitecture: i386\n\n"
        "Package: tzdata\nVersion: 2025b-0+deb12u1\nArchitecture: all\n\n"
        "Package: other\nVersion: 1\nArchitecture: amd64\n"
    )
    got = apt.newest_in_index(text.splitlines(), wanted={"libc6", "tzdata"})
    assert got == {
        ("libc6", "amd64"): "2.36-9+deb12u10",  # u10 > u4: numbers, not strings
        ("libc6", "i386"): "2.36-9+deb12u99",
        ("tzdata", "all"): "2025b-0+deb12u1",
    }


@pytest.mark.parametrize("compression", ["xz", "gz", ""])
def test_read_a_file_mirror(tmp_path: Path, compression: str) -> None:
    uri = write_mirror(tmp_path, "bookworm", [pkg("bash", "5.2.15-2+b7")], compression=compression)
    release = apt.fetch_release(uri, "bookworm")
    assert release.date == T0
    url, lines = apt.read_index(uri, "bookworm", "main", "amd64", release)
    assert url.endswith("/main/binary-amd64/Packages" + (f".{compression}" if compression else ""))
    assert apt.newest_in_index(lines) == {("bash", "amd64"): "5.2.15-2+b7"}


def test_an_index_that_does_not_match_its_release_is_refused(tmp_path: Path) -> None:
    uri = write_mirror(tmp_path, "bookworm", [pkg("bash", "5.2")])
    index = tmp_path / "dists/bookworm/main/binary-amd64/Packages.xz"
    index.write_bytes(lzma.compress(b"Package: bash\nVersion: 9.9\nArchitecture: amd64\n"))
    release = apt.fetch_release(uri, "bookworm")
    with pytest.raises(VmbuildError, match="does not match its Release file"):
        apt.read_index(uri, "bookworm", "main", "amd64", release)


def test_an_unlisted_index_is_read_without_verification(tmp_path: Path) -> None:
    uri = write_mirror(tmp_path, "bookworm", [pkg("bash", "5.2")], listed=False)
    release = apt.fetch_release(uri, "bookworm")
    _url, lines = apt.read_index(uri, "bookworm", "main", "amd64", release)
    assert apt.newest_in_index(lines) == {("bash", "amd64"): "5.2"}


def test_missing_suite_and_index_are_clear_errors(tmp_path: Path) -> None:
    uri = write_mirror(tmp_path, "bookworm", [pkg("bash", "5.2")])
    with pytest.raises(VmbuildError, match="dists/trixie: no Release or InRelease file"):
        apt.fetch_release(uri, "trixie")
    with pytest.raises(VmbuildError, match="no contrib/binary-amd64/Packages index"):
        apt.read_index(uri, "bookworm", "contrib", "amd64", None)


def test_newest_versions_across_suites_over_http(tmp_path: Path) -> None:
    write_mirror(tmp_path / "debian", "bookworm", [pkg("openssl", "3.0.11-1~deb12u2"), pkg("bash", "5.2.15-2+b2")])  # fmt: skip
    write_mirror(tmp_path / "debian", "bookworm-updates", [pkg("openssl", "3.0.13-1~deb12u1")])
    with http_mirror(tmp_path) as base:
        sources = apt.sources_from_lines(
            [f"deb {base}/debian bookworm main", f"deb {base}/debian bookworm-updates main"]
        )
        mirror = apt.newest_versions(sources, {"amd64"}, {"openssl", "bash"})
    assert mirror.versions == {("openssl", "amd64"): "3.0.13-1~deb12u1", ("bash", "amd64"): "5.2.15-2+b2"}  # fmt: skip
    assert mirror.origins[("openssl", "amd64")].endswith("/bookworm-updates/main/binary-amd64/Packages.xz")  # fmt: skip
    assert len(mirror.indexes) == 2


def test_http_errors_are_clear(tmp_path: Path) -> None:
    with http_mirror(tmp_path) as base:
        with pytest.raises(apt.NotFound):
            apt.fetch_url(f"{base}/nothing")
        with pytest.raises(VmbuildError, match="no Release or InRelease"):
            apt.fetch_release(f"{base}/debian", "bookworm")
    with pytest.raises(VmbuildError, match="unsupported URL scheme 'ftp'"):
        apt.fetch_url("ftp://example.org/x")
    with pytest.raises(VmbuildError, match=r"cannot fetch http://127\.0\.0\.1:9/x"):
        apt.fetch_url("http://127.0.0.1:9/x", timeout=5)


def test_upgrades_compare_with_dpkg_ordering() -> None:
    mirror = apt.MirrorVersions(
        versions={("openssl", "amd64"): "3.0.13-1~deb12u1", ("bash", "amd64"): "5.2.15-2+b2",
                  ("tzdata", "all"): "2025b-0+deb12u1", ("old", "amd64"): "1.0"},
        origins={("openssl", "amd64"): "u", ("bash", "amd64"): "m", ("tzdata", "all"): "m",
                 ("old", "amd64"): "m"},
        indexes=[],
    )  # fmt: skip
    sbom = [
        pkg("openssl", "3.0.11-1~deb12u2"),  # newer in the mirror
        pkg("bash", "5.2.15-2+b2"),  # same
        pkg("tzdata", "2024a-0+deb12u1", "all"),  # newer, arch all
        pkg("old", "1.0+local1"),  # newer in the image than in the mirror
        pkg("docker-ce", "27.0"),  # not from this mirror
    ]
    found = apt.upgrades(sbom, mirror)
    assert [(u.name, u.installed, u.available) for u in found] == [
        ("openssl", "3.0.11-1~deb12u2", "3.0.13-1~deb12u1"),
        ("tzdata", "2024a-0+deb12u1", "2025b-0+deb12u1"),
    ]
