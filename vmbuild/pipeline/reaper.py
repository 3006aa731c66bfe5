"""Pipeline runs whose process died: recorded as failed, with their log tail.

A run's row is `running` until its process finishes it. A process killed with
SIGKILL (or a host that lost power) cannot, so the next vmbuild command that
reads the run history on this host judges the rows this host owns: a row whose
process no longer exists is marked failed and gets the tail of its run log, as
a normal failure would. A pid that exists is left alone even if it might have
been reused: a run is declared dead only on proof. Runs that belong to scale-out
workers are judged by their lease, not here.
"""

from __future__ import annotations

import logging
import socket
from datetime import datetime
from pathlib import Path

from vmbuild.pipeline.history import History
from vmbuild.runs import TAIL_LINES, proc_start_time, read_tail

log = logging.getLogger("vmbuild.pipeline")

DIED = "the run's process died (killed?) before it finished"


def log_tail(log_path: str | Path | None) -> str | None:
    """The last lines of a run's log (None when it has none or it is unreadable)."""
    if not log_path:
        return None
    try:
        return read_tail(Path(log_path), TAIL_LINES)
    except OSError:
        return None


def reap_dead_runs(history: History, now: datetime) -> list[int]:
    """Mark this host's `running` runs whose process is gone failed, with their
    log tail; the ids marked."""
    host = socket.gethostname()
    reaped = []
    for run in history.list_runs(status="running", limit=10_000):
        if run.task_id is not None or run.host != host or run.pid is None:
            continue
        if proc_start_time(run.pid) is not None:
            continue  # alive (or a reused pid): never judged on a guess
        done = history.transition(
            run.id, ("running",), status="failed", ended=now, error=DIED,
            log_tail=log_tail(run.log_path),
        )  # fmt: skip
        if done is not None:
            reaped.append(run.id)
    if reaped:
        log.warning("runs %s had died (process gone); marked failed", reaped)
    return reaped


def add_tails(history: History, run_ids: list[int]) -> None:
    """Give runs marked failed under the pipeline lock (`History.abandon_stale`) their
    log tail."""
    for run_id in run_ids:
        run = history.get(run_id)
        if run.log_tail is None and (tail := log_tail(run.log_path)) is not None:
            history.update_run(run_id, log_tail=tail)
