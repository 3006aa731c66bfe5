"""The build plan merges settings once: CLI > pipeline > recipe > default."""

from __future__ import annotations

from pathlib import Path

from tests.support.pipeline import write_pipeline, write_recipe
from vmbuild.config.pipeline import load_pipeline
from vmbuild.config.recipe import load_recipe
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
