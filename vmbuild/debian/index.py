"""A Debian mirror's metadata, read over http(s) or file:// without a VM: a suite's
Release file (when it changed, which indexes it lists) and its Packages indexes.

Layout (as apt reads it): `URI/dists/SUITE/Release` lists, with their SHA256, the
indexes `COMPONENT/binary-ARCH/Packages{.xz,.gz,}`; each index is deb822 stanzas
(Package, Version, Architecture, ...). Indexes listed in the Release are verified
against its SHA256 before they are read. deb822 parsing and version comparison are
python-debian's.
"""

from __future__ import annotations

import email.utils
import gzip
import hashlib
import io
import logging
import lzma
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from debian import deb822

from vmbuild import __version__
from vmbuild.debian import version as debversion
from vmbuild.debian.sources import AptSource, parse_sources_list
from vmbuild.errors import VmbuildError

log = logging.getLogger("vmbuild.debian.index")

MAX_INDEX_BYTES = 256 << 20  # a bookworm main Packages.xz is ~9 MB; refuse runaway downloads
TIMEOUT = 60.0
# Preferred first: what a mirror always serves and is smallest.
INDEX_SUFFIXES = (".xz", ".gz", "")

Fetch = Callable[[str], bytes]


class NotFound(VmbuildError):
    """The mirror has no such file (HTTP 404, or a missing file://)."""


def fetch_url(url: str, *, limit: int = MAX_INDEX_BYTES, timeout: float = TIMEOUT) -> bytes:
    """GET `url` (http, https or file) into memory; NotFound for a 404 / missing file."""
    scheme = urllib.parse.urlparse(url).scheme
    if scheme not in ("http", "https", "file"):
        raise VmbuildError(f"unsupported URL scheme {scheme!r}: {url}")
    request = urllib.request.Request(url, headers={"User-Agent": f"vmbuild/{__version__}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data: bytes = response.read(limit + 1)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise NotFound(f"{url}: not found") from None
        raise VmbuildError(f"cannot fetch {url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        if scheme == "file" and isinstance(exc.reason, FileNotFoundError | NotADirectoryError):
            raise NotFound(f"{url}: not found") from None
        raise VmbuildError(f"cannot fetch {url}: {exc.reason}") from None
    except (OSError, ValueError) as exc:
        raise VmbuildError(f"cannot fetch {url}: {exc}") from None
    if len(data) > limit:
        raise VmbuildError(f"{url}: larger than {limit >> 20} MiB, refusing")
    return data


@dataclass(frozen=True)
class Release:
    """A suite's Release file: its digest (any change shows), Date, and the indexes listed."""

    url: str
    sha256: str
    date: datetime | None
    files: dict[str, tuple[str, int]] = field(default_factory=dict)  # path -> (sha256, size)

    def to_json(self) -> dict[str, str | None]:
        return {
            "url": self.url,
            "sha256": self.sha256,
            "date": self.date.isoformat() if self.date else None,
        }


def parse_release(url: str, data: bytes) -> Release:
    """Parse a Release (or clearsigned InRelease) file: Date and the SHA256 list of
    index files (python-debian's deb822; the signature is stripped, not verified)."""
    release = deb822.Release(data, encoding="utf-8")
    date = None
    if (text := release.get("Date")) is not None:
        try:
            date = email.utils.parsedate_to_datetime(text.strip()).astimezone(UTC)
        except (TypeError, ValueError):
            log.warning("%s: unparsable Date %r", url, text.strip())
    files: dict[str, tuple[str, int]] = {}
    for entry in release.get("SHA256") or []:
        if str(entry.get("size", "")).isdigit():
            files[entry["name"]] = (entry["sha256"].lower(), int(entry["size"]))
    return Release(url, hashlib.sha256(data).hexdigest(), date, files)


def suite_url(uri: str, suite: str) -> str:
    return f"{uri.rstrip('/')}/dists/{suite}"


def fetch_release(uri: str, suite: str, fetch: Fetch = fetch_url) -> Release:
    """The suite's Release file (InRelease if the mirror has no plain Release)."""
    base = suite_url(uri, suite)
    try:
        return parse_release(f"{base}/Release", fetch(f"{base}/Release"))
    except NotFound:
        try:
            return parse_release(f"{base}/InRelease", fetch(f"{base}/InRelease"))
        except NotFound:
            raise VmbuildError(f"{base}: no Release or InRelease file") from None


def iter_stanzas(
    lines: Iterable[str], fields: Sequence[str] | None = None
) -> Iterator[dict[str, str]]:
    """deb822 stanzas (python-debian) as {field: first line of its value}: a
    Description's continuation lines are not needed here. `fields`: only those."""
    wanted = list(fields) if fields is not None else None
    paragraphs = deb822.Deb822.iter_paragraphs(lines, fields=wanted, use_apt_pkg=False)
    for paragraph in paragraphs:
        yield {key: value.split("\n", 1)[0].strip() for key, value in paragraph.items()}


PackageKey = tuple[str, str]  # (name, architecture)
INDEX_FIELDS = ("Package", "Version", "Architecture")  # all a version check reads


def newest_in_index(lines: Iterable[str], wanted: set[str] | None = None) -> dict[PackageKey, str]:
    """The highest version of each (package, architecture) in a Packages index."""
    newest: dict[PackageKey, str] = {}
    for stanza in iter_stanzas(lines, INDEX_FIELDS):
        name, version = stanza.get("Package"), stanza.get("Version")
        if not name or not version or (wanted is not None and name not in wanted):
            continue
        key = (name, stanza.get("Architecture", ""))
        current = newest.get(key)
        try:
            if current is None or debversion.compare(version, current) > 0:
                newest[key] = version
        except ValueError:
            log.warning("ignoring %s: invalid version %r", name, version)
    return newest


def _decompress(name: str, data: bytes) -> Iterator[str]:
    raw: io.BufferedIOBase
    if name.endswith(".xz"):
        raw = lzma.LZMAFile(io.BytesIO(data))  # noqa: SIM115 (closed below)
    elif name.endswith(".gz"):
        raw = gzip.GzipFile(fileobj=io.BytesIO(data))
    else:
        raw = io.BytesIO(data)
    with raw:
        try:
            yield from io.TextIOWrapper(raw, encoding="utf-8", errors="replace")
        except (lzma.LZMAError, OSError, EOFError) as exc:
            raise VmbuildError(f"{name}: corrupt index: {exc}") from None


def read_index(
    uri: str, suite: str, component: str, arch: str, release: Release | None,
    fetch: Fetch = fetch_url,
) -> tuple[str, Iterator[str]]:  # fmt: skip
    """(url, lines) of `component/binary-arch/Packages*`, verified against the Release."""
    base = suite_url(uri, suite)
    stem = f"{component}/binary-{arch}/Packages"
    listed = [s for s in INDEX_SUFFIXES if release is not None and stem + s in release.files]
    # An index the Release does not list is tried anyway (a test mirror without
    # checksums, a hand-made repository); one it lists must match its digest.
    for suffix in listed or INDEX_SUFFIXES:
        url = f"{base}/{stem}{suffix}"
        try:
            data = fetch(url)
        except NotFound:
            continue
        if listed and release is not None:
            digest, size = release.files[stem + suffix]
            if hashlib.sha256(data).hexdigest() != digest or len(data) != size:
                raise VmbuildError(
                    f"{url}: does not match its Release file (a mirror mid-update?)",
                    hint="try again in a few minutes",
                )
        return url, _decompress(url, data)
    raise VmbuildError(f"{base}: no {stem} index (.xz, .gz or plain)")


@dataclass(frozen=True)
class MirrorVersions:
    """The newest version of each package across a set of apt sources."""

    versions: dict[PackageKey, str]
    origins: dict[PackageKey, str]  # which index the newest version is in
    indexes: list[str]


def newest_versions(
    sources: Iterable[AptSource], archs: Iterable[str], wanted: set[str],
    fetch: Fetch = fetch_url,
) -> MirrorVersions:  # fmt: skip
    """Read every index the sources name (for each architecture) and keep the newest
    version of each wanted package, as apt's candidate would be without pinning."""
    versions: dict[PackageKey, str] = {}
    origins: dict[PackageKey, str] = {}
    indexes = []
    for source in sources:
        for suite in source.suites:
            release = None
            try:
                release = fetch_release(source.uri, suite, fetch)
            except VmbuildError as exc:
                log.warning("%s; reading its indexes unverified", exc)
            for component in source.components:
                for arch in sorted(set(archs)):
                    url, lines = read_index(source.uri, suite, component, arch, release, fetch)
                    indexes.append(url)
                    for key, version in newest_in_index(lines, wanted).items():
                        if key not in versions or debversion.compare(version, versions[key]) > 0:
                            versions[key], origins[key] = version, url
    return MirrorVersions(versions, origins, indexes)


def sources_from_lines(lines: Iterable[str]) -> list[AptSource]:
    return parse_sources_list("\n".join(lines))


@dataclass(frozen=True)
class Upgrade:
    name: str
    arch: str
    installed: str
    available: str
    index: str


def upgrades(packages: Iterable[dict[str, str]], mirror: MirrorVersions) -> list[Upgrade]:
    """Packages of an SBOM (name, version, arch) with a newer version in the mirror.

    `Architecture: all` packages sit in every binary-ARCH index, so they match
    whatever architecture they were read from.
    """
    found = []
    for pkg in packages:
        name, version, arch = pkg.get("name", ""), pkg.get("version", ""), pkg.get("arch", "")
        key = (name, arch)
        available = mirror.versions.get(key)
        if available is None:
            continue  # not from these sources (a third-party repository, a local .deb)
        try:
            newer = debversion.compare(available, version) > 0
        except ValueError:
            continue
        if newer:
            found.append(Upgrade(name, arch, version, available, mirror.origins[key]))
    return found
