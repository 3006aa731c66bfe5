"""Distribution against a real local AWS endpoint (moto's server + the import extension).

Every test drives vmbuild through the standard endpoint variables, then checks the result
with an independent client straight to moto (and the AWS CLI), and checks what vmbuild *sent*
where moto ignores a field.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.aws.conftest import BUCKET, REGIONS, LocalAws
from tests.support.disks import make_artifact, make_disk, sign_artifact, used_blocks
from tests.support.motoext import Fault
from vmbuild.config.distribution import DistributionConfig, load_distribution
from vmbuild.publish.distributor import DistributionResult, LintFailed, distribute

pytestmark = pytest.mark.aws

OTHER_ACCOUNT = "111122223333"
ORG = "arn:aws:organizations::111122223333:organization/o-abcdefghij"
BLOCK = 512 * 1024


def dist_data(aws: LocalAws, method: str) -> dict[str, Any]:
    """Three regions: KMS by ARN in us-east-1, by alias in eu-west-1, public in ap-southeast-2."""
    aws.setup_import()
    us_key = aws.kms_key("us-east-1")
    eu_kms = aws.client("kms", "eu-west-1")
    eu_key = eu_kms.create_key()["KeyMetadata"]
    eu_kms.create_alias(AliasName="alias/images", TargetKeyId=eu_key["KeyId"])
    return {
        "import": {"method": method, "s3_bucket": BUCKET, "workers": 4, "timeout": 60},
        "wait": {"poll_interval": 0.05, "timeout": 60},
        "regions": [
            {
                "region": "us-east-1",
                "name": "{{ name }}-{{ version }}-{{ build_date }}",
                "kms_key_id": us_key,
                "ami_tags": {"team": "infra"},
                "launch_permission": {"user_ids": [OTHER_ACCOUNT]},
                "ssm_parameter_configurations": [{"parameter_name": "/images/nginx/latest"}],
            },
            {
                "region": "eu-west-1",
                "kms_key_id": "alias/images",
                "launch_permission": {"user_ids": [OTHER_ACCOUNT], "organization_arns": [ORG]},
            },
            {"region": "ap-southeast-2", "launch_permission": {"user_groups": ["all"]}},
        ],
        "_eu_key_arn": eu_key["Arn"],
        "_us_key_arn": us_key,
    }


def config_of(data: dict[str, Any]) -> DistributionConfig:
    return load_distribution(
        {k: v for k, v in data.items() if not k.startswith("_")}, "dist.yaml", ""
    )


def tags_of(item: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in item.get("Tags", [])}


def assert_distributed(
    aws: LocalAws, result: DistributionResult, data: dict[str, Any], build_dir: Path
) -> dict[str, str]:
    """Check with plain boto3 calls to moto: AMIs, tags, sharing, SSM, manifest."""
    assert result.ok, result.to_json()
    images = {}
    for region in REGIONS:
        ec2 = aws.client("ec2", region)
        found = ec2.describe_images(
            Owners=["self"],
            Filters=[{"Name": "tag:vmbuild:artifact", "Values": [result.artifact]}],
        )["Images"]
        assert len(found) == 1, (region, found)
        image = found[0]
        images[region] = image["ImageId"]
        tags = tags_of(image)
        assert tags["vmbuild:version"] == "1.0.0"
        assert tags["vmbuild:build"] == result.artifact.rsplit("/", 1)[1]
        assert len(tags["vmbuild:manifest-sha256"]) == 64
        assert tags["vmbuild:recipe-sha256"] == "ab" * 32
        assert tags.get("team") == ("infra" if region == "us-east-1" else None)
        perms = ec2.describe_image_attribute(
            ImageId=image["ImageId"], Attribute="launchPermission"
        )["LaunchPermissions"]
        region_result = next(r for r in result.regions if r.region == region)
        assert region_result.image_id == image["ImageId"]
        if region == "ap-southeast-2":
            assert {"Group": "all"} in perms
        else:
            assert {"UserId": OTHER_ACCOUNT} in perms
        if region == "eu-west-1":
            assert {"OrganizationArn": ORG} in perms
        for snapshot_id in region_result.snapshot_ids:
            attr = ec2.describe_snapshot_attribute(
                SnapshotId=snapshot_id, Attribute="createVolumePermission"
            )
            expected = {"Group": "all"} if region == "ap-southeast-2" else {"UserId": OTHER_ACCOUNT}
            assert expected in attr["CreateVolumePermissions"], (region, snapshot_id)
            snap = ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"][0]
            assert tags_of(snap)["vmbuild:artifact"] == result.artifact
    ssm = aws.client("ssm", "us-east-1")
    assert (
        ssm.get_parameter(Name="/images/nginx/latest")["Parameter"]["Value"] == images["us-east-1"]
    )
    # Names: the template in us-east-1, the default elsewhere.
    us_image = aws.client("ec2").describe_images(ImageIds=[images["us-east-1"]])["Images"][0]
    assert us_image["Name"] == "example-nginx-1.0.0-20261122T180000Z"
    # What vmbuild sent to the copies (moto ignores Encrypted/KmsKeyId on CopyImage).
    copies = {r.region: r.params for r in aws.requests.find("CopyImage", "ec2") if r.status == 200}
    assert copies["eu-west-1"]["Encrypted"] == "true"
    assert copies["eu-west-1"]["KmsKeyId"] == data["_eu_key_arn"]
    assert copies["eu-west-1"]["SourceRegion"] == "us-east-1"
    assert copies["eu-west-1"]["SourceImageId"] == images["us-east-1"]
    assert "Encrypted" not in copies["ap-southeast-2"]
    recorded = json.loads((build_dir / "manifest.json").read_text())["distribution"]["aws"]
    assert {r: v["image_id"] for r, v in recorded["regions"].items()} == images
    assert recorded["method"] == result.method
    return images


def aggregate_of(raw: Path) -> tuple[list[int], str]:
    """Independent computation: the blocks the snapshot must hold (every block the ext4 file
    system uses, per debugfs `testb`, zero or not, plus non-zero blocks outside it) and the
    LINEAR aggregate checksum of those blocks."""
    used = used_blocks(raw)
    indexes, digests = [], hashlib.sha256()
    with raw.open("rb") as fh:
        index = 0
        while block := fh.read(BLOCK):
            block = block.ljust(BLOCK, b"\0")
            if index in used or block.count(0) != BLOCK:
                indexes.append(index)
                digests.update(hashlib.sha256(block).digest())
            index += 1
    return indexes, base64.b64encode(digests.digest()).decode()


def assert_snapshot_holds(
    aws: LocalAws, region: str, snapshot_id: str, raw: Path, *, nonzero_only: bool = False
) -> None:
    """The snapshot's blocks in moto are exactly the blocks the disk's file system uses plus
    its data outside the file system, byte for byte. (`nonzero_only`: a snapshot made by the
    VM Import extension, which, like the service's own conversion, stores non-zero blocks.)"""
    ebs = aws.client("ebs", region)
    listed = ebs.list_snapshot_blocks(SnapshotId=snapshot_id)["Blocks"]
    expected, _ = aggregate_of(raw)
    if nonzero_only:
        with raw.open("rb") as fh:
            expected = [i for i in expected if fh.seek(i * BLOCK) >= 0 and any(fh.read(BLOCK))]
    assert sorted(b["BlockIndex"] for b in listed) == expected
    with raw.open("rb") as fh:
        for block in listed:
            fh.seek(block["BlockIndex"] * BLOCK)
            want = fh.read(BLOCK).ljust(BLOCK, b"\0")
            got = ebs.get_snapshot_block(
                SnapshotId=snapshot_id,
                BlockIndex=block["BlockIndex"],
                BlockToken=block["BlockToken"],
            )["BlockData"].read()
            assert got == want, block["BlockIndex"]


# -- the three methods ---------------------------------------------------------------------
def test_ebs_direct_lands_in_three_regions(aws: LocalAws, artifact: Path, good_disk: Path) -> None:
    data = dist_data(aws, "ebs-direct")
    result = distribute(artifact, config_of(data))
    images = assert_distributed(aws, result, data, artifact)

    start = aws.requests.find("StartSnapshot", "ebs")
    assert len(start) == 1
    assert start[0].params["Encrypted"] is True
    assert start[0].params["KmsKeyArn"] == data["_us_key_arn"]
    assert start[0].params["VolumeSize"] == 1
    puts = aws.requests.find("PutSnapshotBlock", "ebs")
    indexes, aggregate = aggregate_of(good_disk)
    # Every used block, zero or not; free space never.
    assert sorted(p.params["BlockIndex"] for p in puts) == indexes
    for put in puts:  # each block's checksum is the SHA-256 of the bytes that went out
        assert put.params["ChecksumAlgorithm"] == "SHA256"
        assert base64.b64decode(put.params["Checksum"]).hex() == put.body_sha256
        assert put.body_size == BLOCK
    complete = aws.requests.find("CompleteSnapshot", "ebs")[0].params
    assert complete["Checksum"] == aggregate
    assert complete["ChecksumAggregationMethod"] == "LINEAR"
    assert int(complete["ChangedBlocksCount"]) == len(indexes)
    snapshot_id = complete["SnapshotId"]
    assert_snapshot_holds(aws, "us-east-1", snapshot_id, good_disk)

    register = aws.requests.find("RegisterImage", "ec2")[0].params
    assert register["BlockDeviceMapping.1.DeviceName"] == "/dev/xvda"
    assert register["BlockDeviceMapping.1.Ebs.SnapshotId"] == snapshot_id
    assert register["BlockDeviceMapping.1.Ebs.VolumeType"] == "gp3"
    assert register["BlockDeviceMapping.1.Ebs.DeleteOnTermination"] == "true"
    assert register["RootDeviceName"] == "/dev/xvda"
    assert register["BootMode"] == "legacy-bios"
    assert register["EnaSupport"] == "true"
    assert register["Architecture"] == "x86_64"
    assert register["VirtualizationType"] == "hvm"
    assert result.upload.bytes_sent == len(indexes) * BLOCK
    assert result.upload.blocks_sent == len(indexes)

    # The AWS CLI, as a third party, sees the copy with its tags.
    env = {**os.environ, "AWS_ENDPOINT_URL": aws.moto.url}
    out = subprocess.run(
        [
            str(Path(sys.executable).with_name("aws")),
            "ec2",
            "describe-images",
            "--owners",
            "self",
            "--region",
            "eu-west-1",
            "--filters",
            f"Name=tag:vmbuild:artifact,Values={result.artifact}",
            "--output",
            "json",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    listed = json.loads(out.stdout)["Images"]
    assert [i["ImageId"] for i in listed] == [images["eu-west-1"]]

    # Idempotent: a re-run finds every AMI and creates nothing.
    aws.requests.clear()
    again = distribute(artifact, config_of(data))
    assert [r.status for r in again.regions] == ["existing"] * 3
    assert {r.region: r.image_id for r in again.regions} == images
    for action in ("StartSnapshot", "PutSnapshotBlock", "RegisterImage", "CopyImage"):
        assert not aws.requests.find(action), action


def test_import_snapshot_lands_in_three_regions(aws: LocalAws, store: Path, tmp_path: Path) -> None:
    # 40 MiB of incompressible data: the VMDK exceeds one 16 MiB part, so S3 gets a
    # parallel multipart upload.
    good_disk = make_disk(tmp_path / "disk", data_mib=40)
    artifact = make_artifact(store, good_disk)
    data = dist_data(aws, "import-snapshot")
    result = distribute(artifact, config_of(data))
    assert_distributed(aws, result, data, artifact)

    (task_request,) = aws.requests.find("ImportSnapshot", "ec2")
    sent = task_request.params
    assert sent["DiskContainer.Format"] == "VMDK"
    assert sent["DiskContainer.UserBucket.S3Bucket"] == BUCKET
    key = sent["DiskContainer.UserBucket.S3Key"]
    assert key == f"vmbuild/{result.artifact}/disk.vmdk"
    assert sent["Encrypted"] == "true"
    assert sent["KmsKeyId"] == data["_us_key_arn"]
    assert sent["RoleName"] == "vmimport"
    assert sent["TagSpecification.1.ResourceType"] == "import-snapshot-task"
    assert aws.requests.find("DescribeImportSnapshotTasks")  # polled until completed
    assert len(aws.requests.find("CreateMultipartUpload", "s3")) == 1
    parts = aws.requests.find("UploadPart", "s3")
    assert len(parts) >= 3 and {p.params["Key"] for p in parts} == {f"{BUCKET}/{key}"}
    assert sum(p.body_size for p in parts) >= 40 * 2**20
    assert len(aws.requests.find("CompleteMultipartUpload", "s3")) == 1
    # The temporary object is gone; the imported snapshot holds the disk.
    listed = aws.client("s3").list_objects_v2(Bucket=BUCKET).get("Contents", [])
    assert listed == []
    register = aws.requests.find("RegisterImage", "ec2")[0].params
    snapshot_id = register["BlockDeviceMapping.1.Ebs.SnapshotId"]
    assert_snapshot_holds(aws, "us-east-1", snapshot_id, good_disk, nonzero_only=True)
    assert not aws.requests.find("StartSnapshot", "ebs")  # nothing went the EBS-direct way


def test_import_image_lands_in_three_regions(aws: LocalAws, artifact: Path) -> None:
    data = dist_data(aws, "import-image")
    data["image"] = {"boot_mode": "legacy-bios"}
    data["import"]["license_type"] = "BYOL"
    result = distribute(artifact, config_of(data))
    assert_distributed(aws, result, data, artifact)

    (task_request,) = aws.requests.find("ImportImage", "ec2")
    sent = task_request.params
    assert sent["BootMode"] == "legacy-bios"
    assert sent["LicenseType"] == "BYOL"
    assert sent["Architecture"] == "x86_64"
    assert sent["Platform"] == "Linux"
    assert sent["RoleName"] == "vmimport"
    assert sent["Encrypted"] == "true"
    assert sent["KmsKeyId"] == data["_us_key_arn"]
    assert sent["DiskContainer.1.Format"] == "VMDK"
    # VM Import's unnamed import-ami-... was renamed by a same-region copy, then removed.
    renames = [r for r in aws.requests.find("CopyImage", "ec2", "us-east-1") if r.status == 200]
    assert len(renames) == 1
    (dereg,) = aws.requests.find("DeregisterImage", "ec2")
    assert dereg.params["ImageId"] == renames[0].params["SourceImageId"]
    ec2 = aws.client("ec2")
    leftovers = [
        i
        for i in ec2.describe_images(Owners=["self"])["Images"]
        if i["Name"].startswith("import-ami-")
    ]
    assert leftovers == []


# -- behaviour users rely on ---------------------------------------------------------------
def test_dry_run_prints_plan_and_checks_without_changing_anything(
    aws: LocalAws, artifact: Path
) -> None:
    data = dist_data(aws, "import-image")
    result = distribute(artifact, config_of(data), dry_run=True)
    assert [r.status for r in result.regions] == ["planned"] * 3
    assert "upload" in result.plan and "copy" in result.plan
    assert "[ok  ] bucket: s3://vmbuild-imports (us-east-1)" in result.plan
    assert "[ok  ] role: IAM role vmimport" in result.plan
    assert data["_eu_key_arn"] in result.plan  # the alias was resolved to the key's ARN
    assert result.lint is not None and result.lint.ok
    mutating = [
        r.action
        for r in aws.requests.requests
        if not r.action.startswith(("Describe", "Get", "Head", "List"))
    ]
    assert mutating == []


def test_preflight_reports_every_problem_before_upload(
    aws: LocalAws, artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vmbuild.cli import main

    # No bucket, no role; a KMS key that does not exist; an unknown region; a name collision.
    taken = aws.client("ec2", "eu-west-1").register_image(Name="nginx-taken")["ImageId"]
    data = {
        "import": {"method": "import-snapshot", "s3_bucket": "no-such-bucket"},
        "regions": [
            {
                "region": "us-east-1",
                "kms_key_id": "arn:aws:kms:us-east-1:123456789012:key/"
                "00000000-0000-0000-0000-000000000000",
            },
            {"region": "eu-west-1", "name": "nginx-taken"},
            {"region": "xx-nowhere-1"},
        ],
    }
    config = load_distribution(data, "dist.yaml", "")
    dry = distribute(artifact, config, dry_run=True)
    plan = dry.plan
    assert "[FAIL] bucket: s3://no-such-bucket does not exist" in plan
    assert "[FAIL] role: IAM role vmimport does not exist" in plan
    assert "[FAIL] kms us-east-1:" in plan
    assert "[FAIL] region xx-nowhere-1: unknown region" in plan
    assert f"[FAIL] ami-name eu-west-1: 'nginx-taken' is taken by {taken}" in plan
    from vmbuild.publish.distributor import PreflightFailed

    with pytest.raises(PreflightFailed, match="nothing was uploaded"):
        distribute(artifact, config)
    # The CLI: the dry run prints the plan and fails; the real run fails with the reasons.
    config_file = tmp_path / "dist.yaml"
    config_file.write_text(yaml.safe_dump(data))
    assert (
        main(
            [
                "distribute",
                str(artifact),
                "--store",
                str(artifact.parents[2]),
                "--config",
                str(config_file),
                "--dry-run",
            ]
        )
        == 1
    )
    out = capsys.readouterr()
    assert "[FAIL] bucket: s3://no-such-bucket does not exist" in out.out
    assert (
        main(
            [
                "distribute",
                str(artifact),
                "--store",
                str(artifact.parents[2]),
                "--config",
                str(config_file),
            ]
        )
        == 1
    )
    assert "preflight failed; nothing was uploaded" in capsys.readouterr().err
    assert not aws.requests.find("PutObject") and not aws.requests.find("ImportSnapshot")


def test_lint_failure_stops_the_upload_before_any_byte(
    aws: LocalAws, store: Path, tmp_path: Path
) -> None:
    def break_fstab(tree: Path) -> None:
        (tree / "etc/fstab").write_text("/dev/sda1 / ext4 defaults 0 1\n")

    raw = make_disk(tmp_path / "bad", edit=break_fstab)
    build_dir = make_artifact(store, raw)
    aws.setup_import()
    for method in ("ebs-direct", "import-snapshot", "import-image"):
        data = {
            "import": {"method": method, "s3_bucket": BUCKET},
            "regions": [{"region": "us-east-1"}, {"region": "eu-west-1"}],
        }
        with pytest.raises(LintFailed, match="fstab: root entry: /dev/sda1 is a device name"):
            distribute(build_dir, config_of(data))
    sent = {r.action for r in aws.requests.requests}
    for action in (
        "StartSnapshot",
        "PutSnapshotBlock",
        "PutObject",
        "CreateMultipartUpload",
        "UploadPart",
        "ImportSnapshot",
        "ImportImage",
        "RegisterImage",
    ):
        assert action not in sent


def test_throttling_is_retried_with_backoff(aws: LocalAws, artifact: Path) -> None:
    data = dist_data(aws, "ebs-direct")
    blocks = aws.front.inject(
        Fault(
            "ebs",
            "PutSnapshotBlock",
            count=3,
            code="ThrottlingException",
            status=400,
            message="Rate exceeded",
        )
    )
    register = aws.front.inject(Fault("ec2", "RegisterImage", count=2))
    copy = aws.front.inject(Fault("ec2", "CopyImage", count=1, region="eu-west-1"))
    result = distribute(artifact, config_of(data))
    assert result.ok, result.to_json()
    assert (blocks.hits, register.hits, copy.hits) == (3, 2, 1)
    assert result.upload.throttled_retries == 3  # counted by vmbuild's block retries
    assert len([r for r in aws.requests.find("RegisterImage") if r.status == 200]) == 1
    assert len(aws.requests.find("RegisterImage")) == 3


def test_a_failed_region_is_reported_and_a_rerun_finishes_only_it(
    aws: LocalAws, artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vmbuild.cli import main

    data = dist_data(aws, "ebs-direct")
    config_file = tmp_path / "dist.yaml"
    config_file.write_text(yaml.safe_dump({k: v for k, v in data.items() if not k.startswith("_")}))
    aws.front.inject(
        Fault(
            "ec2",
            "CopyImage",
            count=1,
            region="eu-west-1",
            code="UnauthorizedOperation",
            status=403,
            message="You are not authorized to perform this operation.",
        )
    )
    argv = [
        "distribute",
        str(artifact),
        "--store",
        str(artifact.parents[2]),
        "--config",
        str(config_file),
        "--json",
    ]
    assert main(argv) == 1
    first = json.loads(capsys.readouterr().out)
    status = {r["region"]: r["status"] for r in first["regions"]}
    assert status == {"us-east-1": "created", "eu-west-1": "failed", "ap-southeast-2": "copied"}
    failed = next(r for r in first["regions"] if r["region"] == "eu-west-1")
    assert "UnauthorizedOperation" in failed["error"]
    recorded = json.loads((artifact / "manifest.json").read_text())["distribution"]["aws"]
    assert recorded["regions"]["eu-west-1"]["status"] == "failed"

    aws.requests.clear()
    assert main(argv) == 0
    second = json.loads(capsys.readouterr().out)
    status = {r["region"]: r["status"] for r in second["regions"]}
    assert status == {"us-east-1": "existing", "eu-west-1": "copied", "ap-southeast-2": "existing"}
    assert [r.region for r in aws.requests.find("CopyImage")] == ["eu-west-1"]
    assert not aws.requests.find("StartSnapshot")
    for region in REGIONS:
        images = aws.client("ec2", region).describe_images(Owners=["self"])["Images"]
        assert len(images) == 1, region


def test_a_hard_failure_mid_upload_deletes_the_snapshot_and_the_rerun_starts_clean(
    aws: LocalAws, store: Path, tmp_path: Path
) -> None:
    raw = make_disk(tmp_path / "disk", data_mib=6)
    build_dir = make_artifact(store, raw, formats=("raw",))
    data = {
        "wait": {"poll_interval": 0.05},
        "import": {"workers": 2},
        "regions": [{"region": "us-east-1"}],
    }
    indexes, aggregate = aggregate_of(raw)
    # The credentials expire after 5 blocks: a hard, non-retryable failure mid-upload.
    aws.front.inject(
        Fault(
            "ebs",
            "PutSnapshotBlock",
            count=1000,
            skip=5,
            status=403,
            code="ExpiredTokenException",
            message="token expired",
        )
    )
    first = distribute(build_dir, config_of(data))
    (region,) = first.regions
    assert region.status == "failed"
    assert "ExpiredTokenException" in (region.error or "")
    assert len(aws.requests.find("StartSnapshot")) == 1
    (deleted,) = aws.requests.find("DeleteSnapshot")  # the snapshot it started
    assert deleted.status == 200
    assert f"snapshot {deleted.params['SnapshotId']} deleted" in (region.error or "")
    assert first.upload.status == "failed"

    aws.front.reset()  # credentials fixed
    second = distribute(build_dir, config_of(data))
    assert second.ok, second.to_json()
    assert len(aws.requests.find("StartSnapshot")) == 1  # a new snapshot, all blocks again
    sent_second = sorted(r.params["BlockIndex"] for r in aws.requests.find("PutSnapshotBlock"))
    assert sent_second == indexes
    (complete,) = aws.requests.find("CompleteSnapshot")
    assert complete.params["Checksum"] == aggregate
    assert int(complete.params["ChangedBlocksCount"]) == len(indexes)
    assert_snapshot_holds(aws, "us-east-1", complete.params["SnapshotId"], raw)
    assert deleted.params["SnapshotId"] != complete.params["SnapshotId"]


def test_zeros_outside_the_file_systems_are_not_sent(
    aws: LocalAws, store: Path, tmp_path: Path
) -> None:
    from tests.support.disks import write_zero_region

    raw = make_disk(tmp_path / "disk")
    build_dir = make_artifact(store, raw, formats=("raw",))
    # 4 MiB of written zeros after the partition (same content, so the sha256 still holds).
    stored = build_dir / "disk.raw"
    write_zero_region(stored, 56, 4)
    fd = os.open(stored, os.O_RDONLY)
    try:
        assert os.lseek(fd, 56 * 2**20, os.SEEK_DATA) == 56 * 2**20  # really allocated
    finally:
        os.close(fd)
    result = distribute(
        build_dir,
        config_of({"regions": [{"region": "us-east-1"}], "wait": {"poll_interval": 0.05}}),
    )
    assert result.ok
    zero_region = set(range(56 * 2, 60 * 2))
    sent = {r.params["BlockIndex"] for r in aws.requests.find("PutSnapshotBlock")}
    assert sent and sent.isdisjoint(zero_region)  # unpartitioned zeros: nothing to send
    indexes, _ = aggregate_of(stored)
    assert sorted(sent) == indexes
    assert result.upload.blocks_selected == len(indexes)


def test_import_fails_on_a_malformed_disk_and_cleans_up(
    aws: LocalAws, store: Path, good_disk: Path
) -> None:
    # The store claims a VMDK, but the file holds raw bytes: VM Import must refuse it.
    build_dir = make_artifact(store, good_disk, formats=("raw",))
    manifest = json.loads((build_dir / "manifest.json").read_text())
    (build_dir / "disk.raw").rename(build_dir / "disk.vmdk")
    manifest["outputs"][0].update(format="vmdk", file="disk.vmdk")
    (build_dir / "manifest.json").write_text(json.dumps(manifest))
    sign_artifact(build_dir)
    aws.setup_import()
    data = {
        "import": {"method": "import-snapshot", "s3_bucket": BUCKET},
        "wait": {"poll_interval": 0.05},
        "lint": False,
        "regions": [{"region": "us-east-1"}, {"region": "eu-west-1"}],
    }
    result = distribute(build_dir, config_of(data))
    status = {r.region: (r.status, r.error) for r in result.regions}
    assert status["us-east-1"][0] == "failed"
    assert "Disk validation failed" in str(status["us-east-1"][1])
    assert status["eu-west-1"] == ("skipped", "not attempted: us-east-1 failed")
    assert aws.client("s3").list_objects_v2(Bucket=BUCKET).get("KeyCount", 0) == 0


def test_import_task_fails_on_a_missing_object(aws: LocalAws) -> None:
    """The extension itself: a task over a missing S3 object progresses, then fails."""
    import time

    import boto3

    aws.setup_import()
    ec2 = boto3.client("ec2", region_name="us-east-1")  # through the front, like vmbuild
    task = ec2.import_snapshot(
        DiskContainer={
            "Format": "VMDK",
            "UserBucket": {"S3Bucket": BUCKET, "S3Key": "missing.vmdk"},
        }
    )
    assert task["SnapshotTaskDetail"]["Status"] == "active"
    for _ in range(100):
        detail = ec2.describe_import_snapshot_tasks(ImportTaskIds=[task["ImportTaskId"]])[
            "ImportSnapshotTasks"
        ][0]["SnapshotTaskDetail"]
        if detail["Status"] != "active":
            break
        time.sleep(0.05)
    assert detail["Status"] == "deleted"
    assert "Unable to access S3 object" in detail["StatusMessage"]
    with pytest.raises(Exception, match="service role nosuchrole"):
        ec2.import_image(
            RoleName="nosuchrole",
            DiskContainers=[
                {"Format": "VMDK", "UserBucket": {"S3Bucket": BUCKET, "S3Key": "x.vmdk"}}
            ],
        )


def test_cli_lint_reports_and_exits_nonzero_on_errors(
    aws: LocalAws,
    store: Path,
    tmp_path: Path,
    good_disk: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from vmbuild.cli import main

    make_artifact(store, good_disk, name="good")
    assert main(["lint", "good", "--store", str(store), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["root_fs"] == "ext4" and report["partition_table"] == "mbr"

    def no_cloud_init_ec2(tree: Path) -> None:
        (tree / "etc/cloud/cloud.cfg.d/90-vmbuild.cfg").write_text("datasource_list: [NoCloud]\n")

    make_artifact(store, make_disk(tmp_path / "bad", edit=no_cloud_init_ec2), name="bad")
    assert main(["lint", "bad", "--store", str(store)]) == 1
    out = capsys.readouterr().out
    assert "error   cloud-init: datasource_list is ['NoCloud']" in out


def test_a_secure_boot_image_is_registered_with_its_boot_mode_and_keys(
    aws: LocalAws, store: Path, good_disk: Path
) -> None:
    """The config says nothing of boot: the image's manifest (uefi-preferred, tested
    under Secure Boot) decides BootMode and sends the tested store as UefiData."""
    from tests.support.disks import make_artifact
    from vmbuild.publish.uefi_data import variable_names

    build_dir = make_artifact(
        store, good_disk, name="uefi-demo",
        manifest_extra={
            "boot_mode": "uefi-preferred",
            "tests": {"status": "passed", "boots": [{"firmware": "uefi-secure"}, {"firmware": "bios"}]},
        },
    )  # fmt: skip
    # The test disk is a BIOS disk: the ESP lint is the VM tier's (test_boot_modes).
    data = {"lint": False, "regions": [{"region": "us-east-1"}]}
    result = distribute(build_dir, config_of(data))
    assert result.ok, result.to_json()
    (register,) = aws.requests.find("RegisterImage", "ec2")
    assert register.params["BootMode"] == "uefi-preferred"
    assert {"PK", "KEK", "db", "dbx"} <= set(variable_names(register.params["UefiData"]))


def test_an_arm64_image_is_registered_as_arm64(aws: LocalAws, store: Path, good_disk: Path) -> None:
    """The config says nothing of the architecture: the image's manifest (recipe
    `arch: arm64`) decides RegisterImage's Architecture, with its uefi boot mode."""
    from tests.support.disks import make_artifact

    build_dir = make_artifact(
        store, good_disk, name="arm64-demo",
        manifest_extra={"boot_mode": "uefi", "architecture": "arm64"},
    )  # fmt: skip
    # The test disk is an x86_64 BIOS disk: the arm64 lint is the VM tier's (test_arm64).
    data = {"lint": False, "regions": [{"region": "us-east-1"}]}
    result = distribute(build_dir, config_of(data))
    assert result.ok, result.to_json()
    (register,) = aws.requests.find("RegisterImage", "ec2")
    assert (register.params["Architecture"], register.params["BootMode"]) == ("arm64", "uefi")
    assert "UefiData" not in register.params
