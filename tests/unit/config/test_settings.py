"""Each setting declared once: the CLI flags and the file fields come from one table."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from tests.support.pipeline import write_pipeline, write_recipe
from vmbuild.config.pipeline import Infrastructure, load_pipeline
from vmbuild.config.recipe import VMSettings
from vmbuild.config.settings import SETTINGS, add_flags, cli_values
from vmbuild.errors import ConfigError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmbuild build", exit_on_error=False)
    add_flags(p)
    return p


def test_the_file_layers_have_exactly_the_settings_the_table_allows_there() -> None:
    assert set(VMSettings.model_fields) == {n for n, s in SETTINGS.items() if "recipe" in s.where}
    assert set(Infrastructure.model_fields) == {
        n for n, s in SETTINGS.items() if "pipeline" in s.where
    }
    for name, f in Infrastructure.model_fields.items():
        assert f.description == SETTINGS[name].help


def test_defaults_live_in_the_lowest_layer_only() -> None:
    vm, infra = VMSettings(), Infrastructure()
    assert (vm.backend, vm.cpus, vm.memory) == ("qemu", 2, 2 << 30)
    # A pipeline that says nothing leaves the recipe's values in place...
    assert (infra.backend, infra.cpus, infra.memory, infra.uri) == (None, None, None, None)
    # ...and has the defaults of what only it (or the CLI) sets.
    assert (infra.accelerator, infra.keep_on_failure, infra.refresh_base) == ("auto", False, True)
    assert cli_values(parser().parse_args([])) == {
        "backend": None, "uri": None, "network": None, "cpus": None, "memory": None,
        "accelerator": None, "keep_on_failure": False, "mirror": None, "skip_tests": False,
        "apt_proxy": None, "no_cache": False, "on_error": None,
    }  # fmt: skip


def test_cli_flags_with_their_old_spellings() -> None:
    args = parser().parse_args(
        ["--accel", "tcg", "--cpus", "4", "--memory", "3G", "--libvirt-uri", "qemu:///session",
         "--keep-on-failure", "--skip-tests"]
    )  # fmt: skip
    values = cli_values(args)
    assert (values["accelerator"], values["cpus"], values["memory"]) == ("tcg", 4, 3 << 30)
    assert (values["uri"], values["keep_on_failure"], values["skip_tests"]) == (
        "qemu:///session", True, True,
    )  # fmt: skip
    assert cli_values(parser().parse_args(["--accelerator", "kvm"]))["accelerator"] == "kvm"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cpus", "0"], "argument --cpus: 0 is out of range"),
        (["--cpus", "x"], "argument --cpus: invalid literal for int() with base 10: 'x'"),
        (["--memory", "lots"], "argument --memory: invalid size 'lots' (use e.g. 4G, 512M)"),
        (["--accelerator", "hvf"], "argument --accelerator/--accel: invalid choice: 'hvf'"),
    ],
)
def test_cli_values_are_checked_like_file_values(argv: list[str], message: str) -> None:
    with pytest.raises(argparse.ArgumentError) as err:
        parser().parse_args(argv)
    assert str(err.value).startswith(message)


def test_pipeline_files_accept_the_old_key_and_the_new(tmp_path: Path) -> None:
    write_recipe(tmp_path, "web")
    for key in ("keep_on_failure", "keep_vm_on_failure"):
        body = {"recipe": "web-recipe.yaml", "infrastructure": {key: True}}
        p = load_pipeline(write_pipeline(tmp_path, body, name=key.replace("_", "-")))
        assert p.pipeline.infrastructure.keep_on_failure is True
    body = {"recipe": "web-recipe.yaml", "infrastructure": {"cpus": 0}}
    with pytest.raises(ConfigError, match=r"infrastructure\.cpus: Input should be greater than"):
        load_pipeline(write_pipeline(tmp_path, body, name="bad"))
