"""VM Import for the local endpoint: ImportSnapshot and ImportImage, which moto lacks.

This is a test-side extension of moto, not a mock of vmbuild: it answers the EC2 query API
like AWS (same XML shapes, botocore parses them), and does the work for real against moto:

- the request is validated synchronously like AWS (disk format name, the service role exists
  in IAM, ClientToken idempotency);
- the task then progresses in a thread: `active/pending` -> `validating` (the S3 object is read
  from moto; a missing object fails the task; `qemu-img info` must detect the declared format,
  VMDK/VHD/RAW, or the task fails with AWS's "Disk validation failed" message; ImportImage also
  requires a partition table: "Unknown OS / Missing OS files") -> `converting` (`qemu-img
  convert` to raw) -> the raw disk is written into a **real EBS snapshot in moto** with the
  EBS direct APIs -> ImportImage registers a **real AMI** named `import-ami-...` from it ->
  `completed`; failures end in `deleted` with the reason in StatusMessage, as AWS does.

Encrypted/KmsKeyId/BootMode/LicenseType are echoed in the task (moto would ignore them on the
snapshot): tests assert them from the recorded requests.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import boto3
import botocore.exceptions

EC2_NS = "http://ec2.amazonaws.com/doc/2016-11-15/"
QEMU_NAME = {"VMDK": "vmdk", "VHD": "vpc", "RAW": "raw", "VHDX": "vhdx"}
BLOCK = 512 * 1024


@dataclass
class Task:
    kind: str  # snapshot | image
    task_id: str
    region: str
    params: dict[str, Any]
    status: str = "active"
    message: str = "pending"
    progress: int = 0
    snapshot_id: str = ""
    image_id: str = ""
    disk_size: int = 0
    tags: list[tuple[str, str]] = field(default_factory=list)

    def p(self, key: str, default: str = "") -> str:
        return str(self.params.get(key, default))


class ImportService:
    """Holds import tasks; `handle()` answers one EC2 action."""

    ACTIONS = frozenset(
        {
            "ImportSnapshot",
            "ImportImage",
            "DescribeImportSnapshotTasks",
            "DescribeImportImageTasks",
            "CancelImportTask",
        }
    )
    step_delay = 0.05  # seconds per stage, so that pollers see the task progress

    def __init__(self, moto_url: str, workdir: Path) -> None:
        self.moto_url = moto_url
        self.workdir = workdir
        self.tasks: dict[str, Task] = {}
        self.tokens: dict[str, str] = {}
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def client(self, service: str, region: str) -> Any:
        return boto3.client(
            service,
            region_name=region,
            endpoint_url=self.moto_url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def reset(self) -> None:
        self.stop()
        with self.lock:
            self.tasks.clear()
            self.tokens.clear()

    def stop(self) -> None:
        for thread in self.threads:
            thread.join(60)
        self.threads.clear()

    # -- the API ------------------------------------------------------------------------
    def handle(self, action: str, region: str, params: dict[str, Any]) -> tuple[int, bytes]:
        try:
            if action in ("ImportSnapshot", "ImportImage"):
                return 200, self._start(action, region, params)
            if action == "CancelImportTask":
                task = self._get(params.get("ImportTaskId", ""))
                task.status, task.message = "deleted", "user cancelled"
                return 200, self._xml(
                    action, f"<state>deleted</state><importTaskId>{task.task_id}</importTaskId>"
                )
            ids = [v for k, v in sorted(params.items()) if k.startswith("ImportTaskId.")]
            kind = "snapshot" if action == "DescribeImportSnapshotTasks" else "image"
            tasks = (
                [self._get(i) for i in ids]
                if ids
                else [t for t in self.tasks.values() if t.kind == kind and t.region == region]
            )
            if kind == "snapshot":
                items = "".join(f"<item>{self._snapshot_task(t)}</item>" for t in tasks)
                return 200, self._xml(
                    action, f"<importSnapshotTaskSet>{items}</importSnapshotTaskSet>"
                )
            items = "".join(f"<item>{self._image_task(t)}</item>" for t in tasks)
            return 200, self._xml(action, f"<importImageTaskSet>{items}</importImageTaskSet>")
        except _ApiError as exc:
            body = (
                f'<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error>'
                f"<Code>{exc.code}</Code><Message>{escape(exc.message)}</Message></Error>"
                f"</Errors><RequestID>{uuid.uuid4()}</RequestID></Response>"
            )
            return 400, body.encode()

    def _get(self, task_id: str) -> Task:
        with self.lock:
            task = self.tasks.get(task_id)
        if task is None:
            raise _ApiError(
                "InvalidConversionTaskId.Malformed", f"The import task ID '{task_id}' is not valid"
            )
        return task

    def _start(self, action: str, region: str, params: dict[str, Any]) -> bytes:
        kind = "snapshot" if action == "ImportSnapshot" else "image"
        prefix = "DiskContainer." if kind == "snapshot" else "DiskContainer.1."
        fmt = str(params.get(f"{prefix}Format", "")).upper()
        allowed = {"VHD", "VMDK", "RAW"} | ({"OVA", "VHDX"} if kind == "image" else set())
        if fmt not in allowed:
            raise _ApiError("InvalidParameter", f"Unsupported disk format {fmt!r}")
        if not params.get(f"{prefix}UserBucket.S3Bucket") and not params.get(f"{prefix}Url"):
            raise _ApiError("InvalidParameter", "No disk container location")
        role = str(params.get("RoleName", "vmimport"))
        try:
            self.client("iam", region).get_role(RoleName=role)
        except botocore.exceptions.ClientError:
            raise _ApiError(
                "InvalidParameter",
                f"The service role {role} provided does not "
                "exist or does not have sufficient permissions",
            ) from None
        token = str(params.get("ClientToken", ""))
        with self.lock:
            if token and token in self.tokens:  # idempotent retry: the same task
                task = self.tasks[self.tokens[token]]
                return self._start_response(task)
            task_id = f"import-{'snap' if kind == 'snapshot' else 'ami'}-{uuid.uuid4().hex[:17]}"
            task = Task(kind, task_id, region, dict(params))
            task.tags = _tags(params, "TagSpecification.1.")
            self.tasks[task_id] = task
            if token:
                self.tokens[token] = task_id
        thread = threading.Thread(target=self._work, args=(task, prefix, fmt), daemon=True)
        self.threads.append(thread)
        thread.start()
        return self._start_response(task)

    def _start_response(self, task: Task) -> bytes:
        if task.kind == "snapshot":
            return self._xml(
                "ImportSnapshot",
                f"<importTaskId>{task.task_id}</importTaskId>"
                f"<description>{escape(task.p('Description'))}</description>"
                f"<snapshotTaskDetail>{self._snapshot_detail(task)}"
                f"</snapshotTaskDetail>{_tag_set(task.tags)}",
            )
        return self._xml("ImportImage", self._image_task(task))

    # -- the work -----------------------------------------------------------------------
    def _step(self, task: Task, message: str, progress: int) -> None:
        if task.status != "active":
            raise _TaskFailed(task.message)
        task.message, task.progress = message, progress
        time.sleep(self.step_delay)

    def _work(self, task: Task, prefix: str, fmt: str) -> None:
        with tempfile.TemporaryDirectory(dir=self.workdir, prefix="import-") as tmp:
            try:
                self._convert_and_register(task, prefix, fmt, Path(tmp))
                task.status, task.message, task.progress = "completed", "", 100
            except _TaskFailed as exc:
                task.status, task.message = "deleted", str(exc)
            except Exception as exc:  # a bug in the fake must show in the test, not hang it
                task.status, task.message = "deleted", f"ServerError: {exc!r}"

    def _convert_and_register(self, task: Task, prefix: str, fmt: str, tmp: Path) -> None:
        self._step(task, "pending", 2)
        self._step(task, "validating", 10)
        bucket = task.p(f"{prefix}UserBucket.S3Bucket")
        key = task.p(f"{prefix}UserBucket.S3Key")
        source = tmp / "source"
        try:
            self.client("s3", task.region).download_file(bucket, key, str(source))
        except botocore.exceptions.ClientError as exc:
            raise _TaskFailed(
                f"ClientError: Unable to access S3 object s3://{bucket}/{key}: "
                f"{exc.response['Error'].get('Code')}"
            ) from None
        info = json.loads(
            subprocess.run(
                ["qemu-img", "info", "--output=json", str(source)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        )
        if info.get("format") != QEMU_NAME[fmt]:
            raise _TaskFailed(
                "ClientError: Disk validation failed [Unsupported specified file "
                f"format] (declared {fmt}, found {info.get('format')})"
            )
        task.disk_size = int(info["virtual-size"])
        self._step(task, "converting", 30)
        raw = tmp / "disk.raw"
        subprocess.run(
            ["qemu-img", "convert", "-f", QEMU_NAME[fmt], "-O", "raw", str(source), str(raw)],
            check=True,
            capture_output=True,
        )
        source.unlink()
        if task.kind == "image":
            head = raw.read_bytes()[:512] if raw.stat().st_size else b""
            if head[510:512] != b"\x55\xaa":
                raise _TaskFailed("ClientError: Unknown OS / Missing OS files.")
        self._step(task, "updating", 60)
        task.snapshot_id = self._snapshot(task, raw)
        if task.kind == "image":
            self._step(task, "preparing ami", 85)
            ec2 = self.client("ec2", task.region)
            task.image_id = ec2.register_image(
                Name=f"import-ami-{uuid.uuid4().hex[:17]}",
                Description=task.p("Description"),
                Architecture=task.p("Architecture", "x86_64"),
                RootDeviceName="/dev/sda1",
                BlockDeviceMappings=[
                    {"DeviceName": "/dev/sda1", "Ebs": {"SnapshotId": task.snapshot_id}}
                ],
                VirtualizationType="hvm",
                BootMode=task.p("BootMode", "legacy-bios"),
            )["ImageId"]
        self._step(task, "completed", 100)

    def _snapshot(self, task: Task, raw: Path) -> str:
        """A real snapshot in moto, written block by block with the EBS direct APIs."""
        ebs = self.client("ebs", task.region)
        gib = max(1, -(-raw.stat().st_size // 2**30))
        snap = ebs.start_snapshot(
            VolumeSize=gib, Description=f"Created by AWS-VMImport service for {task.task_id}"
        )
        sid = snap["SnapshotId"]

        def put(index: int, block: bytes) -> None:
            digest = base64.b64encode(hashlib.sha256(block).digest()).decode()
            ebs.put_snapshot_block(
                SnapshotId=sid,
                BlockIndex=index,
                BlockData=block,
                DataLength=BLOCK,
                Checksum=digest,
                ChecksumAlgorithm="SHA256",
            )

        count = 0
        with raw.open("rb") as fh, ThreadPoolExecutor(8) as pool:
            futures = []
            for index in _data_blocks(fh.fileno(), raw.stat().st_size):
                block = os.pread(fh.fileno(), BLOCK, index * BLOCK).ljust(BLOCK, b"\0")
                if block.count(0) != BLOCK:
                    futures.append(pool.submit(put, index, block))
                    count += 1
                if len(futures) >= 32:  # bound the blocks held in memory
                    futures.pop(0).result()
            for future in futures:
                future.result()
        ebs.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=count)
        return str(sid)

    # -- XML ----------------------------------------------------------------------------
    def _xml(self, action: str, inner: str) -> bytes:
        return (
            f'<?xml version="1.0" encoding="UTF-8"?><{action}Response xmlns="{EC2_NS}">'
            f"<requestId>{uuid.uuid4()}</requestId>{inner}</{action}Response>"
        ).encode()

    def _encryption(self, task: Task) -> str:
        encrypted = task.p("Encrypted", "false").lower() == "true"
        xml = f"<encrypted>{str(encrypted).lower()}</encrypted>"
        if task.p("KmsKeyId"):
            xml += f"<kmsKeyId>{escape(task.p('KmsKeyId'))}</kmsKeyId>"
        return xml

    def _snapshot_detail(self, task: Task) -> str:
        prefix = "DiskContainer."
        xml = (
            f"<description>{escape(task.p(prefix + 'Description'))}</description>"
            f"<diskImageSize>{float(task.disk_size)}</diskImageSize>"
            f"{self._encryption(task)}<format>{task.p(prefix + 'Format').upper()}</format>"
            f"<progress>{task.progress}</progress><status>{task.status}</status>"
            f"<statusMessage>{escape(task.message)}</statusMessage>"
            f"<userBucket><s3Bucket>{escape(task.p(prefix + 'UserBucket.S3Bucket'))}"
            f"</s3Bucket><s3Key>{escape(task.p(prefix + 'UserBucket.S3Key'))}</s3Key>"
            "</userBucket>"
        )
        if task.snapshot_id and task.status == "completed":
            xml += f"<snapshotId>{task.snapshot_id}</snapshotId>"
        return xml

    def _snapshot_task(self, task: Task) -> str:
        return (
            f"<importTaskId>{task.task_id}</importTaskId>"
            f"<description>{escape(task.p('Description'))}</description>"
            f"<snapshotTaskDetail>{self._snapshot_detail(task)}</snapshotTaskDetail>"
            f"{_tag_set(task.tags)}"
        )

    def _image_task(self, task: Task) -> str:
        prefix = "DiskContainer.1."
        detail = (
            f"<item><deviceName>/dev/sda1</deviceName>"
            f"<diskImageSize>{float(task.disk_size)}</diskImageSize>"
            f"<format>{task.p(prefix + 'Format').upper()}</format>"
            f"<status>{task.status}</status>"
            f"<userBucket><s3Bucket>{escape(task.p(prefix + 'UserBucket.S3Bucket'))}"
            f"</s3Bucket><s3Key>{escape(task.p(prefix + 'UserBucket.S3Key'))}</s3Key>"
            "</userBucket>"
            + (
                f"<snapshotId>{task.snapshot_id}</snapshotId>"
                if task.snapshot_id and task.status == "completed"
                else ""
            )
            + "</item>"
        )
        xml = (
            f"<importTaskId>{task.task_id}</importTaskId>"
            f"<architecture>{escape(task.p('Architecture', 'x86_64'))}</architecture>"
            f"<description>{escape(task.p('Description'))}</description>"
            f"{self._encryption(task)}"
            f"<licenseType>{escape(task.p('LicenseType', 'BYOL'))}</licenseType>"
            f"<platform>{escape(task.p('Platform', 'Linux'))}</platform>"
            f"<bootMode>{escape(task.p('BootMode', 'legacy-bios'))}</bootMode>"
            f"<progress>{task.progress}</progress><status>{task.status}</status>"
            f"<statusMessage>{escape(task.message)}</statusMessage>"
            f"<snapshotDetailSet>{detail}</snapshotDetailSet>{_tag_set(task.tags)}"
        )
        if task.image_id and task.status == "completed":
            xml += f"<imageId>{task.image_id}</imageId>"
        return xml


def _data_blocks(fd: int, size: int) -> list[int]:
    """Indexes of the 512 KiB blocks that hold data (holes are skipped, as EBS would)."""
    indexes: list[int] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        first = start // BLOCK
        if indexes and indexes[-1] >= first:
            first = indexes[-1] + 1
        indexes.extend(range(first, (end - 1) // BLOCK + 1))
        pos = end
    return indexes


def _tags(params: dict[str, Any], prefix: str) -> list[tuple[str, str]]:
    tags = []
    i = 1
    while f"{prefix}Tag.{i}.Key" in params:
        tags.append(
            (str(params[f"{prefix}Tag.{i}.Key"]), str(params.get(f"{prefix}Tag.{i}.Value", "")))
        )
        i += 1
    return tags


def _tag_set(tags: list[tuple[str, str]]) -> str:
    items = "".join(
        f"<item><key>{escape(k)}</key><value>{escape(v)}</value></item>" for k, v in tags
    )
    return f"<tagSet>{items}</tagSet>"


class _ApiError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class _TaskFailed(Exception):
    pass
