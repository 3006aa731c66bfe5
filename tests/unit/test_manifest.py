"""manifest.json through the Manifest type: round trip, tolerance, unknown keys kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmbuild.errors import VmbuildError
from vmbuild.manifest import Manifest, OutputRecord, Package
from vmbuild.stages import store

FULL = {
    "schema": 1, "name": "img", "version": "1.0.0", "description": "d",
    "build": "20260101T000000Z-abcdef", "created": "2026-01-01T00:00:00Z",
    "recipe": {"path": "/r.yaml", "sha256": "a" * 64},
    "base": {"id": "debian-12-x", "sha256": "b" * 64, "source": "debian-12", "format": "qcow2"},
    "components": [{"name": "c", "sha256": "c" * 64}],
    "outputs": [{"format": "qcow2", "file": "disk.qcow2", "sha256": "d" * 64, "size": 10,
                 "virtual_size": 20}],
    "packages": [{"name": "bash", "version": "5.2", "arch": "amd64"}],
    "tests": {"status": "passed"}, "timings": {"base": 1.5, "total": 9.25},
    "accelerator": {"kind": "tcg", "reason": "r", "scale": 12.0}, "backend": "qemu",
    "vmbuild_version": "0.1.0",
}  # fmt: skip


def test_round_trip_is_exact() -> None:
    m = Manifest.from_json(FULL)
    assert m.to_json() == FULL and list(m.to_json()) == list(FULL)
    assert m.ref == "img/1.0.0/20260101T000000Z-abcdef" and m.tests_status == "passed"
    assert m.outputs == (OutputRecord("qcow2", "disk.qcow2", "d" * 64, 10, 20),)
    assert m.packages == (Package("bash", "5.2", "amd64"),)
    assert m.created_at is not None and m.created_at.isoformat() == "2026-01-01T00:00:00+00:00"


def test_partial_manifests_read_and_write_back_unchanged(tmp_path: Path) -> None:
    data = {"name": "img", "version": "1.0.0", "later": {"x": 1}, "distribution": {"aws": {}}}
    m = Manifest.from_json(data)
    assert (m.build, m.created_at, m.outputs, m.tests_status) == ("", None, (), "unknown")
    assert m.extra == {"later": {"x": 1}} and m.distribution == {"aws": {}}
    store.write_manifest(tmp_path, m)
    assert json.loads((tmp_path / "manifest.json").read_text()) == {
        "name": "img", "version": "1.0.0", "distribution": {"aws": {}}, "later": {"x": 1}
    }  # fmt: skip
    assert store.load_manifest(tmp_path) == m


def test_missing_identity_is_an_error_naming_the_file() -> None:
    with pytest.raises(
        VmbuildError, match=r"^m.json: incomplete manifest \(KeyError\('version'\)\)"
    ):
        Manifest.from_json({"name": "img"}, "m.json")
    with pytest.raises(VmbuildError, match=r"^m\.json: not a JSON object$"):
        Manifest.from_json([], "m.json")
