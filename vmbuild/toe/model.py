"""The typed model of an AWSTOE component document, produced by `toe.document`.

Values inside `inputs`, loop lists and conditions stay as written (with their
`{{ }}` references unresolved): they are rendered when the step runs, because
chaining references only have a value once earlier steps have run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from vmbuild.toe.conditions import IfClause

DEFAULT_TIMEOUT_SECONDS = 7200
NO_TIMEOUT = -1


class OnFailure(StrEnum):
    ABORT = "Abort"
    CONTINUE = "Continue"
    IGNORE = "Ignore"


# Parameter types Image Builder's API accepts (ComponentParameterDetail.type);
# AWSTOE hands every value to the document as a string.
PARAMETER_TYPES = ("string", "integer", "boolean", "stringlist")


@dataclass(frozen=True)
class ParameterSpec:
    name: str
    default: str | None
    description: str
    type: str = "string"
    allowed: tuple[str, ...] = ()  # allowedValues; empty = any value


@dataclass(frozen=True)
class ForLoop:
    """`for: {start, end, updateBy}`: integers from start to end inclusive."""

    name: str | None
    start: int
    end: int
    update_by: int

    def range(self) -> range:
        stop = self.end + (1 if self.update_by > 0 else -1)
        return range(self.start, stop, self.update_by)

    def values(self) -> list[str]:
        return [str(v) for v in self.range()]


@dataclass(frozen=True)
class ForEachLoop:
    """`forEach: [..]`: each item may hold references, rendered before the loop runs."""

    name: str | None
    items: tuple[str, ...]


@dataclass(frozen=True)
class DelimitedLoop:
    """`forEach: {list, delimiter}`: the rendered list is split on one character."""

    name: str | None
    text: str
    delimiter: str


Loop = ForLoop | ForEachLoop | DelimitedLoop


@dataclass(frozen=True)
class Step:
    name: str
    action: str
    inputs: Any
    timeout_seconds: int = DEFAULT_TIMEOUT_SECONDS
    on_failure: OnFailure = OnFailure.ABORT
    max_attempts: int = 1
    loop: Loop | None = None
    condition: IfClause | None = None

    @property
    def timeout(self) -> float | None:
        """Seconds allowed for one attempt of the whole step; None = no limit."""
        return None if self.timeout_seconds == NO_TIMEOUT else float(self.timeout_seconds)


@dataclass(frozen=True)
class Phase:
    name: str
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class Document:
    """A parsed, fully validated component document with its parameters resolved."""

    name: str
    description: str
    path: Path
    sha256: str
    parameters: dict[str, str]
    phases: tuple[str, ...]
    phase_defs: tuple[Phase, ...] = field(repr=False)
    constants: dict[str, str] = field(default_factory=dict, repr=False)
    parameter_specs: tuple[ParameterSpec, ...] = field(default=(), repr=False)
    display_name: str = ""
    # Not errors, as in AWSTOE (an unknown parameter given at run time is ignored).
    warnings: tuple[str, ...] = field(default=(), repr=False)
    # What identifies the document in an ExecuteDocument chain (cycle checks):
    # the resolved host path, or `instance:/path`, `s3://...`, an ARN.
    identity: str = ""

    @property
    def variables(self) -> dict[str, str]:
        """What `{{ Name }}` resolves to: parameters and constants (names are unique)."""
        return {**self.parameters, **self.constants}

    def phase(self, name: str) -> Phase:
        for phase in self.phase_defs:
            if phase.name == name:
                return phase
        raise KeyError(name)
