"""Upload a raw disk as an EBS snapshot with the EBS direct APIs: resumable, incremental,
and never leaving a snapshot behind on failure.

Which blocks: the allocation map (`diskfs.allocation`) says, per 512 KiB block, whether a file
system uses it (sent, zero or not: on an encrypted volume a missing block reads as garbage),
whether it lies outside every file system (sent when it holds data), or only in free space
(never sent). `upload_blocks: all` is a map where every block is used.

Incremental: with a parent (the previous version's snapshot and the per-block SHA-256 digests
recorded when it was uploaded) the new snapshot starts with `ParentSnapshotId` and only blocks
whose digest differs are sent; a block outside the file systems that the parent had but the new
disk leaves empty is overwritten with zeros. Free space is left as the parent had it.

StartSnapshot, PutSnapshotBlock (parallel, SHA-256 each), CompleteSnapshot with the LINEAR
aggregate (the SHA-256 of the written blocks' digests in index order). One thread reads and
hashes in index order, so memory stays bounded by the in-flight window, whatever the disk size.

A journal (snapshot id, parent, a bitmap of acknowledged blocks) is saved every second and on
an interruption; a re-run continues the same pending snapshot. A *failure* (a refused call,
retries exhausted) deletes the snapshot instead. Every snapshot is tagged with its upload key,
so a snapshot whose run died before its journal was written is found and deleted next time.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import botocore.exceptions

from vmbuild.diskfs.allocation import AllocationMap, SelectStats, select_blocks
from vmbuild.diskfs.partitions import BLOCK_SIZE
from vmbuild.errors import VmbuildError
from vmbuild.publish.aws import Backoff, RetryStats, describe_error, error_code, with_retries
from vmbuild.publish.events import DistributionEvent, EventCallback, Throttled
from vmbuild.run import write_atomic

log = logging.getLogger("vmbuild.publish")

# EBS cancels a pending snapshot after this many minutes without activity; long enough to
# resume after a lunch break, short enough not to leave abandoned snapshots for days.
SNAPSHOT_TIMEOUT_MINUTES = 240
JOURNAL_SAVE_INTERVAL = 1.0
PROGRESS_INTERVAL = 0.5
UPLOAD_TAG = "vmbuild:upload"
ZERO_DIGEST = hashlib.sha256(bytes(BLOCK_SIZE)).digest()


class SnapshotGone(VmbuildError):
    """The journal's pending snapshot can no longer take blocks: start a new one."""


class UploadFailed(VmbuildError):
    """The upload failed; the snapshot it started was deleted (or the message says why not)."""


def encode_digests(digests: dict[int, bytes]) -> str:
    """Block index -> SHA-256, as compact text for the manifest (index-sorted, zlib, base64)."""
    packed = b"".join(struct.pack(">I", i) + digests[i] for i in sorted(digests))
    return base64.b64encode(zlib.compress(packed, 9)).decode()


def decode_digests(text: str) -> dict[int, bytes]:
    """Inverse of `encode_digests` (ValueError on anything malformed)."""
    try:
        packed = zlib.decompress(base64.b64decode(text, validate=True))
    except (zlib.error, ValueError) as exc:
        raise ValueError(f"malformed block digests: {exc}") from None
    if len(packed) % 36:
        raise ValueError("malformed block digests: truncated record")
    return {
        struct.unpack_from(">I", packed, at)[0]: packed[at + 4 : at + 36]
        for at in range(0, len(packed), 36)
    }


@dataclass(frozen=True)
class Parent:
    """The snapshot an incremental upload builds on, and what each of its blocks holds."""

    snapshot_id: str
    digests: dict[int, bytes]


@dataclass
class Journal:
    """Resumable state of one upload, saved as JSON next to vmbuild's cache."""

    path: Path
    key: str
    snapshot_id: str = ""
    client_token: str = ""
    parent_snapshot_id: str = ""
    blocks_total: int = 0
    done: bytearray = field(default_factory=bytearray)
    completed: bool = False
    digests: str = ""  # the finished snapshot's block digests (encode_digests)
    checksum: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load(cls, path: Path, key: str) -> Journal | None:
        """The journal at `path` if it belongs to the upload `key`."""
        try:
            data = json.loads(path.read_text())
            if data.get("key") != key:
                return None
            return cls(
                path=path,
                key=key,
                snapshot_id=str(data["snapshot_id"]),
                client_token=str(data.get("client_token", "")),
                parent_snapshot_id=str(data.get("parent_snapshot_id", "")),
                blocks_total=int(data["blocks_total"]),
                done=bytearray(zlib.decompress(base64.b64decode(data["done"]))),
                completed=bool(data.get("completed")),
                digests=str(data.get("digests", "")),
                checksum=str(data.get("checksum", "")),
            )
        except (OSError, ValueError, KeyError, zlib.error):
            return None

    def save(self) -> None:
        """Persist atomically (a crash leaves the previous journal, never half of one)."""
        with self._lock:
            bitmap = base64.b64encode(zlib.compress(bytes(self.done))).decode()
            payload = {
                "key": self.key,
                "snapshot_id": self.snapshot_id,
                "client_token": self.client_token,
                "parent_snapshot_id": self.parent_snapshot_id,
                "blocks_total": self.blocks_total,
                "done": bitmap,
                "completed": self.completed,
                "digests": self.digests,
                "checksum": self.checksum,
            }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(payload))

    def is_done(self, index: int) -> bool:
        """True if block `index` was acknowledged by EBS."""
        return bool(self.done[index >> 3] & (1 << (index & 7)))

    def mark(self, index: int) -> None:
        """Record block `index` as acknowledged (thread-safe)."""
        with self._lock:
            self.done[index >> 3] |= 1 << (index & 7)

    def discard(self) -> None:
        """Forget the upload (its snapshot is gone or can no longer be continued)."""
        self.path.unlink(missing_ok=True)


@dataclass
class SnapshotUpload:
    """The outcome of an upload."""

    snapshot_id: str
    checksum: str = ""
    resumed: bool = False
    parent_snapshot_id: str | None = None
    blocks_sent: int = 0  # this run
    blocks_already: int = 0  # acknowledged in an earlier, interrupted run
    blocks_unchanged: int = 0  # same content as the parent's block: not sent
    blocks_zeroed: int = 0  # outside the file systems, empty now, data in the parent: zeroed
    digests: dict[int, bytes] = field(default_factory=dict)  # the snapshot's whole content
    select: SelectStats = field(default_factory=SelectStats)

    @property
    def bytes_sent(self) -> int:
        return self.blocks_sent * BLOCK_SIZE

    @property
    def blocks_written(self) -> int:
        """Blocks this snapshot holds itself (the rest it inherits from its parent)."""
        return self.blocks_sent + self.blocks_already


@dataclass
class UploadRequest:
    """What to upload and how the snapshot is made."""

    raw: Path
    region: str
    volume_gib: int
    description: str
    tags: dict[str, str]
    encrypted: bool
    kms_key_arn: str | None
    journal_path: Path
    journal_key: str
    amap: AllocationMap
    parent: Parent | None = None
    workers: int = 16

    @property
    def upload_tag(self) -> str:
        return self.journal_key[:32]


def upload_snapshot(
    ebs: Any,
    ec2: Any,
    req: UploadRequest,
    *,
    backoff: Backoff | None = None,
    retry_stats: RetryStats | None = None,
    on_progress: EventCallback | None = None,
) -> SnapshotUpload:
    """Upload `req.raw` into a new (or the journal's pending) snapshot; return its id.

    Raises UploadFailed after deleting the snapshot it started; on an interruption
    (KeyboardInterrupt) the journal is kept and the next run resumes.
    """
    backoff = backoff or Backoff()
    with _upload_lock(req.journal_path):
        journal = Journal.load(req.journal_path, req.journal_key)
        if journal is not None and journal.completed:
            log.info("snapshot %s already uploaded (journal)", journal.snapshot_id)
            return SnapshotUpload(
                snapshot_id=journal.snapshot_id,
                checksum=journal.checksum,
                resumed=True,
                parent_snapshot_id=journal.parent_snapshot_id or None,
                digests=decode_digests(journal.digests) if journal.digests else {},
            )
        wanted_parent = req.parent.snapshot_id if req.parent else ""
        if journal is not None and journal.snapshot_id:
            if journal.parent_snapshot_id != wanted_parent:
                log.warning(
                    "pending snapshot %s has another parent; replacing it", journal.snapshot_id
                )
                _abandon(ec2, journal, backoff, retry_stats)
            else:
                try:
                    return _send(
                        ebs, ec2, req, journal, backoff, retry_stats, on_progress, resumed=True
                    )
                except SnapshotGone as exc:
                    log.warning("%s; starting a new snapshot", exc)
                    _abandon(ec2, journal, backoff, retry_stats)
        sweep_orphans(ec2, req.upload_tag, keep=None)
        journal = _start(ebs, ec2, req, backoff, retry_stats)
        return _send(ebs, ec2, req, journal, backoff, retry_stats, on_progress, resumed=False)


@contextlib.contextmanager
def _upload_lock(journal_path: Path) -> Iterator[None]:
    """One run per upload key at a time: the orphan sweep must not delete a live upload."""
    journal_path.parent.mkdir(parents=True, exist_ok=True)
    with journal_path.with_suffix(".lock").open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise VmbuildError(
                "another vmbuild is uploading this image to the same region right now",
                hint="wait for it to finish, then re-run",
            ) from None
        yield


def sweep_orphans(ec2: Any, upload_tag: str, keep: str | None) -> list[str]:
    """Delete unfinished snapshots of this upload left by runs that died before their journal
    recorded them (a completed one may back an AMI: it is left alone). Returns the ids."""
    try:
        found = ec2.describe_snapshots(
            OwnerIds=["self"], Filters=[{"Name": f"tag:{UPLOAD_TAG}", "Values": [upload_tag]}]
        ).get("Snapshots", [])
    except botocore.exceptions.ClientError as exc:
        log.warning("cannot look for orphaned snapshots: %s", describe_error(exc))
        return []
    deleted = []
    for snap in found:
        sid = str(snap["SnapshotId"])
        if sid == keep or snap.get("State") == "completed":
            continue
        if delete_snapshot(ec2, sid):
            log.info("deleted snapshot %s left by an interrupted upload", sid)
            deleted.append(sid)
    return deleted


def delete_snapshot(ec2: Any, snapshot_id: str) -> bool:
    """Delete `snapshot_id`; True when it is gone (already gone counts)."""
    try:
        ec2.delete_snapshot(SnapshotId=snapshot_id)
    except botocore.exceptions.ClientError as exc:
        if error_code(exc) == "InvalidSnapshot.NotFound":
            return True
        log.warning("could not delete snapshot %s: %s", snapshot_id, describe_error(exc))
        return False
    except botocore.exceptions.BotoCoreError as exc:
        log.warning("could not delete snapshot %s: %s", snapshot_id, exc)
        return False
    return True


def _abandon(ec2: Any, journal: Journal, backoff: Backoff, stats: RetryStats | None) -> str | None:
    """Delete the journal's snapshot and forget the journal; the reason it stays, if it does."""
    if journal.snapshot_id:
        try:
            with_retries(
                lambda: ec2.delete_snapshot(SnapshotId=journal.snapshot_id),
                what="DeleteSnapshot",
                backoff=backoff,
                stats=stats,
            )
        except botocore.exceptions.ClientError as exc:
            if error_code(exc) != "InvalidSnapshot.NotFound":
                # Keep the journal: the next run deletes (or resumes) it.
                return describe_error(exc)
        except botocore.exceptions.BotoCoreError as exc:
            return str(exc)
    journal.discard()
    return None


def _start(
    ebs: Any,
    ec2: Any,
    req: UploadRequest,
    backoff: Backoff,
    stats: RetryStats | None,
) -> Journal:
    blocks_total = req.amap.blocks_total
    # Saved before the call: a run that dies between StartSnapshot and the next save leaves a
    # journal without a snapshot id, and the snapshot's upload tag lets the next run's
    # sweep_orphans delete it.
    token = str(uuid.uuid4())
    journal = Journal(
        path=req.journal_path,
        key=req.journal_key,
        client_token=token,
        parent_snapshot_id=req.parent.snapshot_id if req.parent else "",
        blocks_total=blocks_total,
        done=bytearray(-(-blocks_total // 8)),
    )
    journal.save()
    params: dict[str, Any] = {
        "VolumeSize": req.volume_gib,
        "Description": req.description,
        "Tags": [
            {"Key": k, "Value": v} for k, v in {**req.tags, UPLOAD_TAG: req.upload_tag}.items()
        ],
        "Timeout": SNAPSHOT_TIMEOUT_MINUTES,
        "ClientToken": token,
    }
    if req.parent is not None:
        # EBS refuses Encrypted together with ParentSnapshotId: the child inherits the
        # parent's encryption, re-keyed only when KmsKeyArn is given.
        params["ParentSnapshotId"] = req.parent.snapshot_id
        if req.encrypted and req.kms_key_arn:
            params["KmsKeyArn"] = req.kms_key_arn
    elif req.encrypted:
        params["Encrypted"] = True
        if req.kms_key_arn:
            params["KmsKeyArn"] = req.kms_key_arn
    try:
        response = with_retries(
            lambda: ebs.start_snapshot(**params), what="StartSnapshot", backoff=backoff, stats=stats
        )
    except botocore.exceptions.ClientError as exc:
        journal.discard()  # refused: nothing was created
        raise UploadFailed(
            f"StartSnapshot in {req.region} refused: {describe_error(exc)}"
        ) from None
    journal.snapshot_id = str(response["SnapshotId"])
    journal.save()
    if int(response.get("BlockSize", BLOCK_SIZE)) != BLOCK_SIZE:
        kept = _abandon(ec2, journal, backoff, stats)
        raise UploadFailed(
            f"EBS reported block size {response['BlockSize']}, expected {BLOCK_SIZE}; "
            + (
                f"snapshot {journal.snapshot_id} deleted"
                if kept is None
                else f"snapshot {journal.snapshot_id} could not be deleted ({kept}): "
                "the next run deletes it"
            )
        )
    log.info(
        "started snapshot %s (%d GiB) in %s%s",
        journal.snapshot_id,
        req.volume_gib,
        req.region,
        f" on parent {req.parent.snapshot_id}" if req.parent else "",
    )
    return journal


def _send(
    ebs: Any,
    ec2: Any,
    req: UploadRequest,
    journal: Journal,
    backoff: Backoff,
    retry_stats: RetryStats | None,
    on_progress: EventCallback | None,
    *,
    resumed: bool,
) -> SnapshotUpload:
    result = SnapshotUpload(
        snapshot_id=journal.snapshot_id,
        resumed=resumed,
        parent_snapshot_id=req.parent.snapshot_id if req.parent else None,
    )
    parent = req.parent.digests if req.parent else {}
    result.digests = dict(parent)
    progress = Throttled(on_progress, PROGRESS_INTERVAL)
    aggregate = hashlib.sha256()
    written = 0
    # Bound the blocks held in memory: the reader waits when this many are in flight.
    window = threading.BoundedSemaphore(req.workers * 2)
    failures: list[BaseException] = []
    lock = threading.Lock()
    acked_first = threading.Event()

    def put(index: int, data: bytes, checksum: str) -> None:
        with_retries(
            lambda: ebs.put_snapshot_block(
                SnapshotId=journal.snapshot_id,
                BlockIndex=index,
                BlockData=data,
                DataLength=len(data),
                Checksum=checksum,
                ChecksumAlgorithm="SHA256",
            ),
            what=f"PutSnapshotBlock {index}",
            backoff=backoff,
            stats=retry_stats,
        )

    def finished(index: int, future: concurrent.futures.Future[None]) -> None:
        window.release()
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            with lock:
                failures.append(exc)
            return
        journal.mark(index)
        acked_first.set()
        with lock:
            result.blocks_sent += 1

    last_save = time.monotonic()
    size = req.amap.disk_size
    pool = concurrent.futures.ThreadPoolExecutor(req.workers, thread_name_prefix="ebs-put")
    try:
        for index, data in select_blocks(req.raw, req.amap, result.select):
            if data is None:
                # Outside every file system and empty: nothing to send, unless the parent
                # has data there, which the new disk must not show.
                if index not in parent or parent[index] == ZERO_DIGEST:
                    continue
                data = bytes(BLOCK_SIZE)
                result.blocks_zeroed += 1
            digest = hashlib.sha256(data).digest()
            if parent.get(index) == digest:
                result.blocks_unchanged += 1
                continue
            result.digests[index] = digest
            aggregate.update(digest)
            written += 1
            if journal.is_done(index):
                result.blocks_already += 1
                continue
            while not window.acquire(timeout=0.5):
                last_save = _maybe_save(journal, last_save)
                if failures:
                    break
            if failures:
                break
            future = pool.submit(put, index, data, base64.b64encode(digest).decode())
            future.add_done_callback(functools.partial(finished, index))
            last_save = _maybe_save(journal, last_save)
            progress(
                DistributionEvent(
                    "upload",
                    req.region,
                    index * BLOCK_SIZE,
                    size,
                    f"{result.blocks_sent * BLOCK_SIZE >> 20} MiB sent",
                )
            )
        pool.shutdown(wait=True)
    except BaseException:
        # Ctrl-C or a failing callback: keep what was acknowledged so a re-run resumes.
        pool.shutdown(wait=True, cancel_futures=True)
        journal.save()
        raise
    journal.save()
    if failures:
        exc = failures[0]
        if resumed and not acked_first.is_set() and _snapshot_rejects(exc):
            raise SnapshotGone(f"pending snapshot {journal.snapshot_id}: {describe_error(exc)}")
        _fail(
            ec2,
            journal,
            backoff,
            retry_stats,
            f"upload to snapshot {journal.snapshot_id} "
            f"in {req.region} failed: {describe_error(exc)}",
        )
    result.checksum = base64.b64encode(aggregate.digest()).decode()
    try:
        with_retries(
            lambda: ebs.complete_snapshot(
                SnapshotId=journal.snapshot_id,
                ChangedBlocksCount=written,
                Checksum=result.checksum,
                ChecksumAlgorithm="SHA256",
                ChecksumAggregationMethod="LINEAR",
            ),
            what="CompleteSnapshot",
            backoff=backoff,
            stats=retry_stats,
        )
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
        _fail(
            ec2,
            journal,
            backoff,
            retry_stats,
            f"CompleteSnapshot {journal.snapshot_id} in {req.region} failed: {describe_error(exc)}",
        )
    journal.completed = True
    journal.digests = encode_digests(result.digests)
    journal.checksum = result.checksum
    journal.save()
    progress(
        DistributionEvent(
            "upload",
            req.region,
            size,
            size,
            f"{result.bytes_sent >> 20} MiB sent, snapshot {journal.snapshot_id}",
        ),
        force=True,
    )
    return result


def _fail(
    ec2: Any, journal: Journal, backoff: Backoff, stats: RetryStats | None, message: str
) -> None:
    """Delete the failed upload's snapshot, then raise UploadFailed saying so."""
    kept = _abandon(ec2, journal, backoff, stats)
    if kept is None:
        raise UploadFailed(f"{message}; snapshot {journal.snapshot_id} deleted")
    raise UploadFailed(
        f"{message}; snapshot {journal.snapshot_id} could not be deleted ({kept})",
        hint="re-run the same command: it resumes the snapshot or deletes it",
    )


def _maybe_save(journal: Journal, last: float) -> float:
    now = time.monotonic()
    if now - last >= JOURNAL_SAVE_INTERVAL:
        journal.save()
        return now
    return last


def _snapshot_rejects(exc: BaseException) -> bool:
    """True when EBS refuses blocks because the snapshot is no longer pending or gone."""
    return error_code(exc) in {
        "ValidationException",
        "ResourceNotFoundException",
        "ConflictException",
        "AccessDeniedException",
    }
