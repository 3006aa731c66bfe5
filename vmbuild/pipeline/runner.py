"""One pipeline run: locked, recorded, timed out, cleaned up.

    lock (busy: record `skipped`) -> start condition (schedule + if-dependencies-updated)
    -> record `running` -> snapshot dependencies -> refresh a stale debian-12 base
    -> build -> distribute -> lifecycle -> record the outcome

A pipeline runs at most once at a time: an exclusive flock per pipeline name, next to
the history database. The lock dies with its process, so a killed run never blocks the
next one, and the next one marks the dead run's record failed.

Cancellation (SIGTERM, Ctrl-C, a timeout) is a KeyboardInterrupt in the build, which
unwinds every VM and staging dir; the run is recorded `cancelled` (or `failed` for a
timeout) before the exception leaves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from vmbuild.build import BuildResult, build
from vmbuild.config.pipeline import LoadedPipeline
from vmbuild.config.recipe import LoadedRecipe
from vmbuild.debian import index as apt
from vmbuild.debian import sources as aptsources
from vmbuild.errors import VmbuildError
from vmbuild.log import Progress, run_log
from vmbuild.pipeline import deps, lifecycle, reaper
from vmbuild.pipeline.clock import Clock, SystemClock
from vmbuild.pipeline.history import History, RunRecord, Trigger
from vmbuild.plan import BuildOptions, pipeline_options, vm_settings
from vmbuild.progress import Reporter
from vmbuild.stages import base_image

log = logging.getLogger("vmbuild.pipeline.runner")

ERROR_MAX_CHARS = 4000
EXIT_BUSY = 75  # EX_TEMPFAIL: the pipeline was already running; the trigger was recorded
BUSY_REASON = "already running"


class RunTimeout(KeyboardInterrupt):
    """A run (or its tests) exceeded its timeout.

    A KeyboardInterrupt so the build unwinds exactly as on Ctrl-C: no `except
    Exception` on the way swallows it, and keep-on-failure keeps no VM for it.
    """


class PipelineLock:
    """An exclusive, non-blocking flock; the file holds the owner's pid (for messages)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def holder(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int(self.path.read_text().strip())
        return None

    def release(self) -> None:
        # The file stays: unlinking it would let a waiter lock a deleted inode
        # while a newcomer locks a fresh file.
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> PipelineLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _format_seconds(seconds: float) -> str:
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


class Watchdog:
    """Deadlines for the main thread (SIGALRM): the run's timeout, and a tighter one
    while a stage with its own limit (the tests) runs. Elsewhere than in the main
    thread it does nothing: only the main thread receives signals."""

    def __init__(self, run_timeout: float | None, *, enabled: bool = True) -> None:
        self.run_timeout = run_timeout
        self.enabled = enabled
        self._deadlines: list[tuple[float, str]] = []
        self._previous: Any = None

    def __enter__(self) -> Watchdog:
        self.enabled = self.enabled and threading.current_thread() is threading.main_thread()
        if self.enabled:
            self._previous = signal.signal(signal.SIGALRM, self._fire)
            if self.run_timeout:
                secs = self.run_timeout
                message = f"the run timed out after {_format_seconds(secs)}"
                self._deadlines.append((_now() + secs, message))
            self._arm()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous)
            self._deadlines.clear()

    @contextlib.contextmanager
    def limit(self, seconds: float | None, what: str) -> Iterator[None]:
        if not self.enabled or not seconds:
            yield
            return
        entry = (_now() + seconds, f"{what} timed out after {_format_seconds(seconds)}")
        self._deadlines.append(entry)
        self._arm()
        try:
            yield
        finally:
            if entry in self._deadlines:  # not when it fired (firing clears them all)
                self._deadlines.remove(entry)
                self._arm()

    def _arm(self) -> None:
        if not self._deadlines:
            signal.setitimer(signal.ITIMER_REAL, 0)
            return
        soonest = min(self._deadlines)[0]
        signal.setitimer(signal.ITIMER_REAL, max(soonest - _now(), 0.001))

    def _fire(self, _signum: int, _frame: FrameType | None) -> None:
        if not self._deadlines:
            return
        deadline, message = min(self._deadlines)
        if _now() < deadline - 0.05:  # woken early (rounding): wait for the rest
            self._arm()
            return
        self._deadlines.clear()  # fire once: cleanup must not be interrupted again
        raise RunTimeout(message)


def _now() -> float:
    return time.monotonic()


class RunProgress:
    """The run's Reporter plus what a pipeline run keeps: the current stage, each
    stage's seconds, and per-stage time limits.

    It wraps the reporter the caller chose, the console's (log.Progress) or the
    `--json` event stream (events.JsonReporter), so `pipeline run --json` gets the
    same events as `build --json`, heartbeats included, from the same code."""

    def __init__(
        self, reporter: Reporter, *, watchdog: Watchdog | None = None,
        limits: dict[str, float | None] | None = None,
    ) -> None:  # fmt: skip
        self.reporter = reporter
        self.watchdog = watchdog
        self.limits = limits or {}
        self.current: str | None = None
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str, title: str) -> Iterator[None]:
        self.current = name
        limit = self.limits.get(name)
        start = time.monotonic()
        try:
            with self.reporter.stage(name, title):
                if self.watchdog is not None and limit:
                    with self.watchdog.limit(limit, f"stage {name}"):
                        yield
                else:
                    yield
        finally:
            self.timings[name] = round(time.monotonic() - start, 2)

    def status(self, text: str) -> None:
        self.reporter.status(text)

    def output(self, line: str) -> None:
        self.reporter.output(line)

    def bytes(self, done: int, total: int | None) -> None:
        self.reporter.bytes(done, total)


@dataclass(frozen=True)
class DistributionOutcome:
    ami_ids: dict[str, str]
    errors: list[str]


BuildFn = Callable[[LoadedRecipe, BuildOptions, Reporter], BuildResult]
DistributeFn = Callable[[Path, Any, Reporter], DistributionOutcome]
CheckFn = Callable[[LoadedPipeline, History], deps.CheckReport]
SnapshotFn = Callable[[LoadedPipeline, dict[str, Any] | None], dict[str, Any]]
RefreshFn = Callable[[LoadedRecipe, str | None, Reporter], None]


def distribute_artifact(build_dir: Path, config: Any, progress: Reporter) -> DistributionOutcome:
    """AWS distribution through vmbuild.publish (imported only when a pipeline uses it)."""
    try:
        from vmbuild.publish import distribute
        from vmbuild.publish.events import to_reporter
    except ModuleNotFoundError as exc:
        raise VmbuildError(f"AWS distribution is not available in this vmbuild: {exc}") from None
    result = distribute(build_dir, config, on_progress=to_reporter(progress))
    amis = {r.region: r.image_id for r in result.regions if r.image_id}
    errors = [f"{r.region}: {r.error or r.status}" for r in result.regions if not r.ok]
    return DistributionOutcome(amis, errors)


def refresh_debian_base(
    recipe: LoadedRecipe, mirror: str | None, progress: Reporter, fetch: apt.Fetch = apt.fetch_url
) -> None:
    """Rebuild a cached debian-12 base when its mirror changed after it was built.

    The base cache is keyed by its inputs, not the mirror's content: without this,
    a base would stay at the packages of the day it was first built, and a pipeline
    triggered by newer packages would rebuild the same image again and again.
    """
    spec = recipe.recipe.base
    if not (isinstance(spec, str) and spec in base_image.RELEASES and recipe.base_path is None):
        return
    with progress.stage("base-refresh", f"{spec} base: compare with its mirror"):
        base = base_image.build_debian(spec, mirror=mirror, on_progress=progress)
        meta = json.loads((base.path.parent / "meta.json").read_text())
        created = datetime.fromisoformat(meta["created"]).astimezone(UTC)
        mirrors = aptsources.DebianMirrors(meta["mirror"], meta.get("security_mirror"))
        codename = base_image.RELEASES[spec]
        moved = []
        for source in apt.sources_from_lines(aptsources.apt_source_lines(mirrors, codename)):
            for suite in source.suites:
                try:
                    release = apt.fetch_release(source.uri, suite, fetch)
                except VmbuildError as exc:
                    log.warning("cannot tell whether the base is current: %s", exc)
                    continue
                if release.date is not None and release.date > created:
                    moved.append(f"{suite} {release.date:%Y-%m-%d %H:%M}")
        if moved:
            progress.status(f"the mirror changed after the base was built ({', '.join(moved)})")
            base_image.build_debian(spec, mirror=mirror, rebuild=True, on_progress=progress)
        else:
            progress.status(f"base {base.id} is current")


@dataclass
class Services:
    """What a run calls out to; tests replace them (a fake build, a local mirror)."""

    build: BuildFn = build
    distribute: DistributeFn = distribute_artifact
    check: CheckFn = deps.check
    snapshot: SnapshotFn = deps.snapshot
    refresh_base: RefreshFn = refresh_debian_base


@dataclass
class RunContext:
    history: History
    store: Path
    state_dir: Path  # locks/ and logs/ live here (next to the history database)
    clock: Clock = field(default_factory=SystemClock)
    quiet: bool = False
    # Where progress goes: the console's log.Progress (quiet or not) unless set
    # (`pipeline run --json` sets its JsonReporter).
    reporter: Reporter | None = None
    services: Services = field(default_factory=Services)
    use_alarm: bool = True  # SIGALRM timeouts (main thread only)
    run_id: int | None = None  # a run already recorded (queued for a worker): reuse its row


def _start(
    ctx: RunContext, loaded: LoadedPipeline, trigger: str, when: datetime,
    *, status: str = "running", reason: str | None = None,
) -> int:  # fmt: skip
    if ctx.run_id is None:
        return ctx.history.start_run(
            loaded.name, str(loaded.path), trigger, when, status=status, reason=reason
        )
    ctx.history.update_run(ctx.run_id, trigger=trigger, status=status, reason=reason)
    return ctx.run_id


def _skip(ctx: RunContext, loaded: LoadedPipeline, trigger: str, when: datetime, why: str) -> int:
    run_id = _start(ctx, loaded, trigger, when, status="skipped", reason=why)
    ctx.history.update_run(run_id, ended=when)
    return run_id


def lock_for(state_dir: Path, pipeline: str) -> PipelineLock:
    return PipelineLock(state_dir / "locks" / f"{pipeline}.lock")


def run_pipeline(loaded: LoadedPipeline, ctx: RunContext, trigger: Trigger = "manual") -> RunRecord:
    """Run `loaded` now (or record why not) and return its history record."""
    history = ctx.history
    lock = lock_for(ctx.state_dir, loaded.name)
    if not lock.acquire():
        active = history.list_runs(loaded.name, limit=1, status="running")
        holder = lock.holder()
        who = (f"run {active[0].id}" if active else "another process") + (
            f", pid {holder}" if holder else ""
        )
        busy = f"{BUSY_REASON} ({who}): this trigger is skipped"
        log.info("pipeline %s: %s", loaded.name, busy)
        now = ctx.clock.now()
        run_id = _skip(ctx, loaded, trigger, now, busy)
        return history.get(run_id)
    with lock:
        stale = history.abandon_stale(loaded.name, ctx.clock.now(), reaper.DIED)
        reaper.add_tails(history, stale)
        if stale:
            log.warning("pipeline %s: runs %s had died; marked failed", loaded.name, stale)
        reason: str | None = None
        spec = loaded.pipeline.schedule
        if trigger == "schedule" and spec and spec.start_condition == "if-dependencies-updated":
            report = ctx.services.check(loaded, history)
            if report.changed:
                trigger, reason = "dependency", report.summary()
            elif report.errors:
                run_id = _start(ctx, loaded, trigger, ctx.clock.now())
                history.update_run(
                    run_id, status="failed", ended=ctx.clock.now(),
                    error="dependency check failed: " + "; ".join(report.errors),
                )  # fmt: skip
                return history.get(run_id)
            else:
                since = f" since run {report.last_run}" if report.last_run else ""
                run_id = _skip(
                    ctx, loaded, trigger, ctx.clock.now(), f"no dependency changed{since}"
                )
                log.info("pipeline %s: no dependency changed%s; not building", loaded.name, since)
                return history.get(run_id)
        return _run_locked(loaded, ctx, trigger, reason)


def _run_locked(
    loaded: LoadedPipeline, ctx: RunContext, trigger: str, reason: str | None
) -> RunRecord:
    history = ctx.history
    started = ctx.clock.now()
    run_id = _start(ctx, loaded, trigger, started, reason=reason)
    log_path = ctx.state_dir / "logs" / loaded.name / f"run-{run_id:06d}.log"
    history.update_run(run_id, log_path=str(log_path))
    tests = loaded.pipeline.tests
    reporter = ctx.reporter or Progress(quiet=ctx.quiet)
    progress = RunProgress(reporter, limits={"test": tests.timeout})
    result: dict[str, Any] = {}
    status, error = "failed", None
    with run_log(log_path):
        try:
            with Watchdog(loaded.pipeline.infrastructure.timeout, enabled=ctx.use_alarm) as dog:
                progress.watchdog = dog
                log.info("pipeline %s: run %d, trigger %s%s", loaded.name, run_id, trigger,
                         f" ({reason})" if reason else "")  # fmt: skip
                _execute(loaded, ctx, progress, run_id, result)
                status = "succeeded"
        except RunTimeout as exc:
            error = f"{exc} (during {progress.current or 'start'}); cancelled and cleaned up"
        except KeyboardInterrupt:
            status, error = "cancelled", "cancelled (SIGTERM or Ctrl-C); cleaned up"
            raise
        except VmbuildError as exc:
            error = str(exc) + (f"\nhint: {exc.hint}" if exc.hint else "")
        except Exception as exc:  # a bug: recorded, then the CLI reports it
            error = f"internal error: {type(exc).__name__}: {exc}"
            raise
        finally:
            # Logged first, so the run log (and the tail kept with the run) ends with it.
            outcome = f": {error.splitlines()[0]}" if error else ""
            log.info("pipeline %s: run %d %s%s", loaded.name, run_id, status, outcome)
            with _signals_deferred():
                history.update_run(
                    run_id, status=status, ended=ctx.clock.now(), timings=progress.timings,
                    error=error[:ERROR_MAX_CHARS] if error else None,
                    log_tail=reaper.log_tail(log_path) if status != "succeeded" else None, **result,
                )  # fmt: skip
    return history.get(run_id)


def with_overrides(loaded: LoadedPipeline) -> LoadedRecipe:
    """The recipe with the pipeline's infrastructure (CPUs, memory) and scan applied."""
    infra = loaded.pipeline.infrastructure
    recipe = loaded.recipe.recipe
    vm = vm_settings(recipe.vm, cpus=infra.cpus, memory=infra.memory)
    recipe = recipe.model_copy(update={"vm": vm, "scan": loaded.scan})
    return dataclasses.replace(loaded.recipe, recipe=recipe, distribution=loaded.distribution)


def _execute(
    loaded: LoadedPipeline, ctx: RunContext, progress: RunProgress, run_id: int,
    result: dict[str, Any],
) -> None:  # fmt: skip
    svc, infra = ctx.services, loaded.pipeline.infrastructure
    last = ctx.history.last_succeeded(loaded.name)
    with progress.stage("dependencies", "record the dependencies"):
        seen = svc.snapshot(loaded, last.deps if last else None)
        ctx.history.update_run(run_id, deps=seen)
        if "error" in seen.get("base", {}):
            log.warning("%s", seen["base"]["error"])
    recipe = with_overrides(loaded)
    if infra.refresh_base:
        svc.refresh_base(recipe, infra.mirror, progress)
    opts = pipeline_options(
        infra, tests_enabled=loaded.pipeline.tests.enabled, store=ctx.store,
        distribute=False,  # done below, so the AMI ids are recorded
    )  # fmt: skip
    built = svc.build(recipe, opts, progress)
    m = built.manifest
    result.update(artifact=str(built.build_dir), image=m.ref)
    if loaded.distribution is not None:
        with progress.stage("distribute", "distribute to AWS"):
            outcome = svc.distribute(built.build_dir, loaded.distribution, progress)
            result["ami_ids"] = outcome.ami_ids
            if outcome.errors:
                raise VmbuildError("distribution failed: " + "; ".join(outcome.errors))
    policy = loaded.pipeline.lifecycle
    if policy.keep_last is not None or policy.max_age is not None:
        with progress.stage("lifecycle", "lifecycle: prune old builds"):
            deleted = lifecycle.prune(ctx.store, m.name, policy, ctx.clock.now())
            result["pruned"] = [d.to_json() for d in deleted]
            for d in deleted:
                progress.status(f"deleted {d.build.ref} ({d.reason})")


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGTERM/SIGINT/SIGHUP/SIGALRM while the outcome is written, so a signal
    cannot leave a half-recorded run; they are delivered right after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
