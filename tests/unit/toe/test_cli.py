"""`vmbuild component validate|list|run` (no VM: `run` fails before booting one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.toe import write
from vmbuild.cli import main
from vmbuild.cli.component import parse_host, parse_parameters
from vmbuild.errors import VmbuildError

CORPUS = Path(__file__).resolve().parents[2] / "data" / "toe" / "corpus"


def test_validate_accepts_good_documents(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["component", "validate", str(CORPUS / "valid" / "main.yaml"), "java"]) == 0
    out = capsys.readouterr().out
    assert "main.yaml: valid" in out and "java: valid" in out


def test_validate_lists_every_problem_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = write(
        tmp_path,
        "schemaVersion: 1.0\nphases:\n  - name: build\n    steps:\n"
        "      - {name: A, action: Nope, inputs: {}}\n"
        "      - {name: B, action: ExecuteBash, timeoutSeconds: 0, inputs: {commands: [x]}}\n",
    )
    assert main(["component", "validate", str(bad), str(CORPUS / "valid" / "main.yaml")]) == 1
    captured = capsys.readouterr()
    assert f"{bad}: build.A.action: unknown action 'Nope'" in captured.out
    assert f"{bad}: build.B.timeoutSeconds: 0 is not allowed" in captured.out
    assert "2 problem(s) in 2 document(s)" in captured.err


def test_list_shows_names_descriptions_and_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["component", "list"]) == 0
    out = capsys.readouterr().out
    assert "java: OpenJDK from the distribution" in out
    assert "    Version (default '17'): Java feature release" in out
    assert main(["component", "list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {c["name"] for c in data} >= {"firewall", "cloud-ready"}


def test_parse_parameters_the_awstoe_way() -> None:
    assert parse_parameters(["a=1,b=x=y", "c=3"]) == {"a": "1", "b": "x=y", "c": "3"}
    with pytest.raises(VmbuildError, match="expected NAME=VALUE, got 'ntp-server='"):
        parse_parameters(["ntp-server="])
    with pytest.raises(VmbuildError, match="got 'novalue'"):
        parse_parameters(["novalue"])


def test_parse_host() -> None:
    assert parse_host("ssh://admin@10.0.0.5:2222") == ("admin", "10.0.0.5", 2222)
    assert parse_host("ssh://admin@host") == ("admin", "host", 22)
    for bad in ("admin@host", "ssh://host:22", "ssh://a@h:99999", "http://a@h"):
        with pytest.raises(VmbuildError, match="expected ssh://user@host"):
            parse_host(bad)


@pytest.fixture
def no_vm(monkeypatch: pytest.MonkeyPatch) -> None:
    import vmbuild.scratch as builder

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a VM was started for a run that could not succeed")

    monkeypatch.setattr(builder, "scratch_vm", refuse)


@pytest.mark.usefixtures("no_vm")
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nginx-app", "--parameters", "Port=a,Port"], "--parameters: expected NAME=VALUE"),
        (["nginx-app", "--phases", "build,deploy"], "nginx-app has no phase deploy"),
        (["nope-component"], "no built-in component 'nope-component'"),
        (["java", "--host", "ssh://u@h"], "--host needs --identity KEY"),
        (["java", "--host", "u@h", "--identity", "k"], "--host: expected ssh://user@host"),
    ],
)
def test_run_refuses_bad_input_before_any_vm(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if "--host" not in args:
        args = [*args, "--base", "debian-12"]
    assert main(["component", "run", *args]) == 1
    assert message in capsys.readouterr().err


@pytest.mark.usefixtures("no_vm")
def test_run_refuses_chaining_across_phases_it_does_not_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = write(
        tmp_path,
        "schemaVersion: 1.0\nphases:\n"
        "  - {name: build, steps: [{name: B, action: ExecuteBash, inputs: {commands: [b]}}]}\n"
        "  - name: test\n    steps:\n"
        "      - {name: T, action: ExecuteBash, inputs: {commands: ['{{ build.B.outputs.stdout }}']}}\n",
    )
    assert main(["component", "run", str(doc), "--phases", "test", "--base", "debian-12"]) == 1
    assert "phase 'build' is not run" in capsys.readouterr().err
