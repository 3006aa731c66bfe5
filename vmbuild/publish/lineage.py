"""Snapshot lineage: what an EBS direct upload records, and the parent the next version uses.

After an upload the artifact's manifest records, under `distribution.aws.snapshot`, the
snapshot id, where and how it is encrypted, and the SHA-256 of every 512 KiB block the
snapshot holds (its own and those inherited from its parent). The next version of the same
image (same name, same store) finds the newest such record for the same account and region,
checks that the snapshot still exists and that AWS allows it as a parent for the requested
encryption, and uploads only the blocks whose digest differs.

A snapshot uploaded before block digests were recorded is never used as a parent: its
all-zero blocks were skipped, so its digests cannot be recomputed from the disk.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import botocore.exceptions

from vmbuild.diskfs.partitions import BLOCK_SIZE
from vmbuild.errors import VmbuildError
from vmbuild.publish.aws import describe_error, error_code
from vmbuild.publish.ebs_direct import Parent, decode_digests

log = logging.getLogger("vmbuild.publish")

RECORD_KEY = "snapshot"


@dataclass(frozen=True)
class SnapshotRecord:
    """One uploaded snapshot, as the manifest keeps it (`distribution.aws.snapshot`)."""

    account: str
    region: str
    snapshot_id: str
    encrypted: bool
    kms_key_arn: str | None
    volume_gib: int
    upload_blocks: str
    blocks: int  # how many blocks the snapshot holds (own + inherited)
    blocks_written: int  # written into this snapshot itself
    digests: str  # ebs_direct.encode_digests
    parent_snapshot_id: str | None = None
    block_size: int = BLOCK_SIZE
    uploaded: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: object) -> SnapshotRecord | None:
        """The record, or None when `data` is not a complete one (older manifests)."""
        if not isinstance(data, dict):
            return None
        try:
            return cls(
                account=str(data["account"]),
                region=str(data["region"]),
                snapshot_id=str(data["snapshot_id"]),
                encrypted=bool(data["encrypted"]),
                kms_key_arn=data.get("kms_key_arn") or None,
                volume_gib=int(data["volume_gib"]),
                upload_blocks=str(data["upload_blocks"]),
                blocks=int(data["blocks"]),
                blocks_written=int(data["blocks_written"]),
                digests=str(data["digests"]),
                parent_snapshot_id=data.get("parent_snapshot_id") or None,
                block_size=int(data.get("block_size", BLOCK_SIZE)),
                uploaded=str(data.get("uploaded", "")),
            )
        except (KeyError, TypeError, ValueError):
            return None


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def recorded_snapshots(build_dir: Path) -> list[tuple[Path, SnapshotRecord]]:
    """Every snapshot recorded by the other builds of this image in its store, newest first.

    `build_dir` is `<store>/<name>/<version>/<build>`: the siblings under `<store>/<name>`
    are the image's other versions and builds.
    """
    from vmbuild.stages.store import load_manifest

    image_dir = build_dir.parent.parent
    found: list[tuple[Path, SnapshotRecord]] = []
    for manifest in sorted(image_dir.glob("*/*/manifest.json")):
        other = manifest.parent
        if other.resolve() == build_dir.resolve():
            continue
        try:
            distribution = load_manifest(other).distribution or {}
        except (VmbuildError, OSError):
            continue
        aws = distribution.get("aws") or {}
        record = SnapshotRecord.from_json(aws.get(RECORD_KEY))
        if record is not None:
            found.append((other, record))
    found.sort(key=lambda item: item[1].uploaded, reverse=True)
    return found


def find_parent(
    ec2: Any,
    build_dir: Path,
    *,
    account: str,
    region: str,
    encrypted: bool,
    kms_key_arn: str | None,
    volume_gib: int,
) -> tuple[Parent | None, str]:
    """The parent for an incremental upload (or None), and one line saying why."""
    candidates = [
        (d, r)
        for d, r in recorded_snapshots(build_dir)
        if (r.account, r.region) == (account, region)
    ]
    if not candidates:
        return None, f"no earlier version was uploaded to {account} in {region}: full upload"
    other, record = candidates[0]
    ref = "/".join(other.parts[-3:])
    if record.block_size != BLOCK_SIZE:
        return None, f"{ref}'s snapshot has {record.block_size}-byte blocks: full upload"
    if record.encrypted != encrypted or (encrypted and record.kms_key_arn != kms_key_arn):
        # EBS makes a child inherit its parent's encryption: an unencrypted parent cannot have
        # an encrypted child (and vice versa), and vmbuild does not re-key through a parent.
        def how(enc: bool, key: str | None) -> str:
            return f"encrypted with {key or 'aws/ebs'}" if enc else "unencrypted"

        theirs = how(record.encrypted, record.kms_key_arn)
        return None, (
            f"{ref}'s snapshot {record.snapshot_id} is {theirs}, "
            f"this upload is {how(encrypted, kms_key_arn)}; EBS cannot use it as the parent: "
            "full upload"
        )
    if volume_gib < record.volume_gib:
        return None, (
            f"{ref}'s snapshot is {record.volume_gib} GiB, larger than this disk "
            f"({volume_gib} GiB): full upload"
        )
    try:
        snaps = ec2.describe_snapshots(SnapshotIds=[record.snapshot_id]).get("Snapshots", [])
    except botocore.exceptions.ClientError as exc:
        if error_code(exc) == "InvalidSnapshot.NotFound":
            snaps = []
        else:
            return None, f"cannot check {record.snapshot_id}: {describe_error(exc)}: full upload"
    if not snaps:
        return None, f"{ref}'s snapshot {record.snapshot_id} no longer exists: full upload"
    state = snaps[0].get("State")
    if state != "completed":
        return None, f"{ref}'s snapshot {record.snapshot_id} is {state}: full upload"
    try:
        digests = decode_digests(record.digests)
    except ValueError as exc:
        return None, f"{ref}'s manifest: {exc}: full upload"
    return Parent(record.snapshot_id, digests), (
        f"incremental on {ref}'s snapshot {record.snapshot_id}"
    )
