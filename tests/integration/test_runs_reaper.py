"""A pipeline run whose process is SIGKILLed stays `running` in the history until
the next vmbuild command that reads it: then it is failed, with its log tail."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

from tests.support.cli import isolated_env, vmbuild
from vmbuild.pipeline.history import History
from vmbuild.pipeline.reaper import DIED

T0 = datetime(2026, 6, 1, tzinfo=UTC)

# A run as the runner records one: its own pid and host, a log it writes to.
RUN = textwrap.dedent("""
    import signal, sys
    from datetime import UTC, datetime
    from pathlib import Path
    from vmbuild.pipeline.history import History
    history, log = Path(sys.argv[1]), Path(sys.argv[2])
    with History(history) as h:
        run_id = h.start_run("nightly", None, "schedule", datetime.now(UTC))
        h.update_run(run_id, log_path=str(log))
    log.write_text("".join(f"line {i}\\n" for i in range(100)) + "== stage components\\n")
    print(run_id, flush=True)
    signal.pause()  # until the test SIGKILLs it
""")


def test_a_killed_runs_row_is_failed_with_its_log_tail(tmp_path: Path) -> None:
    history = tmp_path / "history.sqlite"
    env = isolated_env(tmp_path, VMBUILD_HISTORY=str(history))
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN, str(history), str(tmp_path / "run.log")],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    killed = int(proc.stdout.readline())
    with History(history) as h:
        alive = h.start_run("nightly", None, "manual", T0)  # this test's own, live pid
        elsewhere = h.start_run("nightly", None, "manual", T0)
        h.update_run(elsewhere, host="another-host", pid=proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    listed = vmbuild(env, "runs", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {r["id"]: r for r in json.loads(listed.stdout)}
    assert (rows[killed]["status"], rows[killed]["error"]) == ("failed", DIED)
    assert rows[killed]["ended"] is not None
    tail = rows[killed]["log_tail"].splitlines()
    assert tail[-1] == "== stage components" and len(tail) == 40
    # A live process's run, and another host's, are not this command's to judge.
    assert rows[alive]["status"] == rows[elsewhere]["status"] == "running"

    shown = vmbuild(env, "runs", "show", str(killed))
    assert "== stage components" in shown.stdout
