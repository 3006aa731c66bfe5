"""Lifecycle: which local builds of an image a pipeline deletes after a successful run.

- `keep_last: N`: within each version, builds beyond the newest N;
- `max_age: 30d`: builds created longer ago than that;
- never the newest passing build of the image (tests passed; when no build ran its
  tests, the newest build), whatever the rules say: a pipeline that has not produced
  anything for a while still leaves one usable image.
Distributed AMIs are left alone: this is about the local store.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from vmbuild.config.pipeline import Lifecycle
from vmbuild.errors import VmbuildError
from vmbuild.manifest import Manifest
from vmbuild.stages import store

log = logging.getLogger("vmbuild.pipeline.lifecycle")


@dataclass(frozen=True)
class StoredBuild:
    path: Path
    version: str
    build: str
    created: datetime
    tests: str  # passed | skipped | failed | unknown

    @property
    def ref(self) -> str:
        return f"{self.path.parent.parent.name}/{self.version}/{self.build}"


@dataclass(frozen=True)
class Deletion:
    build: StoredBuild
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"image": self.build.ref, "path": str(self.build.path), "reason": self.reason}


def _created(manifest: Manifest, build_dir: Path) -> datetime:
    if (created := manifest.created_at) is not None:
        return created.astimezone(UTC)
    # The build id starts with its UTC creation time (store.new_build_id).
    return datetime.strptime(build_dir.name[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)


def stored_builds(store_dir: Path, name: str) -> list[StoredBuild]:
    """Every committed build of image `name`, oldest first."""
    found = []
    for build_dir in store.builds(store_dir):
        if build_dir.parent.parent.name != name:
            continue
        try:
            manifest = store.load_manifest(build_dir)
        except VmbuildError as exc:
            log.warning("lifecycle: skipping %s: %s", build_dir, exc)
            continue
        found.append(
            StoredBuild(
                path=build_dir, version=build_dir.parent.name, build=build_dir.name,
                created=_created(manifest, build_dir),
                tests=manifest.tests_status,
            )
        )  # fmt: skip
    return sorted(found, key=lambda b: (b.created, b.build))


def protected(builds: list[StoredBuild]) -> StoredBuild | None:
    """The newest passing build (tests passed), else the newest build that did not fail."""
    for wanted in ({"passed"}, {"passed", "skipped", "unknown"}):
        candidates = [b for b in builds if b.tests in wanted]
        if candidates:
            return candidates[-1]
    return None


def plan(builds: list[StoredBuild], policy: Lifecycle, now: datetime) -> list[Deletion]:
    """The builds `policy` deletes (pure: the input is oldest first, as stored_builds)."""
    keep = protected(builds)
    doomed: dict[Path, str] = {}
    if policy.keep_last is not None:
        versions: dict[str, list[StoredBuild]] = {}
        for b in builds:
            versions.setdefault(b.version, []).append(b)
        for version, in_version in versions.items():
            for b in in_version[: max(0, len(in_version) - policy.keep_last)]:
                doomed[b.path] = f"more than {policy.keep_last} builds of {version}"
    if policy.max_age is not None:
        cutoff = now - timedelta(seconds=policy.max_age)
        for b in builds:
            if b.created < cutoff and b.path not in doomed:
                doomed[b.path] = f"older than {_age(policy.max_age)}"
    return [
        Deletion(b, doomed[b.path])
        for b in builds
        if b.path in doomed and (keep is None or b.path != keep.path)
    ]


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def prune(
    store_dir: Path, name: str, policy: Lifecycle, now: datetime, *, dry_run: bool = False
) -> list[Deletion]:
    """Apply `policy` to image `name` in `store_dir`; the deletions made (or planned)."""
    if policy.keep_last is None and policy.max_age is None:
        return []
    deletions = plan(stored_builds(store_dir, name), policy, now)
    done = []
    for d in deletions:
        if dry_run:
            done.append(d)
            continue
        try:
            store.remove(store_dir, d.build.path)
        except FileNotFoundError:
            continue  # removed meanwhile (another run, `vmbuild images rm`)
        except OSError as exc:
            log.warning("lifecycle: cannot delete %s: %s", d.build.path, exc)
            continue
        log.info("lifecycle: deleted %s (%s)", d.build.ref, d.reason)
        done.append(d)
    return done
