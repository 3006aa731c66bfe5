"""Lifecycle rules: keep the last N builds of each version, delete builds older than
an age, never the newest passing build."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from tests.support.pipeline import T0, fake_artifact
from vmbuild.config.pipeline import Lifecycle
from vmbuild.pipeline import lifecycle
from vmbuild.stages import store


def make(store_dir: Path, version: str, days_ago: float, tests: str = "passed", name: str = "img") -> Path:  # fmt: skip
    created = T0 - timedelta(days=days_ago)
    return fake_artifact(store_dir, name, version, created=created, tests=tests,
                         suffix=f"{int(days_ago * 1000) % 0xFFFFFF:06x}")  # fmt: skip


def refs(deletions: list[lifecycle.Deletion]) -> list[str]:
    return [f"{d.build.version}@{(T0 - d.build.created).days}d" for d in deletions]


def test_keep_last_per_version(tmp_path: Path) -> None:
    for days in (9, 7, 5, 3):
        make(tmp_path, "1.0.0", days)
    for days in (8, 1):
        make(tmp_path, "2.0.0", days)
    plan = lifecycle.plan(lifecycle.stored_builds(tmp_path, "img"), Lifecycle(keep_last=2), T0)
    assert refs(plan) == ["1.0.0@9d", "1.0.0@7d"]
    assert all(d.reason == "more than 2 builds of 1.0.0" for d in plan)


def test_max_age(tmp_path: Path) -> None:
    for days in (40, 31, 29, 2):
        make(tmp_path, "1.0.0", days)
    plan = lifecycle.plan(lifecycle.stored_builds(tmp_path, "img"), Lifecycle(max_age=30 * 86400), T0)  # fmt: skip
    assert refs(plan) == ["1.0.0@40d", "1.0.0@31d"]
    assert plan[0].reason == "older than 30d"


def test_never_the_newest_passing_build(tmp_path: Path) -> None:
    passing = make(tmp_path, "1.0.0", 60)  # everything is old, this is the newest that passed
    make(tmp_path, "1.0.0", 90)
    make(tmp_path, "1.0.0", 50, tests="failed")
    plan = lifecycle.plan(lifecycle.stored_builds(tmp_path, "img"), Lifecycle(max_age=86400), T0)
    assert passing not in [d.build.path for d in plan]
    assert refs(plan) == ["1.0.0@90d", "1.0.0@50d"]


def test_without_tests_the_newest_build_is_protected(tmp_path: Path) -> None:
    make(tmp_path, "1.0.0", 60, tests="skipped")
    newest = make(tmp_path, "1.0.0", 45, tests="skipped")
    plan = lifecycle.plan(lifecycle.stored_builds(tmp_path, "img"), Lifecycle(max_age=86400), T0)
    assert [d.build.path for d in plan] != [] and newest not in [d.build.path for d in plan]


def test_keep_last_protects_the_newest_passing_of_another_version(tmp_path: Path) -> None:
    passing = make(tmp_path, "1.0.0", 5)
    make(tmp_path, "1.0.0", 4, tests="failed")
    make(tmp_path, "1.0.0", 3, tests="failed")
    plan = lifecycle.plan(lifecycle.stored_builds(tmp_path, "img"), Lifecycle(keep_last=1), T0)
    assert passing not in [d.build.path for d in plan]


def test_other_images_are_untouched(tmp_path: Path) -> None:
    make(tmp_path, "1.0.0", 10)
    make(tmp_path, "1.0.0", 9)
    other = make(tmp_path, "1.0.0", 50, name="other")
    deleted = lifecycle.prune(tmp_path, "img", Lifecycle(keep_last=1, max_age=86400), T0)
    assert len(deleted) == 1
    assert other.is_dir()


def test_prune_deletes_through_the_store(tmp_path: Path) -> None:
    old = make(tmp_path, "1.0.0", 10)
    new = make(tmp_path, "1.0.0", 1)
    dry = lifecycle.prune(tmp_path, "img", Lifecycle(keep_last=1), T0, dry_run=True)
    assert [d.build.path for d in dry] == [old] and old.is_dir()
    deleted = lifecycle.prune(tmp_path, "img", Lifecycle(keep_last=1), T0)
    assert [d.build.path for d in deleted] == [old]
    assert not old.exists() and new.is_dir()
    assert store.builds(tmp_path) == [new]
    assert not list(tmp_path.rglob(".staging-*"))
    assert deleted[0].to_json()["image"] == f"img/1.0.0/{old.name}"


def test_no_rules_no_deletions(tmp_path: Path) -> None:
    make(tmp_path, "1.0.0", 400)
    assert lifecycle.prune(tmp_path, "img", Lifecycle(), T0) == []


def test_created_falls_back_to_the_build_id(tmp_path: Path) -> None:
    build = make(tmp_path, "1.0.0", 3)
    manifest = store.read_manifest(build)
    del manifest["created"]
    store.write_manifest(build, manifest)
    [stored] = lifecycle.stored_builds(tmp_path, "img")
    assert stored.created == (T0 - timedelta(days=3)).replace(microsecond=0)
