"""One run on a worker, as its own process: `python -m vmbuild.scaleout.child RUN_ID ...`.

It dies with its worker: PR_SET_PDEATHSIG delivers SIGTERM when the supervising thread
goes (the worker was killed), and SIGTERM unwinds the build as Ctrl-C does (VMs
killed, staging removed). A run whose worker was lost is left `running` so that its
lease expires and the redelivered message takes it over on another worker; a run
cancelled through its supervisor is recorded `cancelled`.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from vmbuild import paths
from vmbuild.errors import VmbuildError
from vmbuild.events import HEARTBEAT, Heartbeat, heartbeat_text
from vmbuild.log import Progress, run_log
from vmbuild.pipeline.history import History, RunRecord
from vmbuild.scaleout import artifacts, events

log = logging.getLogger("vmbuild.scaleout.child")

PR_SET_PDEATHSIG = 1
ERROR_MAX_CHARS = 4000


class EventProgress(Progress):
    """Progress that also publishes each stage, status and output line as run events,
    and a heartbeat `status` (with `elapsed`) after HEARTBEAT seconds of silence in
    a stage, from the same code as `build --json` (vmbuild.events.Heartbeat): a
    follower (`submit --wait`, `runs logs --follow`) tells a slow TCG boot from a
    hung worker."""

    def __init__(self, publish: Any, *, heartbeat: float = HEARTBEAT) -> None:
        super().__init__(quiet=True)
        self._publish = publish
        self._last_bytes = 0.0
        self._heartbeat = Heartbeat(self._beat, heartbeat)

    def publish(self, kind: str, **fields: Any) -> None:
        self._publish(kind, **fields)
        self._heartbeat.seen()

    def _beat(self, name: str, title: str, elapsed: float) -> None:
        self.publish("status", stage=name, text=heartbeat_text(title, elapsed), elapsed=elapsed)

    def stage(self, name: str, title: str) -> Any:
        import contextlib

        parent = super().stage(name, title)

        @contextlib.contextmanager
        def wrapped() -> Any:
            self.publish("stage", stage=name, title=title, state="started")
            try:
                with parent, self._heartbeat.stage(name, title):
                    yield
            except BaseException:
                self.publish("stage", stage=name, title=title, state="failed",
                             seconds=self.timings.get(name))  # fmt: skip
                raise
            self.publish("stage", stage=name, title=title, state="done",
                         seconds=self.timings.get(name))  # fmt: skip

        return wrapped()

    def status(self, text: str) -> None:
        super().status(text)
        self.publish("status", text=text)

    def output(self, line: str) -> None:
        super().output(line)
        self.publish("output", text=line)

    def bytes(self, done: int, total: int | None) -> None:
        # At most one a second: a download reports every chunk.
        now = time.monotonic()
        if done == total or now - self._last_bytes >= 1.0:
            self._last_bytes = now
            self.publish("bytes", done=done, total=total)


def _die_with_parent(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # it died before the prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmbuild.scaleout.child")
    parser.add_argument("run_id", type=int)
    parser.add_argument("--history", required=True)
    parser.add_argument("--broker", required=True)
    parser.add_argument("--parent", type=int, required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    _die_with_parent(args.parent)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    publish = events.RunEvents(events.connect(args.broker), args.run_id).publish
    with History(args.history) as history:
        record = history.get(args.run_id)
        log_path = paths.cache_dir() / "logs" / "runs" / f"run-{args.run_id:06d}.log"
        history.update_run(args.run_id, log_path=str(log_path), pid=os.getpid())
        with run_log(log_path):
            return _run(record, history, publish, args.parent, log_path)


def _run(record: RunRecord, history: History, publish: Any, parent: int, log_path: Path) -> int:
    progress = EventProgress(publish)
    fields: dict[str, Any] = {}
    status, error = "failed", None
    try:
        if record.kind == "noop":
            _noop(record, progress)
        elif record.kind == "build":
            fields = _build(record, progress)
        elif record.kind == "pipeline":
            return _pipeline(record, history, parent)
        else:
            raise VmbuildError(f"run {record.id}: unknown kind {record.kind!r}")
        status = "succeeded"
    except KeyboardInterrupt:
        if os.getppid() != parent:
            # The worker is gone: leave the run to the redelivered message.
            log.warning("run %d: the worker died; the run will be redelivered", record.id)
            history.update_run(record.id, reason="worker lost mid-run: awaiting redelivery")
            return 143
        status, error = "cancelled", "cancelled (runs cancel); cleaned up"
    except VmbuildError as exc:
        error = str(exc) + (f"\nhint: {exc.hint}" if exc.hint else "")
    except Exception as exc:  # a bug: recorded with its type
        log.exception("run %d failed", record.id)
        error = f"internal error: {type(exc).__name__}: {exc}"
    log.info("run %d %s%s", record.id, status, f": {error.splitlines()[0]}" if error else "")
    tail = None
    if status != "succeeded":
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
    history.transition(
        record.id, ("running",), status=status, ended=datetime.now(UTC),
        timings=progress.timings, error=error[:ERROR_MAX_CHARS] if error else None,
        log_tail=tail, **fields,
    )  # fmt: skip
    return 0 if status == "succeeded" else 1


def _noop(record: RunRecord, progress: Progress) -> None:
    """A run with no VM (queues, routing and overhead measurements): waits `seconds`,
    fails when asked to."""
    options = record.options or {}
    with progress.stage("noop", f"no-VM task ({options.get('seconds', 0)}s)"):
        progress.status(f"on {os.environ.get('VMBUILD_WORKER_NAME', '?')}")
        time.sleep(float(options.get("seconds", 0)))
        if options.get("fail"):
            raise VmbuildError(str(options["fail"]))


def _check_file(record: RunRecord) -> Path:
    from vmbuild.digest import sha256_file

    options = record.options or {}
    path = Path(str(record.pipeline_file))
    if not path.is_file():
        raise VmbuildError(
            f"{path}: not found on this worker",
            hint="recipes and pipelines must be at the same path on every worker "
            "(a shared checkout or mount)",
        )
    if options.get("sha256") and sha256_file(path) != options["sha256"]:
        raise VmbuildError(f"{path}: differs on this worker from the file that was submitted")
    return path


def _build(record: RunRecord, progress: Progress) -> dict[str, Any]:
    from vmbuild.build import BuildOptions, build
    from vmbuild.config.recipe import load_recipe

    options = record.options or {}
    key = options["key"]
    store = artifacts.open_store(options["store"])
    done = store.committed(key)
    if done is not None:
        # Redelivered after the commit, before the acknowledgement.
        progress.status(f"already stored by an earlier attempt: {done}")
        return {"artifact": done, "image": "/".join(done.rstrip("/").split("/")[-3:])}
    loaded = load_recipe(_check_file(record))
    remote = artifacts.is_s3(options["store"])
    local_root = artifacts.staging_dir(paths.cache_dir()) if remote else Path(options["store"])
    opts = BuildOptions(
        store=local_root, accelerator=options.get("accelerator"),
        skip_tests=bool(options.get("skip_tests")), distribute=False,
    )  # fmt: skip
    result = build(loaded, opts, progress)
    m = result.manifest
    with progress.stage("upload", f"commit to {store.location}"):
        if isinstance(store, artifacts.S3Store):
            location = store.commit(result.build_dir, key, on_status=progress.status)
            artifacts.discard_local(result.build_dir)
        else:
            location = store.commit(result.build_dir, key)
    return {"artifact": location, "image": m.ref}


def _pipeline(record: RunRecord, history: History, parent: int) -> int:
    from vmbuild.config.pipeline import load_pipeline
    from vmbuild.pipeline.runner import RunContext, run_pipeline

    options = record.options or {}
    loaded = load_pipeline(_check_file(record))
    if artifacts.is_s3(options.get("store")):
        raise VmbuildError("pipeline runs on workers need a store directory shared by the "
                           "workers; S3 stores take `vmbuild submit RECIPE` builds")  # fmt: skip
    store = Path(options.get("store") or loaded.store or paths.store_dir())
    ctx = RunContext(history, store, history.state_dir, quiet=True, run_id=record.id)
    try:
        result = run_pipeline(loaded, ctx, record.trigger)  # type: ignore[arg-type]
    except KeyboardInterrupt:
        if os.getppid() != parent:
            # The runner recorded `cancelled`; the worker is gone, so the run is not
            # over: back to `running` with a lapsing lease, for the redelivery.
            history.transition(record.id, ("cancelled",), status="running", ended=None,
                               error=None)  # fmt: skip
        raise
    return 0 if result.status in ("succeeded", "skipped") else 1


if __name__ == "__main__":
    sys.exit(main())
