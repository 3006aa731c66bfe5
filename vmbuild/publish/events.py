"""Distribution events: structured progress of the publish steps (the CLI renders them,
tests record them). A build or pipeline run forwards them to its Reporter
(vmbuild.progress) through `to_reporter`."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from vmbuild.progress import Reporter


@dataclass(frozen=True)
class DistributionEvent:
    """One step forward: `stage` in a `region`, optionally `done` out of `total` units."""

    stage: str
    region: str | None = None
    done: int | None = None
    total: int | None = None
    message: str = ""

    def __str__(self) -> str:
        # Callers that only print lines (the build's status callback) get something readable.
        where = f" {self.region}" if self.region else ""
        amount = ""
        if self.done is not None and self.total:
            amount = f" {100 * self.done // self.total}%"
        text = f" {self.message}" if self.message else ""
        return f"{self.stage}{where}{amount}{text}"


EventCallback = Callable[[DistributionEvent], None]
# Events whose done/total count bytes (the others count percent or nothing).
BYTE_STAGES = frozenset({"upload", "s3-upload"})


class Throttled:
    """Forward progress at most every `interval` seconds (always the first and `force`d ones).

    Exceptions from the callback propagate: a callback may raise KeyboardInterrupt to stop.
    """

    def __init__(self, callback: EventCallback | None, interval: float = 0.5) -> None:
        self.callback = callback
        self.interval = interval
        self._last = 0.0

    def __call__(self, event: DistributionEvent, *, force: bool = False) -> None:
        if self.callback is None:
            return
        now = time.monotonic()
        if force or now - self._last >= self.interval:
            self._last = now
            self.callback(event)


def to_reporter(reporter: Reporter) -> EventCallback:
    """Forward distribution events to a Reporter: a status line each, plus byte counts."""

    def forward(event: DistributionEvent) -> None:
        reporter.status(str(event))
        if event.stage in BYTE_STAGES and event.done is not None:
            reporter.bytes(event.done, event.total)

    return forward
