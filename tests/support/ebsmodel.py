"""EBS snapshot lineage, encryption and lifecycle for the local endpoint (moto lacks them).

moto 5.2.5's EBS direct backend ignores `ParentSnapshotId`, `Encrypted`, `KmsKeyArn` and
`ClientToken` (its own docstring says so), reports EBS-direct snapshots as `completed` in
DescribeSnapshots while they are still pending, and keeps serving blocks of a snapshot after
EC2 DeleteSnapshot. This test-side extension sits in the front server, in front of moto, and
models what AWS documents, so the incremental upload and the cleanup are tested for real:

- **lineage**: StartSnapshot with `ParentSnapshotId` needs a completed, existing parent and a
  volume at least as large; ListSnapshotBlocks and GetSnapshotBlock of a child read through to
  its ancestors (the child's own block wins), exactly what a volume made from it would read;
- **encryption** (the "Encryption outcomes for EBS direct APIs" tables): `Encrypted` together
  with `ParentSnapshotId` is a ValidationException; a child inherits its parent's encryption
  and key, re-keyed by `KmsKeyArn`; an unencrypted parent with `KmsKeyArn` is a
  ValidationException (our reading of the table; encryption by default is not modelled);
  DescribeSnapshots reports `encrypted`/`kmsKeyId` as the rules decide;
- **lifecycle**: a started snapshot is `pending` in DescribeSnapshots until CompleteSnapshot;
  PutSnapshotBlock on a completed snapshot is a ValidationException; after DeleteSnapshot every
  EBS direct call on it is a ResourceNotFoundException.

Snapshots this model did not see start (e.g. made by the VM Import extension straight in moto)
are left as moto reports them.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from xml.etree import ElementTree

DEFAULT_KEY = "alias/aws/ebs"
# (status, headers, body) from moto for (method, path, body).
Forward = Callable[[str, str, bytes], tuple[int, dict[str, str], bytes]]


@dataclass
class SnapInfo:
    region: str
    volume_size: int
    encrypted: bool
    kms_key: str | None
    parent: str | None
    status: str = "pending"


def ebs_error(status: int, code: str, message: str) -> tuple[int, dict[str, str], bytes]:
    return (
        status,
        {"Content-Type": "application/json", "x-amzn-ErrorType": code},
        json.dumps({"message": message, "Reason": code}).encode(),
    )


class EbsLineage:
    """Per front server: the snapshots started through it, and those deleted."""

    ACTIONS = frozenset(
        {
            "StartSnapshot",
            "PutSnapshotBlock",
            "CompleteSnapshot",
            "ListSnapshotBlocks",
            "GetSnapshotBlock",
        }
    )

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.snaps: dict[str, SnapInfo] = {}
        self.deleted: set[str] = set()

    def reset(self) -> None:
        with self.lock:
            self.snaps.clear()
            self.deleted.clear()

    def info(self, snapshot_id: str) -> SnapInfo | None:
        with self.lock:
            return self.snaps.get(snapshot_id)

    def chain(self, snapshot_id: str) -> list[str]:
        """The snapshot, its parent, its grandparent..."""
        out = [snapshot_id]
        while (info := self.info(out[-1])) is not None and info.parent:
            out.append(info.parent)
        return out

    # -- EBS direct -------------------------------------------------------------------------
    def handle(
        self,
        region: str,
        action: str,
        params: dict[str, Any],
        method: str,
        path: str,
        body: bytes,
        forward: Forward,
    ) -> tuple[int, dict[str, str], bytes]:
        if action == "StartSnapshot":
            return self._start(region, params, path, body, forward)
        sid = str(params.get("SnapshotId", ""))
        with self.lock:
            gone = sid in self.deleted
        if gone:
            return ebs_error(
                404, "ResourceNotFoundException", f"The snapshot {sid} does not exist."
            )
        info = self.info(sid)
        if action == "PutSnapshotBlock" and info is not None and info.status != "pending":
            return ebs_error(400, "ValidationException", f"The snapshot {sid} is {info.status}.")
        if action == "ListSnapshotBlocks" and info is not None and info.parent:
            return self._list(sid, path, forward)
        if action == "GetSnapshotBlock" and info is not None and info.parent:
            return self._get(sid, int(params["BlockIndex"]), path, forward)
        status, headers, rbody = forward(method, path, body)
        if action == "CompleteSnapshot" and status < 300 and info is not None:
            with self.lock:
                info.status = "completed"
        return status, headers, rbody

    def _start(
        self, region: str, params: dict[str, Any], path: str, body: bytes, forward: Forward
    ) -> tuple[int, dict[str, str], bytes]:
        parent_id = params.get("ParentSnapshotId")
        kms = params.get("KmsKeyArn")
        size = int(params.get("VolumeSize", 0))
        if parent_id:
            if "Encrypted" in params:
                return ebs_error(
                    400,
                    "ValidationException",
                    "You cannot specify both ParentSnapshotId and Encrypted.",
                )
            parent = self.info(parent_id)
            with self.lock:
                gone = parent_id in self.deleted
            if parent is None or gone:
                return ebs_error(
                    404, "ResourceNotFoundException", f"The snapshot {parent_id} does not exist."
                )
            if parent.status != "completed":
                return ebs_error(
                    400, "ValidationException", f"The parent snapshot {parent_id} is not completed."
                )
            if size < parent.volume_size:
                return ebs_error(
                    400,
                    "ValidationException",
                    f"VolumeSize {size} is smaller than the parent's {parent.volume_size} GiB.",
                )
            if kms and not parent.encrypted:
                return ebs_error(
                    400,
                    "ValidationException",
                    "An unencrypted parent snapshot cannot have an encrypted child.",
                )
            encrypted, key = parent.encrypted, kms or parent.kms_key
        else:
            encrypted = bool(params.get("Encrypted"))
            if kms and not encrypted:
                return ebs_error(400, "ValidationException", "KmsKeyArn requires Encrypted.")
            key = (kms or DEFAULT_KEY) if encrypted else None
        status, headers, rbody = forward("POST", path, body)
        if status < 300:
            sid = str(json.loads(rbody)["SnapshotId"])
            with self.lock:
                self.snaps[sid] = SnapInfo(region, size, encrypted, key, parent_id or None)
            answer = json.loads(rbody)
            answer.update({"ParentSnapshotId": parent_id, "KmsKeyArn": key} if parent_id else {})
            rbody = json.dumps(answer).encode()
        return status, headers, rbody

    def _blocks(self, sid: str, path: str, forward: Forward) -> dict[int, str]:
        status, _, rbody = forward(
            "GET",
            re.sub(r"/snapshots/[^/]+/", f"/snapshots/{sid}/", path, count=1).split("?")[0],
            b"",
        )
        if status >= 300:
            return {}
        return {int(b["BlockIndex"]): str(b["BlockToken"]) for b in json.loads(rbody)["Blocks"]}

    def _list(self, sid: str, path: str, forward: Forward) -> tuple[int, dict[str, str], bytes]:
        merged: dict[int, str] = {}
        for ancestor in self.chain(sid):
            for index, token in self._blocks(ancestor, path, forward).items():
                merged.setdefault(index, token)
        info = self.info(sid)
        body = {
            "Blocks": [{"BlockIndex": i, "BlockToken": merged[i]} for i in sorted(merged)],
            "VolumeSize": info.volume_size if info else 0,
            "BlockSize": 524288,
        }
        return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()

    def _get(
        self, sid: str, index: int, path: str, forward: Forward
    ) -> tuple[int, dict[str, str], bytes]:
        for ancestor in self.chain(sid):
            if index in self._blocks(ancestor, f"/snapshots/{ancestor}/blocks", forward):
                return forward(
                    "GET", path.replace(f"/snapshots/{sid}/", f"/snapshots/{ancestor}/", 1), b""
                )
        return ebs_error(404, "ResourceNotFoundException", f"Block {index} is not in {sid}.")

    # -- EC2 --------------------------------------------------------------------------------
    def deleted_snapshot(self, snapshot_id: str) -> None:
        with self.lock:
            self.deleted.add(snapshot_id)

    def describe(self, body: bytes) -> bytes:
        """Rewrite moto's DescribeSnapshots items with the modelled state and encryption."""
        root = ElementTree.fromstring(body)
        ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
        snapshot_set = root.find(f"{ns}snapshotSet")
        if snapshot_set is None:
            return body
        for item in snapshot_set.findall(f"{ns}item"):
            sid = item.findtext(f"{ns}snapshotId") or ""
            info = self.info(sid)
            if info is None:
                continue
            for name, value in (
                ("status", info.status),
                ("encrypted", str(info.encrypted).lower()),
                ("kmsKeyId", info.kms_key),
            ):
                node = item.find(f"{ns}{name}")
                if value is None:
                    continue
                if node is None:
                    node = ElementTree.SubElement(item, f"{ns}{name}")
                node.text = value
        if ns:
            ElementTree.register_namespace("", ns[1:-1])
        return ElementTree.tostring(root, encoding="utf-8", xml_declaration=True)
