"""Offline CVE scan: an image's packages against the Debian security tracker's JSON export.

The tracker (https://security-tracker.debian.org/tracker/data/json) maps *source* package
-> CVE -> release codename -> {status, fixed_version, urgency}. A package is affected when
the CVE is open (or undetermined) in the image's release, or resolved in a version newer
than the installed one (dpkg ordering, from python-debian). Air-gapped hosts pass the file
with --data; online ones fetch it once a day into the user cache.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

from debian.debian_support import version_compare

from vmbuild import paths
from vmbuild.errors import VmbuildError
from vmbuild.manifest import Package
from vmbuild.run import write_atomic
from vmbuild.supply.sbom import DEBIAN_CODENAMES

log = logging.getLogger("vmbuild.supply.scan")
TRACKER_URL = "https://security-tracker.debian.org/tracker/data/json"
# An internal copy of the export (a mirror inside a restricted network) instead of Debian's.
ENV_TRACKER_URL = "VMBUILD_TRACKER_URL"
CACHE_MAX_AGE = 24 * 3600
# Tracker urgencies, lowest first; "unknown" covers "not yet assigned" and "end-of-life".
SEVERITIES = ("unknown", "unimportant", "low", "medium", "high")
MAX_TRACKER_BYTES = 2 << 30


class ScanError(VmbuildError):
    """The tracker data is missing or malformed; names the file."""


class ScanFailed(VmbuildError):
    """Findings at or above the configured severity: the build (or `scan`) fails."""


@dataclass(frozen=True)
class Finding:
    package: str
    version: str
    source: str
    cve: str
    severity: str
    status: str  # open | fixed (a fixed version exists) | undetermined
    fixed_version: str | None
    description: str = ""


@dataclass
class ScanResult:
    release: str
    data: str
    packages: int
    findings: list[Finding] = field(default_factory=list)
    fail_on: str | None = None

    @property
    def counts(self) -> dict[str, int]:
        found = {s: 0 for s in SEVERITIES}
        for f in self.findings:
            found[f.severity] += 1
        return found

    @property
    def failed(self) -> bool:
        return self.fail_on is not None and any(
            rank(f.severity) >= rank(self.fail_on) for f in self.findings
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "release": self.release,
            "data": self.data,
            "packages": self.packages,
            "counts": self.counts,
            "fail_on": self.fail_on,
            "failed": self.failed,
            "findings": [asdict(f) for f in self.findings],
        }


def rank(severity: str) -> int:
    return SEVERITIES.index(severity)


def severity_of(urgency: object) -> str:
    text = str(urgency or "").rstrip("*").strip().lower()
    return text if text in SEVERITIES else "unknown"


def load_tracker(path: Path) -> dict[str, Any]:
    """The tracker JSON from a file, checked for the shape the scan relies on."""
    try:
        size = path.stat().st_size
        if size > MAX_TRACKER_BYTES:
            raise ScanError(f"{path}: {size} bytes is larger than any tracker export")
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise ScanError(f"{path}: cannot read the tracker data: {exc.strerror}") from None
    except ValueError as exc:
        raise ScanError(
            f"{path}: not JSON ({exc})",
            hint="expected the Debian security tracker export (tracker/data/json)",
        ) from None
    if not _is_tracker(data):
        raise ScanError(f"{path}: not tracker data (expected {{package: {{CVE: {{...}}}}}})")
    return data


def _is_tracker(data: object) -> TypeGuard[dict[str, Any]]:
    return isinstance(data, dict) and all(isinstance(v, dict) for v in data.values())


def tracker_url() -> str:
    """Where the daily download comes from: `$VMBUILD_TRACKER_URL`, else Debian's tracker."""
    return os.environ.get(ENV_TRACKER_URL) or TRACKER_URL


def tracker_file(data: Path | None, *, offline: bool = False) -> Path:
    """`--data FILE`, else the cached export (refreshed daily when online)."""
    if data is not None:
        return data
    cached = paths.cache_dir() / "security-tracker.json"
    fresh = cached.exists() and time.time() - cached.stat().st_mtime < CACHE_MAX_AGE
    if fresh or offline:
        if not cached.exists():
            raise ScanError("no tracker data", hint="pass --data FILE (tracker/data/json)")
        return cached
    try:
        with urllib.request.urlopen(tracker_url(), timeout=120) as resp:
            body = resp.read(MAX_TRACKER_BYTES)
        # Never cache a truncated download, an error page or some other JSON document.
        if not _is_tracker(json.loads(body)):
            raise ValueError(f"{tracker_url()} did not answer with tracker data")
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cached, body.decode())
    except (OSError, ValueError) as exc:
        if cached.exists():
            log.warning("tracker download failed (%s); using the cached copy from %s", exc,
                        time.ctime(cached.stat().st_mtime))  # fmt: skip
            return cached
        raise ScanError(
            f"cannot download the Debian security tracker data: {exc}",
            hint="on an air-gapped host pass --data FILE (a copy of tracker/data/json)",
        ) from None
    return cached


def scan(
    packages: Iterable[Package],
    tracker: Mapping[str, Any],
    release: str,
    *,
    data_label: str = "",
    fail_on: str | None = None,
) -> ScanResult:
    """Open CVEs per installed package in `release` (a codename such as bookworm)."""
    pkgs = list(packages)
    result = ScanResult(release, data_label, len(pkgs), fail_on=fail_on)
    for pkg in pkgs:
        source = pkg.source or pkg.name
        version = pkg.source_version or pkg.version
        cves = tracker.get(source)
        if not isinstance(cves, dict):
            continue
        for cve, entry in sorted(cves.items()):
            rel = (entry.get("releases") or {}).get(release) if isinstance(entry, dict) else None
            if not isinstance(rel, dict):
                continue
            status = str(rel.get("status", ""))
            fixed = rel.get("fixed_version")
            severity = severity_of(rel.get("urgency"))
            description = str(entry.get("description", ""))[:300]
            if status == "resolved":
                if not fixed or fixed == "0" or version_compare(version, str(fixed)) >= 0:
                    continue
                state = "fixed"
            elif status in ("open", "undetermined"):
                state = status
            else:
                continue
            result.findings.append(
                Finding(pkg.name, pkg.version, source, cve, severity, state,
                        str(fixed) if fixed else None, description)
            )  # fmt: skip
    result.findings.sort(key=lambda f: (-rank(f.severity), f.package, f.cve))
    return result


def release_of(manifest: Mapping[str, Any]) -> str:
    from vmbuild.supply.sbom import distro_of

    base_id = str((manifest.get("base") or {}).get("id", ""))
    distro = distro_of(manifest)
    if distro is not None:
        return DEBIAN_CODENAMES[distro]
    raise ScanError(
        f"the base {base_id!r} is not a Debian release the tracker knows",
        hint="the scan covers debian-11, debian-12 and debian-13 bases",
    )


def scan_build(
    build_dir: Path,
    manifest: Mapping[str, Any],
    *,
    data: Path | None = None,
    fail_on: str | None = None,
) -> ScanResult:
    """Scan a stored (or staged) build's SBOM packages."""
    from vmbuild.supply.sbom import sbom_packages

    release = release_of(manifest)
    source = tracker_file(data, offline=os.environ.get("VMBUILD_OFFLINE") == "1")
    tracker = load_tracker(source)
    packages = sbom_packages(build_dir).values()
    return scan(packages, tracker, release, data_label=str(source), fail_on=fail_on)


def raise_if_failed(result: ScanResult) -> None:
    if result.failed:
        worst = result.findings[0]
        threshold = rank(result.fail_on or "unknown")
        over = sum(1 for f in result.findings if rank(f.severity) >= threshold)
        raise ScanFailed(
            f"CVE scan: {over} finding(s) at or above {result.fail_on}, e.g. {worst.cve} "
            f"in {worst.package} {worst.version} ({worst.severity}"
            + (f", fixed in {worst.fixed_version})" if worst.fixed_version else ", no fix yet)"),
            hint="`vmbuild scan REF --json` lists them; update the packages or raise the threshold",
        )
