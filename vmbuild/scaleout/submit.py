"""The submitting side: record a run as `queued`, send its message, follow or cancel it.

The history row is written before the message is sent, so a worker never receives a
run it cannot find; a send that fails marks the row failed.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmbuild.digest import sha256_file
from vmbuild.errors import VmbuildError
from vmbuild.pipeline.history import FINISHED, History, RunRecord
from vmbuild.scaleout import events
from vmbuild.scaleout.app import TASK_NAME

log = logging.getLogger("vmbuild.scaleout.submit")


@dataclass(frozen=True)
class Submitted:
    run_id: int
    task_id: str
    queue: str


def submit(
    app: Any, history: History, *, kind: str, name: str, queue: str, file: Path | None = None,
    trigger: str = "manual", options: dict[str, Any] | None = None,
) -> Submitted:  # fmt: skip
    """Record and enqueue one run (`kind`: build, pipeline or noop)."""
    task_id = str(uuid.uuid4())
    opts = dict(options or {})
    opts["key"] = task_id  # the store commit key: one artifact per run, whatever redelivers
    if file is not None:
        file = file.resolve()
        opts["sha256"] = sha256_file(file)
    run_id = history.start_run(
        name, str(file) if file else None, trigger, datetime.now(UTC), status="queued",
        kind=kind, queue=queue, task_id=task_id, options=opts,
    )  # fmt: skip
    try:
        app.send_task(TASK_NAME, args=[run_id], queue=queue, task_id=task_id)
    except Exception as exc:  # kombu raises its own and OSError subclasses
        history.transition(run_id, ("queued",), status="failed", ended=datetime.now(UTC),
                           error=f"could not enqueue: {exc}")  # fmt: skip
        raise VmbuildError(f"could not enqueue run {run_id} on {queue}: {exc}",
                           hint="is the broker (--broker) reachable?") from None  # fmt: skip
    log.info("run %d queued on %s (task %s)", run_id, queue, task_id)
    return Submitted(run_id, task_id, queue)


def served_queues(app: Any, timeout: float = 1.0) -> dict[str, list[str]]:
    """Queue -> the workers consuming it right now (those answering within `timeout`)."""
    replies = app.control.inspect(timeout=timeout).active_queues() or {}
    served: dict[str, list[str]] = {}
    for worker, queues in replies.items():
        for q in queues:
            served.setdefault(q["name"], []).append(worker)
    return served


def cancel(app: Any, history: History, client: Any, run_id: int) -> str:
    """Cancel a queued run (it never starts) or a running one (its worker stops it);
    what was done, in words."""
    record = history.get(run_id)
    if record.status in FINISHED:
        raise VmbuildError(f"run {run_id} is already {record.status}")
    if record.task_id is None:
        raise VmbuildError(
            f"run {run_id} is a local run (pid {record.pid} on {record.host}), not a worker's",
            hint=f"stop it with `kill {record.pid}` on {record.host}",
        )
    now = datetime.now(UTC)
    if history.transition(run_id, ("queued",), status="cancelled", ended=now,
                          error="cancelled while queued") is not None:  # fmt: skip
        app.control.revoke(record.task_id)  # workers drop it on receipt
        events.request_cancel(client, run_id)  # and a redelivery finds it cancelled
        events.RunEvents(client, run_id).publish("end", status="cancelled",
                                                 error="cancelled while queued")  # fmt: skip
        return f"run {run_id} cancelled (it was queued on {record.queue})"
    events.request_cancel(client, run_id)
    return f"run {run_id}: cancel sent to {history.get(run_id).worker or 'its worker'}"


def wait(
    history: History, client: Any, run_id: int, on_event: Any = None,
    timeout: float | None = None,
) -> RunRecord:  # fmt: skip
    """Follow a run's events until it ends (or `timeout`); its final record."""
    deadline = None if timeout is None else time.monotonic() + timeout
    for event in events.follow(client, run_id, block_ms=2000):
        if event is not None and on_event is not None:
            on_event(event)
        if event is not None and event["kind"] == "end":
            break
        if event is None and history.get(run_id).status in FINISHED:
            break  # ended before we followed, and its events expired
        if deadline is not None and time.monotonic() > deadline:
            break
    return history.get(run_id)


class RemoteRun:
    """A run on a worker, seen by the scheduler as it sees a local child process."""

    def __init__(self, history: History, client: Any, app: Any, run_id: int) -> None:
        self.history = history
        self.client = client
        self.app = app
        self.run_id = run_id
        self.pid = run_id  # the scheduler names runs by this in its messages

    def poll(self) -> int | None:
        status = self.history.get(self.run_id).status
        if status not in FINISHED:
            return None
        return 0 if status in ("succeeded", "skipped") else 1

    def terminate(self) -> None:
        if self.poll() is None:
            cancel(self.app, self.history, self.client, self.run_id)

    def kill(self) -> None:
        self.terminate()

    def wait(self, timeout: float) -> int | None:
        wait(self.history, self.client, self.run_id, timeout=timeout)
        return self.poll()


class BrokerLauncher:
    """The scheduler's launcher when it has a broker: due pipelines are enqueued."""

    def __init__(self, app: Any, history: History, client: Any, queue: str,
                 store: str | None) -> None:  # fmt: skip
        self.app = app
        self.history = history
        self.client = client
        self.queue = queue
        self.store = store

    def launch(self, pipeline: Any, trigger: str) -> RemoteRun:
        queue = pipeline_queue(pipeline, self.queue)
        opts = {"store": self.store} if self.store else {}
        sent = submit(self.app, self.history, kind="pipeline", name=pipeline.name,
                      queue=queue, file=pipeline.path, trigger=trigger,
                      options=opts)  # fmt: skip
        return RemoteRun(self.history, self.client, self.app, sent.run_id)


def pipeline_queue(pipeline: Any, default: str) -> str:
    """A pipeline that insists on KVM goes to the kvm queue; others to `default`."""
    accel = getattr(pipeline.pipeline.infrastructure, "accelerator", None)
    return "kvm" if accel == "kvm" else default
