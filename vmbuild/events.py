"""`--json` progress: the Reporter protocol (vmbuild.progress) as one JSON event per line.

Each line on stdout is a complete JSON object, flushed as it happens, validated by
the published schema `vmbuild/schemas/events.schema.json` (`"schema": "vmbuild.event/1"`;
a new required field or event type is a new version). Event types:

    start        the build begins: recipe path, image name and version
    stage-start  a stage begins (name, title)
    stage-end    it ended: status ok | failed | interrupted, seconds
    status       a human line about what is happening; a heartbeat (`elapsed` set)
                 after HEARTBEAT seconds without any event during a stage
    output       a line of guest or tool output, literally
    bytes        transfer or conversion progress (throttled): done, total, percent
    warning      a warning vmbuild logged
    result       the stored artifact: path and manifest (schemas/manifest.schema.json)
    error        the build failed: message, hint, error kind, exit code

A consumer reads lines until `result` or `error`; every line carries the time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TextIO

from vmbuild.log import logged_stage
from vmbuild.secrets import mask

log = logging.getLogger("vmbuild")

SCHEMA = "vmbuild.event/1"
BYTES_INTERVAL = 0.5  # seconds between two `bytes` events of one transfer
# Seconds without an event, during a stage, before a heartbeat `status`. Long
# silent waits are normal (a TCG boot, cloud-init, a convert without -p): a
# wrapper or CI log needs to tell them from a hang. 10 s lets a watcher time
# out at 30 s (three missed beats) without false alarms, far inside CI
# no-output limits (minutes), and costs at most 6 lines a minute of silence.
HEARTBEAT = 10.0


class Heartbeat:
    """Calls `beat(stage, title, elapsed)` after every `interval` seconds in which
    nothing was emitted (`seen()` not called) while a stage runs.

    The one heartbeat of every event stream vmbuild writes: `build --json` and
    `pipeline run --json` (JsonReporter) and a scale-out run's Redis stream
    (scaleout.child.EventProgress). One thread per outermost stage, joined when
    it ends; `beat` is called without the lock held, so it may emit (and so call
    `seen()`) itself."""

    def __init__(
        self, beat: Callable[[str, str, float], None], interval: float = HEARTBEAT
    ) -> None:
        self._beat = beat
        self.interval = interval
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._stages: list[tuple[str, str, float]] = []  # name, title, monotonic start

    def seen(self) -> None:
        """Something was emitted: the next beat is `interval` seconds from now."""
        with self._lock:
            self._last = time.monotonic()

    @contextlib.contextmanager
    def stage(self, name: str, title: str) -> Iterator[None]:
        with self._lock:
            self._stages.append((name, title, time.monotonic()))
            outermost = len(self._stages) == 1
        try:
            with self._beating() if outermost else contextlib.nullcontext():
                yield
        finally:
            with self._lock:
                self._stages.pop()

    @contextlib.contextmanager
    def _beating(self) -> Iterator[None]:
        stop = threading.Event()

        def run() -> None:
            while True:
                with self._lock:
                    due = self._last + self.interval
                if stop.wait(max(0.0, due - time.monotonic())):
                    return
                with self._lock:
                    silent = time.monotonic() - self._last >= self.interval
                    current = self._stages[-1] if self._stages else None
                if current is None or not silent:
                    continue
                name, title, start = current
                try:
                    self._beat(name, title, round(time.monotonic() - start, 1))
                except (OSError, ValueError):
                    return  # the stream went away (a closed pipe): the caller reports that

        thread = threading.Thread(target=run, name="heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


def heartbeat_text(title: str, elapsed: float) -> str:
    return f"{title}: running for {elapsed:.0f}s"


class JsonReporter:
    """A Reporter writing events to `stream` (stdout): one JSON object per line."""

    def __init__(self, stream: TextIO | None = None, *, heartbeat: float = HEARTBEAT) -> None:
        self.stream = stream or sys.stdout
        self._stages: list[str] = []  # the names of the stages running, outermost first
        self._last_bytes = 0.0
        # The heartbeat thread writes too: one event at a time, whole lines.
        self._lock = threading.Lock()
        self._heartbeat = Heartbeat(self._beat, heartbeat)

    def emit(self, event_type: str, /, **fields: Any) -> None:
        event = {
            "schema": SCHEMA,
            "type": event_type,
            "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        }
        with self._lock:
            if self._stages and "stage" not in fields:
                event["stage"] = self._stages[-1]
            event.update(fields)
            # Guest output, errors and the manifest may quote a secret parameter value.
            self.stream.write(mask(json.dumps(event, default=str)) + "\n")
            self.stream.flush()
        self._heartbeat.seen()

    def _beat(self, name: str, title: str, elapsed: float) -> None:
        self.emit("status", stage=name, text=heartbeat_text(title, elapsed), elapsed=elapsed)

    @contextlib.contextmanager
    def stage(self, name: str, title: str) -> Iterator[None]:
        # The run log reads the same whichever reporter the build has: stage
        # markers, status lines and output go to it here as in log.Reporter.
        with logged_stage(name, title):
            yield from self._emitted_stage(name, title)

    def _emitted_stage(self, name: str, title: str) -> Iterator[None]:
        self.emit("stage-start", stage=name, title=title)
        start = time.monotonic()
        with self._lock:
            self._stages.append(name)
        status = "failed"
        try:
            with self._heartbeat.stage(name, title):
                yield
            status = "ok"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            with self._lock:
                self._stages.pop()
            seconds = round(time.monotonic() - start, 2)
            self.emit("stage-end", stage=name, title=title, status=status, seconds=seconds)

    def status(self, text: str) -> None:
        log.info("%s", mask(text))
        self.emit("status", text=text)

    def output(self, line: str) -> None:
        log.debug("| %s", mask(line))
        self.emit("output", line=line)

    def bytes(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        if done != total and now - self._last_bytes < BYTES_INTERVAL:
            return
        self._last_bytes = now
        if total:
            self.emit("bytes", done=done, total=total, percent=round(100 * done / total, 2))
        else:
            self.emit("bytes", done=done, total=total)

    @contextlib.contextmanager
    def warnings(self) -> Iterator[None]:
        """While active, vmbuild's logged warnings (and errors) become `warning` events."""
        handler = _WarningEvents(self)
        root = logging.getLogger("vmbuild")
        root.addHandler(handler)
        try:
            yield
        finally:
            root.removeHandler(handler)


class _WarningEvents(logging.Handler):
    def __init__(self, reporter: JsonReporter) -> None:
        super().__init__(level=logging.WARNING)
        self.reporter = reporter

    def emit(self, record: logging.LogRecord) -> None:
        self.reporter.emit("warning", text=record.getMessage(), logger=record.name)
