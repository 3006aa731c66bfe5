"""The one progress protocol every long-running step reports through.

Four kinds of report, whoever the reporter is (the console, the run log, a
pipeline run with time limits, a test recording them):

- `stage(name, title)`: a context manager around a named step (timed);
- `status(text)`: one human line about what is happening;
- `output(line)`: a line of guest or tool output, passed through literally;
- `bytes(done, total)`: transfer progress (`total` None when unknown).

Library code takes a `Reporter | None` and reports through `reporter_or_null()`.
Distribution has structured events of its own (publish/events.py); they reach a
Reporter through `publish.events.to_reporter`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol, runtime_checkable


@runtime_checkable
class Reporter(Protocol):
    def stage(self, name: str, title: str) -> contextlib.AbstractContextManager[None]: ...

    def status(self, text: str) -> None: ...

    def output(self, line: str) -> None: ...

    def bytes(self, done: int, total: int | None) -> None: ...


class NullReporter:
    """Reports nothing (library calls made without a reporter)."""

    @contextlib.contextmanager
    def stage(self, name: str, title: str) -> Iterator[None]:
        yield

    def status(self, text: str) -> None:
        pass

    def output(self, line: str) -> None:
        pass

    def bytes(self, done: int, total: int | None) -> None:
        pass


def reporter_or_null(reporter: Reporter | None) -> Reporter:
    return reporter if reporter is not None else NullReporter()
