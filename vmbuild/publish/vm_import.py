"""The S3-based methods: upload the disk to S3, then ImportSnapshot or ImportImage (VM Import).

The temporary S3 object lives until its import task ends (completed or failed). If vmbuild is
interrupted or times out while AWS still works on the task, the object and a small state file
stay, and a re-run picks the same task up instead of uploading and importing again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import botocore.exceptions
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from s3transfer.subscribers import BaseSubscriber  # type: ignore[import-untyped]

from vmbuild.errors import VmbuildError
from vmbuild.publish.artifact import AWS_FORMAT
from vmbuild.publish.aws import describe_error, error_code
from vmbuild.publish.events import DistributionEvent, EventCallback, Throttled
from vmbuild.run import write_atomic

log = logging.getLogger("vmbuild.publish")

MIB = 1024 * 1024
FAILED_STATES = {"deleting", "deleted", "failed", "error"}


@dataclass
class ImportRequest:
    """Everything one import needs."""

    method: str  # import-snapshot | import-image
    disk: Path
    format: str  # vmdk | vhd | raw
    region: str
    bucket: str
    key: str
    role_name: str
    license_type: str
    boot_mode: str
    architecture: str
    encrypted: bool
    kms_key_arn: str | None
    description: str
    tags: dict[str, str]
    client_token: str
    timeout: float
    poll_interval: float
    workers: int
    state_path: Path
    state_key: str


@dataclass
class ImportOutcome:
    """What the import produced (ImportImage also yields an AMI to rename)."""

    task_id: str
    snapshot_id: str
    image_id: str | None = None
    snapshot_ids: list[str] = field(default_factory=list)
    bytes_uploaded: int = 0
    resumed: bool = False


class _Counter(BaseSubscriber):  # type: ignore[misc]
    """Counts bytes from s3transfer's worker threads; the main thread reports them."""

    def __init__(self) -> None:
        self.done = 0
        self._lock = threading.Lock()

    def on_progress(self, future: Any, bytes_transferred: int, **kwargs: Any) -> None:
        with self._lock:
            self.done += bytes_transferred


def upload_to_s3(s3: Any, req: ImportRequest, on_progress: EventCallback | None) -> int:
    """Multipart upload (parallel parts, bounded memory); returns the bytes uploaded."""
    size = req.disk.stat().st_size
    marker = f"{req.state_key}:{size}"
    try:
        head = s3.head_object(Bucket=req.bucket, Key=req.key)
        if head.get("Metadata", {}).get("vmbuild-upload") == marker:
            log.info("s3://%s/%s already uploaded", req.bucket, req.key)
            return 0
    except botocore.exceptions.ClientError as exc:
        if error_code(exc) not in {"404", "NoSuchKey", "NotFound"}:
            raise
    # S3 allows 10 000 parts; keep parts >= 16 MiB and few enough for any disk size.
    chunk = max(16 * MIB, -(-size // 9000))
    config = TransferConfig(
        multipart_threshold=chunk,
        multipart_chunksize=chunk,
        max_concurrency=max(1, min(req.workers, 8)),
        use_threads=True,
    )
    counter = _Counter()
    progress = Throttled(on_progress)
    with create_transfer_manager(s3, config) as manager:
        future = manager.upload(
            str(req.disk),
            req.bucket,
            req.key,
            extra_args={"Metadata": {"vmbuild-upload": marker}},
            subscribers=[counter],
        )
        try:
            while not future.done():
                time.sleep(0.2)
                progress(
                    DistributionEvent(
                        "s3-upload", req.region, counter.done, size, f"s3://{req.bucket}/{req.key}"
                    )
                )
            future.result()
        except BaseException:
            future.cancel()  # aborts the multipart upload: no orphaned parts
            raise
    progress(
        DistributionEvent("s3-upload", req.region, size, size, f"s3://{req.bucket}/{req.key}"),
        force=True,
    )
    return size


def delete_object(s3: Any, bucket: str, key: str) -> None:
    """Remove the temporary upload (best effort: a leftover costs storage, not correctness)."""
    try:
        s3.delete_object(Bucket=bucket, Key=key)
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
        log.warning("could not delete s3://%s/%s: %s", bucket, key, describe_error(exc))


def _tag_spec(resource: str, tags: dict[str, str]) -> list[dict[str, Any]]:
    return [{"ResourceType": resource, "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}]


def start_import(ec2: Any, req: ImportRequest) -> str:
    """ImportSnapshot or ImportImage; returns the task id."""
    container = {
        "Description": req.description,
        "Format": AWS_FORMAT[req.format],
        "UserBucket": {"S3Bucket": req.bucket, "S3Key": req.key},
    }
    common: dict[str, Any] = {
        "Description": req.description,
        "RoleName": req.role_name,
        "ClientToken": req.client_token,
    }
    if req.encrypted:
        common["Encrypted"] = True
        if req.kms_key_arn:
            common["KmsKeyId"] = req.kms_key_arn
    if req.method == "import-snapshot":
        response = ec2.import_snapshot(
            DiskContainer=container,
            TagSpecifications=_tag_spec("import-snapshot-task", req.tags),
            **common,
        )
    else:
        response = ec2.import_image(
            DiskContainers=[container],
            Architecture=req.architecture,
            BootMode=req.boot_mode,
            LicenseType=req.license_type,
            Platform="Linux",
            TagSpecifications=_tag_spec("import-image-task", req.tags),
            **common,
        )
    return str(response["ImportTaskId"])


def describe_task(ec2: Any, method: str, task_id: str) -> dict[str, Any] | None:
    """The task, flattened to Status/StatusMessage/Progress/SnapshotIds/ImageId; None if unknown."""
    try:
        if method == "import-snapshot":
            tasks = ec2.describe_import_snapshot_tasks(ImportTaskIds=[task_id])
            items = tasks.get("ImportSnapshotTasks", [])
            if not items:
                return None
            detail = items[0].get("SnapshotTaskDetail", {})
            snap = detail.get("SnapshotId")
            return {**detail, "SnapshotIds": [snap] if snap else []}
        tasks = ec2.describe_import_image_tasks(ImportTaskIds=[task_id])
        items = tasks.get("ImportImageTasks", [])
        if not items:
            return None
        task = dict(items[0])
        task["SnapshotIds"] = [
            d["SnapshotId"] for d in task.get("SnapshotDetails", []) if d.get("SnapshotId")
        ]
        return task
    except botocore.exceptions.ClientError as exc:
        if "NotFound" in error_code(exc):
            return None
        raise


def wait_for_task(
    ec2: Any,
    req: ImportRequest,
    task_id: str,
    on_progress: EventCallback | None,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Poll until the task completes; raise on failure or timeout."""
    deadline = time.monotonic() + req.timeout
    progress = Throttled(on_progress, interval=0)
    while True:
        task = describe_task(ec2, req.method, task_id)
        if task is None:
            raise VmbuildError(f"import task {task_id} disappeared in {req.region}")
        status = str(task.get("Status", "")).lower()
        message = str(task.get("StatusMessage", "") or status)
        if status == "completed":
            progress(DistributionEvent("import", req.region, 100, 100, f"{task_id} completed"))
            return task
        if status in FAILED_STATES:
            raise ImportFailed(f"{req.method} task {task_id} in {req.region} failed: {message}")
        pct = task.get("Progress")
        progress(
            DistributionEvent(
                "import",
                req.region,
                int(str(pct)) if str(pct).isdigit() else None,
                100,
                f"{task_id} {message}",
            )
        )
        if time.monotonic() > deadline:
            raise VmbuildError(
                f"{req.method} task {task_id} in {req.region} still {message} after "
                f"{req.timeout:.0f}s",
                hint="AWS keeps working on it: re-run the same command later to pick it up",
            )
        sleep(req.poll_interval)


class ImportFailed(VmbuildError):
    """AWS ended the import task with an error (the disk, the role, the bucket...)."""


def _load_state(req: ImportRequest) -> str | None:
    try:
        data = json.loads(req.state_path.read_text())
    except (OSError, ValueError):
        return None
    return str(data["task_id"]) if data.get("key") == req.state_key else None


def _save_state(req: ImportRequest, task_id: str) -> None:
    req.state_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(
        req.state_path,
        json.dumps(
            {"key": req.state_key, "task_id": task_id, "bucket": req.bucket, "key_s3": req.key}
        ),
    )


def run_import(
    ec2: Any,
    s3: Any,
    req: ImportRequest,
    on_progress: EventCallback | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> ImportOutcome:
    """Upload (unless a running task from an earlier run exists), import, wait, clean up."""
    task_id = _load_state(req)
    resumed = False
    uploaded = 0
    if task_id is not None:
        task = describe_task(ec2, req.method, task_id)
        if task is None or str(task.get("Status", "")).lower() in FAILED_STATES:
            task_id = None
        else:
            resumed = True
            log.info("resuming %s task %s", req.method, task_id)
    if task_id is None:
        uploaded = upload_to_s3(s3, req, on_progress)
        try:
            task_id = start_import(ec2, req)
        except botocore.exceptions.ClientError as exc:
            delete_object(s3, req.bucket, req.key)
            raise VmbuildError(f"{req.method} in {req.region}: {describe_error(exc)}") from None
        except BaseException:
            # No task id to resume with (endpoint gone, Ctrl-C): a task that did start fails
            # without its object, which is better than an object nobody will ever delete.
            delete_object(s3, req.bucket, req.key)
            raise
        _save_state(req, task_id)
    try:
        task = wait_for_task(ec2, req, task_id, on_progress, sleep)
    except ImportFailed:
        delete_object(s3, req.bucket, req.key)
        req.state_path.unlink(missing_ok=True)
        raise
    delete_object(s3, req.bucket, req.key)
    snapshot_ids = list(task["SnapshotIds"])
    if not snapshot_ids:
        raise VmbuildError(f"import task {task_id} completed without a snapshot")
    outcome = ImportOutcome(
        task_id=task_id,
        snapshot_id=snapshot_ids[0],
        image_id=task.get("ImageId"),
        snapshot_ids=snapshot_ids,
        bytes_uploaded=uploaded,
        resumed=resumed,
    )
    # The state file is kept until the caller registered/renamed the result (see forget_state).
    return outcome


def forget_state(req: ImportRequest) -> None:
    """Drop the resume state once the import's result is safely an AMI."""
    req.state_path.unlink(missing_ok=True)
