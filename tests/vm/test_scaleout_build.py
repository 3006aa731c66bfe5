"""One real build through the scale-out path: submitted to Redis, run by a worker, stored in
S3 (moto's server), listed with `images list --store s3://...`. The worker that starts it is
SIGKILLed mid-build (its QEMU running): the build leaves no QEMU behind, is redelivered to
the other worker, succeeds once and stores one artifact.

Redis, PostgreSQL and moto are started here on 127.0.0.1; the two workers are separate
processes with separate cache dirs. Redelivery waits for the visibility timeout, set short
(30 s) for the test; the run's lease keeps a live run from being built twice meanwhile."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from tests.support.motoext import MotoServer, aws_env
from tests.support.services import postgres_server, redis_server, start_worker
from tests.vm.conftest import qemu_pids, vmbuild
from vmbuild.pipeline.history import History
from vmbuild.scaleout import events
from vmbuild.stages import base_image

pytestmark = pytest.mark.vm

BUCKET = "builds"
STORE = f"s3://{BUCKET}/team"
HELLO = """\
name: hello
description: one quick step, so the build is short
schemaVersion: 1.0
phases:
  - name: build
    steps:
      - name: Hello
        action: ExecuteBash
        inputs:
          commands: ["echo built by a worker > /etc/vmbuild-worker"]
"""


@pytest.fixture
def moto(tmp_path: Path) -> Iterator[MotoServer]:
    server = MotoServer()
    server.start(tmp_path / "moto.log")
    try:
        yield server
    finally:
        server.stop()


def wait_until(predicate: object, timeout: float, what: str) -> None:
    """Poll the process table (QEMU has no event to wait on from outside)."""
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.5)


def test_a_build_survives_the_loss_of_its_worker(
    debian_base: base_image.BaseImage, tmp_path: Path, moto: MotoServer
) -> None:
    aws = aws_env(moto.url)
    boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing",
                 ).create_bucket(Bucket=BUCKET)  # fmt: skip
    (tmp_path / "hello.yaml").write_text(HELLO)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"name: scale-img\nversion: 1.0.0\nbase: {debian_base.path}\n"
        "components:\n  - name: ./hello.yaml\noutputs: [qcow2]\nvm: {memory: 1G, cpus: 2}\n"
    )
    with redis_server(tmp_path / "redis") as broker, postgres_server() as pg:
        env = {**os.environ, **aws, "VMBUILD_BROKER": broker, "VMBUILD_HISTORY": pg,
               "VMBUILD_VISIBILITY_TIMEOUT": "30"}  # fmt: skip
        a = start_worker(tmp_path, "a", ["tcg"], broker=broker, history=pg, concurrency=1,
                         env={**aws, "VMBUILD_VISIBILITY_TIMEOUT": "30"})  # fmt: skip
        b = None
        try:
            proc = vmbuild("submit", str(recipe), "--store", STORE, "--skip-tests",
                           "--accel", "tcg", "--json", env=env, timeout=120)  # fmt: skip
            assert proc.returncode == 0, proc.stderr
            sent = json.loads(proc.stdout)
            run_id = sent["run"]
            assert sent["served_by"] == ["a@test"]

            client = events.connect(broker)
            for event in events.follow(client, run_id, block_ms=300_000):
                assert event is not None and event["kind"] != "end", event
                if event["kind"] == "stage" and event["stage"] == "builder":
                    break
            wait_until(lambda: qemu_pids(a.cache), 120, "worker a's builder VM")
            with History(pg) as h:
                first = h.get(run_id)
            assert (first.status, first.worker, first.attempts) == ("running", "a@test", 1)
            child = first.pid
            assert child is not None

            a.kill()  # the host dies: SIGKILL of the worker process alone
            # Its run stops with it (PDEATHSIG): the child unwinds and kills its QEMU.
            wait_until(lambda: not Path(f"/proc/{child}").exists(), 120, "the orphaned run")
            assert not qemu_pids(a.cache)
            assert not list((a.cache / "store-staging").rglob("*.qcow2"))

            b = start_worker(tmp_path, "b", ["tcg"], broker=broker, history=pg, concurrency=1,
                             env={**aws, "VMBUILD_VISIBILITY_TIMEOUT": "30"})  # fmt: skip
            end = None
            for event in events.follow(client, run_id, block_ms=1_200_000):
                assert event is not None, "no end event"
                if event["kind"] == "end":
                    end = event
                    break
            assert end is not None
            assert (end["status"], end["worker"]) == ("succeeded", "b@test"), end
            with History(pg) as h:
                done = h.get(run_id)
            assert (done.status, done.worker, done.attempts) == ("succeeded", "b@test", 2)
            assert done.reason == "redelivered: a@test stopped (lease expired)"
            assert done.artifact == f"{STORE}/{done.image}"

            # One artifact, in S3, listed by the CLI; nothing left on the worker.
            listed = vmbuild("images", "list", "--store", STORE, "--json", env=env, timeout=120)
            assert listed.returncode == 0, listed.stderr
            assert [r["ref"] for r in json.loads(listed.stdout)] == [done.image]
            s3 = boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip
            keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]]
            assert [k for k in keys if k.endswith("manifest.json")] == [
                f"team/{done.image}/manifest.json"
            ]
            assert not qemu_pids(a.cache) and not qemu_pids(b.cache)
            assert not list((b.cache / "store-staging").rglob("*.qcow2"))
            shown = vmbuild("runs", "show", str(run_id), env=env, timeout=120)
            assert "worker:   b@test" in shown.stdout and "attempts: 2" in shown.stdout
        finally:
            for w in (a, b):
                if w is not None:
                    w.stop()
