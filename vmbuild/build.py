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
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmbuild import __version__, preflight, runs
from vmbuild.cache import aptproxy, checkpoints
from vmbuild.config.distribution import DistributionConfig
from vmbuild.config.recipe import LoadedRecipe, UrlBase
from vmbuild.diskfs.scrub import Needle
from vmbuild.errors import StepFailed, VmbuildError
from vmbuild.hypervisor import accel as accel_mod
from vmbuild.hypervisor import firmware
from vmbuild.hypervisor.guest import (
    Guest,
    GuestRequest,
    booted_guest,
    copy_console,
)
from vmbuild.log import run_log
from vmbuild.manifest import BaseRecord, Manifest, Package, RecipeRecord
from vmbuild.plan import BUILDER_USER, TEST_USER, BuildOptions, BuildPlan, OfflineSource
from vmbuild.progress import Reporter
from vmbuild.stages import (
    base_image,
    components,
    convert,
    generalize,
    image_tests,
    resume,
    sbom,
    store,
)
from vmbuild.stages.key import StageKey, stage_key
from vmbuild.stages.verify import builder_needles, check_generalized, register_secrets
from vmbuild.supply.inputs import recorded_files
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
    ck: resume.Checkpointing | None = None  # None: --no-cache, or a backend without layers
    top: Path | None = None  # the builder disk's current top file (layers are cut below it)
    builder_pubkey: str = ""  # checked gone from the image (from the cache when resumed)
    rest: Future[convert.Converted] | None = None  # the formats converted in the background
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
    if r.plan.offline is not None:
        r.base = r.plan.offline.base  # the bundled one, checked against the signed manifest
    else:
        r.base = base_image.for_recipe(
            loaded.recipe.base, loaded.base_path, mirror=r.plan.mirror, reporter=r.reporter,
            layout=base_image.layout_for(loaded.recipe.boot_mode, loaded.recipe.arch),
            arch=loaded.recipe.arch,
        )  # fmt: skip
    base_image.check_boot_mode(r.base, loaded.recipe.boot_mode, r.work)
    base = r.base
    r.keyed("base", base_image.key(base, loaded.recipe.disk_size))
    r.accel = accel_mod.guest_accel(
        loaded.recipe.arch,
        lambda: accel_mod.choose(r.plan.accel_mode, (base.path, base.format), r.work),
    )
    r.reporter.status(f"accelerator: {r.accel.kind} ({r.accel.reason})")
    _open_checkpoints(r)


def _open_checkpoints(r: Run) -> None:
    assert r.base is not None
    plan = r.plan
    if plan.offline is not None:
        # Their key reads the mirror's current state, which an offline host cannot.
        r.reporter.status("checkpoints: off (offline rebuild)")
        return
    if not plan.use_checkpoints:
        r.reporter.status("checkpoints: off (--no-cache)")
        return
    # Registered first so it runs last: after this build's shared lock is released.
    r.stack.callback(checkpoints.prune_after_build, checkpoints.root(), r.reporter.status)
    store = r.stack.enter_context(checkpoints.CheckpointStore(warn=r.reporter.status))
    spec = plan.loaded.recipe.base
    release = base_image.RELEASES.get(spec) if isinstance(spec, str) else None
    if release is None:
        r.reporter.status(resume.UNKNOWN_MIRROR_NOTE)
    assert r.accel is not None
    builder = plan.guest(
        "builder", r.base.path, r.base.format, plan.loaded.recipe.disk_size, r.accel, r.work
    )
    root = resume.root_key(
        r.keys["base"], builder, mirror=resume.mirror_state(plan.mirror, release)
    )
    chain = resume.chain(root, plan.documents, plan.loaded.recipe.working_directory)
    final = stage_key(
        "checkpoint-generalize", disk=(chain[-1] if chain else root).digest,
        script=generalize.generalize_script(BUILDER_USER, plan.loaded.recipe.arch),
    )  # fmt: skip
    why_not = _no_running_state(r)
    r.ck = resume.Checkpointing(
        store, base_path=r.base.path, base_sha256=r.base.sha256, base_format=r.base.format,
        root=root, chain=chain, names=[d.name for d in plan.documents], final_key=final,
        # Only a running state makes a booted builder worth keeping (resume.py).
        boot_key=resume.builder_boot_key(root, builder) if why_not is None else None,
    )  # fmt: skip
    if r.ck.generalized is not None:
        r.reporter.status("checkpoints: the generalized disk is cached; no builder VM needed")
        return
    if r.ck.resumed:
        r.reporter.status(f"checkpoints: resuming after component {r.ck.resumed[-1].label}")
    elif r.ck.boot is not None:
        r.reporter.status("checkpoints: no component matches; resuming the booted builder")
    else:
        r.reporter.status("checkpoints: none match; saving one after each component")
    if why_not:
        r.ck.running_state = False
        r.reporter.status(f"checkpoints: disk layers only ({why_not})")


def _no_running_state(r: Run) -> str | None:
    """Why this build keeps no running VM with its checkpoints, if it keeps none."""
    recipe = r.plan.loaded.recipe
    if r.plan.backend != "qemu":
        return None  # said when it matters: a resume boots from the disk layer
    return resume.no_running_state(recipe.arch)


def _package_cache(r: Run) -> None:
    if r.plan.offline is not None:
        r.reporter.status(
            f"packages: only from the bundle's mirror (127.0.0.1:{r.plan.offline.mirror_port}); "
            "the guests reach nothing else"
        )
        return
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
    if r.ck is not None and r.ck.generalized is not None:
        r.builder_pubkey = str(r.ck.generalized.meta["data"]["builder_pubkey"])
        return
    disk, fmt = r.base.path, r.base.format
    start = r.ck.start_disk() if r.ck is not None else None
    if start is not None:
        disk, fmt = start, "qcow2"
    req = r.plan.guest(
        "builder", disk, fmt, r.plan.loaded.recipe.disk_size, r.accel, r.work,
        apt_proxy=r.guest_proxy,
    )  # fmt: skip
    if r.ck is not None and start is not None:
        r.builder = _resumed_builder(r, req)
        if r.builder is None and r.ck.last is None:
            req = replace(req, base=r.base.path, base_format=r.base.format)
    booted = r.builder is None
    if r.builder is None:
        r.builder = r.stack.enter_context(booted_guest(req, on_status=r.reporter.status))
    r.top = r.builder.spec.disk
    if booted and r.ck is not None and r.ck.last is None:
        _checkpoint_boot(r)
    r.builder_pubkey = r.builder.client_key.public_openssh


def _resumed_builder(r: Run, req: GuestRequest) -> Guest | None:
    """The builder back as it was saved after the last matching component (or as
    it was booted), or None: then it boots from that component's disk layer (or
    from the base); the status says why."""
    assert r.ck is not None and r.ck.resume_from is not None
    label = r.ck.resume_from.label
    if req.backend != "qemu":
        why = "the libvirt backend"
    elif not r.ck.running_state:
        why = _no_running_state(r) or "no running VM is kept"
    else:
        guest, why = resume.resumed(r.ck, req, r.stack, r.reporter.status)
        if guest is not None:
            r.reporter.status(f"checkpoints: {label}: the running VM is back, no boot")
            return guest
    if r.ck.last is None:
        # Its disk layer alone would save nothing: a boot is a boot.
        r.ck.boot_not_resumed()
        r.reporter.status(f"checkpoints: {label}: booting from the base ({why})")
        return None
    r.ck.restored = "disk"
    r.reporter.status(f"checkpoints: {label}: booting from its disk layer ({why})")
    return None


def _components(r: Run) -> None:
    done = r.ck.resumed if r.ck is not None else []
    r.applied = [components.Applied.from_json(cp.meta["data"]["applied"]) for cp in done]
    if r.ck is None or r.ck.generalized is None:
        assert r.builder is not None
        for index, doc in enumerate(r.plan.documents):
            if index < len(done):
                r.reporter.status(f"{doc.name}: from checkpoint {done[index].label}")
                continue
            while True:
                try:
                    applied = components.apply(
                        [doc], r.builder.ssh, phases=["build", "validate"], first_index=index,
                        results_dir=r.logs / "components", on_output=r.reporter.output,
                        working_directory=r.plan.loaded.recipe.working_directory,
                    )  # fmt: skip
                    break
                except StepFailed as exc:
                    if r.plan.on_error != "ask" or not _ask_retry(r, exc, doc.name):
                        raise
            r.applied.extend(applied)
            _checkpoint(r, index, applied[0].to_json() if applied else {})
    chain = components.keys(r.keys["base"], r.plan.documents, ["build", "validate"])
    r.keyed("components", chain[-1] if chain else r.keys["base"])


def _ask_retry(r: Run, exc: StepFailed, component: str) -> bool:
    """--on-error=ask: True to run the failed component again, False to abort.

    The checkpoints saved so far stay either way: a rebuild after fixing the
    component starts from the last good one. A retried build saves no more and
    reuses nothing more: what the failed attempt (or the user, in a shell) left
    in the builder is no input any key covers, so a layer, state, image or test
    result kept from here on would be found by later builds of the same inputs,
    hand edits and all.
    """
    assert r.builder is not None
    if not sys.stdin.isatty():
        r.reporter.status("--on-error=ask: no terminal to ask on; aborting")
        return False
    while True:
        r.reporter.status(f"failed: {exc}")
        answer = input("[r]etry the component, open a [s]hell, or [a]bort? ").strip().lower()
        if answer.startswith("r"):
            if r.ck is not None:
                r.ck.store.disable(
                    f"checkpoints: off for the rest of this build ({component} runs again on "
                    "a builder its failed attempt or a shell may have changed)"
                )
            return True
        if answer.startswith("a") or not answer:
            return False
        if answer.startswith("s"):
            print(f"the builder VM: {r.builder.ssh_hint()}", flush=True)
            input("press Enter when done ")


def _checkpoint_boot(r: Run) -> None:
    """Keep the builder as it just booted: the next build on this base and VM
    settings resumes it instead of booting, whatever its components."""
    assert r.ck is not None and r.builder is not None
    new_top = r.work / "builder-0.qcow2"
    if resume.keep_booted(r.ck, r.builder, new_top, status=r.reporter.status):
        r.top = new_top


def _checkpoint(r: Run, index: int, applied: dict[str, Any]) -> None:
    """Cut the builder's disk below a new top file and keep the cut layer."""
    if r.ck is None or not r.ck.usable or r.ck.diverged:
        return
    start = time.monotonic()
    keep_state = r.ck.running_state
    secret = [c for c in r.plan.loaded.recipe.components[: index + 1] if c.secret_names()]
    if keep_state and secret:
        # The guest's RAM holds what it was given (its tmpfs, freed pages): a
        # state after a component with secret parameters would keep them on disk.
        r.ck.running_state = keep_state = False
        r.reporter.status(
            f"checkpoints: disk layers only from here ({secret[0].name} has secret parameters: "
            "the running VM would hold them)"
        )
    cut = _cut(r, r.work / f"builder-{index + 1}.qcow2", keep_state=keep_state)
    if cut is None:
        return
    layer, vm = cut
    ck = r.ck
    resume.keep(r.reporter.status, start, vm, lambda: ck.save_component(index, layer, applied, vm))


def _cut(r: Run, new_top: Path, *, keep_state: bool) -> tuple[Path, resume.SavedVM | None] | None:
    """Cut the builder's disk below `new_top` (and, with `keep_state`, save its
    running state in the same pause): the layer cut and the state, or None when
    no layer can be cut (checkpoints then stay off for this build)."""
    assert r.ck is not None
    if not r.ck.usable or r.builder is None or r.top is None or not resume.can_cut(r.builder):
        return None
    layer = r.top
    try:
        vm = resume.cut(
            r.builder, layer, new_top, r.ck.store, keep_state=keep_state, status=r.reporter.status
        )
    except (VmbuildError, OSError) as exc:
        # A checkpoint is an optimisation: the build goes on without them.
        r.ck.store.disable(f"cannot cut a checkpoint layer ({exc}); building on without them")
        return None
    r.top = new_top
    return layer, vm


def _sbom(r: Run) -> None:
    assert r.accel is not None
    if r.ck is not None and r.ck.generalized is not None:
        data = r.ck.generalized.meta["data"]
        r.packages = sbom.Sbom(
            tuple(Package(**p) for p in data["packages"]),
            str(data["machine_id"]),
            dict(data.get("apt_indexes") or {}),
        )
    else:
        assert r.builder is not None
        r.packages = sbom.collect(r.builder.ssh, timeout=r.accel.timeout(sbom.TIMEOUT))
    r.keyed("sbom", sbom.key(r.keys["components"]))
    if r.plan.offline is not None:
        _same_packages(r.plan.offline, r.packages.packages)


def _same_packages(offline: OfflineSource, packages: tuple[Package, ...]) -> None:
    """An offline rebuild must reproduce the original's package versions exactly; it
    stops here, before anything is stored, naming the first differences."""
    want = {(n, a): v for n, v, a in offline.packages}
    got = {(p.name, p.arch): p.version for p in packages}
    diff = [
        f"{n}:{a} {want.get((n, a), '(absent)')} -> {got.get((n, a), '(absent)')}"
        for n, a in sorted(set(want) | set(got))
        if want.get((n, a)) != got.get((n, a))
    ]
    if diff:
        raise VmbuildError(
            f"the rebuild from {offline.bundle} differs from {offline.ref} in "
            f"{len(diff)} packages: " + "; ".join(diff[:10]),
            hint="nothing was stored",
        )


def _generalize(r: Run) -> None:
    r.keyed(
        "generalize", generalize.key(r.keys["components"], BUILDER_USER, r.plan.loaded.recipe.arch)
    )
    if r.ck is not None and r.ck.generalized is not None:
        r.reporter.status("generalized disk from checkpoint")
        return
    assert r.builder is not None and r.packages is not None and r.top is not None
    generalize.generalize(r.builder, on_output=r.reporter.output)
    copy_console(r.builder.spec, r.logs)
    if r.ck is not None:
        r.ck.save_generalized(
            r.top,
            {"packages": [p.to_json() for p in r.packages.packages],
             "machine_id": r.packages.machine_id, "builder_pubkey": r.builder_pubkey,
             "apt_indexes": r.packages.apt_indexes},
        )  # fmt: skip


def _convert(r: Run) -> None:
    formats = r.plan.loaded.recipe.outputs
    if r.top is not None:
        r.converted = convert.flatten_final(
            r.top, formats, r.staging.path, r.work, reporter=r.reporter
        )
    else:  # the generalized disk is a cached layer: read, never deleted
        assert r.ck is not None and r.ck.generalized is not None
        assert r.ck.generalized.disk is not None
        r.converted = convert.flatten_final(
            r.ck.generalized.disk, formats, r.staging.path, r.work, keep_source=True,
            reporter=r.reporter,
        )  # fmt: skip
    r.keyed("convert", convert.key(r.keys["generalize"], formats))
    # The other formats are written while the offline check and the test VM
    # run: the test VM needs only the qcow2. One thread, one qemu-img at a time.
    cache = None
    if r.ck is not None and r.ck.store.enabled and any(f != "qcow2" for f in formats):
        cache = convert.OutputCache.of(r.ck.store, r.converted, r.keys["convert"])
    pool = r.stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="convert"))
    r.rest = pool.submit(convert.convert_rest, r.converted, formats, r.staging.path, cache)


def _outputs(r: Run) -> None:
    assert r.rest is not None
    r.converted = r.rest.result()
    if r.converted.reused and r.ck is not None:
        r.ck.outputs_cached = True
        r.reporter.status("other formats: those of this very qcow2, from the checkpoint cache")


def _verify(r: Run) -> None:
    assert r.converted is not None
    # A generalized disk from a checkpoint was searched for its builder's keys
    # when it was made; this build's own secrets are searched for either way.
    needles = [*(builder_needles(r.builder) if r.builder else []), *r.secrets]
    check_generalized(r.converted.final, r.work, BUILDER_USER, r.builder_pubkey, needles)


def _test(r: Run) -> None:
    assert r.converted is not None and r.accel is not None
    assert r.packages is not None
    recipe = r.plan.loaded.recipe
    inputs = image_tests.TestInputs(
        documents=r.plan.documents,
        working_directory=r.plan.loaded.recipe.working_directory,
        testinfra=r.plan.loaded.test_paths,
        ec2=r.plan.test_ec2,
        env={
            "VMBUILD_BUILDER_USER": BUILDER_USER,
            "VMBUILD_BUILDER_PUBKEY": r.builder_pubkey,
            "VMBUILD_BUILDER_MACHINE_ID": r.packages.machine_id,
            "VMBUILD_IMAGE_NAME": recipe.name,
            "VMBUILD_IMAGE_VERSION": recipe.version,
        },
        boots=firmware.boot_modes(recipe.boot_mode, recipe.secure_boot),
    )
    r.keyed("test", inputs.key(r.keys["convert"]))
    cached_key = None
    if r.ck is not None and r.ck.final_key is not None:
        # The same image (by its full checkpoint key) and the same tests: the
        # same result. Kept with its JUnit file and log.
        cached_key = stage_key(
            "checkpoint-test", image=r.ck.final_key.digest, test=r.keys["test"].digest
        ).digest
        cached = r.ck.store.find(cached_key)
        if cached is not None:
            r.tests = image_tests.TestSummary.from_json(cached.meta["data"]["summary"])
            for name in cached.meta["data"].get("files", []):
                shutil.copyfile(cached.path / name, r.logs / name)
            r.reporter.status("tests: passed on this very image and tests before (checkpoint)")
            r.ck.tests_cached = True
            return
    req = r.plan.guest(
        "test", r.converted.final, "qcow2", None, r.accel, r.work, apt_proxy=r.guest_proxy
    )
    r.tests = image_tests.run_image_tests(req, inputs, r.logs, r.reporter)
    if r.ck is not None and cached_key is not None:
        kept = ("junit.xml", image_tests.COMPONENTS_JUNIT, "testinfra.log")
        files = {n: r.logs / n for n in kept if (r.logs / n).exists()}
        r.ck.store.save(
            cached_key, stage="test", label="test result",
            data={"summary": r.tests.to_json(), "files": sorted(files)}, files=files,
        )  # fmt: skip


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
        # Hashed by the convert stage as each was written, not read again.
        hashed={o.file: (o.sha256, o.size) for o in r.converted.outputs} if r.converted else None,
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
    Step("convert", lambda p: "flatten the disk (qcow2)", _convert),
    Step("verify", lambda p: "verify generalization offline", _verify),
    Step("test", lambda p: "test VM: component tests + testinfra", _test, lambda p: p.run_tests),
    Step("outputs", lambda p: "finish the other formats (converted during the tests)", _outputs),
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
        boot_mode=recipe.boot_mode,
        architecture=recipe.arch,
        vmbuild_version=__version__,
        extra={
            # Which steps came from the checkpoint cache (and which were saved).
            **({"checkpoints": r.ck.to_json()} if r.ck is not None else {}),
            # The index state the guest's apt saw (an offline rebuild serves exactly it).
            **({"apt_indexes": r.packages.apt_indexes} if r.packages.apt_indexes else {}),
            **({"rebuilt_from": plan.offline.to_json()} if plan.offline is not None else {}),
            # The files the recipe names (tests, documents, scan data), by digest.
            "recipe_files": recorded_files(plan.loaded.path),
        },
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
