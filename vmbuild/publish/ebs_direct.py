"""Upload a raw disk as an EBS snapshot with the EBS direct APIs, resumably.

StartSnapshot, then PutSnapshotBlock for every non-zero 512 KiB block (parallel, SHA-256 each,
zero blocks skipped), then CompleteSnapshot with the LINEAR aggregate: the SHA-256 of the
concatenated block digests in index order. Blocks are read and hashed in index order by one
thread, so the aggregate is computed on the fly and memory stays bounded by the in-flight
window, however large the disk.

A journal (snapshot id + a bitmap of acknowledged blocks) is saved every second and on any
interruption; a re-run continues the same pending snapshot and sends only what is missing.
"""

from __future__ import annotations

import base64
import concurrent.futures
import functools
import hashlib
import json
import logging
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmbuild.diskfs.partitions import BLOCK_SIZE, ScanStats, scan_blocks
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


class SnapshotGone(VmbuildError):
    """The journal's pending snapshot can no longer take blocks: start a new one."""


@dataclass
class Journal:
    """Resumable state of one upload, saved as JSON next to vmbuild's cache."""

    path: Path
    key: str
    snapshot_id: str = ""
    client_token: str = ""
    blocks_total: int = 0
    done: bytearray = field(default_factory=bytearray)
    completed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load(cls, path: Path, key: str) -> Journal | None:
        """The journal at `path` if it belongs to the upload `key`."""
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if data.get("key") != key:
            return None
        return cls(
            path=path,
            key=key,
            snapshot_id=str(data["snapshot_id"]),
            client_token=str(data.get("client_token", "")),
            blocks_total=int(data["blocks_total"]),
            done=bytearray(zlib.decompress(base64.b64decode(data["done"]))),
            completed=bool(data.get("completed")),
        )

    def save(self) -> None:
        """Persist atomically (a crash leaves the previous journal, never half of one)."""
        with self._lock:
            bitmap = base64.b64encode(zlib.compress(bytes(self.done))).decode()
            payload = {
                "key": self.key,
                "snapshot_id": self.snapshot_id,
                "client_token": self.client_token,
                "blocks_total": self.blocks_total,
                "done": bitmap,
                "completed": self.completed,
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
        """Forget the upload (its snapshot can no longer be continued)."""
        self.path.unlink(missing_ok=True)


@dataclass
class SnapshotUpload:
    """The outcome of an upload."""

    snapshot_id: str
    checksum: str = ""
    resumed: bool = False
    blocks_sent: int = 0  # this run
    blocks_already: int = 0  # acknowledged in an earlier, interrupted run
    scan: ScanStats = field(default_factory=ScanStats)

    @property
    def bytes_sent(self) -> int:
        return self.blocks_sent * BLOCK_SIZE


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
    workers: int = 16


def upload_snapshot(
    ebs: Any,
    req: UploadRequest,
    *,
    backoff: Backoff | None = None,
    retry_stats: RetryStats | None = None,
    on_progress: EventCallback | None = None,
) -> SnapshotUpload:
    """Upload `req.raw` into a new (or the journal's pending) snapshot; return its id."""
    backoff = backoff or Backoff()
    journal = Journal.load(req.journal_path, req.journal_key)
    if journal is not None and journal.completed:
        log.info("snapshot %s already uploaded (journal)", journal.snapshot_id)
        return SnapshotUpload(snapshot_id=journal.snapshot_id, resumed=True)
    if journal is not None:
        try:
            return _send(ebs, req, journal, backoff, retry_stats, on_progress, resumed=True)
        except SnapshotGone as exc:
            log.warning("%s; starting a new snapshot", exc)
            journal.discard()
    journal = _start(ebs, req, backoff, retry_stats)
    return _send(ebs, req, journal, backoff, retry_stats, on_progress, resumed=False)


def _start(ebs: Any, req: UploadRequest, backoff: Backoff, stats: RetryStats | None) -> Journal:
    token = str(uuid.uuid4())
    params: dict[str, Any] = {
        "VolumeSize": req.volume_gib,
        "Description": req.description,
        "Tags": [{"Key": k, "Value": v} for k, v in req.tags.items()],
        "Timeout": SNAPSHOT_TIMEOUT_MINUTES,
        "ClientToken": token,
    }
    if req.encrypted:
        params["Encrypted"] = True
        if req.kms_key_arn:
            params["KmsKeyArn"] = req.kms_key_arn
    response = with_retries(
        lambda: ebs.start_snapshot(**params), what="StartSnapshot", backoff=backoff, stats=stats
    )
    if int(response.get("BlockSize", BLOCK_SIZE)) != BLOCK_SIZE:
        raise VmbuildError(f"EBS reported block size {response['BlockSize']}, expected 524288")
    blocks_total = -(-req.raw.stat().st_size // BLOCK_SIZE)
    journal = Journal(
        path=req.journal_path,
        key=req.journal_key,
        snapshot_id=str(response["SnapshotId"]),
        client_token=token,
        blocks_total=blocks_total,
        done=bytearray(-(-blocks_total // 8)),
    )
    journal.save()
    log.info("started snapshot %s (%d GiB) in %s", journal.snapshot_id, req.volume_gib, req.region)
    return journal


def _send(
    ebs: Any,
    req: UploadRequest,
    journal: Journal,
    backoff: Backoff,
    retry_stats: RetryStats | None,
    on_progress: EventCallback | None,
    *,
    resumed: bool,
) -> SnapshotUpload:
    result = SnapshotUpload(snapshot_id=journal.snapshot_id, resumed=resumed)
    progress = Throttled(on_progress, PROGRESS_INTERVAL)
    aggregate = hashlib.sha256()
    changed = 0
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
        exc = future.exception() if not future.cancelled() else None
        if future.cancelled():
            return
        if exc is not None:
            with lock:
                failures.append(exc)
            return
        journal.mark(index)
        acked_first.set()
        with lock:
            result.blocks_sent += 1

    last_save = time.monotonic()
    size = req.raw.stat().st_size
    pool = concurrent.futures.ThreadPoolExecutor(req.workers, thread_name_prefix="ebs-put")
    try:
        for index, data in scan_blocks(req.raw, result.scan):
            digest = hashlib.sha256(data).digest()
            aggregate.update(digest)
            changed += 1
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
        raise VmbuildError(
            f"upload to snapshot {journal.snapshot_id} in {req.region} failed: "
            f"{describe_error(exc)}",
            hint="re-run the same command: the upload resumes where it stopped",
        )
    result.checksum = base64.b64encode(aggregate.digest()).decode()
    with_retries(
        lambda: ebs.complete_snapshot(
            SnapshotId=journal.snapshot_id,
            ChangedBlocksCount=changed,
            Checksum=result.checksum,
            ChecksumAlgorithm="SHA256",
            ChecksumAggregationMethod="LINEAR",
        ),
        what="CompleteSnapshot",
        backoff=backoff,
        stats=retry_stats,
    )
    journal.completed = True
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
