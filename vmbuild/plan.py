"""The build plan: every setting a build uses, merged once, before anything runs.

Settings come from up to three places; the first that gives one wins:

    CLI flag  >  pipeline `infrastructure:`  >  recipe `vm:`  >  default

`BuildOptions` is the caller's layer (the CLI's flags, or for a pipeline run its
infrastructure rendered by `pipeline_options`); `BuildPlan.create` merges it over
the recipe. Nothing else in vmbuild picks between these sources.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from vmbuild import paths, toe
from vmbuild.cache import aptproxy
from vmbuild.config.recipe import LoadedRecipe, VMSettings
from vmbuild.hypervisor.accel import Accel, AccelMode
from vmbuild.hypervisor.guest import GuestRequest
from vmbuild.stages import store

if TYPE_CHECKING:
    from vmbuild.config.pipeline import Infrastructure

DEFAULT_BACKEND = "qemu"
BUILDER_USER = "vmbuild-builder"
TEST_USER = "vmbuild-test"

T = TypeVar("T")


def first(*values: T | None, default: T) -> T:
    """The precedence rule: the first value given (CLI, pipeline, recipe), else the default."""
    for value in values:
        if value is not None:
            return value
    return default


@dataclass(frozen=True)
class BuildOptions:
    """The caller's settings on top of the recipe; None means "not given"."""

    store: Path
    accel: AccelMode = "auto"
    skip_tests: bool = False
    keep_on_failure: bool = False
    backend: str | None = None
    mirror: str | None = None
    distribute: bool = True
    libvirt_uri: str | None = None
    libvirt_network: str | None = None
    cpus: int | None = None
    memory: int | None = None  # bytes
    apt_proxy: str | None = None  # auto | off | http://127.0.0.1:PORT; None: env, else auto


def pipeline_options(
    infra: Infrastructure, *, tests_enabled: bool, store: Path, distribute: bool
) -> BuildOptions:
    """A pipeline run's layer: its infrastructure (a pipeline run has no CLI flags)."""
    return BuildOptions(
        store=store, accel=infra.accelerator, skip_tests=not tests_enabled,
        keep_on_failure=infra.keep_vm_on_failure, backend=infra.backend, mirror=infra.mirror,
        libvirt_uri=infra.uri, libvirt_network=infra.network, cpus=infra.cpus,
        memory=infra.memory, distribute=distribute,
    )  # fmt: skip


def vm_settings(recipe_vm: VMSettings, *, cpus: int | None, memory: int | None) -> VMSettings:
    """The recipe's `vm:` with the caller's CPUs and memory applied."""
    update = {k: v for k, v in (("cpus", cpus), ("memory", memory)) if v is not None}
    return recipe_vm.model_copy(update=update)


@dataclass(frozen=True)
class BuildPlan:
    """Everything a build does, decided before the first side effect."""

    loaded: LoadedRecipe
    documents: tuple[toe.Document, ...]  # parsed once, with their parameters
    store: Path
    build_id: str
    started: datetime
    backend: str
    libvirt_uri: str | None
    libvirt_network: str | None
    accel_mode: AccelMode
    memory: int  # bytes
    cpus: int
    mirror: str | None
    run_tests: bool
    keep_on_failure: bool
    distribute: bool
    apt_proxy: str  # auto | off | http://127.0.0.1:PORT (validated)

    @classmethod
    def create(cls, loaded: LoadedRecipe, opts: BuildOptions) -> BuildPlan:
        recipe = loaded.recipe
        vm = vm_settings(recipe.vm, cpus=opts.cpus, memory=opts.memory)
        return cls(
            loaded=loaded,
            documents=loaded.documents,
            store=opts.store,
            build_id=store.new_build_id(),
            started=datetime.now(UTC),
            backend=first(opts.backend, vm.backend, default=DEFAULT_BACKEND),
            libvirt_uri=first(opts.libvirt_uri, vm.uri, default=None),
            libvirt_network=first(opts.libvirt_network, vm.network, default=None),
            accel_mode=opts.accel,
            memory=vm.memory,
            cpus=vm.cpus,
            mirror=opts.mirror,
            run_tests=not opts.skip_tests,
            keep_on_failure=opts.keep_on_failure,
            distribute=opts.distribute and loaded.distribution is not None,
            apt_proxy=_apt_proxy_setting(opts.apt_proxy),
        )

    @property
    def run_id(self) -> str:
        return self.build_id.rsplit("-", 1)[1]

    @property
    def failed_logs(self) -> Path:
        """Where a failed build's logs are kept (its staging dir is removed): state,
        not cache, pruned by age by the run reaper (vmbuild/runs.py)."""
        return paths.state_dir() / "logs" / f"{self.loaded.recipe.name}-{self.build_id}"

    def check_backend(self) -> None:
        """An unreachable libvirt is reported before any disk or staging dir exists."""
        if self.backend == "libvirt":
            from vmbuild.hypervisor.libvirt import connect

            connect(self.libvirt_uri).close()

    @property
    def apt_proxy_reachable(self) -> bool:
        """Guests reach the host cache through the user-network gateway only."""
        return not (self.backend == "libvirt" and self.libvirt_network)

    def guest(
        self,
        role: str,
        disk: Path,
        fmt: str,
        size: int | None,
        accel: Accel,
        workdir: Path,
        apt_proxy: str | None = None,
    ) -> GuestRequest:
        """The VM request for the builder ("builder") or the test VM ("test")."""
        return GuestRequest(
            run_id=self.run_id, role=role, base=disk, base_format=fmt, disk_size=size,
            memory_mib=self.memory >> 20, cpus=self.cpus, accel=accel, workdir=workdir,
            user=BUILDER_USER if role == "builder" else TEST_USER, backend=self.backend,
            keep_on_failure=self.keep_on_failure, libvirt_uri=self.libvirt_uri,
            libvirt_network=self.libvirt_network, apt_proxy=apt_proxy,
        )  # fmt: skip


def _apt_proxy_setting(value: str | None) -> str:
    """The flag, else $VMBUILD_APT_PROXY, else auto; a bad value fails here."""
    chosen = aptproxy.parse_setting(value)
    if chosen is None:
        return "off"
    return "auto" if chosen == "auto" else f"http://127.0.0.1:{chosen}"
