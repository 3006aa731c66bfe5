""" "Dependencies updated": recipe, components, base (Debian Release, vendor checksum,
local file) and packages newer in the mirror than in the last image, compared with
the last successful run. The mirror is a small index the test writes."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.disks import qcow2_header
from tests.support.pipeline import (
    T0,
    fake_artifact,
    http_mirror,
    pkg,
    write_mirror,
    write_pipeline,
    write_recipe,
)  # fmt: skip
from vmbuild.config.pipeline import LoadedPipeline, load_pipeline
from vmbuild.pipeline import deps
from vmbuild.pipeline.history import History

SBOM = [pkg("openssl", "3.0.11-1~deb12u2"), pkg("bash", "5.2.15-2+b2"), pkg("tzdata", "2024a-0+deb12u1", "all")]  # fmt: skip


class Setup:
    """A debian-12 pipeline whose mirror (bookworm + bookworm-updates) is on disk."""

    def __init__(self, tmp_path: Path, **pipeline: Any) -> None:
        self.root = tmp_path
        self.mirror = tmp_path / "mirror" / "debian"
        self.uri = write_mirror(self.mirror, "bookworm", SBOM)
        write_mirror(self.mirror, "bookworm-updates", [pkg("openssl", "3.0.11-1~deb12u2")])
        self.recipe = write_recipe(tmp_path / "recipes", "img")
        body = {
            "recipe": "recipes/img-recipe.yaml",
            "infrastructure": {"mirror": self.uri},
            "dependencies": {"apt_sources": [f"deb {self.uri} bookworm main",
                                             f"deb {self.uri} bookworm-updates main"]},
            **pipeline,
        }  # fmt: skip
        self.path = write_pipeline(tmp_path, body, "p")
        self.history = History(tmp_path / "h.sqlite")
        self.store = tmp_path / "store"

    def set_sources(self, lines: list[str]) -> None:
        body = yaml.safe_load(self.path.read_text())
        body["dependencies"] = {"apt_sources": lines}
        self.path.write_text(yaml.safe_dump(body))

    def load(self) -> LoadedPipeline:
        return load_pipeline(self.path)

    def record_success(self, packages: list[dict[str, str]] = SBOM) -> int:
        """What a successful run leaves: its snapshot and an artifact with an SBOM."""
        loaded = self.load()
        run_id = self.history.start_run("p", str(self.path), "manual", T0)
        artifact = fake_artifact(self.store, "img", created=T0, packages=packages,
                                 suffix=f"{run_id:06x}")  # fmt: skip
        self.history.update_run(
            run_id, status="succeeded", ended=T0, deps=deps.snapshot(loaded),
            artifact=str(artifact), image=f"img/1.0.0/{artifact.name}",
        )  # fmt: skip
        return run_id

    def check(self) -> deps.CheckReport:
        return deps.check(self.load(), self.history)


def test_never_built_counts_as_changed(tmp_path: Path) -> None:
    report = Setup(tmp_path).check()
    assert report.changed and report.last_run is None
    assert [c.kind for c in report.changes] == ["history"]


def test_nothing_changed(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    run_id = s.record_success()
    report = s.check()
    assert not report.changed, report.changes
    assert report.last_run == run_id and not report.errors
    assert report.summary() == "no dependency changed"


def test_a_newer_package_in_the_index_is_detected(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.record_success()
    # The mirror's -updates suite gets a security fix; the base suite is untouched.
    write_mirror(s.mirror, "bookworm-updates", [pkg("openssl", "3.0.13-1~deb12u1"),
                                                pkg("tzdata", "2025b-0+deb12u1", "all")])  # fmt: skip
    report = s.check()
    assert [c.kind for c in report.changes] == ["packages"]
    change = report.changes[0]
    assert change.summary == "2 packages newer in the mirror (openssl, tzdata)"
    assert change.details[0].startswith(
        "openssl:amd64 3.0.11-1~deb12u2 → 3.0.13-1~deb12u1 (file://"
    )
    assert "bookworm-updates/main/binary-amd64/Packages.xz" in change.details[0]


def test_an_older_or_equal_package_is_not_a_change(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.record_success([pkg("openssl", "3.0.11-1~deb12u2+local1"), pkg("bash", "5.2.15-2+b2")])
    assert not s.check().changed


def test_the_package_index_over_local_http(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    with http_mirror(s.mirror) as base:
        s.set_sources([f"deb {base} bookworm main", f"deb {base} bookworm-updates main"])
        s.record_success()
        assert not s.check().changed
        write_mirror(s.mirror, "bookworm-updates", [pkg("openssl", "3.0.13-1~deb12u1")])
        report = s.check()
    assert [c.summary for c in report.changes] == ["1 package newer in the mirror (openssl)"]


def test_a_changed_base_suite_release_is_a_base_change(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.record_success()
    # A point release: the bookworm Release changes (new Date), versions as before.
    write_mirror(s.mirror, "bookworm", SBOM, date=T0.replace(month=7))
    report = s.check()
    assert [c.kind for c in report.changes] == ["base"]
    assert "dists/bookworm/Release changed (Date 2026-06-01T12:00:00+00:00 → 2026-07-01" in report.changes[0].summary  # fmt: skip


def test_a_changed_recipe(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.record_success()
    s.recipe.write_text(s.recipe.read_text() + "description: now different\n")
    report = s.check()
    assert [c.kind for c in report.changes] == ["recipe"]
    assert report.changes[0].summary.startswith("recipe img-recipe.yaml changed (")


def test_a_missing_artifact_is_a_change(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    run_id = s.record_success()
    artifact = Path(s.history.get(run_id).artifact or "")
    (artifact / "manifest.json").unlink()
    report = s.check()
    assert [c.kind for c in report.changes] == ["artifact"]
    assert any("packages not checked" in n for n in report.notes)


def test_an_unreachable_mirror_is_an_error_not_a_change(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.record_success()
    s.set_sources([f"deb {s.uri} bookworm main", "deb http://127.0.0.1:9/debian bookworm-updates main"])  # fmt: skip
    report = s.check()
    assert not report.changed
    assert report.errors and report.errors[0].startswith("packages: ")
    assert "127.0.0.1:9" in report.errors[0]


def test_default_sources_for_debian_are_the_base_mirror(tmp_path: Path) -> None:
    s = Setup(tmp_path, dependencies={})
    assert deps.package_sources(s.load()) == [
        f"deb {s.uri} bookworm main",
        f"deb {s.uri} bookworm-updates main",
        f"deb {s.uri}-security bookworm-security main",
    ]


def test_url_base_checksum_file_content(tmp_path: Path) -> None:
    image = tmp_path / "vendor" / "cloud.qcow2"
    image.parent.mkdir()
    image.write_bytes(b"disk")
    sums = image.parent / "SHA256SUMS"
    sums.write_text(f"{'a' * 64}  cloud.qcow2\n{'b' * 64}  other.qcow2\n")
    write_recipe(tmp_path / "recipes", "img", base={"url": image.as_uri(), "checksum_url": sums.as_uri()})  # fmt: skip
    path = write_pipeline(tmp_path, {"recipe": "recipes/img-recipe.yaml"})
    history = History(tmp_path / "h.sqlite")
    loaded = load_pipeline(path)
    snap = deps.snapshot(loaded)
    assert snap["base"] == {"kind": "url", "url": image.as_uri(), "checksum": f"sha256:{'a' * 64}",
                            "checksum_url": sums.as_uri()}  # fmt: skip
    run_id = history.start_run("p", None, "manual", T0)
    artifact = fake_artifact(tmp_path / "store", "img", packages=SBOM)
    history.update_run(run_id, status="succeeded", deps=snap, artifact=str(artifact))
    report = deps.check(loaded, history)
    assert not report.changed
    assert report.notes == ["packages not checked: no apt sources (set dependencies.apt_sources)"]
    sums.write_text(f"{'c' * 64}  cloud.qcow2\n{'b' * 64}  other.qcow2\n")  # the vendor updated
    report = deps.check(loaded, history)
    assert [c.summary for c in report.changes] == [f"base: {image.as_uri()}: checksum changed (aaaaaaaaaaaa → cccccccccccc)"]  # fmt: skip


def test_url_base_with_a_pinned_checksum(tmp_path: Path) -> None:
    write_recipe(tmp_path / "recipes", "img", base={"url": "https://x/cloud.qcow2", "sha512": "F" * 128})  # fmt: skip
    loaded = load_pipeline(write_pipeline(tmp_path, {"recipe": "recipes/img-recipe.yaml"}))
    assert deps.snapshot(loaded)["base"]["checksum"] == f"sha512:{'f' * 128}"


def test_local_file_base_is_rehashed_only_when_it_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    disk = tmp_path / "recipes" / "base.qcow2"
    disk.parent.mkdir()
    disk.write_bytes(qcow2_header(tail=b"v1"))
    write_recipe(tmp_path / "recipes", "img", base="base.qcow2")
    loaded = load_pipeline(write_pipeline(tmp_path, {"recipe": "recipes/img-recipe.yaml"}))
    first = deps.snapshot(loaded)
    assert first["base"]["sha256"] == hashlib.sha256(qcow2_header(tail=b"v1")).hexdigest()

    def no_hashing(path: Path) -> str:
        raise AssertionError("an unchanged file was re-hashed")

    with monkeypatch.context() as m:
        m.setattr(deps, "_sha256_file", no_hashing)
        assert deps.snapshot(loaded, first)["base"] == first["base"]
    disk.write_bytes(b"v2-longer")
    second = deps.snapshot(loaded, first)
    assert [c.kind for c in deps.compare(first, second)] == ["base"]


def test_compare_components() -> None:
    def snap(*components: tuple[str, str, dict[str, str]]) -> dict[str, Any]:
        return {
            "recipe": {"path": "/r.yaml", "sha256": "r"},
            "components": [{"name": n, "sha256": h, "parameters": p} for n, h, p in components],
            "base": {"kind": "file", "path": "/b", "sha256": "b"},
        }

    old = snap(("java", "aaaa", {"version": "17"}), ("nginx", "bbbb", {}))
    assert deps.compare(old, old) == []
    edited = snap(("java", "cccc", {"version": "17"}), ("nginx", "bbbb", {}))
    assert [c.summary for c in deps.compare(old, edited)] == ["component java: document changed (aaaa → cccc)"]  # fmt: skip
    bumped = snap(("java", "aaaa", {"version": "21"}), ("nginx", "bbbb", {}))
    assert [c.summary for c in deps.compare(old, bumped)] == ["component java: parameters changed"]
    reordered = snap(("nginx", "bbbb", {}), ("java", "aaaa", {"version": "17"}))
    assert [c.summary for c in deps.compare(old, reordered)] == ["components changed: [java, nginx] → [nginx, java]"]  # fmt: skip


def test_a_base_that_could_not_be_fingerprinted_is_an_error(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.record_success()
    (s.mirror / "dists" / "bookworm" / "Release").unlink()
    report = s.check()
    assert not report.changed
    assert report.errors and report.errors[0].startswith("base: ")
