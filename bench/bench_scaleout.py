"""Scale-out benchmark (`make bench`): redis-server and PostgreSQL started here on
127.0.0.1, two `vmbuild worker` processes (2 slots each), no VM.

1. Queueing overhead per run: submit (history row + message) -> the worker's `start`
   event (claimed) -> the run's first stage event (its child process is running),
   one run at a time, median of N.
2. Throughput: N no-VM runs (0 s of work each) submitted at once over the 2 workers.

Run times are those of the machine: `uptime` is printed with them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.services import postgres_server, redis_server, start_worker  # noqa: E402
from vmbuild.pipeline.history import History  # noqa: E402
from vmbuild.scaleout import events  # noqa: E402
from vmbuild.scaleout.app import make_app  # noqa: E402
from vmbuild.scaleout.submit import submit  # noqa: E402


def overhead(app: object, history: History, client: object, n: int) -> tuple[float, float]:
    to_start, to_stage = [], []
    for _ in range(n):
        t0 = time.time()
        sent = submit(app, history, kind="noop", name="bench", queue="tcg",
                      options={"seconds": 0})  # fmt: skip
        start = stage = None
        for event in events.follow(client, sent.run_id, block_ms=60_000):
            assert event is not None, "no event in 60 s"
            if event["kind"] == "start":
                start = event["time"]
            elif event["kind"] == "stage" and stage is None:
                stage = event["time"]
            elif event["kind"] == "end":
                break
        assert start is not None and stage is not None
        to_start.append(start - t0)
        to_stage.append(stage - t0)
    return statistics.median(to_start), statistics.median(to_stage)


def throughput(app: object, history: History, client: object, n: int) -> float:
    t0 = time.monotonic()
    ids = [submit(app, history, kind="noop", name="bench", queue="tcg",
                  options={"seconds": 0}).run_id for _ in range(n)]  # fmt: skip
    for run_id in ids:
        for event in events.follow(client, run_id, block_ms=300_000):
            assert event is not None, "no end event in 300 s"
            if event["kind"] == "end":
                assert event["status"] == "succeeded", event
                break
    return time.monotonic() - t0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10, help="runs for the overhead median")
    parser.add_argument("--tasks", type=int, default=40, help="runs for the throughput")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="vmbuild-bench-scale-"))
    with redis_server(root / "redis") as broker, postgres_server() as pg:
        workers = [start_worker(root, name, ["tcg"], broker=broker, history=pg, concurrency=2)
                   for name in ("w1", "w2")]  # fmt: skip
        try:
            app = make_app(broker)
            client = events.connect(broker)
            with History(pg) as history:
                load = os.getloadavg()[0]
                start, stage = overhead(app, history, client, args.runs)
                took = throughput(app, history, client, args.tasks)
                per_worker = {
                    w.name: len(history.list_runs("bench", worker=f"{w.name}@test", limit=9999))
                    for w in workers
                }
        finally:
            for w in workers:
                w.stop()
    print("scale-out (2 workers x 2 slots, redis + postgresql on 127.0.0.1, no VM)")
    print(f"  submit -> worker claimed the run:   {start * 1000:7.0f} ms (median of {args.runs})")
    print(f"  submit -> run's process running:    {stage * 1000:7.0f} ms (median of {args.runs})")
    print(
        f"  throughput: {args.tasks} runs in {took:.1f} s = {args.tasks / took * 60:.0f} runs/min"
    )
    print(f"  runs per worker (all phases): {per_worker}")
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"  load at start {load:.2f}; uptime: {uptime}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
