"""`vmbuild toe validate|run`: AWSTOE's flags, output and exit codes (no VM:
everything here is refused or answered before a guest is needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.toe import write
from vmbuild.cli import main

GOOD = "schemaVersion: 1.0\nphases:\n  - name: build\n    steps:\n      - {name: A, action: ExecuteBash, inputs: {commands: [x]}}\n"
BAD = "schemaVersion: 1.0\nphases:\n  - name: build\n    steps:\n      - {name: A, action: Nope}\n"


def test_validate_every_document_with_awstoe_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good, bad = write(tmp_path, GOOD, "good.yaml"), write(tmp_path, BAD, "bad.yaml")
    assert main(["toe", "validate", "--documents", f"{good},update-linux"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "validationStatus": "success",
        "message": "Document(s) successfully validated.",
    }
    assert main(["toe", "validate", "-d", f"{good},{bad}"]) == 1
    assert json.loads(capsys.readouterr().out) == {
        "validationStatus": "failed",
        "message": f"{bad}: build.A.action: unknown action 'Nope'",
    }


def test_run_refuses_bad_requests_before_any_guest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write(tmp_path, GOOD, "good.yaml")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"documents": [{"path": str(good)}]}))
    host = ["--host", "ssh://u@h", "--identity", "k"]
    assert main(["toe", "run", "-c", str(config), "--parameters", "a=b", *host]) == 1
    assert "--parameters cannot be given with --config" in capsys.readouterr().err
    config.write_text(json.dumps({"documents": [{"parameters": []}]}))
    assert main(["toe", "run", "-c", str(config), *host]) == 1
    assert "documents[0].path: required, a string" in capsys.readouterr().err
    assert main(["toe", "run", "-d", f"{tmp_path / 'bad.yaml'}", *host]) == 1
    assert "component file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["toe", "run", "-d", str(good)])  # no target
    assert usage.value.code == 2
