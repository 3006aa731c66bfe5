"""EBS direct upload against the local endpoint: which blocks, incremental, nothing left behind.

Real ext4 disks (mke2fs -d), real qcow2/raw artifacts, moto's server behind the front server
(which models ParentSnapshotId lineage, encryption rules and the snapshot lifecycle moto lacks,
see tests/support/ebsmodel.py). Expected blocks come from an independent oracle (debugfs
`testb`, block by block), never from vmbuild's own allocation code.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.aws.conftest import BUCKET, LocalAws
from tests.support.disks import (
    make_artifact,
    make_disk,
    used_blocks,
    write_guest_file,
    zero_file_in_place,
)
from tests.support.motoext import Fault
from vmbuild.config.distribution import DistributionConfig, load_distribution
from vmbuild.publish.distributor import DistributionResult, distribute

pytestmark = pytest.mark.aws

BLOCK = 512 * 1024
MIB = 1024 * 1024


def config(**imp: Any) -> DistributionConfig:
    data: dict[str, Any] = {
        "wait": {"poll_interval": 0.05},
        "import": {"workers": 4, **imp},
        "regions": [{"region": "us-east-1"}],
    }
    return load_distribution(data, "dist.yaml", "")


def encrypted_config(key: str, **imp: Any) -> DistributionConfig:
    data: dict[str, Any] = {
        "wait": {"poll_interval": 0.05},
        "import": {"workers": 4, **imp},
        "regions": [{"region": "us-east-1", "kms_key_id": key}],
    }
    return load_distribution(data, "dist.yaml", "")


def blocks_of(raw: Path) -> dict[int, bytes]:
    with raw.open("rb") as fh:
        return {
            i: fh.read(BLOCK).ljust(BLOCK, b"\0") for i in range(-(-raw.stat().st_size // BLOCK))
        }


def nonzero_outside(raw: Path, used: set[int]) -> set[int]:
    return {i for i, data in blocks_of(raw).items() if i not in used and any(data)}


def snapshot_content(aws: LocalAws, snapshot_id: str) -> dict[int, bytes]:
    """Every block the snapshot holds, read back with an independent client through the
    front (so a child reads through to its parent, as a volume would)."""
    import boto3

    ebs = boto3.client("ebs", region_name="us-east-1", endpoint_url=aws.front.url)
    listed = ebs.list_snapshot_blocks(SnapshotId=snapshot_id)["Blocks"]
    return {
        b["BlockIndex"]: ebs.get_snapshot_block(
            SnapshotId=snapshot_id, BlockIndex=b["BlockIndex"], BlockToken=b["BlockToken"]
        )["BlockData"].read()
        for b in listed
    }


def sent(aws: LocalAws) -> list[int]:
    return sorted(
        r.params["BlockIndex"] for r in aws.requests.find("PutSnapshotBlock") if r.status == 201
    )


def snapshots_left(aws: LocalAws) -> list[str]:
    """Snapshots of the account, as a third party sees them through the endpoint."""
    import boto3

    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=aws.front.url)
    # vmbuild tags every snapshot it starts with its upload key; moto's RegisterImage invents
    # a snapshot of its own (which the distribution then tags like the AMI).
    found = ec2.describe_snapshots(
        OwnerIds=["self"], Filters=[{"Name": "tag-key", "Values": ["vmbuild:upload"]}]
    )["Snapshots"]
    return [s["SnapshotId"] for s in found]


def source_snapshot(result: DistributionResult) -> str:
    (region,) = result.regions
    assert region.status == "created", result.to_json()
    # The uploaded snapshot comes last (moto's RegisterImage ignores the block device
    # mapping and invents a snapshot of its own, listed first).
    return region.snapshot_ids[-1]


def zero_file_disk(directory: Path) -> tuple[Path, list[int]]:
    """A disk whose guest wrote a 4 MiB file of zeros (blocks allocated, content zero)."""

    def add(tree: Path) -> None:
        (tree / "var/lib/zeros.bin").write_bytes(b"\xaa" * (4 * MIB))

    raw = make_disk(directory, edit=add)
    offsets = set(zero_file_in_place(raw, "/var/lib/zeros.bin"))
    # The 512 KiB blocks made only of the file's (1 KiB) blocks: all zero, all in use.
    whole = [i for i in range(128) if all(i * BLOCK + k * 1024 in offsets for k in range(512))]
    assert len(whole) >= 6
    return raw, whole


def test_used_zero_blocks_are_in_the_encrypted_snapshot_byte_identical(
    aws: LocalAws, store: Path, tmp_path: Path
) -> None:
    raw, zero_file = zero_file_disk(tmp_path / "disk")
    build_dir = make_artifact(store, raw, formats=("qcow2",))
    # The qcow2 hole case: qemu-img stores the zero file as zero clusters, not as data.
    layout = json.loads(
        subprocess.run(
            ["qemu-img", "map", "--output=json", str(build_dir / "disk.qcow2")],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    for index in zero_file:
        extent = next(e for e in layout if e["start"] <= index * BLOCK < e["start"] + e["length"])
        assert extent["zero"] and not extent["data"], extent

    key = aws.kms_key("us-east-1")
    result = distribute(build_dir, encrypted_config(key))
    snapshot_id = source_snapshot(result)
    (start,) = aws.requests.find("StartSnapshot")
    assert start.params["Encrypted"] is True and start.params["KmsKeyArn"] == key

    used = used_blocks(raw)
    expected = used | nonzero_outside(raw, used)
    assert set(zero_file) <= used
    assert sent(aws) == sorted(expected)
    disk = blocks_of(raw)
    content = snapshot_content(aws, snapshot_id)
    assert sorted(content) == sorted(expected)
    for index in expected:
        assert content[index] == disk[index], index
    for index in zero_file:
        assert content[index] == bytes(BLOCK)
    # The snapshot is complete where the guest can read: the free space is all it lacks.
    up = result.upload
    assert (up.blocks_sent, up.blocks_selected, up.blocks_total) == (
        len(expected),
        len(expected),
        128,
    )
    partition = set(range(2, 112))  # make_disk's ext4: 1 MiB .. 56 MiB
    assert up.blocks_free == len(partition - expected)
    record = json.loads((build_dir / "manifest.json").read_text())["distribution"]["aws"][
        "snapshot"
    ]
    assert record["snapshot_id"] == snapshot_id and record["blocks"] == len(expected)
    assert record["encrypted"] is True and record["kms_key_arn"] == key


def test_upload_blocks_all_sends_every_block(aws: LocalAws, store: Path, good_disk: Path) -> None:
    build_dir = make_artifact(store, good_disk, formats=("qcow2",))
    result = distribute(build_dir, config(upload_blocks="all"))
    snapshot_id = source_snapshot(result)
    assert sent(aws) == list(range(128))
    content = snapshot_content(aws, snapshot_id)
    assert content == blocks_of(good_disk)
    assert result.upload.upload_blocks == "all" and result.upload.blocks_free == 0


def test_incremental_v2_sends_only_changed_blocks_and_reads_back_as_v2(
    aws: LocalAws, store: Path, tmp_path: Path
) -> None:
    raw1 = make_disk(tmp_path / "v1")
    v1 = make_artifact(store, raw1, version="1.0.0", build="20261122T180000Z-000001")
    key = aws.kms_key("us-east-1")
    first = distribute(v1, encrypted_config(key))
    parent = source_snapshot(first)
    assert first.upload.parent_snapshot_id is None
    full = first.upload.blocks_sent

    # Version 2: one component changed, i.e. a new 1 MiB file in the same file system.
    raw2 = tmp_path / "v2.raw"
    subprocess.run(["cp", "--sparse=always", str(raw1), str(raw2)], check=True)
    write_guest_file(raw2, "/var/lib/app.bin", os.urandom(MIB), tmp_path)
    v2 = make_artifact(store, raw2, version="1.1.0", build="20261123T180000Z-000002")
    planned = distribute(v2, encrypted_config(key), dry_run=True)
    assert (
        f"[ok  ] incremental: incremental on example-nginx/1.0.0/20261122T180000Z-000001's "
        f"snapshot {parent}" in planned.plan
    )
    aws.requests.clear()
    second = distribute(v2, encrypted_config(key))
    child = source_snapshot(second)

    (start,) = aws.requests.find("StartSnapshot")
    assert start.params["ParentSnapshotId"] == parent
    assert start.params["KmsKeyArn"] == key and "Encrypted" not in start.params
    old, new = blocks_of(raw1), blocks_of(raw2)
    used1, used2 = used_blocks(raw1), used_blocks(raw2)
    in_parent = used1 | nonzero_outside(raw1, used1)
    in_v2 = used2 | nonzero_outside(raw2, used2)
    changed = {i for i in in_v2 if i not in in_parent or old[i] != new[i]}
    assert changed and len(changed) < len(in_v2) // 4
    assert sent(aws) == sorted(changed)
    assert second.upload.blocks_sent == len(changed)
    assert second.upload.blocks_unchanged == len(in_v2) - len(changed)
    assert second.upload.bytes_sent == len(changed) * BLOCK < full * BLOCK
    assert second.upload.parent_snapshot_id == parent
    assert "incremental on example-nginx/1.0.0/" in second.upload.lineage

    # A volume from the child reads exactly v2's disk wherever v2's file system can read.
    content = snapshot_content(aws, child)
    assert set(content) == in_parent | in_v2
    for index in in_v2:
        assert content[index] == new[index], index
    # What it inherits beyond that lies in v2's free space.
    assert all(i not in in_v2 for i in set(content) - in_v2)
    record = json.loads((v2 / "manifest.json").read_text())["distribution"]["aws"]["snapshot"]
    assert (record["parent_snapshot_id"], record["blocks_written"]) == (parent, len(changed))


def test_incremental_falls_back_to_a_full_upload_when_the_parent_is_gone(
    aws: LocalAws, store: Path, good_disk: Path
) -> None:
    v1 = make_artifact(store, good_disk, version="1.0.0", build="20261122T180000Z-000001")
    parent = source_snapshot(distribute(v1, config()))
    aws.client("ec2").deregister_image(ImageId=_image_of(aws, "1.0.0"))
    aws.client("ec2").delete_snapshot(SnapshotId=parent)
    v2 = make_artifact(store, good_disk, version="1.1.0", build="20261123T180000Z-000002")
    aws.requests.clear()
    result = distribute(v2, config())
    source_snapshot(result)
    (start,) = aws.requests.find("StartSnapshot")
    assert "ParentSnapshotId" not in start.params
    assert result.upload.lineage.endswith(f"snapshot {parent} no longer exists: full upload")
    assert result.upload.blocks_sent == result.upload.blocks_selected


def _image_of(aws: LocalAws, version: str) -> str:
    images = aws.client("ec2").describe_images(
        Owners=["self"], Filters=[{"Name": "tag:vmbuild:version", "Values": [version]}]
    )["Images"]
    return str(images[0]["ImageId"])


def test_an_unencrypted_parent_is_not_used_for_an_encrypted_upload(
    aws: LocalAws, store: Path, good_disk: Path
) -> None:
    v1 = make_artifact(store, good_disk, version="1.0.0", build="20261122T180000Z-000001")
    parent = source_snapshot(distribute(v1, config()))
    v2 = make_artifact(store, good_disk, version="1.1.0", build="20261123T180000Z-000002")
    aws.requests.clear()
    result = distribute(v2, encrypted_config(aws.kms_key("us-east-1")))
    source_snapshot(result)
    (start,) = aws.requests.find("StartSnapshot")
    assert "ParentSnapshotId" not in start.params and start.params["Encrypted"] is True
    assert f"snapshot {parent} is unencrypted" in result.upload.lineage


# -- nothing left behind ------------------------------------------------------------------
def test_a_wrong_block_size_leaves_no_snapshot(aws: LocalAws, artifact: Path) -> None:
    aws.front.block_size = 512
    for _attempt in range(2):
        result = distribute(artifact, config())
        (region,) = result.regions
        assert region.status == "failed"
        assert "block size 512, expected 524288" in (region.error or "")
        assert result.upload.status == "failed"
    assert snapshots_left(aws) == []
    assert len(aws.requests.find("DeleteSnapshot")) == 2


def test_a_refused_block_deletes_the_snapshot(aws: LocalAws, artifact: Path) -> None:
    aws.front.inject(
        Fault(
            "ebs",
            "PutSnapshotBlock",
            count=1000,
            skip=3,
            status=400,
            code="ValidationException",
            message="The checksum does not match",
        )
    )
    result = distribute(artifact, config())
    (region,) = result.regions
    assert region.status == "failed" and "ValidationException" in (region.error or "")
    assert "deleted" in (region.error or "")
    assert snapshots_left(aws) == []
    # The next run starts clean and succeeds.
    aws.front.reset()
    assert distribute(artifact, config()).ok
    assert len(snapshots_left(aws)) == 1


def test_an_interrupted_upload_resumes(
    aws: LocalAws, store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("vmbuild.publish.ebs_direct.PROGRESS_INTERVAL", 0)  # every block
    raw = make_disk(tmp_path / "disk", data_mib=6)
    build_dir = make_artifact(store, raw, formats=("raw",))
    puts = 0

    def stop_after_some_blocks(event: Any) -> None:
        nonlocal puts
        if event.stage == "upload" and event.done is not None:
            puts += 1
            if puts == 6:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distribute(build_dir, config(workers=1), on_progress=stop_after_some_blocks)
    first = set(sent(aws))
    assert first and len(snapshots_left(aws)) == 1
    aws.requests.clear()
    result = distribute(build_dir, config())
    assert result.ok, result.to_json()
    assert not aws.requests.find("StartSnapshot")  # the same pending snapshot continued
    used = used_blocks(raw)
    expected = used | nonzero_outside(raw, used)
    assert set(sent(aws)).isdisjoint(first)
    assert set(sent(aws)) | first == expected
    assert result.upload.blocks_resumed == len(first)
    content = snapshot_content(aws, source_snapshot(result))
    disk = blocks_of(raw)
    assert content == {i: disk[i] for i in expected}


def test_an_orphan_of_an_interrupted_run_is_deleted_by_the_next(
    aws: LocalAws, artifact: Path, tmp_path: Path
) -> None:
    def stop(event: Any) -> None:
        if event.stage == "upload" and event.done is not None:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distribute(artifact, config(workers=1), on_progress=stop)
    (orphan,) = snapshots_left(aws)
    # The run died so early its journal never recorded the snapshot (or the cache was wiped).
    for journal in (tmp_path / "cache" / "distribute").glob("*.json"):
        journal.unlink()
    result = distribute(artifact, config())
    assert result.ok
    assert [r.params["SnapshotId"] for r in aws.requests.find("DeleteSnapshot")] == [orphan]
    assert snapshots_left(aws) == [source_snapshot(result)]


def test_an_unreachable_endpoint_is_named(
    aws: LocalAws,
    artifact: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tests.support.motoext import free_port
    from vmbuild.cli import main

    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    dist = tmp_path / "dist.yaml"
    dist.write_text("regions: [{region: us-east-1}]\n")
    assert (
        main(
            [
                "distribute",
                str(artifact),
                "--store",
                str(artifact.parents[2]),
                "--config",
                str(dist),
            ]
        )
        != 0
    )
    err = capsys.readouterr().err
    assert f"cannot reach AWS endpoint URL {url}" in err
    assert "credentials" not in err.lower()
    assert snapshots_left(aws) == []


def test_a_refused_import_leaves_no_s3_object(aws: LocalAws, artifact: Path) -> None:
    aws.setup_import()
    aws.front.inject(
        Fault(
            "ec2",
            "ImportSnapshot",
            count=1,
            status=400,
            code="InvalidParameter",
            message="The service role vmimport does not have sufficient permissions",
        )
    )
    data = {
        "import": {"method": "import-snapshot", "s3_bucket": BUCKET},
        "wait": {"poll_interval": 0.05},
        "regions": [{"region": "us-east-1"}],
    }
    result = distribute(artifact, load_distribution(data, "dist.yaml", ""))
    (region,) = result.regions
    assert region.status == "failed" and "InvalidParameter" in (region.error or "")
    assert [
        r.status
        for r in aws.requests.find("PutObject") + aws.requests.find("CompleteMultipartUpload")
    ]
    assert aws.client("s3").list_objects_v2(Bucket=BUCKET).get("KeyCount", 0) == 0
    assert snapshots_left(aws) == []
