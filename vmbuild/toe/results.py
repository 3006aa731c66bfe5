"""What a run of a document produced, and its AWSTOE-style detailed output."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any


class Status(StrEnum):
    SUCCESS = "Success"
    FAILED = "Failed"
    IGNORED_FAILURE = "IgnoredFailure"
    SKIPPED = "Skipped"
    SUCCESS_WITH_IGNORED_FAILURE = "SuccessWithIgnoredFailure"


def now() -> datetime:
    return datetime.now(UTC)


def overall(statuses: Iterable[str]) -> Status:
    """A phase's status from its steps, or a document's from its phases."""
    seen = set(statuses)
    if Status.FAILED in seen:
        return Status.FAILED
    if seen & {Status.IGNORED_FAILURE, Status.SUCCESS_WITH_IGNORED_FAILURE}:
        return Status.SUCCESS_WITH_IGNORED_FAILURE
    return Status.SUCCESS


@dataclass
class StepResult:
    name: str
    action: str
    timeout_seconds: int
    on_failure: str
    max_attempts: int
    status: Status = Status.SUCCESS
    attempts: int = 0
    reboots: int = 0
    started: datetime = field(default_factory=now)
    ended: datetime | None = None
    failure_message: str = ""
    inputs: Any = None
    outputs: dict[str, str] = field(default_factory=dict)
    loop: dict[str, Any] | None = None
    nested: list[DocumentResult] = field(default_factory=list)
    output_tail: list[str] = field(default_factory=list)
    stops_document: bool = False

    @property
    def duration(self) -> float:
        return ((self.ended or now()) - self.started).total_seconds()

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status.value,
            "failureMessage": self.failure_message,
            "timeoutSeconds": self.timeout_seconds,
            "onFailure": self.on_failure,
            "maxAttempts": self.max_attempts,
            "attempts": self.attempts,
            "reboots": self.reboots,
            "action": self.action,
            "startTime": _iso(self.started),
            "endTime": _iso(self.ended),
            "duration": round(self.duration, 3),
            # AWSTOE writes inputs and outputs as JSON text inside the JSON.
            "inputs": json.dumps(_as_list(self.inputs), default=str),
            "outputs": json.dumps([self.outputs] if self.outputs else []),
            "loop": self.loop,
            "detailedOutput": [d.to_detailed_output() for d in self.nested] or None,
        }


@dataclass
class PhaseResult:
    name: str
    status: Status = Status.SUCCESS
    steps: list[StepResult] = field(default_factory=list)
    started: datetime = field(default_factory=now)
    ended: datetime | None = None

    @property
    def failure_message(self) -> str:
        failed = [s for s in self.steps if s.status is Status.FAILED]
        return "; ".join(f"{s.name}: {s.failure_message}" for s in failed)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status.value,
            "startTime": _iso(self.started),
            "endTime": _iso(self.ended),
            "failureMessage": self.failure_message,
            "steps": [s.to_json() for s in self.steps],
        }


@dataclass
class DocumentResult:
    """The outcome of `run_document`: never an exception for a failed step."""

    name: str
    path: Path
    sha256: str
    description: str = ""
    parameters: dict[str, str] = field(default_factory=dict)
    status: Status = Status.SUCCESS
    phases: list[PhaseResult] = field(default_factory=list)
    started: datetime = field(default_factory=now)
    ended: datetime | None = None
    execution_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    @property
    def duration(self) -> float:
        return ((self.ended or now()) - self.started).total_seconds()

    def failed_steps(self) -> list[tuple[PhaseResult, StepResult]]:
        return [(p, s) for p in self.phases for s in p.steps if s.status is Status.FAILED]

    @property
    def failed_step(self) -> str | None:
        """`phase/step` of the first failed step, when the document failed."""
        failed = self.failed_steps()
        return f"{failed[0][0].name}/{failed[0][1].name}" if failed else None

    @property
    def failure_message(self) -> str:
        failed = self.failed_steps()
        return (
            f"{failed[0][0].name}/{failed[0][1].name}: {failed[0][1].failure_message}"
            if failed
            else ""
        )

    @property
    def failure_tail(self) -> str:
        """The last lines the first failed step printed."""
        failed = self.failed_steps()
        return "\n".join(failed[0][1].output_tail) if failed else ""

    def to_detailed_output(self) -> dict[str, Any]:
        """JSON-able, shaped like AWSTOE's detailedoutput.json, plus sha256 and attempts."""
        return {
            "executionId": self.execution_id,
            "status": self.status.value,
            "startTime": _iso(self.started),
            "endTime": _iso(self.ended),
            "duration": round(self.duration, 3),
            "failureMessage": self.failure_message,
            "documents": [
                {
                    "name": self.name,
                    "filePath": str(self.path),
                    "sha256": self.sha256,
                    "status": self.status.value,
                    "description": self.description,
                    "parameters": self.parameters,
                    "startTime": _iso(self.started),
                    "endTime": _iso(self.ended),
                    "failureMessage": self.failure_message,
                    "phases": [p.to_json() for p in self.phases],
                }
            ],
        }


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat(timespec="seconds") if moment else None


def _as_list(inputs: Any) -> list[Any]:
    if inputs is None:
        return []
    return inputs if isinstance(inputs, list) else [inputs]
