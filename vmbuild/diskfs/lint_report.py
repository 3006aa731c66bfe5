"""Lint findings and the report that collects them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Severity = Literal["error", "warning", "info"]


@dataclass(frozen=True)
class Finding:
    """One lint result."""

    severity: Severity
    check: str
    message: str
    hint: str | None = None


@dataclass
class LintReport:
    """All findings for one disk, plus what was recognised."""

    findings: list[Finding] = field(default_factory=list)
    partition_table: str | None = None
    root_partition: int | None = None
    root_fs: str | None = None

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "partition_table": self.partition_table,
            "root_partition": self.root_partition,
            "root_fs": self.root_fs,
            "findings": [asdict(f) for f in self.findings],
        }

    def render(self) -> str:
        """Human-readable lines, errors first."""
        order = {"error": 0, "warning": 1, "info": 2}
        lines = []
        for f in sorted(self.findings, key=lambda f: order[f.severity]):
            lines.append(f"{f.severity:7} {f.check}: {f.message}")
            if f.hint:
                lines.append(f"        hint: {f.hint}")
        summary = f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)"
        return "\n".join([*lines, summary])
