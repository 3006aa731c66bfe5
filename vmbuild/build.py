"""`vmbuild build`: the pipeline as a flat, ordered list of stages.

base -> builder VM -> components (build, validate) -> SBOM -> generalize ->
convert -> offline verification -> test VM (component tests + testinfra) ->
store (atomic rename) -> distribute (when the recipe asks).
Each stage is a function in vmbuild/stages/; this module only sequences them
and owns the resources (staging dir, VMs) through one ExitStack.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmbuild import __version__, paths
from vmbuild.config.recipe import LoadedRecipe, UrlBase
from vmbuild.diskfs.rootfs import root_view
from vmbuild.errors import StepFailed, TestsFailed, VmbuildError
from vmbuild.hypervisor import accel as accel_mod
from vmbuild.hypervisor.guest import GuestRequest, booted_guest
from vmbuild.log import Progress, run_log
from vmbuild.run import qemu_img
from vmbuild.stages import base_image, components, convert, generalize, store
from vmbuild.stages import image_tests as test_vm

log = logging.getLogger("vmbuild.build")

BUILDER_USER = "vmbuild-builder"
TEST_USER = "vmbuild-test"
SBOM_SCRIPT = r"""
if command -v dpkg-query >/dev/null; then
  dpkg-query -W -f='${Package}\t${Version}\t${Architecture}\n'
elif command -v rpm >/dev/null; then
  rpm -qa --qf '%{NAME}\t%{VERSION}-%{RELEASE}\t%{ARCH}\n'
fi | sort
"""


@dataclass(frozen=True)
class BuildOptions:
    store: Path
    accel: accel_mod.AccelMode = "auto"
    skip_tests: bool = False
    keep_on_failure: bool = False
    backend: str | None = None  # None: the recipe's vm.backend, else qemu
    mirror: str | None = None
    distribute: bool = True
    libvirt_uri: str | None = None
    libvirt_network: str | None = None


@dataclass(frozen=True)
class BuildResult:
    build_dir: Path
    manifest: dict[str, Any]


def resolve_base(
    loaded: LoadedRecipe, opts: BuildOptions, progress: Progress
) -> base_image.BaseImage:
    spec = loaded.recipe.base
    if isinstance(spec, UrlBase):
        return base_image.fetch_base(
            spec.url, sha256=spec.sha256, sha512=spec.sha512, checksum_url=spec.checksum_url
        )
    if loaded.base_path is not None:
        return base_image.local_base(loaded.base_path)
    return base_image.build_debian(spec, mirror=opts.mirror, on_progress=progress.status)


def parse_sbom(text: str) -> list[dict[str, str]]:
    packages = []
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) == 3 and fields[0]:
            packages.append({"name": fields[0], "version": fields[1], "arch": fields[2]})
    return packages


def build(loaded: LoadedRecipe, opts: BuildOptions, progress: Progress) -> BuildResult:
    recipe = loaded.recipe
    build_id = store.new_build_id()
    run_id = build_id.rsplit("-", 1)[1]
    started = datetime.now(UTC)
    docs = components.load(
        [
            (ref.name, path, dict(ref.parameters))
            for ref, path in zip(recipe.components, loaded.component_paths, strict=True)
        ]
    )
    failed_logs = paths.cache_dir() / "logs" / f"{recipe.name}-{build_id}"
    backend = opts.backend or recipe.vm.backend or "qemu"
    libvirt_uri = opts.libvirt_uri or recipe.vm.uri
    if backend == "libvirt":
        from vmbuild.hypervisor.libvirt import connect

        # Unreachable libvirt is reported before any disk or staging dir exists.
        connect(libvirt_uri).close()
    keep = False
    with contextlib.ExitStack() as stack:
        stage = stack.enter_context(
            store.staging(opts.store, recipe.name, recipe.version, build_id)
        )
        logs = stage.path / "logs"
        stack.enter_context(run_log(logs / "build.log"))
        work = Path(tempfile.mkdtemp(prefix="work-", dir=stage.path))
        try:
            log.info(
                "vmbuild %s building %s %s (build %s)",
                __version__,
                recipe.name,
                recipe.version,
                build_id,
            )
            with progress.stage("base", f"base image {_base_label(recipe.base)}"):
                base = resolve_base(loaded, opts, progress)
                accel = accel_mod.choose(opts.accel, (base.path, base.format), work)
                progress.status(f"accelerator: {accel.kind} ({accel.reason})")

            def request(
                role: str, disk: Path, fmt: str, size: int | None, user: str
            ) -> GuestRequest:
                return GuestRequest(
                    run_id=run_id, role=role, base=disk, base_format=fmt, disk_size=size,
                    memory_mib=recipe.vm.memory >> 20, cpus=recipe.vm.cpus, accel=accel,
                    workdir=work, user=user, backend=backend,
                    keep_on_failure=opts.keep_on_failure, libvirt_uri=libvirt_uri,
                    libvirt_network=opts.libvirt_network or recipe.vm.network,
                )  # fmt: skip

            builder_req = request("builder", base.path, base.format, recipe.disk_size, BUILDER_USER)
            with progress.stage("builder", "builder VM: boot, SSH, cloud-init"):
                builder = stack.enter_context(booted_guest(builder_req, on_status=progress.status))
            with progress.stage("components", f"components: build + validate ({len(docs)})"):
                applied = components.apply(
                    docs, builder.ssh, phases=["build", "validate"],
                    results_dir=logs / "components", on_output=progress.output,
                )  # fmt: skip
            with progress.stage("sbom", "package list (SBOM)"):
                sbom = builder.ssh.run(SBOM_SCRIPT, timeout=accel.timeout(60))
                packages = parse_sbom(sbom.stdout)
                builder_machine_id = builder.ssh.get("/etc/machine-id").decode().strip()
            with progress.stage("generalize", "generalize and power off"):
                generalize.generalize(builder, on_output=progress.output)
            _copy_console(builder.spec.console_log, logs)

            with progress.stage("convert", f"convert to {', '.join(recipe.outputs)}"):
                final = stage.path / convert.output_name("qcow2")
                if "qcow2" not in recipe.outputs:
                    final = work / "final.qcow2"
                convert.flatten(builder.spec.disk, final)
                builder.spec.disk.unlink()
                outputs = [
                    convert.convert(final, f, stage.path) for f in recipe.outputs if f != "qcow2"
                ]
                if "qcow2" in recipe.outputs:
                    outputs.insert(0, convert.convert(final, "qcow2", stage.path))
            with progress.stage("verify", "verify generalization offline"):
                _verify_generalized(final, work, builder.client_key.public_openssh)

            if opts.skip_tests:
                summary = test_vm.TestSummary("skipped")
            else:
                with progress.stage("test", "test VM: component tests + testinfra"):
                    summary = _test(
                        loaded, docs, request("test", final, "qcow2", None, TEST_USER),
                        logs, progress,
                        {"VMBUILD_BUILDER_USER": BUILDER_USER,
                         "VMBUILD_BUILDER_PUBKEY": builder.client_key.public_openssh,
                         "VMBUILD_BUILDER_MACHINE_ID": builder_machine_id},
                    )  # fmt: skip
            with progress.stage("store", "store the artifact"):
                shutil.rmtree(work)
                manifest: dict[str, Any] = {
                    "schema": 1,
                    "name": recipe.name,
                    "version": recipe.version,
                    "description": recipe.description,
                    "build": build_id,
                    "created": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "recipe": {"path": str(loaded.path), "sha256": loaded.sha256},
                    "base": {
                        "id": base.id,
                        "sha256": base.sha256,
                        "source": base.source,
                        "format": base.format,
                    },
                    "components": [a.to_json() for a in applied],
                    "outputs": [o.to_json() for o in outputs],
                    "packages": packages,
                    "tests": summary.to_json(),
                    "timings": {**progress.timings},
                    "accelerator": accel.to_json(),
                    "backend": backend,
                    "vmbuild_version": __version__,
                }
                manifest["timings"] = {
                    **progress.timings,
                    "total": round((datetime.now(UTC) - started).total_seconds(), 2),
                }
                store.write_manifest(stage.path, manifest)
                final_dir = store.commit(stage)
            log.info("stored %s", final_dir)
        except BaseException as exc:
            keep = opts.keep_on_failure and not isinstance(exc, KeyboardInterrupt)
            _save_failed_logs(logs, failed_logs)
            if isinstance(exc, VmbuildError) and exc.hint is None:
                exc.hint = f"run log: {failed_logs / 'build.log'}"
            if keep:
                stack.pop_all()  # the staging dir and VM stay for debugging
                log.error("keeping %s for debugging", stage.path)
            raise
    if loaded.distribution is not None and opts.distribute:
        _distribute(final_dir, loaded, progress)
        manifest = store.read_manifest(final_dir)
    return BuildResult(final_dir, manifest)


def _base_label(spec: object) -> str:
    return spec.url if isinstance(spec, UrlBase) else str(spec)


def _copy_console(console: Path, logs: Path) -> None:
    if console.exists():
        shutil.copy(console, logs / console.name)


def _save_failed_logs(logs: Path, dest: Path) -> None:
    with contextlib.suppress(OSError):
        if logs.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(logs, dest, dirs_exist_ok=True)
        for console in logs.parent.glob("work-*/*-console.log"):
            shutil.copy(console, dest / console.name)


def _verify_generalized(final: Path, work: Path, builder_pubkey: str) -> None:
    raw = work / "verify.raw"
    try:
        qemu_img("convert", "-f", "qcow2", "-O", "raw", final, raw)
        findings = generalize.verify(root_view(raw), BUILDER_USER, builder_pubkey)
    finally:
        raw.unlink(missing_ok=True)
    if findings:
        details = "; ".join(f"{f.path}: {f.problem}" for f in findings)
        raise VmbuildError(f"the image is not generalized: {details}")


def _test(
    loaded: LoadedRecipe,
    docs: list[Any],
    req: GuestRequest,
    logs: Path,
    progress: Progress,
    env: dict[str, str],
) -> test_vm.TestSummary:
    counts = None
    component_tests: list[dict[str, Any]] = []
    junit_name = None
    with booted_guest(req, on_status=progress.status) as guest:
        try:
            applied = components.apply(
                docs, guest.ssh, phases=["test"], results_dir=logs / "components",
                on_output=progress.output,
            )  # fmt: skip
            component_tests = [{"name": a.name, "status": a.status} for a in applied]
        except StepFailed as exc:
            raise TestsFailed(f"image tests failed: {exc}") from None
        finally:
            _copy_console(guest.spec.console_log, logs)
        if loaded.test_paths:
            test_env = {
                **env,
                "VMBUILD_IMAGE_NAME": loaded.recipe.name,
                "VMBUILD_IMAGE_VERSION": loaded.recipe.version,
            }
            *nums, junit = test_vm.run_testinfra(
                guest, loaded.test_paths, logs, env=test_env, on_line=progress.output
            )
            counts = (nums[0], nums[1], nums[2], nums[3])
            junit_name = str(junit.relative_to(logs.parent))
    summary = test_vm.summarize(counts, junit_name, component_tests)
    test_vm.raise_if_failed(summary, "see testinfra.log and junit.xml in the run log")
    return summary


def _distribute(build_dir: Path, loaded: LoadedRecipe, progress: Progress) -> None:
    from vmbuild.publish import distribute

    with progress.stage("distribute", "distribute to AWS"):
        result = distribute(
            build_dir, loaded.distribution, on_progress=lambda ev: progress.status(str(ev))
        )
    if not result.ok:
        # The artifact is stored and tested; only distribution failed, and a
        # re-run of `vmbuild distribute` finishes just the missing regions.
        failed = [f"{r.region}: {r.error}" for r in result.regions if not r.ok]
        raise VmbuildError(
            "distribution failed in " + "; ".join(failed or ["preflight/lint"]),
            hint=f"the image is stored at {build_dir}; re-run `vmbuild distribute {build_dir} "
            "--config ...` to finish only what is missing",
        )
