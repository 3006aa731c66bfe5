"""The run history on PostgreSQL (a server started here on 127.0.0.1): the SQLite
history's own test cases, unchanged, then many writers at once and the schema guard."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from tests.support.pipeline import T0
from tests.support.services import postgres_server
from tests.unit.pipeline import test_history as sqlite_cases
from vmbuild.errors import VmbuildError
from vmbuild.pipeline.history import SCHEMA_VERSION, History


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture
def database(server: str) -> str:
    """A fresh database per test on the shared server."""
    name = f"t{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(server.replace("postgresql://", "postgresql+psycopg://"),
                              isolation_level="AUTOCOMMIT")  # fmt: skip
    with engine.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    engine.dispose()
    return server.rsplit("/", 1)[0] + f"/{name}"


CASES: list[Callable[[History], None]] = [
    sqlite_cases.test_a_run_round_trips,
    sqlite_cases.test_unknown_fields_and_runs_are_errors,
    sqlite_cases.test_list_is_newest_first_and_filters,
    sqlite_cases.test_last_succeeded,
    sqlite_cases.test_abandon_stale_marks_only_that_pipelines_running_rows,
    sqlite_cases.test_scheduler_state,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_the_sqlite_cases_pass_on_postgresql(case: Callable[[History], None], database: str) -> None:  # fmt: skip
    with History(database) as history:
        case(history)


def test_schema_version_and_a_newer_schema_is_refused(database: str) -> None:
    History(database).close()
    engine = sa.create_engine(database.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:
        assert conn.exec_driver_sql("SELECT version FROM vmbuild_schema").scalar_one() == SCHEMA_VERSION  # fmt: skip
        conn.exec_driver_sql(f"UPDATE vmbuild_schema SET version = {SCHEMA_VERSION + 1}")
    engine.dispose()
    with pytest.raises(VmbuildError, match="newer than this vmbuild"):
        History(database)


def test_a_wrong_url_is_a_clear_error_without_the_password(server: str) -> None:
    port = server.split(":")[-1].split("/")[0]
    with pytest.raises(VmbuildError) as err:
        History(f"postgresql://vmbuild:s3cret@127.0.0.1:{port}/no_such_db")
    assert "cannot open the run history" in str(err.value)
    assert "no_such_db" in str(err.value) and "s3cret" not in str(err.value)


def test_concurrent_writers_lose_nothing(database: str) -> None:
    """Several workers and a reader at once, each with its own connection pool."""
    History(database).close()
    errors: list[BaseException] = []
    per_writer = 40

    def writer(name: str) -> None:
        try:
            with History(database) as h:
                for i in range(per_writer):
                    run_id = h.start_run(name, None, "manual", T0)
                    h.update_run(run_id, status="succeeded", timings={"i": i})
                    h.set_schedule_state(name, "k", T0 + timedelta(minutes=i), T0)
                    h.abandon_stale(name, T0, "x")
        except BaseException as exc:
            errors.append(exc)

    def reader() -> None:
        try:
            with History(database) as h:
                for _ in range(150):
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
    with History(database) as h:
        runs = h.list_runs(limit=1000)
        assert len(runs) == 4 * per_writer
        assert all(r.status == "succeeded" for r in runs)
        assert h.schedule_state("p3") == ("k", T0 + timedelta(minutes=per_writer - 1))


def test_one_of_two_claims_wins(database: str) -> None:
    """Two workers claiming the same queued run at once: exactly one gets it."""
    with History(database) as h:
        run_id = h.start_run("img", None, "manual", T0, status="queued", kind="noop")
    won: list[Any] = []
    barrier = threading.Barrier(8)

    def claim(worker: str) -> None:
        with History(database) as h:
            barrier.wait()
            won.append(h.transition(run_id, ("queued",), status="running", worker=worker))

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    winners = [r for r in won if r is not None]
    assert len(won) == 8 and len(winners) == 1
    with History(database) as h:
        assert h.get(run_id).worker == winners[0].worker
