"""The SQLite run history: records, queries, stale runs, scheduler state, and many
writers at once (separate connections, as separate processes would have)."""

from __future__ import annotations

import sqlite3
import threading
from datetime import timedelta
from pathlib import Path

import pytest

from tests.support.pipeline import T0
from vmbuild.errors import VmbuildError
from vmbuild.pipeline.history import SCHEMA_VERSION, History, default_path


@pytest.fixture
def history(tmp_path: Path) -> History:
    return History(tmp_path / "state" / "history.sqlite")


def test_a_run_round_trips(history: History) -> None:
    run_id = history.start_run("p", "/x/p.yaml", "schedule", T0, reason="slot 03:00")
    r = history.get(run_id)
    assert (r.pipeline, r.trigger, r.status, r.reason, r.started) == (
        "p", "schedule", "running", "slot 03:00", T0,
    )  # fmt: skip
    assert r.ended is None and r.duration is None and r.pid and r.host
    history.update_run(
        run_id, status="succeeded", ended=T0 + timedelta(seconds=95),
        timings={"builder": 60.5, "convert": 10.0}, artifact="/s/img/1.0.0/b", image="img/1.0.0/b",
        ami_ids={"us-east-1": "ami-123"}, deps={"recipe": {"sha256": "ab"}},
        pruned=[{"image": "img/1.0.0/a", "reason": "old"}], log_path="/l/run.log",
    )  # fmt: skip
    r = history.get(run_id)
    assert r.status == "succeeded" and r.duration == 95
    assert r.timings == {"builder": 60.5, "convert": 10.0}
    assert r.ami_ids == {"us-east-1": "ami-123"}
    assert r.deps == {"recipe": {"sha256": "ab"}}
    assert r.pruned[0]["image"] == "img/1.0.0/a"
    data = r.to_json()
    assert data["started"] == "2026-06-01T12:00:00.000000Z" and data["duration"] == 95


def test_unknown_fields_and_runs_are_errors(history: History) -> None:
    run_id = history.start_run("p", None, "manual", T0)
    with pytest.raises(ValueError, match="unknown run fields"):
        history.update_run(run_id, colour="red")
    with pytest.raises(VmbuildError, match="no run 999"):
        history.get(999)


def test_list_is_newest_first_and_filters(history: History) -> None:
    a = history.start_run("a", None, "manual", T0)
    b = history.record_skipped("b", None, "schedule", T0, "busy")
    c = history.start_run("a", None, "schedule", T0)
    history.update_run(a, status="succeeded")
    assert [r.id for r in history.list_runs()] == [c, b, a]
    assert [r.id for r in history.list_runs("a")] == [c, a]
    assert [r.id for r in history.list_runs(status="skipped")] == [b]
    assert [r.id for r in history.list_runs(limit=1)] == [c]
    assert history.get(b).ended == T0


def test_last_succeeded(history: History) -> None:
    assert history.last_succeeded("p") is None
    first = history.start_run("p", None, "manual", T0)
    history.update_run(first, status="succeeded")
    failed = history.start_run("p", None, "manual", T0)
    history.update_run(failed, status="failed")
    last = history.last_succeeded("p")
    assert last is not None and last.id == first


def test_abandon_stale_marks_only_that_pipelines_running_rows(history: History) -> None:
    dead = history.start_run("p", None, "schedule", T0)
    other = history.start_run("q", None, "schedule", T0)
    assert history.abandon_stale("p", T0, "process died") == [dead]
    assert history.get(dead).status == "failed" and history.get(dead).error == "process died"
    assert history.get(other).status == "running"


def test_scheduler_state(history: History) -> None:
    assert history.schedule_state("p") is None
    history.set_schedule_state("p", "0 3 * * * @ UTC", T0, T0)
    history.set_schedule_state("p", "0 3 * * * @ UTC", T0 + timedelta(days=1), T0)
    assert history.schedule_state("p") == ("0 3 * * * @ UTC", T0 + timedelta(days=1))


def test_state_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    with History(path) as h:
        h.set_schedule_state("p", "k", T0, T0)
        run_id = h.start_run("p", None, "manual", T0)
    with History(path) as h:
        assert h.schedule_state("p") == ("k", T0)
        assert h.get(run_id).pipeline == "p"


def test_wal_mode_and_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    History(path).close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    History(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(VmbuildError, match="newer than this vmbuild"):
        History(path)


def test_an_unusable_path_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(VmbuildError, match="cannot open the run history"):
        History(tmp_path / "file" / "h.sqlite")


def test_default_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VMBUILD_HISTORY", str(tmp_path / "x.sqlite"))
    assert default_path() == tmp_path / "x.sqlite"
    monkeypatch.delenv("VMBUILD_HISTORY")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert default_path() == tmp_path / "state" / "vmbuild" / "history.sqlite"


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    """A scheduler, a manual run and a reader at once: every write lands, none fails."""
    path = tmp_path / "h.sqlite"
    History(path).close()
    errors: list[BaseException] = []
    per_writer = 60

    def writer(name: str) -> None:
        try:
            with History(path) as h:
                for i in range(per_writer):
                    run_id = h.start_run(name, None, "manual", T0)
                    h.update_run(run_id, status="succeeded", timings={"i": i})
                    h.set_schedule_state(name, "k", T0 + timedelta(minutes=i), T0)
                    h.abandon_stale(name, T0, "x")  # a read-then-write transaction
        except BaseException as exc:
            errors.append(exc)

    def reader() -> None:
        try:
            with History(path) as h:
                for _ in range(200):
                    h.list_runs(limit=5)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(f"p{i}",)) for i in range(4)]
    threads.append(threading.Thread(target=reader))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    with History(path) as h:
        runs = h.list_runs(limit=1000)
        assert len(runs) == 4 * per_writer
        assert all(r.status == "succeeded" for r in runs)
        assert h.schedule_state("p3") == ("k", T0 + timedelta(minutes=per_writer - 1))


V1_SCHEMA = """
CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, pipeline TEXT NOT NULL,
  pipeline_file TEXT, trigger TEXT NOT NULL, status TEXT NOT NULL, reason TEXT,
  started TEXT NOT NULL, ended TEXT, timings TEXT, artifact TEXT, image TEXT, ami_ids TEXT,
  log_path TEXT, error TEXT, log_tail TEXT, deps TEXT, pruned TEXT, pid INTEGER, host TEXT);
CREATE TABLE scheduler_state (pipeline TEXT PRIMARY KEY, schedule TEXT NOT NULL,
  last_slot TEXT NOT NULL, updated TEXT NOT NULL);
INSERT INTO runs (pipeline, trigger, status, started, timings)
  VALUES ('old', 'manual', 'succeeded', '2026-06-01T12:00:00.000000Z', '{"build": 1.5}');
PRAGMA user_version = 1;
"""


def test_a_version_1_file_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    db = sqlite3.connect(path)
    db.executescript(V1_SCHEMA)
    db.close()
    with History(path) as h:
        [old] = h.list_runs()
        assert (old.pipeline, old.timings, old.worker, old.attempts) == (
            "old",
            {"build": 1.5},
            None,
            0,
        )
        new = h.start_run("p", None, "manual", T0, status="queued", kind="build", queue="tcg")
        assert (h.get(new).kind, h.get(new).queue) == ("build", "tcg")
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2


def test_transition_applies_only_from_the_given_states(history: History) -> None:
    run_id = history.start_run("p", None, "manual", T0, status="queued")
    claimed = history.transition(run_id, ("queued",), status="running", worker="w1", heartbeat=T0)
    assert claimed is not None and (claimed.status, claimed.worker, claimed.heartbeat) == (
        "running",
        "w1",
        T0,
    )
    assert history.transition(run_id, ("queued",), status="running", worker="w2") is None
    # A takeover only when the lease is the one that was seen (compare-and-set).
    stale = T0 + timedelta(seconds=1)
    assert (
        history.transition(run_id, ("running",), expect={"heartbeat": stale}, worker="w2") is None
    )
    taken = history.transition(run_id, ("running",), expect={"heartbeat": T0}, worker="w2")
    assert taken is not None and taken.worker == "w2"
    assert history.get(run_id).worker == "w2"


def test_abandon_stale_leaves_worker_runs_to_their_lease(history: History) -> None:
    local = history.start_run("p", None, "manual", T0)
    remote = history.start_run("p", None, "manual", T0, task_id="t-1", kind="build")
    assert history.abandon_stale("p", T0, "died") == [local]
    assert history.get(remote).status == "running"
