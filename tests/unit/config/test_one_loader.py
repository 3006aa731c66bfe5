"""One YAML loader and one error mapper for every file kind: duplicate keys, binary
and non-UTF-8 input, errors naming file and field, unknown fields with a suggestion."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.toe import write as write_doc
from vmbuild.cli.distribute import read_config
from vmbuild.config.pipeline import load_pipeline
from vmbuild.config.recipe import load_recipe
from vmbuild.errors import ConfigError
from vmbuild.toe import load_document

RECIPE = "name: img\nversion: 1.0.0\nbase: debian-12\n"


def loaders(tmp_path: Path) -> dict[str, tuple[str, object]]:
    (tmp_path / "r.yaml").write_text(RECIPE)
    return {
        "recipe": (RECIPE, load_recipe),
        "pipeline": ("recipe: r.yaml\n", load_pipeline),
        "distribution": ("regions: [{region: us-east-1}]\n", read_config),
        "component": ("schemaVersion: 1.0\nphases: []\n", load_document),
    }


@pytest.mark.parametrize("kind", ["recipe", "pipeline", "distribution", "component"])
def test_a_key_written_twice_is_an_error_in_every_file_kind(tmp_path: Path, kind: str) -> None:
    good, load = loaders(tmp_path)[kind]
    path = tmp_path / f"{kind}.yaml"
    first_key = good.split(":", 1)[0]
    path.write_text(good + good.splitlines()[0] + "\n")
    with pytest.raises(ConfigError) as err:
        load(path)  # type: ignore[operator]
    assert str(err.value).startswith(f"{path}: line ")
    assert f"key '{first_key}' appears twice in the same mapping" in str(err.value)


def test_a_recipe_with_two_outputs_lists_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "r2.yaml"
    path.write_text(RECIPE + "outputs: [qcow2]\noutputs: [vmdk]\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert str(err.value) == f"{path}: line 5: key 'outputs' appears twice in the same mapping"


@pytest.mark.parametrize("kind", ["recipe", "pipeline", "distribution", "component"])
@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x7fELF\x02\x01\x01\x00\x00\x00", "cannot read: a binary file, not YAML text"),
        (b"name: caf\xe9\n", "cannot read: not UTF-8 text (byte 9)"),
    ],
)
def test_binary_and_non_utf8_input_is_a_clean_error(
    tmp_path: Path, kind: str, data: bytes, message: str
) -> None:
    _, load = loaders(tmp_path)[kind]
    path = tmp_path / f"{kind}.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as err:
        load(path)  # type: ignore[operator]
    assert str(err.value) == f"{path}: {message}"


def test_every_problem_is_listed_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE + "disk_size: lots\nvm: {cpus: 0}\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert str(err.value).splitlines() == [
        f"{path}: disk_size: invalid size 'lots' (use e.g. 4G, 512M)",
        f"{path}: vm.cpus: Input should be greater than or equal to 1",
    ]


def test_an_unknown_field_gets_a_suggestion_in_every_model(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("recipe: r.yaml\ninfrastructure: {cpu: 2}\n")
    (tmp_path / "r.yaml").write_text(RECIPE)
    with pytest.raises(ConfigError) as err:
        load_pipeline(path)
    assert str(err.value) == f"{path}: infrastructure.cpu: unknown field (did you mean cpus?)"
    doc = write_doc(tmp_path, "schemaVersion: 1.0\nphases: [\n", "bad.yaml")
    with pytest.raises(ConfigError, match=r"bad\.yaml: line 3, column 1: invalid YAML"):
        load_document(doc)
