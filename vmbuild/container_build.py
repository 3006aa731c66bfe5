"""`vmbuild build` for a container recipe: the stage list, run in order.

    parent (the Debian rootfs, or an OCI image fetched by skopeo; host, cached) ->
    OCI layout with the parent's layers ->
    builder VM -> components (build, validate) in chroot, one layer each ->
    component tests in chroot -> labels, tags, docker-archive ->
    SBOMs + signed provenance -> store -> verify -> push

The same components, engine, store and manifest as a VM build; stages are in
vmbuild/stages/rootfs.py, vmbuild/stages/container.py and vmbuild/oci/. One
ExitStack owns the staging dir and the VM: a failure anywhere (a failing
component or test) leaves no staging dir, no VM and no image in the store.
A push that fails after the store keeps the tested image and says so.

Supply chain, as for VM images: the SBOMs list the packages in dpkg's database of the
image as stored (read from its layers, oci/packages.py); the signed provenance's subjects
are the OCI manifest digest, every file of the layout and the docker-archive. The
provenance digest is NOT a label: a label is part of the image config, so the manifest
digest the provenance signs would change with it (a label could only name a provenance
that does not cover the final image). It is recorded outside the image instead, in the
stored manifest's `provenance`, beside the image digest the provenance names. A push
verifies the stored image against it first, before any registry call.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmbuild import __version__, paths, toe
from vmbuild.config.container import LoadedContainerRecipe, TargetRepository
from vmbuild.config.parent_ref import ParentError
from vmbuild.config.settings import SETTINGS
from vmbuild.digest import sha256_file
from vmbuild.errors import ConfigError, VmbuildError
from vmbuild.manifest import BaseRecord, Manifest, OutputRecord, Package, RecipeRecord
from vmbuild.oci import layout as oci_layout
from vmbuild.oci import packages as oci_packages
from vmbuild.oci import parent as oci_parent
from vmbuild.oci import registry
from vmbuild.plan import BuildOptions, _apt_proxy_setting
from vmbuild.progress import Reporter
from vmbuild.remote.base import Remote
from vmbuild.remote.ssh import SSHSession
from vmbuild.run import which
from vmbuild.stages import container, image_tests, rootfs, store
from vmbuild.supply.stage import attest_stage
from vmbuild.supply.verify import verify_build

if TYPE_CHECKING:
    from securesystemslib.signer import Key

log = logging.getLogger("vmbuild.container_build")

WORK_TAG = "vmbuild-work"
# testinfra over SSH into a chroot under TCG: each module call is an exec round trip.
TESTINFRA_TIMEOUT = 900.0
TOOLS = {"umoci": "umoci", "skopeo": "skopeo", "mmdebstrap": "mmdebstrap"}


@dataclass(frozen=True)
class ContainerResult:
    build_dir: Path
    manifest: dict[str, Any]
    image: oci_layout.OciImage
    pushed: list[registry.Pushed] = field(default_factory=list)


def preflight() -> None:
    """Missing host tools are reported before anything is created."""
    missing = [tool for tool in TOOLS if which(tool) is None]
    if missing:
        raise VmbuildError(
            f"container builds need {', '.join(missing)}",
            hint=f"apt-get install {' '.join(sorted({TOOLS[t] for t in missing}))} "
            "(or run scripts/install-host-deps)",
        )


@dataclass(frozen=True)
class Parent:
    """The parent as the build uses it: identity for labels and manifest, its layers."""

    id: str
    sha256: str  # the rootfs tarball's, or the parent image's manifest digest (hex)
    source: str
    format: str  # rootfs-tar | oci
    inherits_config: bool  # an OCI parent's Env, Entrypoint, Cmd, WorkingDir, User stay

    @property
    def label(self) -> str:
        return f"{self.id}@sha256:{self.sha256}"


def _parent(
    loaded: LoadedContainerRecipe, layout: Path, opts: BuildOptions, reporter: Reporter
) -> Parent:
    """The build's layout with the parent image in it as WORK_TAG."""
    recipe, source = loaded.recipe, loaded.parent
    if source.kind == "rootfs":
        tar = rootfs.debian_rootfs(
            recipe.parent_image, mirror=opts.mirror, on_status=reporter.status
        )
        oci_layout.create(layout, WORK_TAG)
        oci_layout.add_layer(layout, WORK_TAG, tar.path, f"vmbuild parent {tar.source}")
        return Parent(recipe.parent_image, tar.sha256, tar.source, "rootfs-tar", False)
    try:
        fetched = oci_parent.fetch(
            source, tls_verify=recipe.parent_tls_verify, on_status=reporter.status
        )
    except ParentError as exc:
        raise ConfigError(loaded.display, "parentImage", str(exc)) from None
    oci_parent.copy_into(fetched, layout, WORK_TAG)
    digest = fetched.digest.removeprefix("sha256:")
    return Parent(source.text, digest, source.skopeo, "oci", True)


def labels(loaded: LoadedContainerRecipe, build_id: str, parent: Parent) -> dict[str, str]:
    """The image config's labels: what built it, from what (an OCI parent's own
    labels stay, these are added or replace those of the same name)."""
    recipe = loaded.recipe
    return {
        "org.opencontainers.image.title": recipe.name,
        "org.opencontainers.image.version": recipe.version,
        "org.opencontainers.image.description": recipe.description,
        "io.vmbuild.recipe": recipe.name,
        "io.vmbuild.recipe.sha256": loaded.sha256,
        "io.vmbuild.build": build_id,
        "io.vmbuild.parent": parent.label,
        "io.vmbuild.components": ",".join(f"{d.name}@sha256:{d.sha256}" for d in loaded.documents),
    }


@dataclass
class _Clock:
    timings: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, reporter: Reporter, name: str, title: str) -> Iterator[None]:
        start = time.monotonic()
        with reporter.stage(name, title):
            yield
        self.timings[name] = round(time.monotonic() - start, 2)


def build_container(
    loaded: LoadedContainerRecipe,
    opts: BuildOptions,
    reporter: Reporter,
    *,
    builder: Remote | None = None,
) -> ContainerResult:
    """Build, test, store and (with a targetRepository) push a container image.

    `builder` is a running Debian guest to build in (its own directory, removed
    after); by default a throwaway builder VM is booted from the cached base.
    """
    preflight()
    recipe = loaded.recipe
    apt_proxy = _apt_proxy_setting(opts.apt_proxy)
    memory = opts.memory or (recipe.vm.memory if "memory" in recipe.vm.model_fields_set
                             else SETTINGS["memory"].default)  # fmt: skip
    cpus = opts.cpus or (recipe.vm.cpus if "cpus" in recipe.vm.model_fields_set
                         else SETTINGS["cpus"].default)  # fmt: skip
    build_id = store.new_build_id()
    started = datetime.now(UTC)
    clock = _Clock()
    tags = recipe.image_tags
    with contextlib.ExitStack() as stack:
        staging = stack.enter_context(
            store.staging(opts.store, recipe.name, recipe.version, build_id)
        )
        work, logs, layout = staging.path / "work", staging.path / "logs", staging.path / "oci"
        work.mkdir()
        try:
            with clock.stage(reporter, "parent", f"parent image {recipe.parent_image}"):
                parent = _parent(loaded, layout, opts, reporter)
                parent_blobs = [x.digest for x in oci_layout.describe(layout, WORK_TAG).layers]
            summary = _in_builder(
                loaded, layout, parent_blobs, work, logs, reporter, clock,
                accel=opts.accelerator or "auto", memory=memory, cpus=cpus, apt_proxy=apt_proxy,
                builder=builder, run_tests=not opts.skip_tests, keep_boot=not opts.no_cache,
            )  # fmt: skip
            with clock.stage(reporter, "image", "labels, tags, docker-archive"):
                # An OCI parent's config is the image's (Cmd, WorkingDir, …): the
                # recipe's workingDirectory is where components run, as in Image Builder.
                image = oci_layout.finish(
                    layout, WORK_TAG, tags, labels(loaded, build_id, parent),
                    None if parent.inherits_config else recipe.working_directory,
                )  # fmt: skip
                archive = staging.path / "image.tar"
                oci_layout.to_docker_archive(layout, tags[0], archive, f"{recipe.name}:{tags[0]}")
            with clock.stage(reporter, "sbom", "package list from the image's dpkg database"):
                installed: list[Package] = oci_packages.installed(layout, tags[0])
        except BaseException:
            _save_failed_logs(logs, paths.state_dir() / "logs" / f"{recipe.name}-{build_id}")
            raise
        shutil.rmtree(work)
        manifest = Manifest(
            name=recipe.name,
            version=recipe.version,
            build=build_id,
            description=recipe.description,
            created=started.strftime("%Y-%m-%dT%H:%M:%SZ"),
            recipe=RecipeRecord(str(loaded.path), loaded.sha256),
            base=BaseRecord(parent.id, parent.sha256, parent.source, parent.format),
            components=tuple(summary["applied"]),
            outputs=(
                OutputRecord(
                    "oci", "oci", image.digest.removeprefix("sha256:"), _tree_size(layout)
                ),
                OutputRecord(
                    "docker-archive", archive.name, sha256_file(archive), archive.stat().st_size
                ),
            ),
            packages=tuple(installed),
            tests=summary["tests"],
            timings={
                **clock.timings,
                "total": round((datetime.now(UTC) - started).total_seconds(), 2),
            },
            backend="qemu",
            vmbuild_version=__version__,
            extra={
                "kind": "container",
                "oci": {
                    **image.to_json(),
                    "layers_mode": recipe.layers,
                    "target": None
                    if recipe.target_repository is None
                    else target_json(recipe.target_repository),
                },
            },
        )
        data = manifest.to_json()
        with reporter.stage("attest", "SBOMs (SPDX, CycloneDX) and signed provenance"):
            attestation = attest_stage(
                staging.path, data, {"memory_mib": memory >> 20, "cpus": cpus}
            )
        # A summary for `images show`; outside the signed digest (MUTABLE_KEYS).
        data["provenance"] = attestation.to_json()
        store.write_manifest(staging.path, data)
        final = store.commit(staging)
    result = ContainerResult(final, store.read_manifest(final), image)
    if recipe.target_repository is None or not opts.distribute:
        return result
    pushed = push_stored(final, reporter)
    return ContainerResult(final, store.read_manifest(final), image, pushed)


def target_json(target: TargetRepository) -> dict[str, Any]:
    """The recipe's targetRepository as the manifest keeps it (`images push` reads it)."""
    data: dict[str, Any] = {
        "service": target.service,
        "registry": target.registry,
        "repository": target.repository_name,
        "tls_verify": target.tls_verify,
    }
    if target.service == "ECR":
        data.update(regions=target.regions, registry_endpoints=target.registry_endpoints)
    return data


def push_stored(
    build_dir: Path, reporter: Reporter, *, keys: list[Key] | None = None,
    allow_unsigned: bool = False,
) -> list[registry.Pushed]:  # fmt: skip
    """Push a stored container image to the target its recipe named, every tag;
    tags already at the image's digest are left alone (so a re-run after a failed
    push finishes only what is missing). Recorded as the manifest's distribution.

    The image is verified against its signed provenance first (VerificationFailed
    naming the file, before any registry call); `allow_unsigned` accepts an image
    without a signature on its content digests alone, as `distribute` does."""
    with reporter.stage("verify", "provenance signature and digests"):
        verify_build(build_dir, keys, allow_unsigned=allow_unsigned)
    manifest = store.read_manifest(build_dir)
    oci = manifest.get("oci") if manifest.get("kind") == "container" else None
    if not isinstance(oci, dict):
        raise VmbuildError(f"{build_dir}: not a container image")
    target = oci.get("target")
    if not isinstance(target, dict):
        raise VmbuildError(
            f"{build_dir}: its recipe names no targetRepository", hint="add one and rebuild"
        )
    if target.get("service") == "ECR":
        return _push_ecr(build_dir, oci, target, reporter)
    where = f"{target['registry']}/{target['repository']}"
    refs = [f"docker://{where}:{tag}" for tag in oci["tags"]]
    start = time.monotonic()
    with reporter.stage("push", f"push to {where}"):
        pushed = registry.push(
            build_dir / "oci", oci["tags"][0], oci["digest"], refs,
            tls_verify=bool(target["tls_verify"]), on_status=reporter.status,
        )  # fmt: skip
    store.update_manifest(
        build_dir, "distribution",
        {"registry": target["registry"], "repository": target["repository"],
         "digest": oci["digest"], "references": refs,
         "seconds": round(time.monotonic() - start, 2)},
    )  # fmt: skip
    return pushed


def _push_ecr(
    build_dir: Path, oci: dict[str, Any], target: dict[str, Any], reporter: Reporter
) -> list[registry.Pushed]:
    """ECR in each region (oci/ecr.py); recorded per region, without the token."""
    from vmbuild.oci import ecr

    regions = [str(r) for r in target["regions"]]
    start = time.monotonic()
    with reporter.stage("push", f"push to ECR {target['repository']} in {', '.join(regions)}"):
        done = ecr.push(
            build_dir / "oci", oci["tags"][0], oci["digest"], oci["tags"],
            repository=str(target["repository"]), regions=regions,
            endpoints=dict(target.get("registry_endpoints") or {}),
            tls_verify=bool(target["tls_verify"]), on_status=reporter.status,
        )  # fmt: skip
    store.update_manifest(
        build_dir, "distribution",
        {"service": "ECR", "repository": target["repository"], "digest": oci["digest"],
         "regions": {r.region: r.to_json() for r in done},
         "references": [p.reference for r in done for p in r.pushed],
         "seconds": round(time.monotonic() - start, 2)},
    )  # fmt: skip
    return [p for r in done for p in r.pushed]


def _in_builder(
    loaded: LoadedContainerRecipe, layout: Path, parent_blobs: list[str], work: Path, logs: Path,
    reporter: Reporter, clock: _Clock, *, accel: str, memory: int, cpus: int, apt_proxy: str,
    builder: Remote | None, run_tests: bool, keep_boot: bool,
) -> dict[str, Any]:  # fmt: skip
    """Boot the builder (or resume the booted builder kept on the base: its disk
    is not the image's), run the components into layers, test; the VM is gone after."""
    from vmbuild.scratch import scratch_guest

    recipe = loaded.recipe
    docs = loaded.documents
    with contextlib.ExitStack() as vm:
        with clock.stage(reporter, "builder", "builder VM"):
            if builder is None:
                builder = vm.enter_context(
                    scratch_guest(
                        "debian-12", base_dir=loaded.dir, accel=accel, memory_mib=memory >> 20,
                        cpus=cpus, on_status=reporter.status, apt_proxy=apt_proxy,
                        keep_boot=keep_boot,
                    )
                ).ssh  # fmt: skip
            blobs = [(d, (layout / "blobs" / d.replace(":", "/")).read_bytes) for d in parent_blobs]
            lowers = container.unpack_layers(builder, blobs)
            ws = vm.enter_context(container.workspace(builder, lowers))
        with clock.stage(reporter, "components", "components (build, validate) in chroot"):
            layers, applied = container.build(
                ws, docs, squash=recipe.layers == "squash",
                working_directory=recipe.working_directory, results_dir=logs / "components",
                on_output=reporter.output,
            )  # fmt: skip
        with clock.stage(reporter, "layers", f"{len(layers)} layer(s) into the OCI layout"):
            for layer in layers:
                tar = work / f"{layer.name}.tar"
                tar.write_bytes(builder.get(layer.guest_tar))
                oci_layout.add_layer(layout, WORK_TAG, tar, layer.created_by)
                tar.unlink()
        results: list[dict[str, Any]] = []

        def record(result: toe.DocumentResult) -> None:
            results.append({"name": result.name, "status": str(result.status)})

        if not run_tests:
            reporter.status("tests: skipped (--skip-tests)")
            return {"applied": [a.to_json() for a in applied],
                    "tests": image_tests.TestSummary("skipped").to_json()}  # fmt: skip
        counts: list[tuple[int, int, int, int]] = []

        def testinfra(root: str) -> None:
            if not loaded.tests:
                return
            if not isinstance(builder, SSHSession):
                raise VmbuildError("testinfra files need the builder reached over SSH")
            *nums, _junit = image_tests.run_testinfra_chroot(
                builder, root, loaded.tests, logs, timeout=TESTINFRA_TIMEOUT,
                on_line=reporter.output,
            )  # fmt: skip
            counts.append((nums[0], nums[1], nums[2], nums[3]))

        title = "components' test phases" + (" and testinfra" if loaded.tests else "")
        with clock.stage(reporter, "test", f"{title} in chroot"):
            container.test(
                ws, docs, layers, working_directory=recipe.working_directory,
                results_dir=logs / "components", on_output=reporter.output, on_result=record,
                then=testinfra,
            )  # fmt: skip
    tests = image_tests.summarize(
        counts[0] if counts else None, "logs/junit.xml" if counts else None, results
    )
    # A failing testinfra file stores nothing (the staging dir goes with the error).
    image_tests.raise_if_failed(tests, "see testinfra.log and junit.xml in the build's saved logs")
    return {"applied": [a.to_json() for a in applied], "tests": tests.to_json()}


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _save_failed_logs(logs: Path, dest: Path) -> None:
    with contextlib.suppress(OSError):
        if logs.exists():
            dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            shutil.copytree(logs, dest, dirs_exist_ok=True)
            dest.chmod(0o700)
