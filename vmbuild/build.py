"""`vmbuild build`: the stage list, run in order over one BuildPlan.

    base -> builder VM -> components (build, validate) -> SBOM -> generalize ->
    convert -> offline verification -> test VM -> store -> distribute

Each stage is a function in vmbuild/stages/ over typed inputs; the steps below
only hand it what earlier stages produced. This module owns the resources
(staging dir, run log, VMs) through one ExitStack, so a failure anywhere
unwinds all of them (or keeps them, with --keep-on-failure).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmbuild import __version__, preflight, runs
from vmbuild.cache import aptproxy
from vmbuild.config.distribution import DistributionConfig
from vmbuild.config.recipe import LoadedRecipe, UrlBase
from vmbuild.diskfs.scrub import Needle
from vmbuild.errors import VmbuildError
from vmbuild.hypervisor import accel as accel_mod
from vmbuild.hypervisor.guest import Guest, booted_guest, copy_console
from vmbuild.log import run_log
from vmbuild.manifest import BaseRecord, Manifest, RecipeRecord
from vmbuild.plan import BUILDER_USER, TEST_USER, BuildOptions, BuildPlan
from vmbuild.progress import Reporter
from vmbuild.stages import base_image, components, convert, generalize, image_tests, sbom, store
from vmbuild.stages.key import StageKey
from vmbuild.stages.verify import builder_needles, check_generalized, register_secrets
from vmbuild.supply.stage import attest_stage

__all__ = ["BUILDER_USER", "TEST_USER", "BuildOptions", "BuildResult", "build"]

log = logging.getLogger("vmbuild.build")


@dataclass(frozen=True)
class BuildResult:
    build_dir: Path
    manifest: Manifest


@dataclass
class Run:
    """One build in progress: the plan, its resources, and each stage's result."""

    plan: BuildPlan
    reporter: Reporter
    stack: contextlib.ExitStack
    staging: store.Staging
    work: Path
    base: base_image.BaseImage | None = None
    accel: accel_mod.Accel | None = None
    builder: Guest | None = None
    applied: list[components.Applied] = field(default_factory=list)
    packages: sbom.Sbom | None = None
    converted: convert.Converted | None = None
    tests: image_tests.TestSummary = field(
        default_factory=lambda: image_tests.TestSummary("skipped")
    )
    manifest: dict[str, Any] | None = None  # manifest.json as written, provenance included
    final_dir: Path | None = None
    guest_proxy: str | None = None  # the host package cache as guests reach it
    timings: dict[str, float] = field(default_factory=dict)  # seconds per finished stage
    # What each stage's output is a function of (stages/key.py): a checkpoint
    # cache keys on these; the run log records them.
    keys: dict[str, StageKey] = field(default_factory=dict)
    # Secret parameter values, searched for on the output disk (never logged).
    secrets: list[Needle] = field(default_factory=list)

    def keyed(self, stage: str, key: StageKey) -> None:
        self.keys[stage] = key
        log.info("stage key %s", key)

    @property
    def logs(self) -> Path:
        return self.staging.path / "logs"


# -- the steps: each hands one stage what the ones before it produced ----------
def _base(r: Run) -> None:
    loaded = r.plan.loaded
    r.base = base_image.for_recipe(
        loaded.recipe.base, loaded.base_path, mirror=r.plan.mirror, reporter=r.reporter
    )
    r.keyed("base", base_image.key(r.base, loaded.recipe.disk_size))
    r.accel = accel_mod.choose(r.plan.accel_mode, (r.base.path, r.base.format), r.work)
    r.reporter.status(f"accelerator: {r.accel.kind} ({r.accel.reason})")


def _package_cache(r: Run) -> None:
    if not r.plan.apt_proxy_reachable:
        r.reporter.status("package cache: not reachable from a libvirt network; direct")
        return
    proxy = r.stack.enter_context(
        aptproxy.host_package_cache(r.plan.apt_proxy, on_status=r.reporter.status)
    )
    r.guest_proxy = proxy.guest_url if proxy else None


def _builder(r: Run) -> None:
    assert r.base is not None and r.accel is not None
    _package_cache(r)
    req = r.plan.guest(
        "builder", r.base.path, r.base.format, r.plan.loaded.recipe.disk_size, r.accel, r.work,
        apt_proxy=r.guest_proxy,
    )  # fmt: skip
    r.builder = r.stack.enter_context(booted_guest(req, on_status=r.reporter.status))


def _components(r: Run) -> None:
    assert r.builder is not None
    r.applied = components.apply(
        r.plan.documents, r.builder.ssh, phases=["build", "validate"],
        results_dir=r.logs / "components", on_output=r.reporter.output,
        working_directory=r.plan.loaded.recipe.working_directory,
    )  # fmt: skip
    chain = components.keys(r.keys["base"], r.plan.documents, ["build", "validate"])
    r.keyed("components", chain[-1] if chain else r.keys["base"])


def _sbom(r: Run) -> None:
    assert r.builder is not None and r.accel is not None
    r.packages = sbom.collect(r.builder.ssh, timeout=r.accel.timeout(sbom.TIMEOUT))
    r.keyed("sbom", sbom.key(r.keys["components"]))


def _generalize(r: Run) -> None:
    assert r.builder is not None
    generalize.generalize(r.builder, on_output=r.reporter.output)
    r.keyed("generalize", generalize.key(r.keys["components"], r.builder.user))
    copy_console(r.builder.spec, r.logs)


def _convert(r: Run) -> None:
    assert r.builder is not None
    r.converted = convert.convert_all(
        r.builder.spec.disk, r.plan.loaded.recipe.outputs, r.staging.path, r.work
    )
    r.keyed("convert", convert.key(r.keys["generalize"], r.plan.loaded.recipe.outputs))


def _verify(r: Run) -> None:
    assert r.converted is not None and r.builder is not None
    pubkey = r.builder.client_key.public_openssh
    needles = [*builder_needles(r.builder), *r.secrets]
    check_generalized(r.converted.final, r.work, BUILDER_USER, pubkey, needles)


def _test(r: Run) -> None:
    assert r.converted is not None and r.builder is not None and r.accel is not None
    assert r.packages is not None
    recipe = r.plan.loaded.recipe
    inputs = image_tests.TestInputs(
        documents=r.plan.documents,
        working_directory=r.plan.loaded.recipe.working_directory,
        testinfra=r.plan.loaded.test_paths,
        env={
            "VMBUILD_BUILDER_USER": BUILDER_USER,
            "VMBUILD_BUILDER_PUBKEY": r.builder.client_key.public_openssh,
            "VMBUILD_BUILDER_MACHINE_ID": r.packages.machine_id,
            "VMBUILD_IMAGE_NAME": recipe.name,
            "VMBUILD_IMAGE_VERSION": recipe.version,
        },
    )
    r.keyed("test", inputs.key(r.keys["convert"]))
    req = r.plan.guest(
        "test", r.converted.final, "qcow2", None, r.accel, r.work, apt_proxy=r.guest_proxy
    )
    r.tests = image_tests.run_image_tests(req, inputs, r.logs, r.reporter)


def _attest(r: Run) -> None:
    shutil.rmtree(r.work)
    recipe = r.plan.loaded.recipe
    r.manifest = _manifest(r).to_json()
    attestation = attest_stage(
        r.staging.path,
        r.manifest,
        {"memory_mib": recipe.vm.memory >> 20, "cpus": recipe.vm.cpus},
        scan_settings=recipe.scan,
        recipe_dir=r.plan.loaded.dir,
    )
    # A summary for `images show`; outside the signed digest (publish.artifact.MUTABLE_KEYS).
    r.manifest["provenance"] = attestation.to_json()


def _store(r: Run) -> None:
    assert r.manifest is not None
    store.write_manifest(r.staging.path, r.manifest)
    r.final_dir = store.commit(r.staging)


@dataclass(frozen=True)
class Step:
    name: str
    title: Callable[[BuildPlan], str]
    run: Callable[[Run], None]
    enabled: Callable[[BuildPlan], bool] = lambda _plan: True


STEPS: tuple[Step, ...] = (
    Step("base", lambda p: f"base image {_base_label(p.loaded.recipe.base)}", _base),
    Step("builder", lambda p: "builder VM: boot, SSH, cloud-init", _builder),
    Step("components", lambda p: f"components: build + validate ({len(p.documents)})", _components),
    Step("sbom", lambda p: "package list (SBOM)", _sbom),
    Step("generalize", lambda p: "generalize and power off", _generalize),
    Step("convert", lambda p: f"convert to {', '.join(p.loaded.recipe.outputs)}", _convert),
    Step("verify", lambda p: "verify generalization offline", _verify),
    Step("test", lambda p: "test VM: component tests + testinfra", _test, lambda p: p.run_tests),
    Step("attest", lambda p: "SBOMs (SPDX, CycloneDX) and signed provenance", _attest),
    Step("store", lambda p: "store the artifact", _store),
)


def build(loaded: LoadedRecipe, opts: BuildOptions, progress: Reporter) -> BuildResult:
    plan = BuildPlan.create(loaded, opts)
    preflight.check_plan(plan)  # every tool and module it needs, before any side effect
    plan.check_backend()
    recipe = loaded.recipe
    with contextlib.ExitStack() as stack:
        staging = stack.enter_context(
            store.staging(plan.store, recipe.name, recipe.version, plan.build_id)
        )
        stack.enter_context(run_log(staging.path / "logs" / "build.log"))
        runs.note(log=staging.path / "logs" / "build.log")  # its tail goes in a failed-run record
        work = Path(tempfile.mkdtemp(prefix="work-", dir=staging.path))
        r = Run(plan, progress, stack, staging, work, secrets=register_secrets(recipe))
        try:
            log.info("vmbuild %s building %s %s (build %s)",
                     __version__, recipe.name, recipe.version, plan.build_id)  # fmt: skip
            for step in STEPS:
                if step.enabled(plan):
                    start = time.monotonic()
                    with progress.stage(step.name, step.title(plan)):
                        step.run(r)
                    r.timings[step.name] = round(time.monotonic() - start, 2)
            log.info("stored %s", r.final_dir)
        except BaseException as exc:
            _keep_failure(r, exc)
            raise
    assert r.final_dir is not None
    if plan.distribute and loaded.distribution is not None:
        _distribute(r.final_dir, loaded.distribution, progress)
    return BuildResult(r.final_dir, store.load_manifest(r.final_dir))


def _manifest(r: Run) -> Manifest:
    assert r.base is not None and r.accel is not None
    assert r.converted is not None and r.packages is not None
    plan, recipe = r.plan, r.plan.loaded.recipe
    return Manifest(
        name=recipe.name,
        version=recipe.version,
        description=recipe.description,
        build=plan.build_id,
        created=plan.started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        recipe=RecipeRecord(str(plan.loaded.path), plan.loaded.sha256),
        base=BaseRecord(r.base.id, r.base.sha256, r.base.source, r.base.format),
        components=tuple(a.to_json() for a in r.applied),
        outputs=tuple(o.record() for o in r.converted.outputs),
        packages=r.packages.packages,
        tests=r.tests.to_json(),
        # Every stage before this one; the store stage's own time is not known yet.
        timings={
            **r.timings,
            "total": round((datetime.now(UTC) - plan.started).total_seconds(), 2),
        },
        accelerator=r.accel.to_json(),
        backend=plan.backend,
        vmbuild_version=__version__,
    )


def _keep_failure(r: Run, exc: BaseException) -> None:
    """Save the logs of a failed build; keep its staging dir and VMs if asked to."""
    failed_logs = r.plan.failed_logs
    _save_failed_logs(r.logs, failed_logs)
    if isinstance(exc, VmbuildError) and exc.hint is None:
        exc.hint = f"run log: {failed_logs / 'build.log'}"
    if r.plan.keep_on_failure and not isinstance(exc, KeyboardInterrupt):
        r.stack.pop_all()  # the staging dir and VM stay for debugging
        log.error("keeping %s for debugging", r.staging.path)


def _base_label(spec: object) -> str:
    return spec.url if isinstance(spec, UrlBase) else str(spec)


def _save_failed_logs(logs: Path, dest: Path) -> None:
    with contextlib.suppress(OSError):
        if logs.exists():
            # Run logs may quote parameters: private to the user.
            dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            shutil.copytree(logs, dest, dirs_exist_ok=True)
            dest.chmod(0o700)
        for pattern in ("work-*/*-console.log", "work-*/*-qemu.log"):
            for vm_log in logs.parent.glob(pattern):
                shutil.copy(vm_log, dest / vm_log.name)


def _distribute(build_dir: Path, config: DistributionConfig, progress: Reporter) -> None:
    from vmbuild.publish import distribute
    from vmbuild.publish.events import to_reporter

    with progress.stage("distribute", "distribute to AWS"):
        result = distribute(build_dir, config, on_progress=to_reporter(progress))
    if not result.ok:
        # The artifact is stored and tested; only distribution failed, and a
        # re-run of `vmbuild distribute` finishes just the missing regions.
        failed = [f"{r.region}: {r.error}" for r in result.regions if not r.ok]
        raise VmbuildError(
            "distribution failed in " + "; ".join(failed or ["preflight/lint"]),
            hint=f"the image is stored at {build_dir}; re-run `vmbuild distribute {build_dir} "
            "--config ...` to finish only what is missing",
        )
