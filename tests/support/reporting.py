"""A Reporter (vmbuild.progress) that records what it was told, for assertions."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class RecordingReporter:
    stages: list[str] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    transfers: list[tuple[int, int | None]] = field(default_factory=list)

    @contextlib.contextmanager
    def stage(self, name: str, title: str) -> Iterator[None]:
        self.stages.append(name)
        yield

    def status(self, text: str) -> None:
        self.statuses.append(text)

    def output(self, line: str) -> None:
        self.lines.append(line)

    def bytes(self, done: int, total: int | None) -> None:
        self.transfers.append((done, total))
