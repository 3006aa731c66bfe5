"""The --json Reporter: one schema-valid JSON object per line, in order."""

from __future__ import annotations

import io
import json
import logging
import threading

import pytest

from tests.support.schemas import event_lines, validator
from vmbuild.events import JsonReporter
from vmbuild.manifest import BaseRecord, Manifest, OutputRecord, Package, RecipeRecord

SHA = "0123456789abcdef" * 4


def manifest() -> Manifest:
    return Manifest(
        name="web", version="1.0.0-rc.10", build="20261130T120000Z-abc123",
        created="2026-11-30T12:00:00Z", recipe=RecipeRecord("/r/recipe.yaml", SHA),
        base=BaseRecord("debian-12-0123", SHA, "debian-12", "qcow2"),
        components=({"name": "nginx-app", "sha256": SHA, "parameters": {"Port": "80"}},),
        outputs=(OutputRecord("qcow2", "web.qcow2", SHA, 1024, 4 << 30),),
        packages=(Package("nginx", "1.22.1-9", "amd64"),),
        tests={"status": "passed", "testinfra": {"tests": 6}, "components": []},
        timings={"base": 1.5, "total": 99.0}, accelerator={"kind": "tcg"}, backend="qemu",
        vmbuild_version="0.1.0",
    )  # fmt: skip


def test_a_build_as_events() -> None:
    buf = io.StringIO()
    r = JsonReporter(buf)
    r.emit("start", recipe="/r/recipe.yaml", name="web", version="1.0.0")
    with r.warnings():
        with r.stage("base", "base image debian-12"):
            r.status("using cached base")
            r.bytes(0, None)
            r.bytes(10, None)  # throttled: within BYTES_INTERVAL of the previous one
            r.bytes(20, 20)  # complete: always reported
            logging.getLogger("vmbuild.test").warning("disk [/x] nearly full")
        with pytest.raises(RuntimeError), r.stage("components", "components"):
            r.output("\x1b[1m[name]\x1b[0m apt says hi")
            raise RuntimeError("boom")
    r.emit("result", path="/store/web", manifest=manifest().to_json())
    events = event_lines(buf.getvalue())
    assert [(e["type"], e.get("stage")) for e in events] == [
        ("start", None), ("stage-start", "base"), ("status", "base"), ("bytes", "base"),
        ("bytes", "base"), ("warning", "base"), ("stage-end", "base"),
        ("stage-start", "components"), ("output", "components"), ("stage-end", "components"),
        ("result", None),
    ]  # fmt: skip
    assert [e["done"] for e in events if e["type"] == "bytes"] == [0, 20]
    assert events[5]["text"] == "disk [/x] nearly full"
    assert events[6]["status"] == "ok" and events[9]["status"] == "failed"
    assert events[8]["line"] == "\x1b[1m[name]\x1b[0m apt says hi"
    assert all(e["schema"] == "vmbuild.event/1" for e in events)


@pytest.mark.parametrize(
    "bad",
    [
        {"type": "stage-end", "stage": "x", "title": "x", "status": "maybe", "seconds": 1},
        {"type": "error", "message": "m", "kind": "VmbuildError", "exit_code": 1},  # no hint
        {"type": "result", "path": "/p", "manifest": {"name": "web"}},
        {"type": "telemetry"},
    ],
)
def test_the_schema_rejects_malformed_events(bad: dict[str, object]) -> None:
    event = {"schema": "vmbuild.event/1", "time": "2026-11-30T12:00:00.000Z", **bad}
    assert list(validator("events.schema.json").iter_errors(event))


def test_the_manifest_schema_accepts_what_the_build_writes() -> None:
    data = json.loads(json.dumps(manifest().to_json()))
    assert list(validator("manifest.schema.json").iter_errors(data)) == []
    data["outputs"][0]["sha256"] = "not-a-digest"
    assert list(validator("manifest.schema.json").iter_errors(data))


def test_bytes_with_a_known_total_carry_the_percent() -> None:
    def sizes(*reports: tuple[int, int | None]) -> list[tuple[int, float | None]]:
        buf = io.StringIO()
        r = JsonReporter(buf)
        for done, total in reports:
            r.bytes(done, total)
        events = event_lines(buf.getvalue())
        return [(e["done"], e.get("percent")) for e in events if e["type"] == "bytes"]

    assert sizes((1 << 30, 4 << 30), (4 << 30, 4 << 30)) == [(1 << 30, 25.0), (4 << 30, 100.0)]
    assert sizes((7, None)) == [(7, None)]
    assert sizes((0, 0)) == [(0, None)]  # an empty transfer: no percent to give


class _Lines(io.StringIO):
    """A stream that tells a waiting test when a heartbeat was written."""

    def __init__(self) -> None:
        super().__init__()
        self.beat = threading.Event()

    def write(self, s: str) -> int:
        n = super().write(s)
        if '"elapsed"' in s:
            self.beat.set()
        return n


def test_a_silent_stage_gets_heartbeats_and_they_stop_with_it() -> None:
    buf = _Lines()
    r = JsonReporter(buf, heartbeat=0.2)
    with r.stage("base", "base image debian-12"), r.stage("fetch", "download"):
        assert buf.beat.wait(10), "no heartbeat during a silent stage"
    after = buf.getvalue()
    events = event_lines(after)
    beats = [e for e in events if "elapsed" in e]
    assert beats and all(e["type"] == "status" for e in beats)
    assert beats[0]["stage"] == "fetch" and beats[0]["elapsed"] >= 0.2
    assert beats[0]["text"].startswith("download: running for ")
    assert [e["type"] for e in events][-2:] == ["stage-end", "stage-end"]
    # The thread was joined when the outermost stage ended: nothing more comes.
    assert buf.getvalue() == after
    assert all(t.name != "heartbeat" for t in threading.enumerate())


def test_a_scaleout_run_stream_gets_the_same_heartbeat() -> None:
    """A worker's Redis event stream (scaleout.child.EventProgress) beats through
    the same Heartbeat: a `status` with `elapsed` after a silent stretch of a stage,
    none after the stage ended."""
    from vmbuild.scaleout.child import EventProgress

    published: list[tuple[str, dict[str, object]]] = []
    beat = threading.Event()

    def publish(kind: str, **fields: object) -> None:
        published.append((kind, fields))
        if "elapsed" in fields:
            beat.set()

    progress = EventProgress(publish, heartbeat=0.2)
    with progress.stage("builder", "builder VM: boot, SSH, cloud-init"):
        progress.status("booting")
        assert beat.wait(10), "no heartbeat during a silent stage"
    after = list(published)
    kind, fields = next((k, f) for k, f in after if "elapsed" in f)
    assert kind == "status" and fields["stage"] == "builder"
    assert isinstance(fields["elapsed"], float) and fields["elapsed"] >= 0.2
    assert str(fields["text"]).startswith("builder VM: boot, SSH, cloud-init: running for ")
    assert after[0] == (
        "stage",
        {"stage": "builder", "title": "builder VM: boot, SSH, cloud-init", "state": "started"},
    )
    assert after[1] == ("status", {"text": "booting"})
    assert after[-1][0] == "stage" and after[-1][1]["state"] == "done"
    assert published == after  # the beating thread was joined with the stage
    assert all(t.name != "heartbeat" for t in threading.enumerate())
