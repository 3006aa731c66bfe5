"""The offline CVE scan against a small file in the security tracker's JSON format."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest

from tests.support.pipeline import http_mirror
from tests.support.supply import fake_artifact
from vmbuild.manifest import Package
from vmbuild.supply.scan import (
    CACHE_MAX_AGE,
    ENV_TRACKER_URL,
    ScanError,
    ScanFailed,
    load_tracker,
    raise_if_failed,
    scan,
    scan_build,
    tracker_file,
)
from vmbuild.supply.signing import KeyPaths

TRACKER = {
    "openssl": {
        "CVE-2024-0727": {
            "description": "PKCS12 NULL dereference",
            "scope": "local",
            "releases": {
                "bookworm": {"status": "resolved", "fixed_version": "3.0.13-1~deb12u1",
                             "urgency": "high", "repositories": {"bookworm": "3.0.15-1~deb12u1"}},
                "trixie": {"status": "resolved", "fixed_version": "3.1.5-1", "urgency": "low"},
            },
        },
        "CVE-2023-0001": {  # fixed in an older version than installed: not affected
            "releases": {"bookworm": {"status": "resolved", "fixed_version": "3.0.11-1~deb12u1",
                                      "urgency": "medium"}}
        },
        "CVE-2023-0002": {  # never affected bookworm
            "releases": {"bookworm": {"status": "resolved", "fixed_version": "0", "urgency": "high"}}
        },
    },
    "glibc": {
        "CVE-2025-1111": {"releases": {"bookworm": {"status": "open", "urgency": "low**"}}},
        "CVE-2025-2222": {"releases": {"bookworm": {"status": "open", "urgency": "unimportant"}}},
    },
    "nginx": {
        "CVE-2025-3333": {"releases": {"bullseye": {"status": "open", "urgency": "high"}}},
        "CVE-2025-4444": {"releases": {"bookworm": {"status": "undetermined",
                                                    "urgency": "not yet assigned"}}},
    },
}  # fmt: skip


def pkg(name: str, version: str, source: str = "", sv: str = "") -> Package:
    return Package(name, version, "amd64", source, sv)


def test_findings_with_severity_and_fixed_version() -> None:
    packages = [
        pkg("libssl3", "3.0.11-1~deb12u2", "openssl", "3.0.11-1~deb12u2"),
        pkg("libc6", "2.36-9+deb12u9", "glibc", "2.36-9+deb12u9"),
        pkg("nginx", "1.22.1-9"),
        pkg("curl", "7.88.1-10+deb12u8"),
    ]
    result = scan(packages, TRACKER, "bookworm")
    got = [(f.package, f.cve, f.severity, f.status, f.fixed_version) for f in result.findings]
    assert got == [
        ("libssl3", "CVE-2024-0727", "high", "fixed", "3.0.13-1~deb12u1"),
        ("libc6", "CVE-2025-1111", "low", "open", None),
        ("libc6", "CVE-2025-2222", "unimportant", "open", None),
        ("nginx", "CVE-2025-4444", "unknown", "undetermined", None),
    ]
    assert result.counts == {"unknown": 1, "unimportant": 1, "low": 1, "medium": 0, "high": 1}


@pytest.mark.parametrize(
    ("installed", "affected"),
    [
        ("3.0.13-1~deb12u1", False),  # exactly the fix
        ("3.0.13-1~deb12u0", True),  # ~ sorts before anything
        ("3.0.13-1", False),  # the release without ~ sorts after the ~deb12u1 backport
        ("3.0.9-1", True),  # 9 < 13 numerically, not as text
        ("1:1.0-1", False),  # an epoch beats any upstream version
        ("3.0.13~rc1-1", True),
    ],
)
def test_dpkg_version_semantics(installed: str, affected: bool) -> None:
    tracker = {"openssl": {"CVE-2024-0727": TRACKER["openssl"]["CVE-2024-0727"]}}
    result = scan([pkg("openssl", installed)], tracker, "bookworm")
    assert bool(result.findings) is affected


def test_threshold_fails_at_or_above_the_severity() -> None:
    packages = [pkg("libc6", "2.36-9", "glibc", "2.36-9")]
    low = scan(packages, TRACKER, "bookworm", fail_on="low")
    assert low.failed
    with pytest.raises(
        ScanFailed, match=r"CVE scan: 1 finding\(s\) at or above low, e\.g\. CVE-2025-1111"
    ):
        raise_if_failed(low)
    assert not scan(packages, TRACKER, "bookworm", fail_on="medium").failed
    raise_if_failed(scan(packages, TRACKER, "bookworm", fail_on="high"))


def test_scan_of_a_stored_build_reads_its_sbom(
    local_key: KeyPaths, store: Path, tmp_path: Path
) -> None:
    data = tmp_path / "tracker.json"
    data.write_text(json.dumps(TRACKER))
    build_dir = fake_artifact(store)
    manifest = json.loads((build_dir / "manifest.json").read_text())
    result = scan_build(build_dir, manifest, data=data, fail_on="high")
    assert result.release == "bookworm" and result.packages == 4
    # openssl and libssl3 both come from the openssl source package.
    assert sorted((f.package, f.cve) for f in result.findings if f.severity == "high") == [
        ("libssl3", "CVE-2024-0727"), ("openssl", "CVE-2024-0727")
    ]  # fmt: skip
    assert result.failed
    assert result.to_json()["counts"]["high"] == 2


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "not tracker data"),
        ('{"openssl": [1]}', "not tracker data"),
        ("", "not JSON"),
    ],
)
def test_a_bad_tracker_file_is_one_clear_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "tracker.json"
    path.write_text(content)
    with pytest.raises(ScanError) as err:
        load_tracker(path)
    assert str(err.value).startswith(f"{path}: {message}")


def test_a_missing_tracker_file(tmp_path: Path) -> None:
    with pytest.raises(ScanError, match="cannot read the tracker data"):
        load_tracker(tmp_path / "nope.json")


def test_the_tracker_is_downloaded_once_a_day_and_never_cached_broken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    served = tmp_path / "served"
    served.mkdir()
    cache = tmp_path / "cache"
    monkeypatch.setenv("VMBUILD_CACHE_DIR", str(cache))
    cached = cache / "security-tracker.json"
    export = served / "json"
    with http_mirror(served) as url:
        monkeypatch.setenv(ENV_TRACKER_URL, f"{url}/json")
        # Nothing served and nothing cached: one clear error, nothing written.
        with pytest.raises(ScanError, match="cannot download the Debian security tracker data"):
            tracker_file(None)
        assert not cached.exists()
        # JSON that is not the tracker's shape (an API error document) is not cached either.
        export.write_text('{"error": "rate limited"}')
        with pytest.raises(ScanError, match=f"{url}/json did not answer with tracker data"):
            tracker_file(None)
        assert not cached.exists()
        export.write_text(json.dumps(TRACKER))
        assert tracker_file(None) == cached
        assert load_tracker(cached) == TRACKER
        # Within a day the cached copy is used without asking: the server no longer has it.
        export.unlink()
        assert tracker_file(None) == cached
        # A day later the download is tried again; when it fails the older copy is used.
        day_old = time.time() - CACHE_MAX_AGE - 60
        os.utime(cached, (day_old, day_old))
        export.write_text("<html>maintenance</html>")
        with caplog.at_level(logging.WARNING, logger="vmbuild.supply.scan"):
            assert tracker_file(None) == cached
        assert "tracker download failed" in caplog.text
        assert load_tracker(cached) == TRACKER
        assert cached.stat().st_mtime == pytest.approx(day_old)
        # A good download replaces it.
        newer = {"nginx": TRACKER["nginx"]}
        export.write_text(json.dumps(newer))
        assert tracker_file(None) == cached
        assert load_tracker(cached) == newer
    # Offline (VMBUILD_OFFLINE=1): the cache whatever its age, never the network.
    os.utime(cached, (day_old, day_old))
    monkeypatch.setenv(ENV_TRACKER_URL, "http://127.0.0.1:9/unreachable")
    assert tracker_file(None, offline=True) == cached
    cached.unlink()
    with pytest.raises(ScanError, match="no tracker data"):
        tracker_file(None, offline=True)
