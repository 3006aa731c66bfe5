"""Secret parameters: which names are secret, where values come from, masking."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.config.test_recipe import COMPONENT, write
from vmbuild import secrets
from vmbuild.config.recipe import load_recipe
from vmbuild.errors import ConfigError
from vmbuild.log import run_log


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    secrets.clear()
    yield
    secrets.clear()


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("DbPassword", True), ("db_passwd", True), ("ApiToken", True), ("SecretKey", True),
        ("SshKey", True), ("api_key", True), ("key", True), ("AwsCredentials", True),
        ("KeyboardLayout", False), ("Monkey", False), ("Port", False), ("Content", False),
    ],
)  # fmt: skip
def test_secret_looking_names(name: str, secret: bool) -> None:
    assert secrets.looks_secret(name) is secret


def test_masking_covers_json_escapes_and_longest_first() -> None:
    secrets.register('pa"ss\\word')
    secrets.register("pa")
    text = json.dumps({"cmd": 'echo pa"ss\\word'})
    assert secrets.mask(text) == '{"cmd": "echo ***"}'
    assert secrets.mask_json({"k": ["x pa y"]}) == {"k": ["x *** y"]}


def test_the_run_log_is_private_and_masked(tmp_path: Path) -> None:
    secrets.register("hunter2-hunter2")
    log_file = tmp_path / "logs" / "build.log"
    with run_log(log_file):
        logging.getLogger("vmbuild.test").info("connecting with %s", "hunter2-hunter2")
    text = log_file.read_text()
    assert "connecting with ***" in text and "hunter2" not in text
    assert oct(log_file.stat().st_mode & 0o777) == "0o600"
    assert oct(log_file.parent.stat().st_mode & 0o777) == "0o700"


def test_cli_secrets_come_from_files_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "pw").write_text("s3cret-value\n")
    assert secrets.parse_cli_secret(f"DbPassword=@{tmp_path / 'pw'}") == (
        "DbPassword",
        "s3cret-value",
    )
    monkeypatch.setenv("MY_TOKEN", "tok-123456")
    assert secrets.parse_cli_secret("ApiToken=env:MY_TOKEN") == ("ApiToken", "tok-123456")
    for spec, message in (
        ("DbPassword=literal", "--secret DbPassword: the value must come from a file (@FILE)"),
        ("DbPassword=env:NOPE_NOT_SET", "--secret DbPassword: environment variable NOPE_NOT_SET"),
        (f"X=@{tmp_path}", f"--secret X: not a regular file: {tmp_path}"),
        ("X=@/dev/zero", "--secret X: not a regular file: /dev/zero"),
        ("=@x", "--secret =@x: expected NAME=@FILE or NAME=env:VAR"),
    ):
        with pytest.raises(ConfigError) as info:
            secrets.parse_cli_secret(spec)
        assert str(info.value).startswith(message)


SECRET_COMPONENT = COMPONENT.replace(
    "  - target:",
    "  - DbPassword:\n      type: string\n      default: ''\n      description: x\n"
    "  - Motto:\n      type: string\n      default: ''\n      description: x\n  - target:",
)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hello.yaml").write_text(SECRET_COMPONENT)
    return tmp_path


def recipe(extra: str = "", params: str = "target: world") -> str:
    return (
        "name: demo\nversion: 1.2.3\nbase: debian-12\n"
        f"components:\n  - name: ./hello.yaml\n    parameters: {{{params}}}\n{extra}"
    )


def test_secret_names_by_pattern_declaration_and_cli(project: Path) -> None:
    path = write(project, recipe("    secret_parameters: [Motto]\n", "target: w, Motto: m0tt0"))
    loaded = load_recipe(path, secrets={"DbPassword": "pw-from-cli"})
    (ref,) = loaded.recipe.components
    assert ref.parameters == {"target": "w", "Motto": "m0tt0", "DbPassword": "pw-from-cli"}
    assert ref.secret_names() == {"Motto", "DbPassword"}


def test_a_secret_looking_name_can_be_declared_public(project: Path) -> None:
    path = write(
        project, recipe("    public_parameters: [DbPassword]\n", "DbPassword: x, target: w")
    )
    (ref,) = load_recipe(path).recipe.components
    assert ref.secret_names() == set()


def test_secret_errors_name_the_field(project: Path) -> None:
    path = write(project, recipe("    secret_parameters: [Nope]\n"))
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert str(info.value) == (
        "recipe.yaml: components[0].secret_parameters[0]: the component has no parameter 'Nope'"
    )
    with pytest.raises(ConfigError) as info:
        load_recipe(write(project, recipe()), secrets={"Unknown": "v"})
    assert str(info.value) == "--secret Unknown: no component of the recipe declares this parameter"
    path = write(project, recipe("", "target: w, DbPassword: in-the-file"))
    with pytest.raises(ConfigError) as info:
        load_recipe(path, secrets={"DbPassword": "v"})
    assert str(info.value).startswith(
        "recipe.yaml: components[0].parameters.DbPassword: given both"
    )


def test_a_build_registers_secret_values_and_the_manifest_masks_them(
    project: Path, tmp_path: Path
) -> None:
    from vmbuild.stages.store import write_manifest
    from vmbuild.stages.verify import register_secrets

    path = write(project, recipe("", "target: w, DbPassword: pw-1234567"))
    needles = register_secrets(load_recipe(path).recipe)
    assert [(n.label, n.value) for n in needles] == [
        ("secret parameter components[0].parameters.DbPassword", b"pw-1234567")
    ]
    write_manifest(tmp_path, {"components": [{"parameters": {"DbPassword": "pw-1234567"}}]})
    manifest = tmp_path / "manifest.json"
    assert json.loads(manifest.read_text()) == {
        "components": [{"parameters": {"DbPassword": "***"}}]
    }
    assert oct(manifest.stat().st_mode & 0o777) == "0o600"


def test_short_secret_values_are_flagged_with_how_far_the_image_is_checked(
    project: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from vmbuild.stages.verify import register_secrets

    path = write(
        project, recipe("", "target: w, DbPassword: pw1, ApiToken: tok-123, SecretKey: k-12345678")
    )
    loaded = load_recipe(path)
    with caplog.at_level(logging.WARNING, logger="vmbuild.verify"):
        needles = register_secrets(loaded.recipe)
    assert len(needles) == 3
    field = "secret parameter components[0].parameters."
    assert [r.getMessage() for r in caplog.records if r.name == "vmbuild.verify"] == [
        f"{field}ApiToken is shorter than 8 bytes: the image is checked for it only as a "
        "whole word in the text files under /etc, /root, /home, /srv, /var/lib/cloud, /var/log",
        f"{field}DbPassword is 3 bytes long: it is masked, but too short to be told apart "
        "from other text, so the image cannot be checked for it",
    ]
    assert all(
        "pw1" not in r.getMessage() and "tok-123" not in r.getMessage() for r in caplog.records
    )
