"""Distribute a stored artifact to AWS: a flat list of steps over a preflighted plan.

1. plan + preflight (identity, regions, KMS, bucket, role, names, existing AMIs)
2. lint the disk offline (errors stop here, before any upload)
3. source region: find the artifact's AMI, or upload (ebs-direct | import-snapshot |
   import-image) and register/rename it
4. other regions, concurrently: find, or CopyImage (encrypting where asked), wait
5. every region: tags on AMI and snapshots, launch permissions, SSM parameters
6. results per region into the manifest (`distribution.aws`)
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmbuild.config.distribution import DistributionConfig
from vmbuild.diskfs.allocation import AllocationMap, BlockClass, allocation_map
from vmbuild.diskfs.lint import LintReport, lint_disk
from vmbuild.errors import VmbuildError
from vmbuild.paths import cache_dir
from vmbuild.publish import ebs_direct, lineage, regions, vm_import
from vmbuild.publish.artifact import Artifact, Disks, load_artifact, workdir
from vmbuild.publish.aws import Backoff, Clients, RetryStats, describe_error
from vmbuild.publish.events import DistributionEvent, EventCallback
from vmbuild.publish.plan import Plan, RegionPlan, build_plan, preflight

log = logging.getLogger("vmbuild.publish")
MANIFEST_KEY = "distribution"


class LintFailed(VmbuildError):
    """The disk would not boot on EC2 (or AWS would reject it): nothing was uploaded."""

    def __init__(self, report: LintReport) -> None:
        self.report = report
        first = report.errors[0]
        more = f" (and {len(report.errors) - 1} more)" if len(report.errors) > 1 else ""
        super().__init__(
            f"lint: {first.check}: {first.message}{more}; nothing was uploaded",
            hint=first.hint or "`vmbuild lint IMAGE` lists every finding",
        )


class PreflightFailed(VmbuildError):
    """A preflight check failed: nothing was uploaded."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        lines = [f"{c.name}: {c.message}" for c in plan.errors]
        super().__init__("preflight failed; nothing was uploaded:\n  " + "\n  ".join(lines))


@dataclass
class RegionResult:
    """The outcome in one region."""

    region: str
    status: str  # created | copied | existing | failed | skipped | planned
    name: str
    image_id: str | None = None
    snapshot_ids: list[str] = field(default_factory=list)
    encrypted: bool = False
    kms_key_id: str | None = None
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status in ("created", "copied", "existing", "planned")


@dataclass
class UploadStats:
    """Bytes sent versus bytes allocated, and how the upload went."""

    method: str = ""
    bytes_sent: int = 0
    bytes_allocated: int = 0
    disk_size: int = 0
    status: str = ""  # done | failed
    blocks_total: int = 0  # blocks of the volume
    blocks_selected: int = 0  # what the snapshot must hold: a full upload sends these
    blocks_sent: int = 0  # sent by this run
    blocks_resumed: int = 0  # sent by an interrupted earlier run of the same upload
    blocks_unchanged: int = 0  # incremental: same digest as the parent's block
    blocks_zeroed: int = 0  # incremental: overwritten with zeros (outside the file systems)
    blocks_free: int = 0  # file-system free space: never sent
    upload_blocks: str = ""
    parent_snapshot_id: str | None = None
    lineage: str = ""  # why the upload is (or is not) incremental
    throttled_retries: int = 0
    transient_retries: int = 0
    seconds: float = 0.0


@dataclass
class DistributionResult:
    """What `distribute` did (or, for a dry run, would do)."""

    artifact: str
    method: str
    account: str
    dry_run: bool
    regions: list[RegionResult]
    upload: UploadStats = field(default_factory=UploadStats)
    lint: LintReport | None = None
    checks: list[dict[str, str]] = field(default_factory=list)
    plan: str = ""

    @property
    def ok(self) -> bool:
        """Every region done (or, for a dry run, planned with no failed check or lint error)."""
        return (
            all(r.ok for r in self.regions)
            and (self.lint is None or self.lint.ok)
            and not any(c["status"] == "error" for c in self.checks)
        )

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (the `--json` output)."""
        data = asdict(self)
        data["ok"] = self.ok
        data["lint"] = self.lint.to_json() if self.lint else None
        return data


def distribute(
    build_dir: Path,
    config: DistributionConfig,
    *,
    dry_run: bool = False,
    on_progress: EventCallback | None = None,
    clients: Clients | None = None,
    allow_unsigned: bool = False,
    trusted_keys: list[Any] | None = None,
) -> DistributionResult:
    """Turn the artifact in `build_dir` into AMIs in every configured region.

    The artifact is verified against its signed provenance first (VerificationFailed, naming
    the file, before any AWS call); `allow_unsigned` accepts an artifact without a signature
    on the manifest's checksums alone. Raises PreflightFailed or LintFailed before any
    upload; failures after that are reported per region in the result (and the manifest),
    and a re-run finishes only what is missing.
    """
    from vmbuild.supply.verify import verify_build

    artifact = load_artifact(build_dir)
    # Registered as the image was built and tested, unless the config says otherwise.
    manifest = artifact.manifest
    image = config.image.for_image(
        manifest.boot_mode, secure_boot=manifest.secure_boot_tested,
        architecture=manifest.architecture,
    )  # fmt: skip
    if image.uefi_data and config.import_.method == "import-image":
        log.warning("VM Import cannot carry the Secure Boot store: EC2's default store is used")
        image = image.model_copy(update={"uefi_data": False})
    config = config.model_copy(update={"image": image})
    emit = on_progress or (lambda _e: None)
    emit(DistributionEvent("verify", message="provenance signature and digests"))
    verify_build(build_dir, trusted_keys, allow_unsigned=allow_unsigned)
    clients = clients or Clients(config.profile, max_pool=config.import_.workers + 8)
    plan = preflight(build_plan(artifact, config), clients)
    result = DistributionResult(
        artifact=artifact.ref,
        method=config.import_.method,
        account=plan.account,
        dry_run=dry_run,
        regions=[],
    )
    needs_upload = plan.source.action == "upload"
    if plan.errors and not dry_run:
        raise PreflightFailed(plan)  # before spending time on the disk
    with workdir() as scratch:
        # Every disk was just hashed against the signed provenance (or the manifest).
        disks = Disks(artifact, scratch, emit, verified={o.path for o in artifact.outputs})
        if config.lint and (needs_upload or dry_run):
            raw = disks.raw()
            emit(
                DistributionEvent("lint", plan.source.region, message="inspecting the disk offline")
            )
            plan.lint = result.lint = lint_disk(
                raw,
                boot_mode=config.image.mode,
                architecture=config.image.arch,
                ena_support=config.image.ena_support,
            )
        elif not config.lint:
            plan.check("lint", "warning", "skipped (lint: false)")
        result.plan = plan.render()
        result.checks = [asdict(c) for c in plan.checks]
        if dry_run:
            result.regions = [
                RegionResult(
                    rp.region,
                    "planned",
                    rp.name,
                    rp.existing_image,
                    encrypted=rp.encrypted,
                    kms_key_id=rp.kms_key_arn,
                )
                for rp in plan.regions
            ]
            return result
        if plan.errors:
            raise PreflightFailed(plan)
        if plan.lint is not None and not plan.lint.ok:
            raise LintFailed(plan.lint)
        runner = _Runner(plan, clients, disks, emit, result)
        runner.run()
    return result


class _Runner:
    """Executes a plan; keeps per-region results and records them in the manifest."""

    def __init__(
        self,
        plan: Plan,
        clients: Clients,
        disks: Disks,
        emit: EventCallback,
        result: DistributionResult,
    ) -> None:
        self.plan, self.clients, self.disks, self.emit = plan, clients, disks, emit
        self.result = result
        self.cfg = plan.config
        self.artifact: Artifact = plan.artifact
        self.retry_stats = RetryStats()
        self._source_snapshot: str | None = None
        self._snapshot_record: lineage.SnapshotRecord | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.results = {
            rp.region: RegionResult(
                rp.region, "skipped", rp.name, encrypted=rp.encrypted, kms_key_id=rp.kms_key_arn
            )
            for rp in plan.regions
        }
        result.regions = list(self.results.values())

    def run(self) -> None:
        """Source region first, then the copies concurrently; results always recorded."""
        regions_ = [rp.region for rp in self.plan.regions]
        for service in ("ec2", "ssm"):
            self.clients.prepare(service, *regions_)
        self.clients.prepare("ebs", self.plan.source.region)
        self.clients.prepare("s3", self.plan.source.region)
        try:
            self._run_regions()
        except BaseException:
            self._stop.set()  # Ctrl-C: region threads stop polling instead of waiting it out
            raise
        finally:
            self.result.upload.throttled_retries = self.retry_stats.throttled
            self.result.upload.transient_retries = self.retry_stats.transient
            self._record()

    def _run_regions(self) -> None:
        source = self.plan.source
        source_image = self._region(source, self._source_image)
        others = self.plan.regions[1:]
        if source_image is None:
            for rp in others:
                self.results[rp.region].error = f"not attempted: {source.region} failed"
            return
        if not others:
            return
        # Copies run concurrently: each waits minutes in AWS, none needs the others.
        with concurrent.futures.ThreadPoolExecutor(
            len(others), thread_name_prefix="region"
        ) as pool:
            futures = [
                pool.submit(
                    self._region, rp, functools.partial(self._copied_image, rp, source_image)
                )
                for rp in others
            ]
            for future in concurrent.futures.as_completed(futures):
                future.result()

    def _sleep(self, seconds: float) -> None:
        """Poll delay that ends at once when the run is interrupted."""
        if self._stop.wait(seconds):
            raise KeyboardInterrupt("distribution interrupted")

    def _wait_image(self, ec2: Any, image_id: str, region: str) -> dict[str, Any]:
        return regions.wait_available(
            ec2,
            image_id,
            region=region,
            timeout=self.cfg.wait.timeout,
            poll_interval=self.cfg.wait.poll_interval,
            on_progress=self.emit,
            sleep=self._sleep,
        )

    def _region(self, rp: RegionPlan, make: Callable[[], tuple[str, str]]) -> str | None:
        """Get the region's AMI (found, created or copied), then finish it; record failures."""
        started = time.monotonic()
        res = self.results[rp.region]
        try:
            image_id, status = make()
            ec2 = self.clients.get("ec2", rp.region)
            image = self._wait_image(ec2, image_id, rp.region)
            snaps = regions.snapshot_ids(image)
            if rp.region == self.plan.source.region and self._source_snapshot:
                snaps = list(dict.fromkeys([*snaps, self._source_snapshot]))
            self._finish(rp, image_id, snaps)
            with self._lock:
                res.status, res.image_id, res.snapshot_ids = status, image_id, snaps
                res.error = None
            self.emit(DistributionEvent("done", rp.region, message=f"{image_id} ({status})"))
            return image_id
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            message = exc.args[0] if isinstance(exc, VmbuildError) else describe_error(exc)
            log.debug("region %s failed", rp.region, exc_info=True)
            with self._lock:
                res.status, res.error = "failed", message
            self.emit(DistributionEvent("failed", rp.region, message=message))
            return None
        finally:
            res.seconds = round(time.monotonic() - started, 3)

    def _finish(self, rp: RegionPlan, image_id: str, snaps: list[str]) -> None:
        ec2 = self.clients.get("ec2", rp.region)
        self.emit(DistributionEvent("share", rp.region, message=image_id))
        regions.tag_resources(ec2, [image_id, *snaps], rp.tags)
        regions.share(ec2, image_id, snaps, rp.entry.launch_permission)
        if rp.entry.ssm_parameter_configurations:
            regions.set_parameters(
                self.clients.get("ssm", rp.region),
                list(rp.entry.ssm_parameter_configurations),
                image_id,
            )

    def _source_image(self) -> tuple[str, str]:
        rp = self.plan.source
        ec2 = self.clients.get("ec2", rp.region)
        found = regions.find_image(ec2, self.artifact.ref, self.artifact.digest)
        if found is not None:
            return str(found["ImageId"]), "existing"
        method = self.cfg.import_.method
        started = time.monotonic()
        self.result.upload.method = method
        try:
            if method == "ebs-direct":
                snapshot_id = self._ebs_direct(rp)
                image_id = self._register(rp, snapshot_id)
            else:
                image_id = self._vm_import(rp)
        except KeyboardInterrupt:
            if self.result.upload.status != "done":
                self.result.upload.status = "interrupted"
            raise
        except Exception:
            if self.result.upload.status != "done":
                self.result.upload.status = "failed"
            raise
        self.result.upload.seconds = round(time.monotonic() - started, 3)
        return image_id, "created"

    def _state_path(self, rp: RegionPlan, kind: str) -> tuple[Path, str]:
        key = hashlib.sha256(
            "\0".join(
                [
                    self.artifact.digest,
                    self.plan.account,
                    rp.region,
                    kind,
                    str(rp.encrypted),
                    rp.kms_key_arn or "",
                ]
            ).encode()
        ).hexdigest()
        return cache_dir() / "distribute" / f"{key[:32]}.json", key

    def _ebs_direct(self, rp: RegionPlan) -> str:
        raw = self.disks.raw()
        imp = self.cfg.import_
        stats = self.result.upload
        stats.upload_blocks = imp.upload_blocks
        if imp.upload_blocks == "all":
            amap = AllocationMap.uniform(raw.stat().st_size, BlockClass.USED)
        else:
            self.emit(
                DistributionEvent(
                    "allocation", rp.region, message="reading the file systems' bitmaps"
                )
            )
            amap = allocation_map(raw)
            for note in amap.notes:
                log.info("%s", note)
        ec2 = self.clients.get("ec2", rp.region)
        parent = None
        if imp.incremental:
            parent, stats.lineage = lineage.find_parent(
                ec2,
                self.artifact.build_dir,
                account=self.plan.account,
                region=rp.region,
                encrypted=rp.encrypted,
                kms_key_arn=rp.kms_key_arn,
                volume_gib=self.artifact.volume_gib,
            )
        else:
            stats.lineage = "incremental: false: full upload"
        self.emit(DistributionEvent("upload", rp.region, message=stats.lineage))
        journal_path, key = self._state_path(rp, f"ebs-direct:{imp.upload_blocks}")
        try:
            upload = ebs_direct.upload_snapshot(
                self.clients.get("ebs", rp.region),
                ec2,
                ebs_direct.UploadRequest(
                    raw=raw,
                    region=rp.region,
                    volume_gib=self.artifact.volume_gib,
                    description=f"{self.artifact.ref} ({rp.description})"[:255],
                    tags=rp.tags,
                    encrypted=rp.encrypted,
                    kms_key_arn=rp.kms_key_arn,
                    journal_path=journal_path,
                    journal_key=key,
                    amap=amap,
                    parent=parent,
                    workers=imp.workers,
                ),
                backoff=Backoff(),
                retry_stats=self.retry_stats,
                on_progress=self.emit,
            )
        except ebs_direct.UploadFailed:
            stats.status = "failed"
            raise
        sel = upload.select
        stats.status = "done"
        stats.bytes_sent = upload.bytes_sent
        stats.blocks_sent = upload.blocks_sent
        stats.blocks_resumed = upload.blocks_already
        stats.blocks_unchanged = upload.blocks_unchanged
        stats.blocks_zeroed = upload.blocks_zeroed
        stats.blocks_total = amap.blocks_total
        stats.blocks_free = sel.blocks_free
        stats.blocks_selected = sel.blocks_used + sel.blocks_outside
        stats.bytes_allocated = sel.allocated
        stats.disk_size = amap.disk_size
        stats.parent_snapshot_id = upload.parent_snapshot_id
        self._source_snapshot = upload.snapshot_id
        self._snapshot_record = lineage.SnapshotRecord(
            account=self.plan.account,
            region=rp.region,
            snapshot_id=upload.snapshot_id,
            encrypted=rp.encrypted,
            kms_key_arn=rp.kms_key_arn,
            volume_gib=self.artifact.volume_gib,
            upload_blocks=imp.upload_blocks,
            blocks=len(upload.digests),
            blocks_written=upload.blocks_written,
            digests=ebs_direct.encode_digests(upload.digests),
            parent_snapshot_id=upload.parent_snapshot_id,
            uploaded=lineage.now(),
        )
        regions.wait_snapshot(
            ec2,
            upload.snapshot_id,
            region=rp.region,
            timeout=self.cfg.wait.timeout,
            poll_interval=self.cfg.wait.poll_interval,
            sleep=self._sleep,
        )
        return upload.snapshot_id

    def _register(self, rp: RegionPlan, snapshot_id: str) -> str:
        ec2 = self.clients.get("ec2", rp.region)
        image_id = regions.register_image(
            ec2,
            snapshot_id=snapshot_id,
            name=rp.name,
            description=rp.description,
            image=self.cfg.image,
            volume_gib=self.artifact.volume_gib,
            tags=rp.tags,
        )
        # Tag at once: the tag is how a re-run finds this AMI (and some endpoints ignore
        # TagSpecifications on RegisterImage).
        regions.tag_resources(ec2, [image_id, snapshot_id], rp.tags)
        for kind in ("ebs-direct:used", "ebs-direct:all", "import-snapshot"):
            self._state_path(rp, kind)[0].unlink(missing_ok=True)
        return image_id

    def _vm_import(self, rp: RegionPlan) -> str:
        imp = self.cfg.import_
        disk = self.disks.for_import(imp.format)
        state_path, key = self._state_path(rp, imp.method)
        prefix = (
            imp.s3_prefix
            if not imp.s3_prefix or imp.s3_prefix.endswith("/")
            else imp.s3_prefix + "/"
        )
        req = vm_import.ImportRequest(
            method=imp.method,
            disk=disk,
            format=imp.format,
            region=rp.region,
            bucket=str(imp.s3_bucket),
            key=f"{prefix}{self.artifact.ref}/disk.{imp.format}",
            role_name=imp.role_name,
            license_type=imp.license_type,
            boot_mode=self.cfg.image.mode,
            architecture=self.cfg.image.arch,
            encrypted=rp.encrypted,
            kms_key_arn=rp.kms_key_arn,
            description=f"{self.artifact.ref}"[:255],
            tags=rp.tags,
            client_token=regions.client_token(key, imp.method),
            timeout=imp.timeout,
            poll_interval=self.cfg.wait.poll_interval,
            workers=imp.workers,
            state_path=state_path,
            state_key=key,
        )
        outcome = vm_import.run_import(
            self.clients.get("ec2", rp.region),
            self.clients.get("s3", rp.region),
            req,
            self.emit,
            sleep=self._sleep,
        )
        self.result.upload.status = "done"
        self.result.upload.bytes_sent = outcome.bytes_uploaded
        self.result.upload.disk_size = self.artifact.virtual_size
        ec2 = self.clients.get("ec2", rp.region)
        if imp.method == "import-snapshot":
            self._source_snapshot = outcome.snapshot_id
            ec2.create_tags(
                Resources=[outcome.snapshot_id],
                Tags=[{"Key": k, "Value": v} for k, v in rp.tags.items()],
            )
            image_id = self._register(rp, outcome.snapshot_id)
            vm_import.forget_state(req)
            return image_id
        # VM Import names its AMI import-ami-...: a same-region copy gives it the planned
        # name and description, then the unnamed original and its snapshots go.
        assert outcome.image_id is not None
        self._wait_image(ec2, outcome.image_id, rp.region)
        image_id = regions.copy_image(
            ec2,
            source_region=rp.region,
            source_image_id=outcome.image_id,
            name=rp.name,
            description=rp.description,
            encrypted=rp.encrypted,
            kms_key_arn=rp.kms_key_arn,
            token=regions.client_token(key, "rename"),
            tags=rp.tags,
        )
        regions.tag_resources(ec2, [image_id], rp.tags)
        self._wait_image(ec2, image_id, rp.region)
        regions.deregister(ec2, outcome.image_id, outcome.snapshot_ids)
        vm_import.forget_state(req)
        return image_id

    def _copied_image(self, rp: RegionPlan, source_image: str) -> tuple[str, str]:
        ec2 = self.clients.get("ec2", rp.region)
        found = regions.find_image(ec2, self.artifact.ref, self.artifact.digest)
        if found is not None:
            return str(found["ImageId"]), "existing"
        self.emit(DistributionEvent("copy", rp.region, message=f"from {self.plan.source.region}"))
        image_id = regions.copy_image(
            ec2,
            source_region=self.plan.source.region,
            source_image_id=source_image,
            name=rp.name,
            description=rp.description,
            encrypted=rp.encrypted,
            kms_key_arn=rp.kms_key_arn,
            token=regions.client_token(self.artifact.digest, rp.region, "copy"),
            tags=rp.tags,
        )
        regions.tag_resources(ec2, [image_id], rp.tags)
        return image_id, "copied"

    def _record(self) -> None:
        """Write the per-region results into the manifest, keeping earlier successes."""
        from vmbuild.stages.store import load_manifest, update_manifest

        with self._lock, contextlib.suppress(VmbuildError, OSError):
            previous = load_manifest(self.artifact.build_dir).distribution or {}
            aws = dict(previous.get("aws") or {})
            recorded = dict(aws.get("regions") or {})
            for res in self.results.values():
                if res.ok or res.region not in recorded or not recorded[res.region].get("image_id"):
                    recorded[res.region] = {
                        k: v for k, v in asdict(res).items() if k not in ("region", "seconds")
                    }
            aws.update(
                {
                    "account": self.plan.account,
                    "method": self.cfg.import_.method,
                    "updated": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "regions": recorded,
                }
            )
            if self._snapshot_record is not None:
                aws[lineage.RECORD_KEY] = self._snapshot_record.to_json()
            update_manifest(self.artifact.build_dir, MANIFEST_KEY, {**previous, "aws": aws})
