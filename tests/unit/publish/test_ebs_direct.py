"""EBS direct upload against an in-memory EBS that validates like the real one."""

from __future__ import annotations

import base64
import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest

from vmbuild.errors import VmbuildError
from vmbuild.publish.aws import Backoff, RetryStats, retry_kind, with_retries
from vmbuild.publish.ebs_direct import Journal, UploadRequest, upload_snapshot
from vmbuild.publish.events import DistributionEvent

BLOCK = 512 * 1024
NO_WAIT = Backoff(attempts=5, base=0.0)


def client_error(code: str, status: int = 400, op: str = "PutSnapshotBlock") -> Exception:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        op,
    )


class FakeEBS:
    """Checks per-block SHA-256 and the LINEAR aggregate, as EBS does; records every call."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.snapshots: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.faults: dict[str, list[Exception]] = {}

    def _call(self, op: str, params: dict[str, Any]) -> None:
        with self.lock:
            self.calls.append((op, {k: v for k, v in params.items() if k != "BlockData"}))
            pending = self.faults.get(op)
            if pending:
                raise pending.pop(0)

    def start_snapshot(self, **params: Any) -> dict[str, Any]:
        self._call("StartSnapshot", params)
        sid = f"snap-{len(self.snapshots):04d}"
        self.snapshots[sid] = {"params": params, "blocks": {}, "status": "pending"}
        return {"SnapshotId": sid, "BlockSize": BLOCK, "Status": "pending"}

    def put_snapshot_block(self, **params: Any) -> dict[str, Any]:
        self._call("PutSnapshotBlock", params)
        snap = self.snapshots[params["SnapshotId"]]
        if snap["status"] != "pending":
            raise client_error("ValidationException")
        data = params["BlockData"]
        assert len(data) == params["DataLength"] == BLOCK
        if base64.b64encode(hashlib.sha256(data).digest()).decode() != params["Checksum"]:
            raise client_error("ValidationException")
        with self.lock:
            snap["blocks"][params["BlockIndex"]] = data
        return {"Checksum": params["Checksum"]}

    def complete_snapshot(self, **params: Any) -> dict[str, Any]:
        self._call("CompleteSnapshot", params)
        snap = self.snapshots[params["SnapshotId"]]
        digests = hashlib.sha256()
        for index in sorted(snap["blocks"]):
            digests.update(hashlib.sha256(snap["blocks"][index]).digest())
        if params["Checksum"] != base64.b64encode(digests.digest()).decode():
            raise client_error("ValidationException", op="CompleteSnapshot")
        assert params["ChangedBlocksCount"] == len(snap["blocks"])
        snap["status"] = "completed"
        return {"Status": "completed"}

    def count(self, op: str) -> int:
        return sum(1 for name, _ in self.calls if name == op)


def make_raw(path: Path, blocks: dict[int, bytes], size: int) -> Path:
    """A sparse file with `blocks` written at their 512 KiB indexes."""
    with path.open("wb") as fh:
        fh.truncate(size)
        for index, data in blocks.items():
            fh.seek(index * BLOCK)
            fh.write(data)
    return path


def request(tmp_path: Path, raw: Path, **overrides: Any) -> UploadRequest:
    params: dict[str, Any] = {
        "raw": raw,
        "region": "us-east-1",
        "volume_gib": 1,
        "description": "test",
        "tags": {"vmbuild:artifact": "a/1/b"},
        "encrypted": False,
        "kms_key_arn": None,
        "journal_path": tmp_path / "journal.json",
        "journal_key": "key-1",
        "workers": 3,
    }
    params.update(overrides)
    return UploadRequest(**params)


@pytest.fixture
def disk(tmp_path: Path) -> tuple[Path, dict[int, bytes]]:
    blocks = {i: os.urandom(BLOCK) for i in (0, 1, 7, 8, 9, 30, 63)}
    blocks[20] = bytes(BLOCK)  # allocated, but zeros
    blocks[40] = b"\x01" + bytes(BLOCK - 1)
    raw = make_raw(tmp_path / "disk.raw", blocks, 32 * 1024 * 1024)
    return raw, {i: d for i, d in blocks.items() if any(d)}


def test_uploads_only_nonzero_blocks_with_checksums(
    tmp_path: Path, disk: tuple[Path, dict[int, bytes]]
) -> None:
    raw, expected = disk
    ebs = FakeEBS()
    result = upload_snapshot(
        ebs,
        request(tmp_path, raw, encrypted=True, kms_key_arn="arn:aws:kms:us-east-1:1:key/k"),
        backoff=NO_WAIT,
    )
    snap = ebs.snapshots[result.snapshot_id]
    assert snap["blocks"] == expected
    assert snap["status"] == "completed"
    start = snap["params"]
    assert (start["VolumeSize"], start["Encrypted"], start["KmsKeyArn"]) == (
        1,
        True,
        "arn:aws:kms:us-east-1:1:key/k",
    )
    assert start["Tags"] == [{"Key": "vmbuild:artifact", "Value": "a/1/b"}]
    assert result.blocks_sent == len(expected)
    assert result.scan.blocks_zero >= 1
    assert result.bytes_sent == len(expected) * BLOCK
    journal = Journal.load(tmp_path / "journal.json", "key-1")
    assert journal is not None and journal.completed


def test_throttled_blocks_are_retried_and_counted(
    tmp_path: Path, disk: tuple[Path, dict[int, bytes]]
) -> None:
    raw, expected = disk
    ebs = FakeEBS()
    ebs.faults["PutSnapshotBlock"] = [
        client_error("ThrottlingException"),
        client_error("RequestThrottledException"),
        client_error("InternalServerException", 500),
    ]
    stats = RetryStats()
    upload_snapshot(ebs, request(tmp_path, raw), backoff=NO_WAIT, retry_stats=stats)
    assert (stats.throttled, stats.transient) == (2, 1)
    assert ebs.count("PutSnapshotBlock") == len(expected) + 3


def test_a_hard_failure_keeps_the_journal_for_a_resume(
    tmp_path: Path, disk: tuple[Path, dict[int, bytes]]
) -> None:
    raw, expected = disk
    ebs = FakeEBS()
    ebs.faults["PutSnapshotBlock"] = [client_error("AccessDeniedException", 403)] * 50
    with pytest.raises(VmbuildError, match="AccessDeniedException") as info:
        upload_snapshot(ebs, request(tmp_path, raw), backoff=NO_WAIT)
    assert "resumes" in str(info.value.hint)
    ebs.faults.clear()
    result = upload_snapshot(ebs, request(tmp_path, raw), backoff=NO_WAIT)
    assert result.resumed and ebs.count("StartSnapshot") == 1
    assert ebs.snapshots[result.snapshot_id]["blocks"] == expected


def test_ctrl_c_mid_upload_then_resume_sends_only_the_rest(
    tmp_path: Path, disk: tuple[Path, dict[int, bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    raw, expected = disk
    monkeypatch.setattr("vmbuild.publish.ebs_direct.PROGRESS_INTERVAL", 0)  # every block
    ebs = FakeEBS()
    seen: list[DistributionEvent] = []

    def interrupt(event: DistributionEvent) -> None:
        seen.append(event)
        if len(seen) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        upload_snapshot(
            ebs, request(tmp_path, raw, workers=1), backoff=NO_WAIT, on_progress=interrupt
        )
    first = dict(ebs.snapshots["snap-0000"]["blocks"])
    assert 0 < len(first) < len(expected)
    journal = Journal.load(tmp_path / "journal.json", "key-1")
    assert journal is not None and not journal.completed
    assert {i for i in range(64) if journal.is_done(i)} == set(first)

    ebs.calls.clear()
    result = upload_snapshot(ebs, request(tmp_path, raw), backoff=NO_WAIT)
    assert result.resumed and result.snapshot_id == "snap-0000"
    assert result.blocks_already == len(first)
    resent = [p["BlockIndex"] for op, p in ebs.calls if op == "PutSnapshotBlock"]
    assert sorted(resent) == sorted(set(expected) - set(first))
    assert ebs.snapshots["snap-0000"]["blocks"] == expected  # the aggregate checked out too


def test_a_snapshot_that_no_longer_takes_blocks_is_replaced(
    tmp_path: Path, disk: tuple[Path, dict[int, bytes]]
) -> None:
    raw, expected = disk
    ebs = FakeEBS()
    stale = Journal(
        path=tmp_path / "journal.json",
        key="key-1",
        snapshot_id="snap-gone",
        blocks_total=64,
        done=bytearray(8),
    )
    ebs.snapshots["snap-gone"] = {"params": {}, "blocks": {}, "status": "error"}
    stale.save()
    result = upload_snapshot(ebs, request(tmp_path, raw), backoff=NO_WAIT)
    assert result.snapshot_id != "snap-gone" and not result.resumed
    assert ebs.snapshots[result.snapshot_id]["blocks"] == expected


def test_a_completed_journal_skips_the_upload(
    tmp_path: Path, disk: tuple[Path, dict[int, bytes]]
) -> None:
    raw, _ = disk
    Journal(
        path=tmp_path / "journal.json",
        key="key-1",
        snapshot_id="snap-done",
        blocks_total=64,
        done=bytearray(8),
        completed=True,
    ).save()
    ebs = FakeEBS()
    assert upload_snapshot(ebs, request(tmp_path, raw)).snapshot_id == "snap-done"
    assert ebs.calls == []
    # Another artifact's journal at the same path is ignored.
    assert Journal.load(tmp_path / "journal.json", "key-2") is None


def test_retry_classification_and_budget() -> None:
    assert retry_kind(client_error("RequestLimitExceeded")) == "throttled"
    assert retry_kind(client_error("SlowDown", 503)) == "throttled"
    assert retry_kind(client_error("Whatever", 429)) == "throttled"
    assert retry_kind(client_error("InternalError", 500)) == "transient"
    assert retry_kind(client_error("Whatever", 502)) == "transient"
    assert retry_kind(client_error("ValidationException")) is None
    assert retry_kind(ValueError("x")) is None
    calls = []

    def always_throttled() -> None:
        calls.append(1)
        raise client_error("ThrottlingException")

    with pytest.raises(botocore.exceptions.ClientError):
        with_retries(always_throttled, what="x", backoff=Backoff(attempts=4, base=0.0))
    assert len(calls) == 4
    delays = [Backoff(base=0.25, cap=2.0).delay(a) for a in range(10)]
    assert all(0 <= d <= 2.0 for d in delays)
