"""The distribution plan and its preflight: everything checked before a byte is uploaded.

Caller identity, region names, KMS keys (resolved to ARNs: EBS direct wants ARNs), the bucket
and the vmimport role for the S3 methods, AMI names (valid, unused by anything else), volume
size, and which regions already hold this artifact's AMI.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import botocore.exceptions

from vmbuild.config.distribution import (
    DistributionConfig,
    RegionDistribution,
    ami_name_problem,
    render_template,
)
from vmbuild.diskfs.lint import LintReport
from vmbuild.errors import VmbuildError
from vmbuild.publish.artifact import Artifact
from vmbuild.publish.aws import (
    Clients,
    credentials_hint,
    describe_error,
    endpoint_hint,
    error_code,
)
from vmbuild.publish.regions import ARTIFACT_TAG, DIGEST_TAG, find_by_name, find_image

log = logging.getLogger("vmbuild.publish")

Status = Literal["ok", "warning", "error"]
Action = Literal["upload", "copy", "exists"]


@dataclass(frozen=True)
class Check:
    """One preflight result."""

    name: str
    status: Status
    message: str


@dataclass
class RegionPlan:
    """What will happen in one region."""

    entry: RegionDistribution
    name: str
    description: str
    tags: dict[str, str]
    action: Action
    kms_key_arn: str | None = None
    existing_image: str | None = None

    @property
    def region(self) -> str:
        return self.entry.region

    @property
    def encrypted(self) -> bool:
        return self.entry.is_encrypted


@dataclass
class Plan:
    """The whole distribution, ready to run (or to print for --dry-run)."""

    artifact: Artifact
    config: DistributionConfig
    account: str = ""
    caller: str = ""
    regions: list[RegionPlan] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    lint: LintReport | None = None

    @property
    def errors(self) -> list[Check]:
        return [c for c in self.checks if c.status == "error"]

    @property
    def source(self) -> RegionPlan:
        return self.regions[0]

    def check(self, name: str, status: Status, message: str) -> None:
        self.checks.append(Check(name, status, message))

    def render(self) -> str:
        """The plan as a table plus the checks, for people."""
        a, cfg = self.artifact, self.config
        method = cfg.import_.method
        lines = [
            f"artifact  {a.ref}  ({a.virtual_size / 2**30:.1f} GiB disk, "
            f"tests: {a.tests_status or 'unknown'})",
            f"account   {self.account or '?'}  {self.caller}",
            f"method    {method} in {self.source.region}"
            + (
                f" via s3://{cfg.import_.s3_bucket}/{cfg.import_.s3_prefix}"
                if method != "ebs-direct"
                else f" ({cfg.import_.workers} parallel blocks, upload_blocks: "
                f"{cfg.import_.upload_blocks})"
            ),
            f"image     {cfg.image.arch}, {cfg.image.mode}, "
            f"ENA {'on' if cfg.image.ena_support else 'off'}, root {cfg.image.root_device_name} "
            f"{cfg.image.volume_type}",
            "",
        ]
        rows = [("REGION", "ACTION", "AMI NAME", "ENCRYPTION", "SHARED WITH", "SSM")]
        for rp in self.regions:
            lp = rp.entry.launch_permission
            shared = [
                *lp.user_ids,
                *lp.user_groups,
                *(a.rsplit("/", 1)[-1] for a in lp.organization_arns),
                *(a.rsplit("/", 1)[-1] for a in lp.organizational_unit_arns),
            ]
            action = rp.action + (f" ({rp.existing_image})" if rp.existing_image else "")
            enc = (rp.kms_key_arn or rp.entry.kms_key_id or "aws/ebs") if rp.encrypted else "-"
            ssm = ",".join(p.parameter_name for p in rp.entry.ssm_parameter_configurations)
            rows.append((rp.region, action, rp.name, enc, ",".join(shared) or "-", ssm or "-"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines += [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
        ]
        lines.append("")
        mark = {"ok": "ok  ", "warning": "warn", "error": "FAIL"}
        lines += [f"[{mark[c.status]}] {c.name}: {c.message}" for c in self.checks]
        if self.lint is not None:
            lines += ["", "lint:", *("  " + line for line in self.lint.render().splitlines())]
        return "\n".join(lines)


PROVENANCE_TAG = "vmbuild:provenance-sha256"


def artifact_tags(artifact: Artifact) -> dict[str, str]:
    """Tags that identify the artifact on every AMI and snapshot (and find them again)."""
    tags = {
        ARTIFACT_TAG: artifact.ref,
        "vmbuild:name": artifact.name,
        "vmbuild:version": artifact.version,
        "vmbuild:build": artifact.build,
        DIGEST_TAG: artifact.digest,
        "CreatedBy": "vmbuild",
    }
    from vmbuild.supply.verify import provenance_digest

    # Traces a launched instance back to the signed provenance of what it runs.
    signed = provenance_digest(artifact.build_dir)
    if signed:
        tags[PROVENANCE_TAG] = signed
    recipe = artifact.manifest.recipe
    if recipe is not None and recipe.sha256:
        tags["vmbuild:recipe-sha256"] = recipe.sha256
    return tags


def build_plan(artifact: Artifact, config: DistributionConfig) -> Plan:
    """Render names, descriptions and tags per region (no AWS calls)."""
    plan = Plan(artifact=artifact, config=config)
    variables = artifact.variables()
    base_tags = artifact_tags(artifact)
    for index, entry in enumerate(config.regions):
        name = render_template(entry.name, variables)
        description = render_template(
            entry.description or "{{ name }} {{ version }} (build {{ build }}) built by vmbuild",
            variables,
        )
        plan.regions.append(
            RegionPlan(
                entry=entry,
                name=name,
                description=description,
                tags={**base_tags, **entry.ami_tags},
                action="upload" if index == 0 else "copy",
            )
        )
        problem = ami_name_problem(name)
        if problem:
            plan.check(f"ami-name {entry.region}", "error", f"regions[{index}].name: {problem}")
    status = artifact.tests_status
    if status is None:
        plan.check("tests", "warning", "the manifest records no test result")
    elif status != "passed":
        plan.check("tests", "error", f"the artifact's tests {status}: only tested images ship")
    size = config.image.volume_size
    if size is not None and size < artifact.volume_gib:
        plan.check(
            "volume-size",
            "error",
            f"image.volume_size {size} GiB is smaller than the disk ({artifact.volume_gib} GiB)",
        )
    return plan


def preflight(plan: Plan, clients: Clients) -> Plan:
    """Check against AWS what can be checked before uploading; findings go to `plan.checks`."""
    cfg = plan.config
    source = plan.source.region
    try:
        identity = clients.probe("sts", source).get_caller_identity()
    except (
        botocore.exceptions.EndpointConnectionError,
        botocore.exceptions.ConnectTimeoutError,
    ) as exc:
        # Not a credentials problem: nothing answered at all.
        raise VmbuildError(describe_error(exc), hint=endpoint_hint()) from None
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise VmbuildError(
            f"AWS credentials: {describe_error(exc)}", hint=credentials_hint()
        ) from None
    plan.account, plan.caller = str(identity["Account"]), str(identity.get("Arn", ""))
    plan.check("identity", "ok", f"{plan.caller} (account {plan.account})")
    unknown = _check_regions(plan, clients)
    if cfg.import_.method != "ebs-direct":
        _check_bucket(plan, clients)
        _check_role(plan, clients)
    for rp in plan.regions:
        if rp.region in unknown:
            continue  # its endpoint does not exist: nothing more to ask there
        try:
            _check_region(plan, rp, clients)
        except botocore.exceptions.ClientError as exc:
            plan.check(f"region {rp.region}", "error", describe_error(exc))
    if (
        cfg.import_.method == "ebs-direct"
        and cfg.import_.incremental
        and plan.source.action == "upload"
        and plan.source.region not in unknown
    ):
        _check_lineage(plan, clients)
    return plan


def _check_lineage(plan: Plan, clients: Clients) -> None:
    """Say whether the upload will be incremental, and on which snapshot (or why not)."""
    from vmbuild.publish.lineage import find_parent

    rp = plan.source
    _parent, why = find_parent(
        clients.get("ec2", rp.region),
        plan.artifact.build_dir,
        account=plan.account,
        region=rp.region,
        encrypted=rp.encrypted,
        kms_key_arn=rp.kms_key_arn,
        volume_gib=plan.artifact.volume_gib,
    )
    plan.check("incremental", "ok", why)


def _check_regions(plan: Plan, clients: Clients) -> set[str]:
    """Check the region names; return the unusable ones."""
    try:
        known = clients.get("ec2", plan.source.region).describe_regions(AllRegions=True)
    except botocore.exceptions.ClientError as exc:
        plan.check("regions", "warning", f"cannot list regions: {describe_error(exc)}")
        return set()
    status = {r["RegionName"]: r.get("OptInStatus", "") for r in known.get("Regions", [])}
    bad = set()
    for rp in plan.regions:
        if rp.region not in status:
            plan.check(f"region {rp.region}", "error", "unknown region")
            bad.add(rp.region)
        elif status[rp.region] == "not-opted-in":
            plan.check(f"region {rp.region}", "error", "the account has not opted in")
            bad.add(rp.region)
    if not bad:
        plan.check("regions", "ok", ", ".join(rp.region for rp in plan.regions))
    return bad


def _check_bucket(plan: Plan, clients: Clients) -> None:
    bucket = plan.config.import_.s3_bucket
    s3 = clients.get("s3", plan.source.region)
    try:
        s3.head_bucket(Bucket=bucket)
        location = s3.get_bucket_location(Bucket=bucket).get("LocationConstraint") or "us-east-1"
    except botocore.exceptions.ClientError as exc:
        code = error_code(exc)
        why = "does not exist" if code in {"404", "NoSuchBucket"} else describe_error(exc)
        plan.check("bucket", "error", f"s3://{bucket} {why}")
        return
    if location != plan.source.region:
        plan.check(
            "bucket",
            "error",
            f"s3://{bucket} is in {location}; VM Import reads only a "
            f"bucket in the import region {plan.source.region}",
        )
    else:
        plan.check("bucket", "ok", f"s3://{bucket} ({location})")


def _check_role(plan: Plan, clients: Clients) -> None:
    role = plan.config.import_.role_name
    try:
        clients.get("iam", plan.source.region).get_role(RoleName=role)
    except botocore.exceptions.ClientError as exc:
        if error_code(exc) == "NoSuchEntity":
            plan.check(
                "role",
                "error",
                f"IAM role {role} does not exist (VM Import's service "
                "role: trust vmie.amazonaws.com, read the bucket)",
            )
        else:
            plan.check("role", "warning", f"cannot check role {role}: {describe_error(exc)}")
        return
    plan.check("role", "ok", f"IAM role {role}")


def _check_kms(plan: Plan, rp: RegionPlan, clients: Clients) -> None:
    entry = rp.entry
    if not entry.is_encrypted:
        return
    if entry.kms_key_id is None:
        if entry.launch_permission.user_ids or entry.launch_permission.organization_arns:
            plan.check(
                f"kms {rp.region}",
                "error",
                "encrypted with the AWS managed key "
                "aws/ebs, which cannot be shared with other accounts: set kms_key_id",
            )
        return
    try:
        meta: dict[str, Any] = clients.get("kms", rp.region).describe_key(KeyId=entry.kms_key_id)[
            "KeyMetadata"
        ]
    except botocore.exceptions.ClientError as exc:
        plan.check(f"kms {rp.region}", "error", f"{entry.kms_key_id}: {describe_error(exc)}")
        return
    rp.kms_key_arn = str(meta["Arn"])
    problems = []
    if meta.get("KeyState", "Enabled") != "Enabled":
        problems.append(f"key state {meta.get('KeyState')}")
    if meta.get("KeyUsage", "ENCRYPT_DECRYPT") != "ENCRYPT_DECRYPT":
        problems.append(f"key usage {meta.get('KeyUsage')}")
    if meta.get("KeySpec", "SYMMETRIC_DEFAULT") != "SYMMETRIC_DEFAULT":
        problems.append(f"key spec {meta.get('KeySpec')} (EBS needs a symmetric key)")
    if problems:
        plan.check(f"kms {rp.region}", "error", f"{rp.kms_key_arn}: {', '.join(problems)}")
        return
    plan.check(f"kms {rp.region}", "ok", rp.kms_key_arn)
    if entry.launch_permission.user_ids:
        plan.check(
            f"kms {rp.region}",
            "warning",
            "accounts "
            f"{', '.join(entry.launch_permission.user_ids)} also need kms:Decrypt and "
            f"kms:CreateGrant on {rp.kms_key_arn} to launch the AMI",
        )


def _check_region(plan: Plan, rp: RegionPlan, clients: Clients) -> None:
    _check_kms(plan, rp, clients)
    ec2 = clients.get("ec2", rp.region)
    existing = find_image(ec2, plan.artifact.ref, plan.artifact.digest)
    if existing is not None:
        rp.action, rp.existing_image = "exists", str(existing["ImageId"])
        return
    same_name = find_by_name(ec2, rp.name)
    if same_name is not None:
        tags = {t["Key"]: t["Value"] for t in same_name.get("Tags", [])}
        owner = tags.get(ARTIFACT_TAG, "something else")
        plan.check(
            f"ami-name {rp.region}",
            "error",
            f"{rp.name!r} is taken by "
            f"{same_name['ImageId']} ({owner}); AMI names are unique per region: "
            "change the name template",
        )
