"""The build plan merges settings once: CLI > pipeline > recipe > default."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.pipeline import write_pipeline, write_recipe
from vmbuild.config.pipeline import load_pipeline
from vmbuild.config.recipe import load_recipe
from vmbuild.errors import VmbuildError
from vmbuild.hypervisor.guest import GuestRequest
from vmbuild.plan import BuildOptions, BuildPlan, pipeline_options


def test_defaults_when_nothing_is_given(tmp_path: Path) -> None:
    loaded = load_recipe(write_recipe(tmp_path))
    plan = BuildPlan.create(loaded, BuildOptions(store=tmp_path / "images"))
    assert (plan.backend, plan.libvirt_uri, plan.libvirt_network) == ("qemu", None, None)
    assert (plan.cpus, plan.memory, plan.accel_mode) == (2, 2 << 30, "auto")
    assert (plan.run_tests, plan.keep_on_failure, plan.distribute) == (True, False, False)
    assert plan.documents == () and plan.run_id == plan.build_id.rsplit("-", 1)[1]
    assert set(plan.sources.values()) == {"default"}


def test_recipe_values_apply_when_the_caller_gives_none(tmp_path: Path) -> None:
    vm = {"backend": "libvirt", "uri": "qemu:///session", "network": "default", "cpus": 3,
          "memory": "1G"}  # fmt: skip
    loaded = load_recipe(write_recipe(tmp_path, vm=vm))
    plan = BuildPlan.create(loaded, BuildOptions(store=tmp_path))
    assert (plan.backend, plan.libvirt_uri, plan.libvirt_network) == (
        "libvirt", "qemu:///session", "default",
    )  # fmt: skip
    assert (plan.cpus, plan.memory) == (3, 1 << 30)
    assert plan.sources["cpus"] == "recipe" and plan.sources["accelerator"] == "default"


def test_cli_beats_recipe(tmp_path: Path) -> None:
    loaded = load_recipe(write_recipe(tmp_path, vm={"backend": "libvirt", "cpus": 3}))
    opts = BuildOptions(store=tmp_path, backend="qemu", cpus=1, memory=512 << 20, skip_tests=True)
    plan = BuildPlan.create(loaded, opts)
    assert (plan.backend, plan.cpus, plan.memory, plan.run_tests) == ("qemu", 1, 512 << 20, False)
    assert [plan.sources[k] for k in ("backend", "cpus", "run_tests", "libvirt_uri")] == [
        "cli", "cli", "cli", "default",
    ]  # fmt: skip


def test_pipeline_infrastructure_beats_recipe(tmp_path: Path) -> None:
    write_recipe(tmp_path, "web", vm={"cpus": 3, "memory": "1G", "network": "lan"})
    body = {"recipe": "web-recipe.yaml",
            "infrastructure": {"cpus": 1, "accelerator": "tcg", "backend": "libvirt"}}  # fmt: skip
    p = load_pipeline(write_pipeline(tmp_path, body))
    opts = pipeline_options(
        p.pipeline.infrastructure, tests_enabled=False, store=tmp_path, distribute=False
    )
    plan = BuildPlan.create(p.recipe, opts)
    assert (plan.cpus, plan.memory, plan.accel_mode) == (1, 1 << 30, "tcg")
    assert (plan.backend, plan.libvirt_network, plan.run_tests) == ("libvirt", "lan", False)
    assert [plan.sources[k] for k in ("cpus", "memory", "libvirt_network", "accelerator")] == [
        "pipeline", "recipe", "recipe", "pipeline",
    ]  # fmt: skip


def test_builder_boots_minimal_and_the_test_vm_is_a_real_first_boot(tmp_path: Path) -> None:
    from vmbuild.hypervisor.accel import Accel

    plan = BuildPlan.create(load_recipe(write_recipe(tmp_path)), BuildOptions(store=tmp_path))
    accel = Accel("tcg", "test", 10.0)
    builder = plan.guest("builder", tmp_path / "b", "qcow2", None, accel, tmp_path)
    test = plan.guest("test", tmp_path / "t", "qcow2", None, accel, tmp_path, apt_proxy="p")
    assert (builder.first_boot, builder.dispose, builder.apt_proxy) == (
        "minimal", "shutdown", None,
    )  # fmt: skip
    assert (test.first_boot, test.dispose, test.apt_proxy) == ("full", "kill", "p")


def test_apt_proxy_setting_is_validated_by_the_plan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VMBUILD_APT_PROXY", raising=False)
    loaded = load_recipe(write_recipe(tmp_path))
    assert BuildPlan.create(loaded, BuildOptions(store=tmp_path)).apt_proxy == "auto"
    named = BuildOptions(store=tmp_path, apt_proxy="http://localhost:3142")
    assert BuildPlan.create(loaded, named).apt_proxy == "http://127.0.0.1:3142"
    with pytest.raises(VmbuildError) as err:
        BuildPlan.create(loaded, BuildOptions(store=tmp_path, apt_proxy="http://10.0.0.1:1"))
    assert str(err.value) == (
        "apt proxy 'http://10.0.0.1:1': expected auto, off or http://127.0.0.1:PORT"
    )


def test_a_scratch_vm_is_a_default_recipes_builder_to_the_boot_key(tmp_path: Path) -> None:
    """component run and a default recipe's build resume each other's booted
    builder: every field the boot key covers is the same (resume.boot_key)."""
    from dataclasses import replace

    from vmbuild.hypervisor.accel import Accel
    from vmbuild.scratch import request
    from vmbuild.stages import base_image, resume

    loaded = load_recipe(write_recipe(tmp_path))
    plan = BuildPlan.create(loaded, BuildOptions(store=tmp_path))
    accel = Accel("tcg", "test", 10.0)
    image = base_image.BaseImage(
        "i", tmp_path / "b.qcow2", "qcow2", "ab" * 32, "debian-12", 2 << 30
    )
    builder = plan.guest("builder", image.path, "qcow2", loaded.recipe.disk_size, accel, tmp_path)
    scratch = request(
        image, tmp_path, accel, memory_mib=None, cpus=None, user="vmbuild-builder",
        first_boot="minimal", apt_proxy=None,
    )  # fmt: skip

    def keyed(req: GuestRequest) -> str:
        root = resume.root_key(base_image.key(image, req.disk_size), req, mirror={})
        # The signature (guest.state_signature) is read from the same fields below.
        boot = resume.boot_key(root, user=req.user, firmware=req.firmware, signature="s")
        return boot.digest

    fields = (
        "disk_size", "memory_mib", "cpus", "user", "firmware", "first_boot", "arch", "accel",
        "backend", "ec2", "offline_mirror_port",
    )  # fmt: skip
    assert [getattr(scratch, f) for f in fields] == [getattr(builder, f) for f in fields]
    assert keyed(scratch) == keyed(builder)
    # Both key their root on the request they boot: the plan's memory and CPUs.
    assert (plan.memory, plan.cpus) == (builder.memory_mib << 20, builder.cpus)
    # What a component sees of its machine is in the root key; where it runs, in
    # each component's.
    base = base_image.key(image, builder.disk_size)
    root = resume.root_key(base, builder, mirror={})
    for other in (replace(builder, firmware="uefi"), replace(builder, accel=Accel("kvm", "", 1.0)),
                  replace(builder, memory_mib=4096), replace(builder, cpus=4)):  # fmt: skip
        assert resume.root_key(base, other, mirror={}) != root
    assert resume.root_key(base, builder, mirror={"a": "1"}) != root
    assert resume.chain(root, [], "/tmp") == []
    assert plan.mirror is None  # as the scratch VM's key reads it: the default mirror
    # A base bigger than a default recipe's disk keeps its own size, and so its own key.
    big = replace(image, virtual_size=8 << 30)
    kept_size = request(
        big, tmp_path, accel, memory_mib=None, cpus=None, user="vmbuild-builder",
        first_boot="minimal", apt_proxy=None,
    )  # fmt: skip
    assert kept_size.disk_size is None
    # `images run`: a stored image, booted in full as it is.
    stored = request(
        image, tmp_path, accel, memory_mib=None, cpus=None, user="admin", first_boot="full",
        apt_proxy=None,
    )  # fmt: skip
    assert stored.disk_size is None
