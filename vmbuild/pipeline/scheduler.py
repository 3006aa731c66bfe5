"""`vmbuild scheduler`: the daemon that fires pipeline runs on their schedules.

Each pass: re-read the pipelines directory (a broken edit is logged and the last good
version kept), reap finished runs, fire what is due, then sleep until the next slot
(at most a minute, less while runs are going).

- Each run is a child process, `vmbuild pipeline run FILE --trigger schedule`: a
  crashing build cannot take the daemon down, its failure is recorded by the run
  itself, and stopping it is one signal.
- The last slot fired per pipeline is persisted in the history database. After
  downtime a pipeline whose slots were missed runs once, not once per slot.
- A slot that comes while the pipeline's previous run is still going is recorded as
  `skipped`; a pipeline waiting for a free run slot (`max_parallel`) stays due and
  starts when one frees up, still once.
- Stopping (SIGTERM, Ctrl-C): no new runs; each running child gets SIGTERM (its build
  unwinds: VMs killed, staging removed, run recorded `cancelled`) and is waited for.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from vmbuild.config.cron import Due
from vmbuild.config.pipeline import LoadedPipeline, load_pipeline, load_pipelines, pipeline_files
from vmbuild.errors import VmbuildError
from vmbuild.pipeline.clock import Clock, SystemClock
from vmbuild.pipeline.history import History
from vmbuild.pipeline.runner import PipelineLock

if TYPE_CHECKING:
    from vmbuild.config.variables import Given

log = logging.getLogger("vmbuild.pipeline.scheduler")

IDLE_POLL = 60.0  # re-read the directory at least this often
BUSY_POLL = 2.0  # while runs are going: notice their end promptly
STOP_TIMEOUT = 300.0  # a cancelled build's cleanup (VM kill, staging removal) is fast


class RunHandle(Protocol):
    pid: int

    def poll(self) -> int | None: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...

    def wait(self, timeout: float) -> int | None: ...


class Launcher(Protocol):
    def launch(self, pipeline: LoadedPipeline, trigger: str) -> RunHandle: ...


class ProcessHandle:
    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.pid = proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()

    def kill(self) -> None:
        # Its own session: the whole group, in case it left helpers behind.
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None


class ProcessLauncher:
    """Runs go to `python -m vmbuild pipeline run` children, output to our stdout."""

    def __init__(
        self, history: Path, store: Path | None = None, *, debug: bool = False,
        var_env: Mapping[str, str] | None = None,
    ) -> None:  # fmt: skip
        self.history = history
        self.store = store
        self.debug = debug
        # The scheduler's --var/--var-file values reach each run as VMBUILD_VAR_*: one
        # value may serve several pipelines, so a run must not reject the ones its own
        # pipeline does not declare (a --var on its command line would).
        self.var_env = dict(var_env or {})

    def argv(self, pipeline: LoadedPipeline, trigger: str) -> list[str]:
        argv = [sys.executable, "-m", "vmbuild", *(["--debug"] if self.debug else [])]
        argv += ["pipeline", "run", str(pipeline.path), "--trigger", trigger, "--quiet"]
        argv += ["--history", str(self.history)]
        if self.store is not None:
            argv += ["--store", str(self.store)]
        return argv

    def launch(self, pipeline: LoadedPipeline, trigger: str) -> RunHandle:
        from vmbuild.run import spawn

        # Its own session: a terminal's Ctrl-C reaches the scheduler only, which
        # then stops each run in order; stdout is inherited (journald, a log file).
        env = {**os.environ, **self.var_env}
        return ProcessHandle(
            spawn(self.argv(pipeline, trigger), stdout=None, env=env, new_session=True)
        )


class Scheduler:
    def __init__(
        self, directory: Path, history: History, launcher: Launcher, *,
        clock: Clock | None = None, max_parallel: int = 1, stop_timeout: float = STOP_TIMEOUT,
        load: Callable[[Path], LoadedPipeline] | None = None, variables: Given | None = None,
    ) -> None:  # fmt: skip
        self.directory = directory
        self.history = history
        self.launcher = launcher
        self.clock = clock or SystemClock()
        self.max_parallel = max(1, max_parallel)
        self.stop_timeout = stop_timeout
        # --var/--var-file values: every (re)load of a pipeline substitutes the same ones.
        self.variables = variables
        self._load = load or functools.partial(load_pipeline, variables=variables)
        self.pipelines: dict[str, LoadedPipeline] = {}
        self._files: dict[Path, int] = {}  # path -> mtime_ns last read (good or bad)
        self.running: dict[str, RunHandle] = {}
        self._waiting: set[str] = set()  # due, but no free run slot (logged once)

    # -- pipelines --------------------------------------------------------------
    def start(self) -> None:
        """Load every pipeline (refusing to start if any is broken) and their state."""
        now = self.clock.now()
        for p in load_pipelines(self.directory, now=now, variables=self.variables):
            self.pipelines[p.name] = p
            self._files[p.path] = _mtime(p.path)
        for path in pipeline_files(self.directory):
            self._files.setdefault(path.resolve(), _mtime(path))
        if not self.pipelines:
            log.warning("no pipelines in %s (yet): waiting for some", self.directory)
        for p in self.pipelines.values():
            self._sync_state(p, now)

    def _sync_state(self, p: LoadedPipeline, now: datetime) -> None:
        if p.schedule is None:
            log.info("%s: no schedule (manual runs only)", p.name)
            return
        state = self.history.schedule_state(p.name)
        if state is not None and state[0] == p.schedule.key:
            nxt = p.schedule.next_after(state[1])
            log.info("%s: %s; last slot %s, next %s", p.name, p.schedule.key,
                     _fmt(state[1]), _fmt(nxt))  # fmt: skip
            return
        why = "new schedule" if state is None else f"schedule changed (was {state[0]})"
        # Slots before now belong to no run: the first one counts from now.
        self.history.set_schedule_state(p.name, p.schedule.key, now, now)
        log.info("%s: %s: %s; first run at %s", p.name, why, p.schedule.key,
                 _fmt(p.schedule.next_after(now)))  # fmt: skip

    def rescan(self) -> None:
        """Pick up added, edited and removed pipeline files; keep the last good version
        of a file that broke, and say so once per edit."""
        now = self.clock.now()
        present = {p.resolve(): _mtime(p) for p in pipeline_files(self.directory)}
        for path in set(self._files) - set(present):
            del self._files[path]
            for name, p in list(self.pipelines.items()):
                if p.path == path:
                    del self.pipelines[name]
                    log.info("%s: %s was removed; no longer scheduled", name, path.name)
        for path, mtime in present.items():
            if self._files.get(path) == mtime:
                continue
            self._files[path] = mtime
            try:
                p = self._load(path)
            except VmbuildError as exc:
                log.error(
                    "%s is broken, keeping its last good version (if any): %s", path.name, exc
                )
                continue
            other = self.pipelines.get(p.name)
            if other is not None and other.path != path:
                log.error("%s: name %r is taken by %s; ignored", path.name, p.name, other.path.name)
                continue
            for name, old in list(self.pipelines.items()):
                if old.path == path and name != p.name:
                    del self.pipelines[name]  # renamed
            log.info(
                "%s: %s", p.name, "reloaded" if other is not None else f"added from {path.name}"
            )
            self.pipelines[p.name] = p
            self._sync_state(p, now)

    # -- the loop ---------------------------------------------------------------
    def tick(self) -> float:
        """One pass; returns how long to sleep before the next."""
        self.rescan()
        self._reap()
        now = self.clock.now()
        for name in sorted(self.pipelines):
            p = self.pipelines[name]
            if p.schedule is None:
                continue
            state = self.history.schedule_state(name)
            if state is None or state[0] != p.schedule.key:
                self._sync_state(p, now)
                continue
            due = p.schedule.due(state[1], now)
            if due is None:
                self._waiting.discard(name)
                continue
            if name in self.running:
                reason = (f"slot {_fmt(due.slot)}: the previous run (pid {self.running[name].pid}) "
                          "is still going")  # fmt: skip
                self.history.set_schedule_state(name, p.schedule.key, due.slot, now)
                self.history.record_skipped(name, str(p.path), "schedule", now, reason)
                log.warning("%s: skipped %s", name, reason)
            elif len(self.running) >= self.max_parallel:
                if name not in self._waiting:
                    self._waiting.add(name)
                    log.info("%s: due (slot %s) but %d run(s) going; it starts when one ends",
                             name, _fmt(due.slot), len(self.running))  # fmt: skip
            else:
                self._fire(p, due, state[1], now)
        return self._sleep_for(now)

    def _fire(self, p: LoadedPipeline, due: Due, last: datetime, now: datetime) -> None:
        assert p.schedule is not None
        self._waiting.discard(p.name)
        why = f"slot {_fmt(due.slot)}"
        if due.missed:
            more = "+" if due.capped else ""
            why += (f"; {due.missed}{more} earlier slot(s) since {_fmt(last)} were missed "
                    "(scheduler stopped?): running once for all of them")  # fmt: skip
        # Persisted before launching: a crash in between loses a slot rather than
        # running it twice (the next slot still comes).
        self.history.set_schedule_state(p.name, p.schedule.key, due.slot, now)
        try:
            handle = self.launcher.launch(p, "schedule")
        except (VmbuildError, OSError) as exc:
            log.error("%s: could not start a run: %s", p.name, exc)
            run_id = self.history.start_run(p.name, str(p.path), "schedule", now)
            error = f"the scheduler could not start the run: {exc}"
            self.history.update_run(run_id, status="failed", ended=now, error=error)
            return
        self.running[p.name] = handle
        remote = getattr(handle, "run_id", None)
        started = (
            f"queued run {remote}" if remote is not None else f"started a run (pid {handle.pid})"
        )
        log.info("%s: %s: %s", p.name, started, why)

    def _reap(self) -> None:
        for name, handle in list(self.running.items()):
            code = handle.poll()
            if code is None:
                continue
            del self.running[name]
            # The run this process recorded (a manual run may have been recorded since).
            # (A run on a worker is known by its run id.)
            run_id = getattr(handle, "run_id", None)
            mine = [r for r in self.history.list_runs(name, limit=20)
                    if r.id == run_id or (run_id is None and r.pid == handle.pid)]  # fmt: skip
            outcome = f"run {mine[0].id} {mine[0].status}" if mine else "no run recorded"
            if mine and mine[0].error:
                outcome += f": {mine[0].error.splitlines()[0]}"
            log.info("%s: run process %d exited %d (%s)", name, handle.pid, code, outcome)

    def _sleep_for(self, now: datetime) -> float:
        wake = IDLE_POLL
        for name, p in self.pipelines.items():
            state = self.history.schedule_state(name)
            if p.schedule is None or state is None:
                continue
            nxt = p.schedule.next_after(max(state[1], now))
            if nxt is not None:
                wake = min(wake, (nxt - now).total_seconds())
        if self.running or self._waiting:
            wake = min(wake, BUSY_POLL)
        return max(wake, 0.2)

    def run_forever(self) -> None:
        """Tick and sleep until interrupted (KeyboardInterrupt: SIGTERM in the CLI).

        A stop signal that arrives during a tick takes effect when the tick ends.
        Raised inside it, it could cut a history write in half, and stop() would
        then cancel the runs on a connection left inside that transaction
        (psycopg: "can't change 'autocommit' now"), leaving a queued run
        uncancelled. The sleep between ticks is interrupted at once.
        """
        try:
            while True:
                with _stop_signals_held() as held:
                    wake = self.tick()
                if held:
                    raise KeyboardInterrupt(f"signal {held[0]}")
                self.clock.sleep(wake)
        finally:
            self.stop()

    def stop(self) -> None:
        """Cancel running builds (SIGTERM) and wait for each to clean up."""
        if not self.running:
            log.info("scheduler stopped (no run in progress)")
            return
        # A second Ctrl-C must not abandon the wait: the children clean up anyway,
        # but the daemon would exit before saying how it went.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            names = ", ".join(f"{n} (pid {h.pid})" for n, h in self.running.items())
            log.info("stopping: cancelling %s", names)
            for handle in self.running.values():
                handle.terminate()
            deadline = time.monotonic() + self.stop_timeout
            for name, handle in list(self.running.items()):
                code = handle.wait(max(0.0, deadline - time.monotonic()))
                if code is None:
                    log.error("%s: run (pid %d) did not stop within %.0fs: killing it",
                              name, handle.pid, self.stop_timeout)  # fmt: skip
                    handle.kill()
                    code = handle.wait(10)
                log.info("%s: run process %d exited %s", name, handle.pid, code)
            self.running.clear()
            log.info("scheduler stopped")
        finally:
            signal.signal(signal.SIGINT, previous)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@contextlib.contextmanager
def _stop_signals_held() -> Iterator[list[int]]:
    """Record the stop signals that arrive inside the block instead of raising there;
    a second one raises at once.

    On leaving, the previous handlers are back. If one arrived, SIGTERM and SIGHUP
    are ignored from then on, as the CLI's own handler does after its first one:
    the stop that follows must not be interrupted in turn.
    """
    held: list[int] = []

    def hold(signum: int, _frame: object) -> None:
        held.append(signum)
        if len(held) > 1:
            # Asked twice: a tick stuck on the network (a broker or database
            # that does not answer) must not make SIGKILL the only way out,
            # which would orphan the running builds.
            raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, hold) for sig in STOP_SIGNALS}
    try:
        yield held
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if held:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)


def scheduler_lock(state_dir: Path) -> PipelineLock:
    """One scheduler per history database: two would fire every slot twice."""
    return PipelineLock(state_dir / "scheduler.lock")  # not in locks/: a pipeline's name


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return -1


def _fmt(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment is not None else "never"
