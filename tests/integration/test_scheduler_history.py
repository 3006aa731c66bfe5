"""The run history with real concurrent processes (a scheduler, manual runs and
`runs list` at once): WAL + busy timeouts + BEGIN IMMEDIATE lose nothing."""

from __future__ import annotations

import multiprocessing
from datetime import UTC, datetime, timedelta
from pathlib import Path

from vmbuild.pipeline.history import History

RUNS_PER_WRITER = 40
T0 = datetime(2026, 6, 1, tzinfo=UTC)


def _writer(path: str, name: str) -> None:
    with History(Path(path)) as h:
        for i in range(RUNS_PER_WRITER):
            run_id = h.start_run(name, None, "schedule", T0)
            h.update_run(run_id, status="succeeded", ended=T0, timings={"i": i})
            h.set_schedule_state(name, "k", T0 + timedelta(minutes=i), T0)
            h.abandon_stale(name, T0, "x")


def _reader(path: str) -> None:
    with History(Path(path)) as h:
        for _ in range(150):
            h.list_runs(limit=10)
            h.last_succeeded("w0")


def test_concurrent_processes(tmp_path: Path) -> None:
    path = str(tmp_path / "history.sqlite")
    History(Path(path)).close()
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters, like separate commands
    procs = [ctx.Process(target=_writer, args=(path, f"w{i}")) for i in range(4)]
    procs += [ctx.Process(target=_reader, args=(path,)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0] * len(procs)
    with History(Path(path)) as h:
        runs = h.list_runs(limit=10_000)
        assert len(runs) == 4 * RUNS_PER_WRITER
        assert {r.status for r in runs} == {"succeeded"}
        assert len({r.pid for r in runs}) == 4
        for i in range(4):
            assert h.schedule_state(f"w{i}") == ("k", T0 + timedelta(minutes=RUNS_PER_WRITER - 1))
