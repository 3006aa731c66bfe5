"""`build --json` stays audibly alive through a silent stage: the base download
stalls on a local HTTP server (127.0.0.1, no VM) that sent its headers and then
nothing; a heartbeat `status` event comes after HEARTBEAT seconds, before the
server lets go. Read from the live stdout, line by line, each schema-checked."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli import REPO, isolated_env
from tests.support.schemas import event_lines
from vmbuild.events import HEARTBEAT


@pytest.fixture
def stalled_server() -> Iterator[tuple[str, threading.Event]]:
    """A URL whose body never comes until `release` is set (then the
    connection closes short: the download fails as truncated)."""
    release = threading.Event()

    class Stall(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(1 << 20))
            self.end_headers()
            self.wfile.flush()
            release.wait(120)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stall)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/disk.qcow2", release
    finally:
        release.set()
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_silent_stage_emits_heartbeats(
    tmp_path: Path, stalled_server: tuple[str, threading.Event]
) -> None:
    url, release = stalled_server
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: slow\nversion: 1.0.0\nbase:\n  url: {url}\n  sha256: {'ab' * 32}\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmbuild", "build", str(recipe), "--json", "--skip-tests"],
        env=isolated_env(tmp_path), cwd=REPO, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "elapsed" in json.loads(line):
                break  # the heartbeat came while the server still stalls
        release.set()
        rest, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    events = event_lines("".join(lines) + rest)
    assert proc.returncode == 1, stderr
    beats = [e for e in events if "elapsed" in e]
    assert beats, f"no heartbeat: {events}"
    beat = beats[0]
    assert (beat["type"], beat["stage"]) == ("status", "base")
    assert beat["elapsed"] >= HEARTBEAT
    assert [(e["type"], e.get("stage")) for e in events if "elapsed" not in e] == [
        ("start", None), ("stage-start", "base"), ("stage-end", "base"), ("error", None),
    ]  # fmt: skip
    assert events[-1]["message"] == f"download of {url} truncated: 0 of {1 << 20} bytes"


def test_pipeline_run_json_streams_the_same_events_with_heartbeats(
    tmp_path: Path, stalled_server: tuple[str, threading.Event]
) -> None:
    """`pipeline run --json`: the run's build events as `build --json` writes
    them (the same JsonReporter, heartbeat included), then one `run` event."""
    url, release = stalled_server
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: slow\nversion: 1.0.0\nbase:\n  url: {url}\n  sha256: {'ab' * 32}\n")
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text("recipe: recipe.yaml\nschedule: {cron: '0 3 * * 1'}\n")
    env = isolated_env(tmp_path, VMBUILD_HISTORY=str(tmp_path / "state" / "history.sqlite"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmbuild", "pipeline", "run", str(pipeline), "--json"],
        env=env, cwd=REPO, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "elapsed" in json.loads(line):
                break  # the heartbeat came while the server still stalls
        release.set()
        rest, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    events = event_lines("".join(lines) + rest)
    assert proc.returncode == 1, stderr  # a failed run, as without --json
    beats = [e for e in events if "elapsed" in e]
    assert [(b["type"], b["stage"]) for b in beats][:1] == [("status", "base")]
    assert beats[0]["elapsed"] >= HEARTBEAT
    assert beats[0]["text"].startswith(f"base image {url}: running for ")
    shape = [(e["type"], e.get("stage")) for e in events if "elapsed" not in e]
    assert shape == [
        ("start", None),
        ("stage-start", "dependencies"), ("stage-end", "dependencies"),
        ("stage-start", "base"), ("stage-end", "base"),
        ("run", None),
    ], shape  # fmt: skip
    start, run = events[0], events[-1]
    assert (start["name"], start["version"], start["pipeline"]) == ("slow", "1.0.0", str(pipeline))
    record = run["record"]
    assert (record["id"], record["pipeline"], record["status"]) == (1, "pipeline", "failed")
    assert record["error"].splitlines()[0] == f"download of {url} truncated: 0 of {1 << 20} bytes"
    assert set(record["timings"]) == {"dependencies", "base"}
