"""Scale-out without a VM, on real parts: redis-server (broker) and PostgreSQL (shared
history) started here on 127.0.0.1, two `vmbuild worker` processes with their own cache
dirs standing in for two hosts, and the CLI as a subprocess.

Worker w1 serves tcg + kvm, w2 serves tcg + arm64: kvm work must run on w1, arm64
work on w2, tcg work on either; nothing serves `aws`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.services import REPO, Output, Worker, postgres_server, redis_server, start_worker
from vmbuild.pipeline.history import History
from vmbuild.scaleout import events
from vmbuild.scaleout.app import make_app
from vmbuild.scaleout.submit import submit

VMBUILD = [sys.executable, "-m", "vmbuild"]


class Cluster:
    def __init__(self, root: Path, broker: str, history: str) -> None:
        self.root = root
        self.broker = broker
        self.history = history
        self.env = {**os.environ, "VMBUILD_BROKER": broker, "VMBUILD_HISTORY": history,
                    "VMBUILD_STORE": str(root / "store")}  # fmt: skip
        self.workers: list[Worker] = []

    def vmbuild(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*VMBUILD, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=REPO)  # fmt: skip

    def submit_noop(self, queue: str, seconds: float = 0.2) -> int:
        """Through the CLI, as a user would."""
        proc = self.vmbuild("submit", "--noop", str(seconds), "--queue", queue, "--json")
        assert proc.returncode == 0, proc.stderr
        return int(json.loads(proc.stdout)["run"])

    def submit_many(self, queues: list[str], seconds: float) -> dict[int, str]:
        """Through the library, back to back (the CLI's start-up would space them out)."""
        app = make_app(self.broker)
        with History(self.history) as h:
            return {submit(app, h, kind="noop", name="noop", queue=q,
                           options={"seconds": seconds}).run_id: q for q in queues}  # fmt: skip

    def wait_end(self, run_id: int, timeout: float = 120) -> dict[str, Any]:
        """The run's `end` event (published by the worker that ran it)."""
        client = events.connect(self.broker)
        for event in events.follow(client, run_id, block_ms=int(timeout * 1000)):
            assert event is not None, f"run {run_id}: no end event in {timeout}s"
            if event["kind"] == "end":
                return event
        raise AssertionError("unreachable")

    def wait_event(self, run_id: int, kind: str, timeout: float = 60) -> dict[str, Any]:
        client = events.connect(self.broker)
        for event in events.follow(client, run_id, block_ms=int(timeout * 1000)):
            assert event is not None, f"run {run_id}: no {kind} event in {timeout}s"
            if event["kind"] == kind:
                return event
        raise AssertionError(f"run {run_id} ended without a {kind} event")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("scaleout")
    with redis_server(root / "redis") as broker, postgres_server() as pg:
        c = Cluster(root, broker, pg)
        try:
            c.workers.append(start_worker(root, "w1", ["tcg", "kvm"], broker=broker, history=pg))
            c.workers.append(start_worker(root, "w2", ["tcg", "arm64"], broker=broker, history=pg))
            yield c
        finally:
            for w in c.workers:
                w.stop()


def test_ten_tasks_spread_over_both_workers_with_routing_respected(cluster: Cluster) -> None:
    plan = ["kvm"] * 3 + ["arm64"] * 3 + ["tcg"] * 4
    ids = cluster.submit_many(plan, 0.5)
    ends = {run_id: cluster.wait_end(run_id) for run_id in ids}
    assert all(e["status"] == "succeeded" for e in ends.values()), ends
    with History(cluster.history) as h:
        runs = {r.id: r for r in h.list_runs(limit=100) if r.id in ids}
    assert set(runs) == set(ids)
    for run_id, queue in ids.items():
        r = runs[run_id]
        assert (r.kind, r.queue, r.status, r.attempts) == ("noop", queue, "succeeded", 1)
        assert r.ended is not None and r.heartbeat is not None
        if queue == "kvm":
            assert r.worker == "w1@test"
        elif queue == "arm64":
            assert r.worker == "w2@test"
    # The history in PostgreSQL has rows from both workers.
    assert {r.worker for r in runs.values()} == {"w1@test", "w2@test"}
    shown = cluster.vmbuild("runs", "show", str(next(iter(ids))))
    assert "worker:   w1@test" in shown.stdout and "attempts: 1" in shown.stdout
    listed = cluster.vmbuild("runs", "list", "--limit", "10")
    assert listed.returncode == 0 and "w1@test" in listed.stdout and "w2@test" in listed.stdout


def test_a_task_for_an_unserved_queue_stays_queued_and_is_reported(cluster: Cluster) -> None:
    proc = cluster.vmbuild("submit", "--noop", "0.1", "--queue", "aws")
    assert proc.returncode == 0, proc.stderr
    run_id = int(proc.stdout.split()[1])
    assert f"run {run_id} queued on aws (NO worker serves queue 'aws' now" in proc.stdout
    assert "warning: no worker consumes queue 'aws'" in proc.stderr
    # A tcg run submitted after it starts and ends: the workers are not stuck on it.
    later = cluster.submit_noop("tcg", 0.1)
    assert cluster.wait_end(later)["status"] == "succeeded"
    with History(cluster.history) as h:
        r = h.get(run_id)
        assert (r.status, r.worker, r.queue) == ("queued", None, "aws")
    assert events.connect(cluster.broker).llen("aws") == 1  # still in the broker
    listed = cluster.vmbuild("runs", "list", "--status", "queued")
    assert "(aws)" in listed.stdout
    # Cancelling a queued run: it never starts.
    proc = cluster.vmbuild("runs", "cancel", str(run_id))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"run {run_id} cancelled (it was queued on aws)"
    with History(cluster.history) as h:
        assert h.get(run_id).status == "cancelled"
    again = cluster.vmbuild("runs", "cancel", str(run_id))
    assert again.returncode == 1 and f"run {run_id} is already cancelled" in again.stderr


def test_cancel_of_a_running_task_stops_its_process(cluster: Cluster) -> None:
    run_id = cluster.submit_noop("kvm", 3600)
    start = cluster.wait_event(run_id, "start")
    assert start["worker"] == "w1@test"
    cluster.wait_event(run_id, "stage")  # the child is running the task
    with History(cluster.history) as h:
        child_pid = h.get(run_id).pid
    assert child_pid is not None and Path(f"/proc/{child_pid}").exists()
    proc = cluster.vmbuild("runs", "cancel", str(run_id), "--wait", "--timeout", "60")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == [f"run {run_id}: cancel sent to w1@test",
                                        f"run {run_id} cancelled"]  # fmt: skip
    with History(cluster.history) as h:
        r = h.get(run_id)
    assert (r.status, r.error) == ("cancelled", "cancelled (runs cancel); cleaned up")
    assert not Path(f"/proc/{child_pid}").exists()
    # The worker goes on: another kvm run succeeds on it.
    assert cluster.wait_end(cluster.submit_noop("kvm", 0.1))["worker"] == "w1@test"


def test_a_failing_task_is_recorded_with_its_error(cluster: Cluster) -> None:
    proc = cluster.vmbuild("submit", "--noop", "0", "--noop-fail", "disk full (ENOSPC)", "--queue",
                           "arm64", "--wait")  # fmt: skip
    assert proc.returncode == 1
    run_id = int(proc.stdout.split()[1])
    assert f"error: run {run_id} failed: disk full (ENOSPC)" in proc.stderr
    assert f"run {run_id} failed on w2@test" in proc.stdout
    # Seen from a host without the worker's files: the log comes from the run's events.
    with History(cluster.history) as h:
        log_path = Path(h.get(run_id).log_path or "")
    assert log_path.is_relative_to(cluster.root / "w2" / "cache")
    log_path.unlink()
    logs = cluster.vmbuild("runs", "logs", str(run_id))
    assert logs.returncode == 0, logs.stderr
    assert f"the log is on w2@test ({log_path})" in logs.stderr
    lines = [line.split(" ", 2)[2] for line in logs.stdout.splitlines()]
    assert lines == ["start  started on w2@test (attempt 1)",
                     "stage  stage noop started: no-VM task (0.0s)",
                     "status on w2@test",
                     "stage  stage noop failed: no-VM task (0.0s) (0.0s)",
                     "end    failed: disk full (ENOSPC)"]  # fmt: skip


def test_the_scheduler_enqueues_a_due_pipeline(cluster: Cluster, tmp_path: Path) -> None:
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "r.yaml").write_text(
        yaml.safe_dump({"name": "sched-img", "version": "1.0.0", "base": "debian-12"})
    )
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    (pipelines / "nightly.yaml").write_text(yaml.safe_dump({
        "recipe": "../recipes/r.yaml", "schedule": {"cron": "0 3 * * *", "timezone": "UTC"},
    }))  # fmt: skip
    with History(cluster.history) as h:
        # The daemon was down over the 03:00 slot: it is due at start.
        now = datetime.now(UTC)
        h.set_schedule_state("nightly", "0 3 * * * @ UTC", now - timedelta(days=2), now)
    env = {**cluster.env, "XDG_STATE_HOME": str(tmp_path / "state")}
    daemon = subprocess.Popen(
        [*VMBUILD, "scheduler", "--pipelines", str(pipelines), "--queue", "nowhere"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO,
    )  # fmt: skip
    out = Output(daemon, tmp_path / "scheduler.log")
    try:
        line = out.wait_for("nightly: queued run", 60)
        run_id = int(line.split("queued run ")[1].split(":")[0])
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(60)
    assert code == 0, out.text()
    with History(cluster.history) as h:
        r = h.get(run_id)
    assert (r.pipeline, r.kind, r.trigger, r.queue) == (
        "nightly",
        "pipeline",
        "schedule",
        "nowhere",
    )
    assert r.pipeline_file == str((pipelines / "nightly.yaml").resolve())
    # Stopping the scheduler cancelled the run it had queued, as it stops local runs.
    assert r.status == "cancelled"
    assert "Traceback" not in out.text()
