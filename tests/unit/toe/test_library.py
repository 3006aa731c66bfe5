"""The built-in component library: every component is valid, documented, has
build, validate and test phases, and can be found by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmbuild.toe import (
    ComponentNotFound,
    declared_parameters,
    find_component,
    list_components,
    load_document,
    validate_file,
)
from vmbuild.toe.library import components_dir

BUILTINS = [
    "amazon-cloudwatch-agent-linux",
    "aws-cli",
    "aws-cli-version-2-linux",
    "chrony-time-configuration-test",
    "cloud-ready",
    "docker-ce-linux",
    "firewall",
    "java",
    "nginx-app",
    "python-3-linux",
    "reboot-linux",
    "reboot-test-linux",
    "simple-boot-test-linux",
    "ssh-hardening",
    "stig-build-linux-medium",
    "time-sync",
    "update-linux",
]

# Debian equivalents of AWS-managed components, under AWS's names: each says
# which Debian package stands in and that only Debian's mirror is needed.
MANAGED = [
    "amazon-cloudwatch-agent-linux",
    "aws-cli-version-2-linux",
    "chrony-time-configuration-test",
    "docker-ce-linux",
    "python-3-linux",
    "reboot-linux",
    "reboot-test-linux",
    "simple-boot-test-linux",
    "stig-build-linux-medium",
    "update-linux",
]


@pytest.mark.parametrize("name", MANAGED)
def test_managed_names_resolve_by_name_and_arn(name: str) -> None:
    arn = f"arn:aws:imagebuilder:us-east-1:aws:component/{name}/x.x.x"
    assert (
        find_component(arn, Path("."))
        == find_component(name, Path("."))
        == (components_dir() / f"{name}.yaml")
    )


def test_the_library_has_the_issue_s_components() -> None:
    assert [c.name for c in list_components()] == BUILTINS


@pytest.mark.parametrize("name", BUILTINS)
def test_each_component_is_valid_documented_and_complete(name: str) -> None:
    path = find_component(name, Path("/nonexistent"))
    assert path == components_dir() / f"{name}.yaml"
    assert validate_file(path) == []
    doc = load_document(path)  # every parameter has a default
    assert doc.name == name and len(doc.description) > 20
    assert {"build", "validate", "test"} <= set(doc.phases)
    for spec in doc.parameter_specs:
        assert len(spec.description) > 10, f"{name}: parameter {spec.name} is not documented"


def test_components_take_parameters() -> None:
    doc = load_document(find_component("nginx-app", Path(".")), {"Port": 8080, "Content": "hi"})
    assert doc.parameters == {"Content": "hi", "Port": "8080"}
    assert declared_parameters(find_component("firewall", Path("."))) == {
        "AllowedTcpPorts": False,
        "AllowedUdpPorts": False,
    }


def test_find_component_by_path(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "app.yaml").write_text("schemaVersion: 1.0\n")
    assert find_component("mine/app.yaml", tmp_path) == tmp_path / "mine" / "app.yaml"
    (tmp_path / "local").write_text("x")
    assert find_component("local", tmp_path) == tmp_path / "local"


def test_a_missing_component_says_what_exists(tmp_path: Path) -> None:
    with pytest.raises(ComponentNotFound) as err:
        find_component("jaava", tmp_path)
    assert (
        "no built-in component 'jaava' (built-ins: amazon-cloudwatch-agent-linux, aws-cli"
        in str(err.value)
    )
    assert str(err.value).endswith(") and none of that name in the local library")
    assert err.value.hint == "vmbuild component list shows the built-in and library components"
    with pytest.raises(ComponentNotFound, match=r"component file .*nope\.yaml does not exist"):
        find_component("nope.yaml", tmp_path)
