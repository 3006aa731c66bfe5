"""The worker side of a run: claim it in the history, run it in a child process
(its own process group, dying with the worker), keep its lease, relay cancellation.

Claiming is one atomic transition in the shared history:
- `queued` -> `running` (this worker): the normal case;
- `running` with a STALE lease (its worker stopped refreshing the heartbeat: it died)
  -> `running` (this worker, attempts + 1): a redelivery after a lost worker;
- `running` with a fresh lease: Redis redelivered the message while the run is alive
  elsewhere (visibility timeout shorter than the run): retry later, never build twice;
- finished (`succeeded`, `failed`, `cancelled`): an acknowledged-late duplicate: nothing.
The artifact commit is keyed by the run as well (artifacts.ArtifactStore.committed).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from vmbuild.pipeline.history import FINISHED, History
from vmbuild.scaleout import events

log = logging.getLogger("vmbuild.scaleout.tasks")

HEARTBEAT = 5.0  # seconds between lease refreshes
LEASE = 30.0  # a run whose heartbeat is older than this has lost its worker
STOP_TIMEOUT = 300.0  # a cancelled build's cleanup (VM kill, staging removal)
CONFIG_KEY = "vmbuild_worker"


def _now() -> datetime:
    return datetime.now(UTC)


def register(app: Any) -> None:
    from vmbuild.scaleout.app import TASK_NAME

    @app.task(name=TASK_NAME, bind=True, max_retries=None)  # type: ignore[untyped-decorator]
    def run(self: Any, run_id: int) -> str:
        return supervise(self, run_id)


def supervise(task: Any, run_id: int) -> str:
    cfg: dict[str, Any] = task.app.conf[CONFIG_KEY]
    worker = str(task.request.hostname or socket.gethostname())
    client = events.connect(cfg["broker"])
    publish = events.RunEvents(client, run_id).publish
    with History(cfg["history"]) as history:
        claimed = _claim(history, run_id, worker)
        if isinstance(claimed, str):
            if claimed == "retry":
                raise task.retry(countdown=LEASE)
            return claimed
        attempt = claimed
        publish("start", worker=worker, attempt=attempt, host=socket.gethostname())
        log.info("run %d: started on %s (attempt %d)", run_id, worker, attempt)
        if events.cancel_requested(client, run_id):
            return _finish_cancelled(history, run_id, publish, "cancelled before it started")
        code, cancelled = _run_child(cfg, history, client, run_id)
        record = history.get(run_id)
        if record.status == "running":
            # The child could not record its outcome (killed, crashed).
            status = "cancelled" if cancelled else "failed"
            error = (
                "cancelled (runs cancel)" if cancelled
                else f"the run's process exited {code} without recording an outcome"
            )  # fmt: skip
            history.transition(run_id, ("running",), status=status, ended=_now(), error=error)
            record = history.get(run_id)
        publish("end", status=record.status, error=record.error, artifact=record.artifact,
                image=record.image, worker=worker)  # fmt: skip
        log.info("run %d: %s", run_id, record.status)
        return record.status


def _claim(history: History, run_id: int, worker: str) -> int | str:
    """The attempt number, or what to do instead: a finished status, or "retry"."""
    now = _now()
    mine: dict[str, Any] = {
        "worker": worker,
        "heartbeat": now,
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    got = history.transition(run_id, ("queued",), status="running", attempts=1,
                             started=now, **mine)  # fmt: skip
    if got is not None:
        return 1
    current = history.get(run_id)
    if current.status in FINISHED:
        log.info("run %d already %s: duplicate delivery ignored", run_id, current.status)
        return current.status
    if current.status != "running":
        return current.status
    beat = current.heartbeat
    if beat is not None and now - beat < timedelta(seconds=LEASE):
        log.info("run %d is alive on %s: checking again in %.0fs", run_id, current.worker, LEASE)
        return "retry"
    taken = history.transition(
        run_id, ("running",), expect={"heartbeat": beat}, attempts=current.attempts + 1,
        reason=f"redelivered: {current.worker} stopped (lease expired)", **mine,
    )  # fmt: skip
    if taken is None:
        return "retry"  # another worker took it over first
    log.warning("run %d: %s stopped mid-run; taking it over", run_id, current.worker)
    return taken.attempts


def _finish_cancelled(history: History, run_id: int, publish: Any, why: str) -> str:
    history.transition(run_id, ("running", "queued"), status="cancelled", ended=_now(), error=why)
    publish("end", status="cancelled", error=why)
    return "cancelled"


def _run_child(cfg: dict[str, Any], history: History, client: Any, run_id: int) -> tuple[int, bool]:
    """Run the child to its end, refreshing the lease; relay a cancel as SIGTERM to its
    process group (then SIGKILL after STOP_TIMEOUT). Its exit code and whether cancelled."""
    from vmbuild.run import reaped, spawn

    cache = Path(cfg["cache_dir"])
    log_dir = cache / "worker-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable, "-m", "vmbuild.scaleout.child", str(run_id),
        "--history", cfg["history"], "--broker", cfg["broker"], "--parent", str(os.getpid()),
    ]  # fmt: skip
    env = {"VMBUILD_CACHE_DIR": str(cache)}
    with (log_dir / f"run-{run_id}.out").open("ab") as out:
        # Its own session: a cancel (or the worker's stop) signals the whole group.
        proc = spawn(argv, stdout=out, env=env, new_session=True)
    # The child's end wakes the loop at once (an entry on a key of this supervisor's).
    wake = f"vmbuild:supervisor:{socket.gethostname()}:{os.getpid()}:{run_id}"
    client.delete(wake)

    def waiter() -> None:
        proc.wait()
        with contextlib.suppress(Exception):
            client.rpush(wake, "exited")
            client.expire(wake, 60)

    threading.Thread(target=waiter, daemon=True, name=f"run-{run_id}-wait").start()
    cancelled = False
    stop_by: float | None = None
    try:
        while proc.poll() is None:
            got = events.wait_cancel(client, run_id, HEARTBEAT, wake)
            if got == "cancel" and not cancelled:
                cancelled = True
                log.info("run %d: cancel requested; stopping pid %d", run_id, proc.pid)
                _signal_group(proc, signal.SIGTERM)
                stop_by = time.monotonic() + STOP_TIMEOUT
            if stop_by is not None and time.monotonic() > stop_by:
                _signal_group(proc, signal.SIGKILL)
            history.transition(run_id, ("running",), heartbeat=_now())
    except BaseException:
        # The worker is stopping (warm shutdown interrupted, Ctrl-C): no run outlives it.
        _signal_group(proc, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_TIMEOUT)
        _signal_group(proc, signal.SIGKILL)
        raise
    finally:
        client.delete(wake)
    code = proc.wait()
    reaped(proc)
    return code, cancelled


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
