"""Container recipes (Image Builder's containerRecipe): validated before any side
effect, errors naming the file and the field."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support.cli import REPO
from vmbuild.config.container import load_container_recipe
from vmbuild.config.detect import detect_kind
from vmbuild.config.loader import load_yaml
from vmbuild.errors import ConfigError

DATA = REPO / "tests" / "data" / "container"


@pytest.fixture
def recipe_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("hello.yaml", "harden.yaml", "recipe.yaml", "image_checks.py"):
        shutil.copy(DATA / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def edit(path: Path, old: str, new: str) -> Path:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    return Path(path.name)


def error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_container_recipe(path)
    return str(info.value)


def test_the_example_loads_with_its_components_and_tags(recipe_dir: Path) -> None:
    loaded = load_container_recipe(Path("recipe.yaml"))
    recipe = loaded.recipe
    assert (recipe.name, recipe.parent_image, recipe.layers) == (
        "ctr-hello",
        "debian-12",
        "per-component",
    )
    assert [d.name for d in loaded.documents] == ["hello", "harden"]
    assert loaded.documents[0].parameters == {"Greeting": "hi from vmbuild"}
    assert recipe.image_tags == ["latest", "1.0.0"]
    target = recipe.target_repository
    assert target is not None
    assert target.reference("latest") == "docker://127.0.0.1:5000/vmbuild/ctr-hello:latest"
    assert target.tls_verify is False
    assert detect_kind(load_yaml(DATA / "recipe.yaml")) == "container-recipe"
    assert loaded.tests == ((recipe_dir / "image_checks.py").resolve(),)


def test_without_tags_the_version_is_the_tag(recipe_dir: Path) -> None:
    path = edit(recipe_dir / "recipe.yaml", "tags: [latest, 1.0.0]\n", "")
    path = edit(recipe_dir / "recipe.yaml", "version: 1.0.0", "version: 1.0.0+b2")
    assert load_container_recipe(path).recipe.image_tags == ["1.0.0_b2"]


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("parentImage: debian-12", "parentImage: 'Alpine:3'",
         "recipe.yaml: parentImage: 'Alpine:3' is not a parent image: expected debian-12, "
         "oci:PATH[:TAG], docker-archive:PATH, docker://REF or a registry reference"),
        ("parentImage: debian-12", "parentImage: oci:missing:1",
         "recipe.yaml: parentImage: "),
        ("parentImage: debian-12", "parentImage: docker-archive:missing.tar",
         "recipe.yaml: parentImage: "),
        ("parentImage: debian-12",
         "parentImage: arn:aws:imagebuilder:us-east-1:aws:image/amazon-linux-x86-2/x.x.x",
         "recipe.yaml: parentImage: 'arn:aws:imagebuilder:us-east-1:aws:image/amazon-linux-x86-2"
         "/x.x.x': an Image Builder image ARN names an image in AWS"),
        ("tags: [latest, 1.0.0]", "tags: [latest, 'bad tag']",
         "recipe.yaml: tags[1]: 'bad tag' is not a valid image tag"),
        ("tags: [latest, 1.0.0]", "tags: [latest, latest]", "recipe.yaml: tags: a tag is listed twice"),
        ("layers: per-component", "layers: flat", "recipe.yaml: layers:"),
        ("service: registry", "service: ECR",
         "recipe.yaml: targetRepository: registry: an ECR target's registry comes from each "
         "region"),
        ("  registry: 127.0.0.1:5000\n", "  registry: 127.0.0.1:5000\n  regions: [us-east-1]\n",
         "recipe.yaml: targetRepository: regions, registryEndpoints: only an ECR target has them"),
        ("  registry: 127.0.0.1:5000\n", "",
         "recipe.yaml: targetRepository: registry: a registry target names its HOST[:PORT]"),
        ("repositoryName: vmbuild/ctr-hello", "repositoryName: Vmbuild/Upper",
         "recipe.yaml: targetRepository.repositoryName:"),
        ("  - name: harden.yaml", "  - name: missing.yaml", "recipe.yaml: components[1].name:"),
        ("version: 1.0.0", "version: one", "recipe.yaml: version: 'one' is not a semantic version"),
        ("tests: [image_checks.py]", "tests: [hello.yaml]",
         "recipe.yaml: tests[0]: hello.yaml: a testinfra file is a .py file"),
        ("tests: [image_checks.py]", "tests: [missing.py]",
         "recipe.yaml: tests[0]: file not found: missing.py"),
    ],
)  # fmt: skip
def test_errors_name_the_file_and_the_field(
    recipe_dir: Path, old: str, new: str, message: str
) -> None:
    assert error(edit(recipe_dir / "recipe.yaml", old, new)).startswith(message)


def test_parent_images_in_skopeo_syntax_or_as_image_builder_writes_them(
    recipe_dir: Path,
) -> None:
    (recipe_dir / "layout").mkdir()
    (recipe_dir / "layout" / "index.json").write_text("{}")
    (recipe_dir / "saved.tar").write_bytes(b"")
    digest = "sha256:" + "ab" * 32
    cases = {
        "debian-12": ("rootfs", ""),
        "oci:layout": ("oci", f"oci:{recipe_dir / 'layout'}"),
        "oci:layout:v1.2": ("oci", f"oci:{recipe_dir / 'layout'}:v1.2"),
        "docker-archive:saved.tar": ("docker-archive", f"docker-archive:{recipe_dir}/saved.tar"),
        "amazonlinux:latest": ("docker", "docker://amazonlinux:latest"),
        f"127.0.0.1:5000/vm/base@{digest}": ("docker", f"docker://127.0.0.1:5000/vm/base@{digest}"),
        "docker://quay.io/org/img:1": ("docker", "docker://quay.io/org/img:1"),
        "123456789012.dkr.ecr.us-east-1.amazonaws.com/web:2": (
            "docker", "docker://123456789012.dkr.ecr.us-east-1.amazonaws.com/web:2"),
    }  # fmt: skip
    for text, (kind, skopeo) in cases.items():
        edit(recipe_dir / "recipe.yaml", "parentImage: debian-12", f"parentImage: '{text}'")
        parent = load_container_recipe(Path("recipe.yaml")).parent
        assert (parent.kind, parent.text, parent.skopeo) == (kind, text, skopeo)
        edit(recipe_dir / "recipe.yaml", f"parentImage: '{text}'", "parentImage: debian-12")


ECR = "  service: ECR\n  repositoryName: vmbuild/ctr-hello\n"


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("", "regions: an ECR target names at least one region"),
        ("  regions: [us-east-1, Mars]\n", "regions[1]: 'Mars' is not an AWS region name"),
        ("  regions: [us-east-1, us-east-1]\n", "regions: a region is listed twice"),
        ("  regions: [us-east-1]\n  registryEndpoints: {eu-west-1: h.example}\n",
         "registryEndpoints.eu-west-1: not one of the regions"),
        ("  regions: [us-east-1]\n  registryEndpoints: {us-east-1: 'a b'}\n",
         "registryEndpoints.us-east-1: 'a b' is not HOST[:PORT]"),
    ],
)  # fmt: skip
def test_ecr_targets_are_checked(recipe_dir: Path, target: str, message: str) -> None:
    text = (recipe_dir / "recipe.yaml").read_text()
    start = text.index("targetRepository:\n") + len("targetRepository:\n")
    end = text.index("  tlsVerify:")
    (recipe_dir / "recipe.yaml").write_text(text[:start] + ECR + target + text[end:])
    assert error(Path("recipe.yaml")).startswith(f"recipe.yaml: targetRepository: {message}")


def test_an_ecr_target_loads(recipe_dir: Path) -> None:
    text = (recipe_dir / "recipe.yaml").read_text()
    start = text.index("targetRepository:\n") + len("targetRepository:\n")
    end = text.index("  tlsVerify:")
    target = ECR + "  regions: [us-east-1, eu-west-1]\n  registryEndpoints: {eu-west-1: h:5000}\n"
    (recipe_dir / "recipe.yaml").write_text(text[:start] + target + text[end:])
    loaded = load_container_recipe(Path("recipe.yaml")).recipe.target_repository
    assert loaded is not None
    assert (loaded.service, loaded.regions, loaded.registry_endpoints) == (
        "ECR", ["us-east-1", "eu-west-1"], {"eu-west-1": "h:5000"}
    )  # fmt: skip


def test_a_recipe_without_components_is_refused(recipe_dir: Path) -> None:
    text = (recipe_dir / "recipe.yaml").read_text()
    start, end = text.index("components:"), text.index("layers:")
    (recipe_dir / "recipe.yaml").write_text(text[:start] + "components: []\n" + text[end:])
    assert error(Path("recipe.yaml")).startswith("recipe.yaml: components:")


def test_a_reboot_step_cannot_run_in_a_container(recipe_dir: Path) -> None:
    (recipe_dir / "reboot.yaml").write_text(
        "name: reboot\nschemaVersion: 1.0\nphases:\n  - name: build\n    steps:\n"
        "      - name: Again\n        action: Reboot\n"
    )
    path = edit(recipe_dir / "recipe.yaml", "  - name: harden.yaml", "  - name: reboot.yaml")
    assert error(path) == (
        "recipe.yaml: components[1].name: reboot.yaml: a Reboot step cannot run in a "
        "container build"
    )
