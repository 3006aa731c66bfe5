"""The scheduler and pipeline verbs as real processes, without a VM: a broken pipeline
stops the daemon from starting; a failing run is recorded and the daemon goes on firing;
SIGTERM stops it cleanly; a concurrent manual run is recorded as skipped; `pipeline
check` reads a package index served on 127.0.0.1."""

from __future__ import annotations

import functools
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.disks import qcow2_header
from vmbuild.pipeline.history import History
from vmbuild.pipeline.runner import lock_for
from vmbuild.stages import store

REPO = Path(__file__).resolve().parents[2]
VMBUILD = [sys.executable, "-m", "vmbuild"]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = dict(os.environ)
    e["VMBUILD_STORE"] = str(tmp_path / "store")
    e["VMBUILD_CACHE_DIR"] = str(tmp_path / "cache")
    e["VMBUILD_HISTORY"] = str(tmp_path / "state" / "history.sqlite")
    return e


def vmbuild(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return subprocess.run([*VMBUILD, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)  # fmt: skip


def write(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def failing_pipeline(tmp_path: Path, cron: str = "* * * * *") -> Path:
    """A pipeline whose build fails in seconds: its base is a qcow2 header and no image
    (it passes the load-time check, which reads only the header; qemu-img refuses it)."""
    (tmp_path / "recipes").mkdir(exist_ok=True)
    (tmp_path / "recipes" / "bad.qcow2").write_bytes(qcow2_header())
    write(tmp_path / "recipes" / "bad.yaml", {"name": "bad", "version": "1.0.0", "base": "bad.qcow2"})  # fmt: skip
    return write(tmp_path / "pipelines" / "failing.yaml", {
        "recipe": "../recipes/bad.yaml", "tests": {"enabled": False},
        "schedule": {"cron": cron, "timezone": "UTC"},
    })  # fmt: skip


def test_the_scheduler_refuses_to_start_with_a_broken_pipeline(tmp_path: Path, env: dict[str, str]) -> None:  # fmt: skip
    failing_pipeline(tmp_path)
    write(tmp_path / "pipelines" / "typo.yaml", {"recipe": "../recipes/missing.yaml"})
    write(tmp_path / "pipelines" / "tz.yaml", {"recipe": "../recipes/bad.yaml",
                                               "schedule": {"cron": "0 3 * * *", "timezone": "Europe/Pariss"}})  # fmt: skip
    proc = vmbuild(env, "scheduler", "--pipelines", str(tmp_path / "pipelines"))
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error: 2 problems in the pipelines of ")
    assert "typo.yaml: recipe: recipe not found:" in proc.stderr
    assert "tz.yaml: schedule.timezone: unknown time zone 'Europe/Pariss' (did you mean Europe/Paris" in proc.stderr  # fmt: skip
    assert "Traceback" not in proc.stderr
    with History(Path(env["VMBUILD_HISTORY"])) as h:
        assert h.list_runs() == [] and h.schedule_state("failing") is None


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_failed_run_is_recorded_and_the_daemon_keeps_firing(tmp_path: Path, env: dict[str, str]) -> None:  # fmt: skip
    failing_pipeline(tmp_path)
    history_path = Path(env["VMBUILD_HISTORY"])
    with History(history_path) as h:
        # The daemon was down for 10 minutes: those slots become one run at start.
        h.set_schedule_state("failing", "* * * * * @ UTC", datetime.now(UTC) - timedelta(minutes=10), datetime.now(UTC))  # fmt: skip
    log_file = tmp_path / "scheduler.log"
    with log_file.open("w") as out:
        daemon = subprocess.Popen([*VMBUILD, "scheduler", "--pipelines", str(tmp_path / "pipelines")],
                                  env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)  # fmt: skip
    try:

        def runs() -> list[Any]:
            with History(history_path) as h:
                return [r for r in h.list_runs("failing") if r.status != "running"]

        # If the minute turns while the catch-up run goes, that slot is recorded as
        # skipped at once, possibly before the run ends (CI once saw both at the
        # first look): the first run is the lowest id of those that ran.
        ran = wait_for(lambda: [r for r in runs() if r.status != "skipped"], 60, "the first run")
        first = min(ran, key=lambda r: r.id)
        assert (first.trigger, first.status) == ("schedule", "failed")
        assert "qcow2 header too short" in (first.error or "")
        assert first.log_tail and "stage base failed" in first.log_tail
        assert Path(first.log_path or "").is_file()
        # The next minute's slot fires again: the failure did not stop the daemon.
        wait_for(lambda: len(runs()) >= 2, 90, "a second run")
        assert daemon.poll() is None
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(60)
    text = log_file.read_text()
    assert code == 0, text
    assert "9 earlier slot(s)" in text or "10 earlier slot(s)" in text  # folded into one run
    assert "running once for all of them" in text
    assert "failing: run process" in text and "failed: base image" not in text
    assert "scheduler stopped" in text
    assert "Traceback" not in text
    assert not list((tmp_path / "store").rglob(".staging-*"))


def test_a_manual_run_while_one_is_going_is_recorded_skipped(tmp_path: Path, env: dict[str, str]) -> None:  # fmt: skip
    pipeline = failing_pipeline(tmp_path)
    state = Path(env["VMBUILD_HISTORY"]).parent
    lock = lock_for(state, "failing")
    assert lock.acquire()  # as a running pipeline holds it
    try:
        proc = vmbuild(env, "pipeline", "run", str(pipeline))
    finally:
        lock.release()
    assert proc.returncode == 75, proc.stderr
    assert proc.stdout.startswith(f"run 1 skipped: already running (another process, pid {os.getpid()})")  # fmt: skip
    proc = vmbuild(env, "runs", "list", "--json")
    [run] = json.loads(proc.stdout)
    assert (run["status"], run["trigger"]) == ("skipped", "manual")


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def write_index(root: Path, suite: str, packages: dict[str, str]) -> None:
    text = "".join(
        f"Package: {n}\nVersion: {v}\nArchitecture: amd64\n\n" for n, v in packages.items()
    )
    index = root / "debian" / "dists" / suite / "main" / "binary-amd64" / "Packages.gz"
    index.parent.mkdir(parents=True, exist_ok=True)
    import gzip

    index.write_bytes(gzip.compress(text.encode()))
    (index.parents[2] / "Release").write_text(
        f"Suite: {suite}\nDate: Mon, 01 Jun 2026 12:00:00 UTC\n"
    )


def test_check_reads_a_changed_index_over_http(tmp_path: Path, env: dict[str, str], http_root: tuple[Path, str]) -> None:  # fmt: skip
    root, url = http_root
    write_index(root, "bookworm", {"openssl": "3.0.11-1~deb12u2", "bash": "5.2.15-2+b2"})
    write(tmp_path / "recipes" / "r.yaml", {"name": "img", "version": "1.0.0", "base": "debian-12"})
    pipeline = write(tmp_path / "pipelines" / "p.yaml", {
        "recipe": "../recipes/r.yaml", "infrastructure": {"mirror": f"{url}/debian"},
        "dependencies": {"apt_sources": [f"deb {url}/debian bookworm main"]},
    })  # fmt: skip
    proc = vmbuild(env, "pipeline", "check", str(pipeline))
    assert proc.returncode == 0 and "no successful run of p recorded yet" in proc.stdout

    # What a successful run leaves behind: its dependency snapshot and an artifact.
    artifact = Path(env["VMBUILD_STORE"]) / "img" / "1.0.0" / "20260601T120000Z-abcdef"
    artifact.mkdir(parents=True)
    store.write_manifest(artifact, {"name": "img", "version": "1.0.0", "packages": [
        {"name": "openssl", "version": "3.0.11-1~deb12u2", "arch": "amd64"},
        {"name": "bash", "version": "5.2.15-2+b2", "arch": "amd64"}]})  # fmt: skip
    from vmbuild.config.pipeline import load_pipeline
    from vmbuild.pipeline import deps

    with History(Path(env["VMBUILD_HISTORY"])) as h:
        run_id = h.start_run("p", str(pipeline), "manual", datetime.now(UTC))
        h.update_run(run_id, status="succeeded", artifact=str(artifact),
                     deps=deps.snapshot(load_pipeline(pipeline)))  # fmt: skip
    proc = vmbuild(env, "pipeline", "check", str(pipeline))
    assert (proc.returncode, proc.stdout.strip()) == (1, f"p: no dependency changed since run {run_id}")  # fmt: skip

    write_index(root, "bookworm", {"openssl": "3.0.13-1~deb12u1", "bash": "5.2.15-2+b2"})
    proc = vmbuild(env, "pipeline", "check", str(pipeline))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "packages: 1 package newer in the mirror (openssl)" in proc.stdout
    assert "openssl:amd64 3.0.11-1~deb12u2 → 3.0.13-1~deb12u1" in proc.stdout
