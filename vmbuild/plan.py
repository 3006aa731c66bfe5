"""The build plan: every setting a build uses, merged once, before anything runs.

Settings come from up to three places; the first that gives one wins:

    CLI flag  >  pipeline `infrastructure:`  >  recipe `vm:`  >  default

`BuildOptions` is the caller's layer (the CLI's flags, or for a pipeline run its
infrastructure rendered by `pipeline_options`); `BuildPlan.create` merges it over
the recipe. Nothing else in vmbuild picks between these sources.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmbuild import paths, toe
from vmbuild.cache import aptproxy
from vmbuild.config.recipe import LoadedRecipe, VMSettings
from vmbuild.config.settings import SETTINGS
from vmbuild.errors import ConfigError
from vmbuild.hypervisor import firmware
from vmbuild.hypervisor.accel import Accel, AccelMode
from vmbuild.hypervisor.guest import GuestRequest
from vmbuild.hypervisor.imds import Ec2Settings
from vmbuild.stages import store

if TYPE_CHECKING:
    from vmbuild.config.pipeline import Infrastructure
    from vmbuild.stages.base_image import BaseImage

BUILDER_USER = "vmbuild-builder"
TEST_USER = "vmbuild-test"


@dataclass(frozen=True)
class OfflineSource:
    """An offline rebuild from a bundle (vmbuild.rebuild): the bundled base, the
    bundle's mirror every guest reaches (and nothing else), and what the rebuilt image
    must reproduce."""

    base: BaseImage  # the bundled base, recorded under the original build's id
    mirror_port: int  # vmbuild.supply.mirror on the host's 127.0.0.1
    bundle: str  # the bundle file, as given
    bundle_sha256: str  # sha256 of the whole bundle file
    ref: str  # the original build: NAME/VERSION/BUILD
    packages: tuple[tuple[str, str, str], ...]  # (name, version, arch) of the original image

    def to_json(self) -> dict[str, str]:
        return {"bundle": self.bundle, "sha256": self.bundle_sha256, "ref": self.ref}


@dataclass(frozen=True)
class BuildOptions:
    """The caller's settings on top of the recipe; None means "not given"."""

    # Field names are the setting names of config/settings.py.
    store: Path
    accelerator: AccelMode | None = None
    skip_tests: bool = False
    keep_on_failure: bool = False
    backend: str | None = None
    mirror: str | None = None
    uri: str | None = None  # libvirt
    network: str | None = None  # libvirt
    cpus: int | None = None
    memory: int | None = None  # bytes
    apt_proxy: str | None = None  # auto | off | http://127.0.0.1:PORT; None: env, else auto
    no_cache: bool = False  # neither resume from nor save checkpoints
    on_error: str | None = None  # abort (default) | keep (the VM stays up) | ask
    distribute: bool = True
    origin: str = "cli"  # which layer these options are: "cli" or "pipeline"
    offline: OfflineSource | None = None  # a rebuild from a bundle (`bundle rebuild`)

    @property
    def accel(self) -> AccelMode | None:
        """The accelerator under its earlier name."""
        return self.accelerator


def pipeline_options(
    infra: Infrastructure, *, tests_enabled: bool, store: Path, distribute: bool
) -> BuildOptions:
    """A pipeline run's layer: its infrastructure (a pipeline run has no CLI flags)."""
    return BuildOptions(
        store=store, accelerator=infra.accelerator, skip_tests=not tests_enabled,
        keep_on_failure=infra.keep_on_failure, backend=infra.backend, mirror=infra.mirror,
        uri=infra.uri, network=infra.network, cpus=infra.cpus,
        memory=infra.memory, distribute=distribute, origin="pipeline",
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
    # Where each setting's value came from: cli | pipeline | recipe | environment | default.
    sources: Mapping[str, str] = field(default_factory=dict)
    use_checkpoints: bool = True
    on_error: str = "abort"  # abort | keep | ask
    offline: OfflineSource | None = None

    @classmethod
    def create(cls, loaded: LoadedRecipe, opts: BuildOptions) -> BuildPlan:
        recipe = loaded.recipe
        in_recipe = recipe.vm.model_fields_set
        sources: dict[str, str] = {}

        def pick(name: str, given: Any, recipe_key: str | None = None) -> Any:
            """The precedence rule, recording which layer won."""
            if given is not None and given is not False:
                sources[name] = opts.origin
                return given
            if recipe_key is not None and recipe_key in in_recipe:
                sources[name] = "recipe"
                return getattr(recipe.vm, recipe_key)
            sources[name] = "default"
            return SETTINGS[recipe_key or name].default

        plan = cls(
            loaded=loaded,
            documents=loaded.documents,
            store=opts.store,
            build_id=store.new_build_id(),
            started=datetime.now(UTC),
            backend=pick("backend", opts.backend, "backend"),
            libvirt_uri=pick("libvirt_uri", opts.uri, "uri"),
            libvirt_network=pick("libvirt_network", opts.network, "network"),
            accel_mode=pick("accelerator", opts.accelerator),
            memory=pick("memory", opts.memory, "memory"),
            cpus=pick("cpus", opts.cpus, "cpus"),
            mirror=pick("mirror", opts.mirror),
            run_tests=not pick("skip_tests", opts.skip_tests),
            keep_on_failure=pick("keep_on_failure", opts.keep_on_failure)
            or opts.on_error == "keep",
            distribute=opts.distribute and loaded.distribution is not None,
            apt_proxy=_apt_proxy_setting(opts.apt_proxy),
            sources=sources,
            use_checkpoints=not pick("no_cache", opts.no_cache),
            on_error=pick("on_error", opts.on_error),
            offline=opts.offline,
        )
        sources["run_tests"] = sources.pop("skip_tests")
        sources["apt_proxy"] = (
            opts.origin if opts.apt_proxy
            else "environment" if os.environ.get("VMBUILD_APT_PROXY") else "default"
        )  # fmt: skip
        sources["disk_size"] = "recipe" if "disk_size" in recipe.model_fields_set else "default"
        return plan

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
        if self.test_ec2 is not None and self.run_tests and self.libvirt_network:
            raise ConfigError(
                self.loaded.display, "tests.boot",
                "the ec2 boot serves instance metadata through QEMU's user network; "
                f"a libvirt network ({self.libvirt_network}) has no 169.254.169.254",
                hint="drop the libvirt network for this build, or boot the tests with nocloud",
            )  # fmt: skip
        if self.offline is not None and (self.backend != "qemu" or self.test_ec2 is not None):
            what = "the libvirt backend" if self.backend != "qemu" else "tests.boot: ec2"
            raise ConfigError(
                self.loaded.display, "backend" if self.backend != "qemu" else "tests.boot",
                f"an offline rebuild runs its guests on a restricted QEMU user network; "
                f"{what} is not supported there yet",
                hint="rebuild with --backend qemu" if self.backend != "qemu"
                else "rebuild with --skip-tests, or test the imported image separately",
            )  # fmt: skip
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
        """The VM request for the builder ("builder") or the test VM ("test"), booted
        with the firmware the recipe's boot mode gives it first."""
        from vmbuild.cache.aptproxy import OFFLINE_ADDRESS

        recipe = self.loaded.recipe
        offline_port = self.offline.mirror_port if self.offline is not None else None
        if offline_port is not None:
            apt_proxy = f"http://{OFFLINE_ADDRESS}:80"
        return GuestRequest(
            run_id=self.run_id, role=role, base=disk, base_format=fmt, disk_size=size,
            memory_mib=self.memory >> 20, cpus=self.cpus, accel=accel, workdir=workdir,
            user=BUILDER_USER if role == "builder" else TEST_USER, backend=self.backend,
            keep_on_failure=self.keep_on_failure, libvirt_uri=self.libvirt_uri,
            libvirt_network=self.libvirt_network, apt_proxy=apt_proxy,
            # The test VM is the image's real first boot, and disposable.
            first_boot="full" if role == "test" else "minimal",
            dispose="kill" if role == "test" else "shutdown",
            ec2=self.test_ec2 if role == "test" else None,
            firmware=firmware.builder_firmware(recipe.boot_mode) if role == "builder"
            else firmware.boot_modes(recipe.boot_mode, recipe.secure_boot)[0],
            arch=recipe.arch, offline_mirror_port=offline_port,
        )  # fmt: skip

    @property
    def test_ec2(self) -> Ec2Settings | None:
        """How the test VM is dressed as an EC2 instance (`tests: {boot: ec2}`), or None."""
        tests = self.loaded.recipe.tests
        return tests.imds.settings() if tests.boot == "ec2" else None


def _apt_proxy_setting(value: str | None) -> str:
    """The flag, else $VMBUILD_APT_PROXY, else auto; a bad value fails here."""
    chosen = aptproxy.parse_setting(value)
    if chosen is None:
        return "off"
    return "auto" if chosen == "auto" else f"http://127.0.0.1:{chosen}"
