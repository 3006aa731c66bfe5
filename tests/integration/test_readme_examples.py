"""README commands run as written (those that boot no VM), and the exit codes it documents."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

from tests.support.cli import REPO, isolated_env, vmbuild


def test_scheduler_on_the_example_directory(tmp_path: Path) -> None:
    # `vmbuild scheduler --pipelines examples/nginx`: the recipe and distribution files
    # beside the pipeline are recognised as such, not reported as broken pipelines.
    env = isolated_env(tmp_path, VMBUILD_HISTORY=str(tmp_path / "history.sqlite"))
    daemon = subprocess.Popen(
        [sys.executable, "-m", "vmbuild", "scheduler", "--pipelines", "examples/nginx"],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert daemon.stdout is not None
    seen: list[str] = []
    started = threading.Event()

    def read() -> None:
        assert daemon.stdout is not None
        for line in daemon.stdout:
            seen.append(line)
            if "vmbuild scheduler: started" in line:
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert started.wait(60), "".join(seen)
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(60)
        reader.join(10)
    text = "".join(seen)
    assert code == 0, text
    assert "example-nginx-weekly: new schedule: 0 3 * * 1 @ Europe/Paris" in text
    assert "started (pid" in text and ": 1 pipeline(s) in " in text
    assert "scheduler stopped" in text
    assert "problem" not in text and "Traceback" not in text


def test_pipeline_check_that_cannot_read_its_file_exits_2(tmp_path: Path) -> None:
    env = isolated_env(tmp_path, VMBUILD_HISTORY=str(tmp_path / "history.sqlite"))
    proc = vmbuild(env, "pipeline", "check", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2
    assert proc.stderr == f"error: {tmp_path / 'missing.yaml'}: file not found\n"
    # So `check && build` never builds on a check that did not happen.
    chained = subprocess.run(
        f"{sys.executable} -m vmbuild pipeline check {tmp_path / 'missing.yaml'} && echo BUILD",
        shell=True, env=env, cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert chained.returncode == 2 and "BUILD" not in chained.stdout
