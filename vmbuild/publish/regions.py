"""AMI operations per region: find, register, copy, wait, tag, share, publish to SSM.

Every step is idempotent (find by tag before creating, ClientToken on CopyImage, adding a
permission or tag twice is a no-op), which is what makes a re-run finish only what is missing.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

import botocore.exceptions

from vmbuild.config.distribution import ImageSettings, LaunchPermission, SsmParameter
from vmbuild.errors import VmbuildError
from vmbuild.publish.aws import error_code
from vmbuild.publish.events import DistributionEvent, EventCallback

log = logging.getLogger("vmbuild.publish")

ARTIFACT_TAG = "vmbuild:artifact"
DIGEST_TAG = "vmbuild:manifest-sha256"


def client_token(*parts: str) -> str:
    """A deterministic idempotency token (AWS allows up to 64 characters)."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:64]


def find_image(ec2: Any, artifact_ref: str, digest: str) -> dict[str, Any] | None:
    """This artifact's AMI in the region (by tag), if one exists and is not failed."""
    images = ec2.describe_images(
        Owners=["self"],
        Filters=[{"Name": f"tag:{ARTIFACT_TAG}", "Values": [artifact_ref]}],
    ).get("Images", [])
    usable = [
        i
        for i in images
        if i.get("State") in ("available", "pending")
        and {t["Key"]: t["Value"] for t in i.get("Tags", [])}.get(DIGEST_TAG) == digest
    ]
    # Prefer an available image, then the oldest (the one a re-run would have found first).
    usable.sort(key=lambda i: (i.get("State") != "available", i.get("CreationDate", "")))
    return usable[0] if usable else None


def find_by_name(ec2: Any, name: str) -> dict[str, Any] | None:
    """An AMI of this account with exactly this name (names are unique per region)."""
    images = ec2.describe_images(Owners=["self"], Filters=[{"Name": "name", "Values": [name]}]).get(
        "Images", []
    )
    return images[0] if images else None


def describe_image(ec2: Any, image_id: str) -> dict[str, Any] | None:
    """The AMI, or None once it is gone."""
    try:
        images = ec2.describe_images(ImageIds=[image_id]).get("Images", [])
    except botocore.exceptions.ClientError as exc:
        if error_code(exc) in {"InvalidAMIID.NotFound", "InvalidAMIID.Unavailable"}:
            return None
        raise
    return images[0] if images else None


def snapshot_ids(image: dict[str, Any]) -> list[str]:
    """The EBS snapshots behind an AMI's block device mappings."""
    return [
        m["Ebs"]["SnapshotId"]
        for m in image.get("BlockDeviceMappings", [])
        if m.get("Ebs", {}).get("SnapshotId")
    ]


def _tags(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in tags.items()]


def register_image(
    ec2: Any,
    *,
    snapshot_id: str,
    name: str,
    description: str,
    image: ImageSettings,
    volume_gib: int,
    tags: dict[str, str],
) -> str:
    """RegisterImage from an EBS snapshot with the configured boot and device settings."""
    ebs: dict[str, Any] = {
        "SnapshotId": snapshot_id,
        "VolumeSize": max(volume_gib, image.volume_size or 0),
        "VolumeType": image.volume_type,
        "DeleteOnTermination": True,
    }
    params: dict[str, Any] = {
        "Name": name,
        "Description": description,
        "Architecture": image.arch,
        "RootDeviceName": image.root_device_name,
        "BlockDeviceMappings": [{"DeviceName": image.root_device_name, "Ebs": ebs}],
        "VirtualizationType": "hvm",
        "EnaSupport": image.ena_support,
        "BootMode": image.mode,
        "TagSpecifications": [{"ResourceType": "image", "Tags": _tags(tags)}],
    }
    if image.ena_support:
        params["SriovNetSupport"] = "simple"
    if image.imds_support:
        params["ImdsSupport"] = image.imds_support
    if image.uefi_data:
        from vmbuild.publish.uefi_data import secure_boot_uefi_data

        params["UefiData"] = secure_boot_uefi_data()
    return str(ec2.register_image(**params)["ImageId"])


def copy_image(
    ec2: Any,
    *,
    source_region: str,
    source_image_id: str,
    name: str,
    description: str,
    encrypted: bool,
    kms_key_arn: str | None,
    token: str,
    tags: dict[str, str],
) -> str:
    """CopyImage into the client's region (optionally encrypting with that region's key)."""
    params: dict[str, Any] = {
        "SourceRegion": source_region,
        "SourceImageId": source_image_id,
        "Name": name,
        "Description": description,
        "ClientToken": token,
        "TagSpecifications": [{"ResourceType": "image", "Tags": _tags(tags)}],
    }
    if encrypted:
        params["Encrypted"] = True
        if kms_key_arn:
            params["KmsKeyId"] = kms_key_arn
    return str(ec2.copy_image(**params)["ImageId"])


def wait_available(
    ec2: Any,
    image_id: str,
    *,
    region: str,
    timeout: float,
    poll_interval: float,
    on_progress: EventCallback | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Poll until the AMI is available; raise if it fails or takes longer than `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        image = describe_image(ec2, image_id)
        state = image.get("State") if image else "missing"
        if image is not None and state == "available":
            return image
        if state in ("failed", "invalid", "deregistered", "error"):
            reason = (image or {}).get("StateReason", {}).get("Message", "")
            raise VmbuildError(f"{image_id} in {region} is {state}: {reason}".rstrip(": "))
        if on_progress is not None:
            on_progress(DistributionEvent("wait", region, message=f"{image_id} {state}"))
        if time.monotonic() > deadline:
            raise VmbuildError(
                f"{image_id} in {region} still {state} after {timeout:.0f}s",
                hint="re-run later: the copy continues in AWS",
            )
        sleep(poll_interval)


def wait_snapshot(
    ec2: Any,
    snapshot_id: str,
    *,
    region: str,
    timeout: float,
    poll_interval: float,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Poll until a snapshot is completed (RegisterImage needs it)."""
    deadline = time.monotonic() + timeout
    while True:
        snaps = ec2.describe_snapshots(SnapshotIds=[snapshot_id]).get("Snapshots", [])
        state = snaps[0].get("State") if snaps else "missing"
        if state == "completed":
            return
        if state in ("error", "missing", "recoverable"):
            raise VmbuildError(
                f"snapshot {snapshot_id} in {region} is {state}: "
                f"{(snaps or [{}])[0].get('StateMessage', '')}".rstrip(": ")
            )
        if time.monotonic() > deadline:
            raise VmbuildError(
                f"snapshot {snapshot_id} in {region} still {state} after {timeout:.0f}s"
            )
        sleep(poll_interval)


def tag_resources(ec2: Any, resource_ids: list[str], tags: dict[str, str]) -> None:
    """Tag the AMI and its snapshots (CreateTags overwrites values: safe to repeat)."""
    if resource_ids and tags:
        ec2.create_tags(Resources=resource_ids, Tags=_tags(tags))


def share(ec2: Any, image_id: str, snapshots: list[str], permission: LaunchPermission) -> None:
    """Launch permission on the AMI; create-volume permission on its snapshots.

    Snapshots accept only account ids and `all`: organizations get access to the snapshots
    through the AMI's launch permission.
    """
    if permission.empty:
        return
    add: list[dict[str, str]] = [{"UserId": u} for u in permission.user_ids]
    add += [{"Group": g} for g in permission.user_groups]
    add += [{"OrganizationArn": a} for a in permission.organization_arns]
    add += [{"OrganizationalUnitArn": a} for a in permission.organizational_unit_arns]
    ec2.modify_image_attribute(ImageId=image_id, LaunchPermission={"Add": add})
    if not (permission.user_ids or permission.user_groups):
        return
    for snapshot_id in snapshots:
        params: dict[str, Any] = {
            "SnapshotId": snapshot_id,
            "Attribute": "createVolumePermission",
            "OperationType": "add",
        }
        if permission.user_ids:
            params["UserIds"] = list(permission.user_ids)
        if permission.user_groups:
            params["GroupNames"] = list(permission.user_groups)
        ec2.modify_snapshot_attribute(**params)


def set_parameters(ssm: Any, parameters: list[SsmParameter], image_id: str) -> None:
    """Point each SSM parameter at the new AMI id."""
    for param in parameters:
        ssm.put_parameter(
            Name=param.parameter_name,
            Value=image_id,
            Type="String",
            DataType=param.data_type,
            Overwrite=True,
        )


def deregister(ec2: Any, image_id: str, snapshots: list[str]) -> None:
    """Remove an intermediate AMI and its snapshots (VM Import's unnamed result)."""
    ec2.deregister_image(ImageId=image_id)
    for snapshot_id in snapshots:
        try:
            ec2.delete_snapshot(SnapshotId=snapshot_id)
        except botocore.exceptions.ClientError as exc:
            log.warning("could not delete %s: %s", snapshot_id, exc)
