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

from vmbuild.diskfs.allocation import AllocationMap, BlockClass
from vmbuild.publish.aws import Backoff, RetryStats, retry_kind, with_retries
from vmbuild.publish.ebs_direct import (
    UPLOAD_TAG,
    Journal,
    Parent,
    UploadFailed,
    UploadRequest,
    decode_digests,
    encode_digests,
    upload_snapshot,
)
from vmbuild.publish.events import DistributionEvent

BLOCK = 512 * 1024
NO_WAIT = Backoff(attempts=5, base=0.0)
SIZE = 32 * 1024 * 1024  # 64 blocks


def client_error(code: str, status: int = 400, op: str = "PutSnapshotBlock") -> Exception:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        op,
    )


class FakeEBS:
    """Checks per-block SHA-256, the LINEAR aggregate and StartSnapshot's parameter rules, as
    EBS does; a child snapshot reads through to its parent; records every call. Its `ec2`
    attribute deletes and describes the same snapshots."""

    def __init__(self, block_size: int = BLOCK) -> None:
        self.lock = threading.Lock()
        self.snapshots: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.faults: dict[str, list[Exception]] = {}
        self.block_size = block_size
        self.started = 0
        self.ec2 = FakeEC2(self)

    def _call(self, op: str, params: dict[str, Any]) -> None:
        with self.lock:
            self.calls.append((op, {k: v for k, v in params.items() if k != "BlockData"}))
            pending = self.faults.get(op)
            if pending:
                raise pending.pop(0)

    def start_snapshot(self, **params: Any) -> dict[str, Any]:
        self._call("StartSnapshot", params)
        parent = params.get("ParentSnapshotId")
        if parent is not None:
            if "Encrypted" in params:
                raise client_error("ValidationException", op="StartSnapshot")
            if self.snapshots.get(parent, {}).get("status") != "completed":
                raise client_error("ResourceNotFoundException", op="StartSnapshot")
        sid = f"snap-{self.started:04d}"
        self.started += 1
        self.snapshots[sid] = {"params": params, "blocks": {}, "status": "pending"}
        return {"SnapshotId": sid, "BlockSize": self.block_size, "Status": "pending"}

    def put_snapshot_block(self, **params: Any) -> dict[str, Any]:
        self._call("PutSnapshotBlock", params)
        snap = self.snapshots.get(params["SnapshotId"])
        if snap is None:
            raise client_error("ResourceNotFoundException")
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

    def view(self, sid: str) -> dict[int, bytes]:
        """What a volume made from `sid` reads in the blocks the snapshot holds."""
        snap = self.snapshots[sid]
        parent = snap["params"].get("ParentSnapshotId")
        blocks = self.view(parent) if parent else {}
        return {**blocks, **snap["blocks"]}

    def count(self, op: str) -> int:
        return sum(1 for name, _ in self.calls if name == op)


class FakeEC2:
    def __init__(self, ebs: FakeEBS) -> None:
        self.ebs = ebs
        self.deleted: list[str] = []

    def delete_snapshot(self, SnapshotId: str) -> None:
        if self.ebs.snapshots.pop(SnapshotId, None) is None:
            raise client_error("InvalidSnapshot.NotFound", op="DeleteSnapshot")
        self.deleted.append(SnapshotId)

    def describe_snapshots(self, **params: Any) -> dict[str, Any]:
        (flt,) = params["Filters"]
        assert flt["Name"] == f"tag:{UPLOAD_TAG}"
        found = []
        for sid, snap in self.ebs.snapshots.items():
            tags = {t["Key"]: t["Value"] for t in snap["params"].get("Tags", [])}
            if tags.get(UPLOAD_TAG) in flt["Values"]:
                found.append({"SnapshotId": sid, "State": snap["status"]})
        return {"Snapshots": found}


def make_raw(path: Path, blocks: dict[int, bytes], size: int = SIZE) -> Path:
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
        "journal_key": "key-1" * 8,
        "amap": AllocationMap.uniform(raw.stat().st_size, BlockClass.USED),
        "workers": 3,
    }
    params.update(overrides)
    return UploadRequest(**params)


def journal_of(tmp_path: Path) -> Journal | None:
    return Journal.load(tmp_path / "journal.json", "key-1" * 8)


@pytest.fixture
def disk(tmp_path: Path) -> tuple[Path, dict[int, bytes]]:
    blocks = {i: os.urandom(BLOCK) for i in (0, 1, 7, 8, 9, 30, 63)}
    blocks[20] = bytes(BLOCK)  # allocated, but zeros
    blocks[40] = b"\x01" + bytes(BLOCK - 1)
    raw = make_raw(tmp_path / "disk.raw", blocks)
    return raw, blocks


def whole(blocks: dict[int, bytes], total: int = 64) -> dict[int, bytes]:
    return {i: blocks.get(i, bytes(BLOCK)) for i in range(total)}


def test_every_used_block_is_sent_zero_or_not(
    tmp_path: Path, disk: tuple[Path, dict[int, bytes]]
) -> None:
    raw, blocks = disk
    ebs = FakeEBS()
    key = "arn:aws:kms:us-east-1:1:key/k"
    result = upload_snapshot(
        ebs, ebs.ec2, request(tmp_path, raw, encrypted=True, kms_key_arn=key), backoff=NO_WAIT
    )
    snap = ebs.snapshots[result.snapshot_id]
    assert snap["blocks"] == whole(blocks)  # holes and zero blocks included
    assert snap["status"] == "completed"
    start = snap["params"]
    assert (start["VolumeSize"], start["Encrypted"], start["KmsKeyArn"]) == (1, True, key)
    assert "ParentSnapshotId" not in start
    assert {"Key": UPLOAD_TAG, "Value": ("key-1" * 8)[:32]} in start["Tags"]
    assert result.blocks_sent == 64 and result.bytes_sent == 64 * BLOCK
    assert result.digests == {i: hashlib.sha256(d).digest() for i, d in whole(blocks).items()}
    journal = journal_of(tmp_path)
    assert journal is not None and journal.completed
    assert decode_digests(journal.digests) == result.digests


def test_the_map_decides_free_blocks_are_never_read(
    tmp_path: Path, disk: tuple[Path, dict[int, bytes]]
) -> None:
    raw, blocks = disk
    classes = bytearray([BlockClass.FREE]) * 64
    for i in (0, 1, 20, 21):  # 20 is zeros, 21 a hole: both used, both sent
        classes[i] = BlockClass.USED
    for i in (7, 40, 50):  # outside the file systems: 7 and 40 hold data, 50 is a hole
        classes[i] = BlockClass.PROBE
    amap = AllocationMap(SIZE, BLOCK, classes)
    ebs = FakeEBS()
    result = upload_snapshot(ebs, ebs.ec2, request(tmp_path, raw, amap=amap), backoff=NO_WAIT)
    got = ebs.snapshots[result.snapshot_id]["blocks"]
    assert sorted(got) == [0, 1, 7, 20, 21, 40]
    assert got[20] == got[21] == bytes(BLOCK)
    assert got[40] == blocks[40]
    assert (result.select.blocks_used, result.select.blocks_outside) == (4, 2)
    assert result.select.blocks_free == 64 - 7


def test_throttled_blocks_are_retried_and_counted(
    tmp_path: Path, disk: tuple[Path, dict[int, bytes]]
) -> None:
    raw, _ = disk
    ebs = FakeEBS()
    ebs.faults["PutSnapshotBlock"] = [
        client_error("ThrottlingException"),
        client_error("RequestThrottledException"),
        client_error("InternalServerException", 500),
    ]
    stats = RetryStats()
    upload_snapshot(ebs, ebs.ec2, request(tmp_path, raw), backoff=NO_WAIT, retry_stats=stats)
    assert (stats.throttled, stats.transient) == (2, 1)
    assert ebs.count("PutSnapshotBlock") == 64 + 3


def test_a_hard_failure_deletes_the_snapshot_and_the_journal(
    tmp_path: Path, disk: tuple[Path, dict[int, bytes]]
) -> None:
    raw, blocks = disk
    ebs = FakeEBS()
    ebs.faults["PutSnapshotBlock"] = [client_error("AccessDeniedException", 403)] * 80
    with pytest.raises(UploadFailed, match=r"AccessDeniedException.*snap-0000 deleted"):
        upload_snapshot(ebs, ebs.ec2, request(tmp_path, raw), backoff=NO_WAIT)
    assert ebs.ec2.deleted == ["snap-0000"] and ebs.snapshots == {}
    assert journal_of(tmp_path) is None
    ebs.faults.clear()
    result = upload_snapshot(ebs, ebs.ec2, request(tmp_path, raw), backoff=NO_WAIT)
    assert not result.resumed and result.snapshot_id == "snap-0001"
    assert ebs.snapshots[result.snapshot_id]["blocks"] == whole(blocks)


def test_a_wrong_block_size_leaves_no_snapshot(
    tmp_path: Path, disk: tuple[Path, dict[int, bytes]]
) -> None:
    raw, _ = disk
    ebs = FakeEBS(block_size=512)
    for _attempt in range(2):
        with pytest.raises(
            UploadFailed, match=r"block size 512, expected 524288; snapshot .* deleted"
        ):
            upload_snapshot(ebs, ebs.ec2, request(tmp_path, raw), backoff=NO_WAIT)
    assert ebs.snapshots == {} and ebs.count("PutSnapshotBlock") == 0
    assert journal_of(tmp_path) is None


def test_a_refused_start_creates_nothing(
    tmp_path: Path, disk: tuple[Path, dict[int, bytes]]
) -> None:
    raw, _ = disk
    ebs = FakeEBS()
    ebs.faults["StartSnapshot"] = [client_error("AccessDeniedException", 403, "StartSnapshot")]
    with pytest.raises(UploadFailed, match="StartSnapshot in us-east-1 refused"):
        upload_snapshot(ebs, ebs.ec2, request(tmp_path, raw), backoff=NO_WAIT)
    assert ebs.snapshots == {} and journal_of(tmp_path) is None


def test_ctrl_c_mid_upload_then_resume_sends_only_the_rest(
    tmp_path: Path, disk: tuple[Path, dict[int, bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    raw, blocks = disk
    monkeypatch.setattr("vmbuild.publish.ebs_direct.PROGRESS_INTERVAL", 0)  # every block
    ebs = FakeEBS()
    seen: list[DistributionEvent] = []

    def interrupt(event: DistributionEvent) -> None:
        seen.append(event)
        if len(seen) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        upload_snapshot(
            ebs, ebs.ec2, request(tmp_path, raw, workers=1), backoff=NO_WAIT, on_progress=interrupt
        )
    first = dict(ebs.snapshots["snap-0000"]["blocks"])
    assert 0 < len(first) < 64
    journal = journal_of(tmp_path)
    assert journal is not None and not journal.completed
    assert {i for i in range(64) if journal.is_done(i)} == set(first)

    ebs.calls.clear()
    result = upload_snapshot(ebs, ebs.ec2, request(tmp_path, raw), backoff=NO_WAIT)
    assert result.resumed and result.snapshot_id == "snap-0000"
    assert result.blocks_already == len(first)
    resent = [p["BlockIndex"] for op, p in ebs.calls if op == "PutSnapshotBlock"]
    assert sorted(resent) == sorted(set(range(64)) - set(first))
    assert ebs.snapshots["snap-0000"]["blocks"] == whole(blocks)  # the aggregate checked out


def test_an_orphan_from_a_run_that_died_before_its_journal_is_deleted(
    tmp_path: Path, disk: tuple[Path, dict[int, bytes]]
) -> None:
    raw, _ = disk
    ebs = FakeEBS()
    # A run started this upload's snapshot, then died before recording it anywhere.
    tags = [{"Key": UPLOAD_TAG, "Value": ("key-1" * 8)[:32]}]
    ebs.snapshots["snap-orphan"] = {"params": {"Tags": tags}, "blocks": {}, "status": "pending"}
    # Another image's pending upload, and this upload's completed snapshot: both kept.
    ebs.snapshots["snap-other"] = {
        "params": {"Tags": [{"Key": UPLOAD_TAG, "Value": "x" * 32}]},
        "blocks": {},
        "status": "pending",
    }
    ebs.snapshots["snap-done"] = {"params": {"Tags": tags}, "blocks": {}, "status": "completed"}
    result = upload_snapshot(ebs, ebs.ec2, request(tmp_path, raw), backoff=NO_WAIT)
    assert ebs.ec2.deleted == ["snap-orphan"]
    assert {"snap-other", "snap-done", result.snapshot_id} == set(ebs.snapshots)


def test_a_snapshot_that_no_longer_takes_blocks_is_replaced(
    tmp_path: Path, disk: tuple[Path, dict[int, bytes]]
) -> None:
    raw, blocks = disk
    ebs = FakeEBS()
    stale = Journal(
        path=tmp_path / "journal.json",
        key="key-1" * 8,
        snapshot_id="snap-gone",
        blocks_total=64,
        done=bytearray(8),
    )
    ebs.snapshots["snap-gone"] = {"params": {}, "blocks": {}, "status": "error"}
    stale.save()
    result = upload_snapshot(ebs, ebs.ec2, request(tmp_path, raw), backoff=NO_WAIT)
    assert result.snapshot_id != "snap-gone" and not result.resumed
    assert "snap-gone" in ebs.ec2.deleted
    assert ebs.snapshots[result.snapshot_id]["blocks"] == whole(blocks)


def test_a_completed_journal_skips_the_upload(
    tmp_path: Path, disk: tuple[Path, dict[int, bytes]]
) -> None:
    raw, _ = disk
    digests = {3: hashlib.sha256(b"x").digest()}
    Journal(
        path=tmp_path / "journal.json",
        key="key-1" * 8,
        snapshot_id="snap-done",
        blocks_total=64,
        done=bytearray(8),
        completed=True,
        digests=encode_digests(digests),
    ).save()
    ebs = FakeEBS()
    result = upload_snapshot(ebs, ebs.ec2, request(tmp_path, raw))
    assert (result.snapshot_id, result.digests) == ("snap-done", digests)
    assert ebs.calls == []
    # Another upload's journal at the same path is ignored.
    assert Journal.load(tmp_path / "journal.json", "key-2") is None


def test_incremental_sends_only_what_differs_from_the_parent(tmp_path: Path) -> None:
    v1 = {i: os.urandom(BLOCK) for i in range(10)}
    v1[30] = os.urandom(BLOCK)  # outside the file systems in v1
    raw1 = make_raw(tmp_path / "v1.raw", v1)
    classes = bytearray([BlockClass.FREE]) * 64
    classes[0:12] = bytearray([BlockClass.USED]) * 12
    classes[30] = BlockClass.PROBE
    amap = AllocationMap(SIZE, BLOCK, classes)
    ebs = FakeEBS()
    key = "arn:aws:kms:us-east-1:1:key/k"
    first = upload_snapshot(
        ebs,
        ebs.ec2,
        request(tmp_path, raw1, amap=amap, encrypted=True, kms_key_arn=key),
        backoff=NO_WAIT,
    )
    assert first.blocks_sent == 13  # 12 used (two of them holes) + 1 outside

    v2 = dict(v1)
    v2[3] = os.urandom(BLOCK)  # changed
    v2[11] = bytes(BLOCK)  # used both times, zero both times: unchanged
    v2[12] = os.urandom(BLOCK)  # became used
    del v2[30]  # data outside the file systems gone: must read as zeros now
    raw2 = make_raw(tmp_path / "v2.raw", v2)
    classes2 = bytearray(classes)
    classes2[12] = BlockClass.USED
    classes2[5] = BlockClass.FREE  # became free: left as the parent had it
    req = request(
        tmp_path,
        raw2,
        amap=AllocationMap(SIZE, BLOCK, classes2),
        encrypted=True,
        kms_key_arn=key,
        journal_key="key-2" * 8,
        parent=Parent(first.snapshot_id, first.digests),
    )
    second = upload_snapshot(ebs, ebs.ec2, req, backoff=NO_WAIT)
    start = ebs.snapshots[second.snapshot_id]["params"]
    assert start["ParentSnapshotId"] == first.snapshot_id
    assert start["KmsKeyArn"] == key and "Encrypted" not in start
    assert sorted(ebs.snapshots[second.snapshot_id]["blocks"]) == [3, 12, 30]
    assert (second.blocks_sent, second.blocks_zeroed, second.blocks_unchanged) == (3, 1, 10)
    view = ebs.view(second.snapshot_id)
    for index in (*range(13), 30):
        if index != 5:
            assert view[index] == v2.get(index, bytes(BLOCK)), index
    assert view[5] == v1[5]  # free in v2: nothing reads it
    assert second.digests == {i: hashlib.sha256(d).digest() for i, d in view.items()}


def test_digests_round_trip_and_reject_garbage() -> None:
    digests = {i * 7: hashlib.sha256(bytes([i])).digest() for i in range(100)}
    assert decode_digests(encode_digests(digests)) == digests
    with pytest.raises(ValueError, match="malformed"):
        decode_digests("not base64!")


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
