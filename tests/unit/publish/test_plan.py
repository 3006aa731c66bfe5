"""The plan (names, tags, checks), the artifact identity, and the VM Import task polling."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from vmbuild.config.distribution import load_distribution
from vmbuild.errors import VmbuildError
from vmbuild.publish.artifact import load_artifact, manifest_digest
from vmbuild.publish.events import DistributionEvent
from vmbuild.publish.plan import build_plan
from vmbuild.publish.vm_import import ImportFailed, ImportRequest, wait_for_task


def write_artifact(tmp_path: Path, **changes: Any) -> Path:
    build_dir = tmp_path / "images/web/1.2.0/20261122T180000Z-1a2b3c"
    build_dir.mkdir(parents=True)
    (build_dir / "disk.qcow2").write_bytes(b"QFI\xfb")
    manifest: dict[str, Any] = {
        "schema": 1,
        "name": "web",
        "version": "1.2.0",
        "build": "20261122T180000Z-1a2b3c",
        "created": "2026-11-22T18:00:00Z",
        "recipe": {"path": "r.yaml", "sha256": "ab" * 32},
        "outputs": [
            {
                "format": "qcow2",
                "file": "disk.qcow2",
                "sha256": None,
                "size": 4,
                "virtual_size": 3 * 2**30 + 1,
            }
        ],
        "tests": {"status": "passed"},
    }
    manifest.update(changes)
    (build_dir / "manifest.json").write_text(json.dumps(manifest))
    return build_dir


def config(**region: Any) -> Any:
    return load_distribution(
        {"regions": [{"region": "us-east-1", **region}, {"region": "eu-west-1"}]}, "d.yaml", ""
    )


def test_plan_renders_names_descriptions_and_identity_tags(tmp_path: Path) -> None:
    artifact = load_artifact(write_artifact(tmp_path))
    assert artifact.volume_gib == 4  # 3 GiB + 1 byte needs a 4 GiB volume
    plan = build_plan(
        artifact, config(name="{{ name }} {{ version }} {{ build_date }}", ami_tags={"team": "web"})
    )
    source, copy = plan.regions
    assert (source.action, copy.action) == ("upload", "copy")
    assert source.name == "web 1.2.0 20261122T180000Z"
    assert copy.name == "web-1.2.0-20261122T180000Z-1a2b3c"
    assert source.description == "web 1.2.0 (build 20261122T180000Z-1a2b3c) built by vmbuild"
    assert source.tags["vmbuild:artifact"] == "web/1.2.0/20261122T180000Z-1a2b3c"
    assert source.tags["vmbuild:manifest-sha256"] == artifact.digest
    assert source.tags["vmbuild:recipe-sha256"] == "ab" * 32
    assert source.tags["team"] == "web" and "team" not in copy.tags
    assert plan.errors == []
    text = plan.render()
    assert "us-east-1  upload" in text and "eu-west-1  copy" in text


def test_plan_refuses_failed_tests_bad_names_and_small_volumes(tmp_path: Path) -> None:
    artifact = load_artifact(
        write_artifact(tmp_path, version="1.2.0+git", tests={"status": "failed"})
    )
    cfg = load_distribution(
        {"image": {"volume_size": 2}, "regions": [{"region": "us-east-1"}]}, "d.yaml", ""
    )
    errors = [c.message for c in build_plan(artifact, cfg).errors]
    assert any("tests failed" in e for e in errors)
    assert any("regions[0].name" in e and "'+'" in e for e in errors)
    assert any("volume_size 2 GiB is smaller than the disk (4 GiB)" in e for e in errors)


def test_the_digest_ignores_what_distribution_writes(tmp_path: Path) -> None:
    manifest = json.loads((write_artifact(tmp_path) / "manifest.json").read_text())
    before = manifest_digest(manifest)
    manifest["distribution"] = {"aws": {"regions": {}}}
    assert manifest_digest(manifest) == before
    manifest["version"] = "9"
    assert manifest_digest(manifest) != before


def test_incomplete_manifests_are_reported(tmp_path: Path) -> None:
    build_dir = write_artifact(
        tmp_path, outputs=[{"format": "iso", "file": "x", "virtual_size": 1}]
    )
    with pytest.raises(VmbuildError, match="unknown disk format 'iso'"):
        load_artifact(build_dir)
    (build_dir / "manifest.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(VmbuildError, match="incomplete manifest"):
        load_artifact(build_dir)


class FakeTasks:
    """describe_import_*_tasks answering a scripted sequence of states."""

    def __init__(self, states: list[tuple[str, str, str]]) -> None:
        self.states = states

    def describe_import_snapshot_tasks(self, ImportTaskIds: list[str]) -> dict[str, Any]:
        status, message, progress = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        detail = {"Status": status, "StatusMessage": message, "Progress": progress}
        if status == "completed":
            detail["SnapshotId"] = "snap-1"
        return {
            "ImportSnapshotTasks": [
                {"ImportTaskId": ImportTaskIds[0], "SnapshotTaskDetail": detail}
            ]
        }


def import_request(tmp_path: Path, timeout: float = 60) -> ImportRequest:
    return ImportRequest(
        method="import-snapshot",
        disk=tmp_path / "d.vmdk",
        format="vmdk",
        region="us-east-1",
        bucket="b",
        key="k",
        role_name="vmimport",
        license_type="BYOL",
        boot_mode="legacy-bios",
        architecture="x86_64",
        encrypted=False,
        kms_key_arn=None,
        description="d",
        tags={},
        client_token="t",
        timeout=timeout,
        poll_interval=0.0,
        workers=1,
        state_path=tmp_path / "state.json",
        state_key="k",
    )


def test_import_tasks_are_polled_with_progress(tmp_path: Path) -> None:
    ec2 = FakeTasks(
        [
            ("active", "pending", "2"),
            ("active", "validating", "10"),
            ("active", "converting", "30"),
            ("completed", "", "100"),
        ]
    )
    seen: list[DistributionEvent] = []
    task = wait_for_task(
        ec2, import_request(tmp_path), "import-snap-1", seen.append, sleep=lambda _s: None
    )
    assert task["SnapshotIds"] == ["snap-1"]
    assert [e.done for e in seen] == [2, 10, 30, 100]
    assert "validating" in str(seen[1])


def test_a_failed_import_task_raises_its_reason(tmp_path: Path) -> None:
    ec2 = FakeTasks(
        [("active", "validating", "10"), ("deleted", "ClientError: Disk validation failed", "10")]
    )
    with pytest.raises(ImportFailed, match="Disk validation failed"):
        wait_for_task(ec2, import_request(tmp_path), "import-snap-1", None, sleep=lambda _s: None)


def test_a_slow_import_task_times_out_with_a_resume_hint(tmp_path: Path) -> None:
    ec2 = FakeTasks([("active", "converting", "30")])
    with pytest.raises(VmbuildError) as info:
        wait_for_task(
            ec2,
            import_request(tmp_path, timeout=0.01),
            "import-snap-1",
            None,
            sleep=lambda _s: __import__("time").sleep(0.02),
        )
    assert "still converting" in str(info.value)
    assert "re-run" in str(info.value.hint)
