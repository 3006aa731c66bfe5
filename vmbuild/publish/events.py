"""Progress reporting shared by the distribution steps (the CLI renders it, tests record it)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
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


ProgressCallback = Callable[[Progress], None]


class Throttled:
    """Forward progress at most every `interval` seconds (always the first and `force`d ones).

    Exceptions from the callback propagate: a callback may raise KeyboardInterrupt to stop.
    """

    def __init__(self, callback: ProgressCallback | None, interval: float = 0.5) -> None:
        self.callback = callback
        self.interval = interval
        self._last = 0.0

    def __call__(self, event: Progress, *, force: bool = False) -> None:
        if self.callback is None:
            return
        now = time.monotonic()
        if force or now - self._last >= self.interval:
            self._last = now
            self.callback(event)
