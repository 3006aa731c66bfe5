"""`vmbuild build --json` through the real CLI: one event per line, each valid against the
published schema, errors as events too. (The VM suite checks a full build's stream.)"""

from __future__ import annotations

from pathlib import Path

from tests.support.cli import isolated_env, vmbuild
from tests.support.disks import qcow2_header
from tests.support.schemas import event_lines


def test_a_failing_stage_streams_events_then_an_error(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    # Passes the load-time check (a qcow2 header), fails in the base stage (no image).
    (tmp_path / "bad.qcow2").write_bytes(qcow2_header())
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: bad\nversion: 1.0.0\nbase: bad.qcow2\n")
    proc = vmbuild(env, "build", str(recipe), "--json", "--skip-tests")
    assert proc.returncode == 1
    events = event_lines(proc.stdout)
    assert [(e["type"], e.get("stage")) for e in events] == [
        ("start", None), ("stage-start", "base"), ("stage-end", "base"), ("error", None),
    ]  # fmt: skip
    assert events[0]["recipe"] == str(recipe)
    assert (events[0]["name"], events[0]["version"]) == ("bad", "1.0.0")
    assert events[2]["status"] == "failed"
    error = events[3]
    assert "qcow2 header too short" in error["message"]
    assert error["exit_code"] == 1 and error["kind"].endswith("Error")
    # The human line still goes to stderr; stdout holds only events.
    assert proc.stderr.startswith("error: ")
    assert not list((tmp_path / "store").rglob("*.qcow2"))
    # The run log has the stage markers whichever reporter the build used.
    assert error["hint"].startswith("run log: ")
    text = Path(error["hint"].removeprefix("run log: ")).read_text()
    assert "== stage base: " in text and "== stage base failed after " in text


def test_an_invalid_recipe_is_one_error_event(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: x\nversion: one\nbase: debian-12\n")
    proc = vmbuild(env, "build", str(recipe), "--json")
    assert proc.returncode == 1
    [error] = event_lines(proc.stdout)
    assert error["type"] == "error"
    assert error["message"] == f"{recipe}: version: 'one' is not a semantic version (e.g. 1.2.3)"
    assert (error["kind"], error["exit_code"], error["hint"]) == ("ConfigError", 1, None)
