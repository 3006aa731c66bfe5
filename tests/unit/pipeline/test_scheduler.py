"""The scheduler loop with an injected clock and a fake launcher: first sight, firing,
missed slots after downtime (one run), skipped triggers, capacity, reloads, stopping."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.support.pipeline import T0, FakeClock, write_pipeline, write_recipe
from vmbuild.config.pipeline import LoadedPipeline
from vmbuild.errors import VmbuildError
from vmbuild.pipeline.history import History
from vmbuild.pipeline.scheduler import BUSY_POLL, Scheduler


class FakeHandle:
    def __init__(self, pid: int, *, stubborn: bool = False) -> None:
        self.pid = pid
        self.code: int | None = None
        self.stubborn = stubborn  # ignores SIGTERM
        self.signals: list[str] = []

    def poll(self) -> int | None:
        return self.code

    def terminate(self) -> None:
        self.signals.append("TERM")
        if not self.stubborn:
            self.code = 130

    def kill(self) -> None:
        self.signals.append("KILL")
        self.code = -9

    def wait(self, timeout: float) -> int | None:
        return self.code


class FakeLauncher:
    def __init__(self) -> None:
        self.launched: list[tuple[str, str]] = []
        self.handles: list[FakeHandle] = []
        self.fail: Exception | None = None
        self.stubborn = False

    def launch(self, pipeline: LoadedPipeline, trigger: str) -> FakeHandle:
        if self.fail is not None:
            raise self.fail
        self.launched.append((pipeline.name, trigger))
        handle = FakeHandle(1000 + len(self.handles), stubborn=self.stubborn)
        self.handles.append(handle)
        return handle


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path / "pipelines"
        write_recipe(tmp_path / "recipes", "img")
        self.db = tmp_path / "h.sqlite"
        self.history = History(self.db)
        self.clock = FakeClock(T0)  # 12:00 UTC
        self.launcher = FakeLauncher()

    def pipeline(self, name: str, cron: str | None = "0 13 * * *", **extra: Any) -> Path:
        body: dict[str, Any] = {"recipe": "../recipes/img-recipe.yaml", **extra}
        if cron:
            body["schedule"] = {"cron": cron}
        return write_pipeline(self.dir, body, name)

    def scheduler(self, **kwargs: Any) -> Scheduler:
        s = Scheduler(self.dir, self.history, self.launcher, clock=self.clock, **kwargs)
        s.start()
        return s


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def test_first_sight_waits_for_the_next_slot(world: World) -> None:
    world.pipeline("p")
    s = world.scheduler()
    assert world.history.schedule_state("p") == ("0 13 * * * @ UTC", T0)
    assert s.tick() == 60.0  # idle: re-read the directory every minute at most
    assert world.launcher.launched == []


def test_fires_at_the_slot_once(world: World, caplog: pytest.LogCaptureFixture) -> None:
    world.pipeline("p")
    s = world.scheduler()
    world.clock.advance(minutes=59, seconds=30)
    assert s.tick() == pytest.approx(30)  # sleeps until 13:00
    assert world.launcher.launched == []
    world.clock.advance(seconds=30)
    with caplog.at_level(logging.INFO, "vmbuild.pipeline.scheduler"):
        assert s.tick() == BUSY_POLL  # a run is going: poll it
    assert world.launcher.launched == [("p", "schedule")]
    assert "p: started a run (pid 1000): slot 2026-06-01 13:00:00 UTC" in caplog.text
    assert world.history.schedule_state("p") == ("0 13 * * * @ UTC", T0 + timedelta(hours=1))
    world.clock.advance(seconds=5)
    s.tick()
    assert len(world.launcher.launched) == 1  # the same slot never fires twice


def test_finished_runs_are_reaped_and_logged(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.pipeline("p")
    s = world.scheduler()
    world.clock.advance(hours=1)
    s.tick()
    # The child records its run with its own pid; a manual run is recorded meanwhile.
    run_id = world.history.start_run("p", None, "schedule", world.clock.now())
    world.history.update_run(run_id, status="failed", error="the builder VM did not boot\nmore")
    handle = world.launcher.handles[0]
    handle.pid = os.getpid()
    manual = world.history.record_skipped("p", None, "manual", world.clock.now(), "busy")
    with sqlite3.connect(world.db) as db:  # as two processes would have recorded them
        db.execute("UPDATE runs SET pid = ? WHERE id = ?", (handle.pid, run_id))
        db.execute("UPDATE runs SET pid = 1 WHERE id = ?", (manual,))
    handle.code = 1
    with caplog.at_level(logging.INFO, "vmbuild.pipeline.scheduler"):
        s.tick()
    assert s.running == {}
    expected = f"exited 1 (run {run_id} failed: the builder VM did not boot)"
    assert f"p: run process {handle.pid} {expected}" in caplog.text


def test_a_failed_run_does_not_stop_the_schedule(world: World) -> None:
    world.pipeline("p")
    s = world.scheduler()
    world.clock.advance(hours=1)
    s.tick()
    world.launcher.handles[0].code = 1
    world.clock.advance(days=1)
    s.tick()
    assert len(world.launcher.launched) == 2


def test_missed_slots_after_downtime_run_once(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.pipeline("p")
    world.scheduler()  # first start: baseline at 12:00
    # The scheduler is stopped for a week; a new one starts from the persisted state.
    world.clock.advance(days=7)
    s = world.scheduler()
    with caplog.at_level(logging.INFO, "vmbuild.pipeline.scheduler"):
        s.tick()
    assert world.launcher.launched == [("p", "schedule")]
    assert "6 earlier slot(s) since 2026-06-01 12:00:00 UTC were missed" in caplog.text
    assert "running once for all of them" in caplog.text
    latest = T0 + timedelta(days=6, hours=1)  # 13:00 on the 7th day
    assert world.history.schedule_state("p") == ("0 13 * * * @ UTC", latest)
    world.launcher.handles[0].code = 0
    s.tick()
    assert len(world.launcher.launched) == 1


def test_a_slot_while_the_previous_run_goes_is_recorded_skipped(world: World) -> None:
    world.pipeline("p", cron="*/10 * * * *")
    s = world.scheduler()
    world.clock.advance(minutes=10)
    s.tick()
    world.clock.advance(minutes=10)  # still running at the next slot
    s.tick()
    assert len(world.launcher.launched) == 1
    [skipped] = world.history.list_runs("p", status="skipped")
    assert skipped.trigger == "schedule"
    assert (
        skipped.reason == "slot 2026-06-01 12:20:00 UTC: the previous run (pid 1000) is still going"
    )
    world.launcher.handles[0].code = 0
    world.clock.advance(minutes=10)
    s.tick()
    assert len(world.launcher.launched) == 2  # not queued: the next slot runs normally


def test_capacity_makes_a_due_pipeline_wait_not_skip(world: World) -> None:
    world.pipeline("a")
    world.pipeline("b")
    s = world.scheduler(max_parallel=1)
    world.clock.advance(hours=1)
    s.tick()
    assert world.launcher.launched == [("a", "schedule")]
    world.clock.advance(minutes=30)
    s.tick()
    assert len(world.launcher.launched) == 1 and world.history.list_runs("b") == []
    world.launcher.handles[0].code = 0
    s.tick()
    assert world.launcher.launched == [("a", "schedule"), ("b", "schedule")]


def test_max_parallel_two(world: World) -> None:
    world.pipeline("a")
    world.pipeline("b")
    s = world.scheduler(max_parallel=2)
    world.clock.advance(hours=1)
    s.tick()
    assert sorted(world.launcher.launched) == [("a", "schedule"), ("b", "schedule")]


def test_refuses_to_start_with_a_broken_pipeline(world: World) -> None:
    world.pipeline("good")
    world.pipeline("bad", cron="0 3 * * * * *")
    with pytest.raises(VmbuildError) as info:
        world.scheduler()
    assert "bad.yaml: schedule.cron:" in str(info.value)
    assert world.history.schedule_state("good") is None  # nothing was started


def test_a_broken_edit_keeps_the_last_good_version(world: World, caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    path = world.pipeline("p")
    s = world.scheduler()
    path.write_text(path.read_text().replace("0 13", "0 99"))
    os.utime(path, ns=(1, 1))  # a different mtime, whatever the file system's resolution
    with caplog.at_level(logging.INFO, "vmbuild.pipeline.scheduler"):
        s.tick()
    assert "p.yaml is broken, keeping its last good version" in caplog.text
    assert "hour field '99'" in caplog.text
    world.clock.advance(hours=1)
    s.tick()
    assert world.launcher.launched == [("p", "schedule")]


def test_a_new_schedule_starts_afresh(world: World, caplog: pytest.LogCaptureFixture) -> None:
    path = world.pipeline("p")
    s = world.scheduler()
    world.clock.advance(hours=5)  # 17:00: 13:00 was missed...
    path.write_text(path.read_text().replace("0 13", "0 18"))
    os.utime(path, ns=(2, 2))
    with caplog.at_level(logging.INFO, "vmbuild.pipeline.scheduler"):
        s.tick()  # ...but the schedule changed: its slots count from now
    assert world.launcher.launched == []
    assert "schedule changed (was 0 13 * * * @ UTC)" in caplog.text
    world.clock.advance(hours=1)
    s.tick()
    assert world.launcher.launched == [("p", "schedule")]


def test_added_and_removed_pipelines(world: World) -> None:
    world.pipeline("a")
    s = world.scheduler()
    world.pipeline("b")
    s.tick()
    assert set(s.pipelines) == {"a", "b"}
    (world.dir / "a.yaml").unlink()
    s.tick()
    assert set(s.pipelines) == {"b"}


def test_pipelines_without_schedule_never_fire(world: World) -> None:
    world.pipeline("manual", cron=None)
    s = world.scheduler()
    world.clock.advance(days=30)
    s.tick()
    assert world.launcher.launched == []


def test_a_launch_failure_is_recorded_and_the_loop_goes_on(world: World) -> None:
    world.pipeline("p")
    s = world.scheduler()
    world.launcher.fail = OSError("fork failed")
    world.clock.advance(hours=1)
    s.tick()
    [r] = world.history.list_runs("p")
    assert r.status == "failed" and r.error == "the scheduler could not start the run: fork failed"
    world.launcher.fail = None
    world.clock.advance(days=1)
    s.tick()
    assert world.launcher.launched == [("p", "schedule")]


def test_stop_cancels_running_builds_and_waits(world: World) -> None:
    world.pipeline("p")
    s = world.scheduler()
    world.clock.advance(hours=1)
    s.tick()
    s.stop()
    assert world.launcher.handles[0].signals == ["TERM"]
    assert s.running == {}


def test_stop_kills_a_run_that_does_not_stop(world: World) -> None:
    world.pipeline("p")
    s = world.scheduler(stop_timeout=0)
    world.launcher.stubborn = True
    world.clock.advance(hours=1)
    s.tick()
    s.stop()
    assert world.launcher.handles[0].signals == ["TERM", "KILL"]


def test_run_forever_stops_cleanly_on_interrupt(world: World) -> None:
    world.pipeline("p", cron="*/5 * * * *")
    s = world.scheduler()
    ticks = 0
    original = s.tick

    def tick() -> float:
        nonlocal ticks
        ticks += 1
        if ticks == 8:  # 12:00, then every minute (the idle poll): 12:05 is the 6th
            raise KeyboardInterrupt  # SIGTERM, as the CLI turns it
        return original()

    s.tick = tick  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        s.run_forever()
    assert world.launcher.launched == [("p", "schedule")]
    assert world.launcher.handles[0].signals == ["TERM"]


def test_a_stop_signal_during_a_tick_takes_effect_when_the_tick_ends(world: World) -> None:
    # Raised inside a tick, the signal could cut a history write in half and the
    # stop would then use that connection (the race a scale-out test hit).
    world.pipeline("p", cron="*/5 * * * *")
    s = world.scheduler()
    original = s.tick
    finished: list[int] = []

    def tick() -> float:
        if len(finished) == 5:  # 12:00, then every minute: 12:05, the due one, is the 6th
            os.kill(os.getpid(), signal.SIGTERM)  # delivered here, before the launch
        wake = original()
        finished.append(len(world.launcher.launched))
        return wake

    s.tick = tick  # type: ignore[method-assign]
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with pytest.raises(KeyboardInterrupt, match=f"signal {int(signal.SIGTERM)}"):
            s.run_forever()
        # The one tick ran to its end (it queued the due run), then the stop
        # cancelled that run; a second SIGTERM is ignored while it does.
        assert finished == [0, 0, 0, 0, 0, 1]
        assert world.launcher.handles[0].signals == ["TERM"]
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_a_second_stop_signal_interrupts_a_stuck_tick(world: World) -> None:
    world.pipeline("p", cron="*/5 * * * *")
    s = world.scheduler()
    reached: list[str] = []

    def tick() -> float:  # a tick waiting on a broker that never answers
        os.kill(os.getpid(), signal.SIGTERM)
        reached.append("held")
        os.kill(os.getpid(), signal.SIGINT)
        reached.append("not reached")
        return 60.0

    s.tick = tick  # type: ignore[method-assign]
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with pytest.raises(KeyboardInterrupt, match=f"signal {int(signal.SIGINT)}"):
            s.run_forever()
        assert reached == ["held"]
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_the_process_launcher_runs_the_pipeline_as_a_scheduled_run(world: World) -> None:
    from vmbuild.pipeline.scheduler import ProcessLauncher

    path = world.pipeline("p")
    [loaded] = world.scheduler().pipelines.values()
    argv = ProcessLauncher(world.db, Path("/srv/images")).argv(loaded, "schedule")
    assert argv[1:] == [
        "-m", "vmbuild", "pipeline", "run", str(path.resolve()), "--trigger", "schedule",
        "--quiet", "--history", str(world.db), "--store", "/srv/images",
    ]  # fmt: skip


def test_the_schedulers_variables_reach_its_runs_in_order_of_precedence() -> None:
    from vmbuild.config.variables import Given, as_environment

    given = Given(
        cli={"a": "cli"}, files={"a": "file", "b": "file", "c": True, "d": 3},
        env={"VMBUILD_VAR_b": "env", "VMBUILD_VAR_a": "env"},
    )  # fmt: skip
    # b stays the environment's (it wins over a var file); a is the --var.
    assert as_environment(given) == {
        "VMBUILD_VAR_a": "cli", "VMBUILD_VAR_c": "true", "VMBUILD_VAR_d": "3",
    }  # fmt: skip
