"""The local versioned component library: add/list/show, NAME/VERSION, x.x.x and
ARN resolution, AWS-managed names to built-ins, and the pipeline dependency check
seeing a new version (no processes, no VM)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.toe import write
from vmbuild.cli import main
from vmbuild.config.pipeline import load_pipeline
from vmbuild.errors import VmbuildError
from vmbuild.pipeline.deps import compare, snapshot
from vmbuild.toe.library import (
    ComponentNotFound,
    add_to_library,
    components_dir,
    find_component,
    library_dir,
    list_library,
    parse_arn,
)

DOC = """
name: {name}
description: version {version} of a test component
schemaVersion: 1.0
phases:
  - name: build
    steps:
      - name: Say
        action: ExecuteBash
        inputs:
          commands: ["echo {version}"]
"""


def add(tmp_path: Path, version: str, name: str = "my-app") -> Path:
    source = write(tmp_path, DOC.format(name=name, version=version), f"{name}-{version}.yaml")
    return add_to_library(source, name, version)


def test_versions_resolve_like_image_builder(tmp_path: Path) -> None:
    for version in ("1.0.0", "1.2.0", "1.10.1", "2.0.0"):
        add(tmp_path, version)
    root = library_dir()
    assert find_component("my-app/1.2.0", tmp_path) == root / "my-app/1.2.0/component.yaml"
    assert find_component("my-app/1.x.x", tmp_path) == root / "my-app/1.10.1/component.yaml"
    assert find_component("my-app/x.x.x", tmp_path) == root / "my-app/2.0.0/component.yaml"
    assert find_component("my-app", tmp_path) == root / "my-app/2.0.0/component.yaml"
    arn = "arn:aws:imagebuilder:us-west-2:123456789012:component/my-app/1.x.x"
    assert find_component(arn, tmp_path) == root / "my-app/1.10.1/component.yaml"
    build_arn = "arn:aws:imagebuilder:us-west-2:123456789012:component/my-app/1.0.0/1"
    assert find_component(build_arn, tmp_path) == root / "my-app/1.0.0/component.yaml"
    with pytest.raises(ComponentNotFound, match=r"my-app/3\.x\.x is not in the local library "):
        find_component("my-app/3.x.x", tmp_path)
    assert [f"{c.name}/{c.version}" for c in list_library()] == [
        "my-app/1.0.0",
        "my-app/1.2.0",
        "my-app/1.10.1",
        "my-app/2.0.0",
    ]


def test_aws_managed_names_and_arns_are_the_built_ins(tmp_path: Path) -> None:
    arn = "arn:aws:imagebuilder:eu-central-1:aws:component/update-linux/1.0.2/1"
    assert find_component(arn, tmp_path) == components_dir() / "update-linux.yaml"
    assert find_component("update-linux", tmp_path) == components_dir() / "update-linux.yaml"
    parsed = parse_arn("arn:aws:imagebuilder:us-east-1:aws:component/reboot-linux/x.x.x")
    assert parsed is not None and parsed.aws_managed and parsed.name == "reboot-linux"
    with pytest.raises(ComponentNotFound, match="'eni-attachment-test-linux' has no vmbuild"):
        find_component(
            "arn:aws:imagebuilder:us-east-1:aws:component/eni-attachment-test-linux/x.x.x",
            tmp_path,
        )


def test_versions_are_immutable_and_checked(tmp_path: Path) -> None:
    add(tmp_path, "1.0.0")
    with pytest.raises(VmbuildError, match="already in the library; versions are immutable"):
        add(tmp_path, "1.0.0")
    with pytest.raises(VmbuildError, match=r"expected MAJOR\.MINOR\.PATCH"):
        add(tmp_path, "1.0")
    bad = write(tmp_path, "schemaVersion: 1.0\nphases: []\n", "bad.yaml")
    with pytest.raises(VmbuildError, match=r"bad\.yaml: phases: expected a non-empty list"):
        add_to_library(bad, "bad", "1.0.0")
    assert not (library_dir() / "bad").exists()


def test_component_add_list_show_from_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write(tmp_path, DOC.format(name="Hello World", version="0.1.0"), "hello.yaml")
    assert main(["component", "add", str(source), "--version", "0.1.0"]) == 0
    assert capsys.readouterr().out.startswith("Hello-World/0.1.0: added (")
    assert main(["component", "list"]) == 0
    assert "Hello-World/0.1.0: version 0.1.0 of a test component" in capsys.readouterr().out
    assert main(["component", "show", "Hello-World/0.x.x"]) == 0
    assert capsys.readouterr().out == source.read_text()


def test_the_pipeline_check_sees_a_new_component_version(tmp_path: Path) -> None:
    add(tmp_path, "1.0.0")
    with (tmp_path / "base.raw").open("wb") as disk:
        disk.truncate(1 << 20)
        disk.seek(510)
        disk.write(b"\x55\xaa")  # an MBR signature: a raw disk to the recipe check
    (tmp_path / "recipe.yaml").write_text(
        "name: app\nversion: 1.0.0\nbase: ./base.raw\ncomponents:\n  - name: my-app/1.x.x\n"
    )
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text("recipe: recipe.yaml\n")
    before = snapshot(load_pipeline(pipeline))
    assert compare(before, snapshot(load_pipeline(pipeline))) == []
    add(tmp_path, "1.1.0")
    changes = compare(before, snapshot(load_pipeline(pipeline)))
    assert [c.kind for c in changes] == ["component"]
    assert changes[0].summary.startswith("component my-app/1.x.x: document changed")
