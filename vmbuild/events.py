"""`--json` progress: the Reporter protocol (vmbuild.progress) as one JSON event per line.

Each line on stdout is a complete JSON object, flushed as it happens, validated by
the published schema `vmbuild/schemas/events.schema.json` (`"schema": "vmbuild.event/1"`;
a new required field or event type is a new version). Event types:

    start        the build begins: recipe path, image name and version
    stage-start  a stage begins (name, title)
    stage-end    it ended: status ok | failed | interrupted, seconds
    status       a human line about what is happening
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
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, TextIO

from vmbuild.secrets import mask

log = logging.getLogger("vmbuild")

SCHEMA = "vmbuild.event/1"
BYTES_INTERVAL = 0.5  # seconds between two `bytes` events of one transfer


class JsonReporter:
    """A Reporter writing events to `stream` (stdout): one JSON object per line."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self._stages: list[str] = []
        self._last_bytes = 0.0

    def emit(self, event_type: str, /, **fields: Any) -> None:
        event = {
            "schema": SCHEMA,
            "type": event_type,
            "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        }
        if self._stages and "stage" not in fields:
            event["stage"] = self._stages[-1]
        event.update(fields)
        # Guest output, errors and the manifest may quote a secret parameter value.
        self.stream.write(mask(json.dumps(event, default=str)) + "\n")
        self.stream.flush()

    @contextlib.contextmanager
    def stage(self, name: str, title: str) -> Iterator[None]:
        # The run log reads the same whichever reporter the build has: stage
        # markers, status lines and output go to it here as in log.Reporter.
        log.info("== stage %s: %s", name, title)
        self.emit("stage-start", stage=name, title=title)
        self._stages.append(name)
        start = time.monotonic()
        status = "failed"
        try:
            yield
            status = "ok"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            self._stages.pop()
            seconds = round(time.monotonic() - start, 2)
            log.info("== stage %s %s after %.1fs", name, status, seconds)
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
