"""The artifact store: staging, atomic commit, resolution of references."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmbuild.errors import VmbuildError
from vmbuild.stages import store


def make_build(root: Path, name: str, version: str, build: str) -> Path:
    d = root / name / version / build
    d.mkdir(parents=True)
    store.write_manifest(
        d,
        {"name": name, "version": version, "build": build, "created": "x",
         "tests": {"status": "passed"}, "outputs": [{"format": "qcow2", "size": 10}]},
    )  # fmt: skip
    return d


def test_staging_removed_on_failure_and_leaves_no_dirs(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), store.staging(tmp_path, "img", "1.0.0", "b1") as st:
        (st.path / "disk.qcow2").write_bytes(b"x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_commit_renames_into_place(tmp_path: Path) -> None:
    build = store.new_build_id()
    with store.staging(tmp_path, "img", "1.0.0", build) as st:
        store.write_manifest(st.path, {"name": "img"})
        final = store.commit(st)
    assert final == tmp_path / "img" / "1.0.0" / build
    assert json.loads((final / "manifest.json").read_text()) == {"name": "img"}
    assert [p.name for p in final.parent.iterdir()] == [build]


def test_build_ids_sort_by_time() -> None:
    assert store.BUILD_ID.match(store.new_build_id())


def test_resolve_refs_pick_latest(tmp_path: Path) -> None:
    a = make_build(tmp_path, "img", "1.0.0", "20261101T000000Z-aaaaaa")
    b = make_build(tmp_path, "img", "1.10.0", "20261102T000000Z-bbbbbb")
    c = make_build(tmp_path, "img", "1.2.0", "20261103T000000Z-cccccc")
    make_build(tmp_path, "other", "1.0.0", "20261101T000000Z-dddddd")
    assert store.resolve(tmp_path, "img") == b  # semver order: 1.10 > 1.2
    assert store.resolve(tmp_path, "img/1.2.0") == c
    assert store.resolve(tmp_path, "img/1.0.0/20261101T000000Z-aaaaaa") == a
    assert store.resolve(tmp_path, str(a)) == a
    with pytest.raises(VmbuildError, match=r"no image 'img/9\.9\.9'"):
        store.resolve(tmp_path, "img/9.9.9")


def test_staging_and_half_written_builds_are_not_listed(tmp_path: Path) -> None:
    make_build(tmp_path, "img", "1.0.0", "20261101T000000Z-aaaaaa")
    (tmp_path / "img" / "1.0.0" / ".staging-20261102T000000Z-bbbbbb").mkdir()
    (tmp_path / "img" / "1.0.0" / "20261103T000000Z-cccccc").mkdir()  # no manifest
    assert [b.name for b in store.builds(tmp_path)] == ["20261101T000000Z-aaaaaa"]


def test_remove_cleans_empty_parents(tmp_path: Path) -> None:
    a = make_build(tmp_path, "img", "1.0.0", "20261101T000000Z-aaaaaa")
    store.remove(tmp_path, a)
    assert list(tmp_path.iterdir()) == []


def test_remove_refuses_outside_the_store(tmp_path: Path) -> None:
    elsewhere = make_build(tmp_path / "elsewhere", "img", "1.0.0", "20261101T000000Z-aaaaaa")
    (tmp_path / "store").mkdir()
    with pytest.raises(VmbuildError, match="outside the store"):
        store.remove(tmp_path / "store", elsewhere)
    assert (elsewhere / "manifest.json").is_file()


def test_resolve_refuses_paths_outside_the_store(tmp_path: Path) -> None:
    stored = make_build(tmp_path / "store", "img", "1.0.0", "20261101T000000Z-aaaaaa")
    outside = make_build(tmp_path, "img", "1.0.0", "20261102T000000Z-bbbbbb")
    with pytest.raises(VmbuildError, match="outside the store"):
        store.resolve(tmp_path / "store", str(outside))
    with pytest.raises(VmbuildError, match="is not a build in the store"):
        store.resolve(tmp_path / "store", str(stored.parent))
    assert store.resolve(tmp_path / "store", str(stored)) == stored


def test_prerelease_order_is_semver() -> None:
    order = ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta",
             "1.0.0-beta.2", "1.0.0-beta.11", "1.0.0-rc.1", "1.0.0-rc.2", "1.0.0-rc.10",
             "1.0.0", "1.0.1", "1.10.0"]  # fmt: skip
    assert sorted(reversed(order), key=store._version_key) == order


def test_update_manifest(tmp_path: Path) -> None:
    a = make_build(tmp_path, "img", "1.0.0", "20261101T000000Z-aaaaaa")
    store.update_manifest(a, "distribution", {"us-east-1": "ami-1"})
    assert store.read_manifest(a)["distribution"] == {"us-east-1": "ami-1"}
