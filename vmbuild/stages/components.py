"""Apply components in a guest: their build+validate phases in the builder VM,
their test phases in the test VM. Failing steps fail the build with the step's
name and the tail of its output."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmbuild import toe
from vmbuild.errors import StepFailed
from vmbuild.remote.base import Remote
from vmbuild.secrets import mask, mask_json
from vmbuild.stages.key import StageKey, stage_key

log = logging.getLogger("vmbuild.components")


@dataclass(frozen=True)
class Applied:
    name: str
    path: Path
    sha256: str
    parameters: dict[str, str]
    status: str
    phases: tuple[str, ...]
    duration: float

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "sha256": self.sha256,
            "parameters": self.parameters,
            "status": self.status,
            "phases": list(self.phases),
            "duration": round(self.duration, 2),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Applied:
        return cls(
            name=str(data["name"]), path=Path(data["path"]), sha256=str(data["sha256"]),
            parameters=dict(data["parameters"]), status=str(data["status"]),
            phases=tuple(data["phases"]), duration=float(data["duration"]),
        )  # fmt: skip


def keys(disk: StageKey, docs: Sequence[toe.Document], phases: Sequence[str]) -> list[StageKey]:
    """The key of the disk after each document's `phases`, given the disk before it.

    A chain: each key covers every document before it, so a checkpoint taken
    after document N is valid for any recipe that shares the first N.
    """
    out = []
    for doc in docs:
        wanted = [p for p in phases if p in doc.phases]
        disk = stage_key(
            "component", disk=disk.digest, document=doc.sha256,
            parameters=dict(doc.parameters), phases=wanted,
        )  # fmt: skip
        out.append(disk)
    return out


def apply(
    docs: Sequence[toe.Document],
    remote: Remote,
    *,
    phases: Sequence[str],
    results_dir: Path,
    on_output: Callable[[str], None] | None = None,
    s3: Any = None,
    working_directory: str | None = None,
    first_index: int = 0,
    on_result: Callable[[toe.DocumentResult], None] | None = None,
) -> list[Applied]:
    """Run `phases` of every document in order, steps in `working_directory` on
    the guest; raise StepFailed on the first failure. `on_result` sees each
    document's result first, the failed one included (the test stage's JUnit)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    applied = []
    for index, doc in enumerate(docs, start=first_index):
        wanted = [p for p in phases if p in doc.phases]
        if not wanted:
            continue
        log.info("component %s: phases %s", doc.name, ",".join(wanted))
        result = toe.run_document(
            doc, remote, phases=wanted, on_output=on_output, s3=s3,
            working_directory=working_directory,
        )  # fmt: skip
        if on_result is not None:
            on_result(result)
        detail = result.to_detailed_output()
        out = results_dir / f"{index:02d}-{_slug(doc.name)}-{'-'.join(wanted)}.json"
        # Rendered commands and outputs may hold a secret parameter value.
        out.write_text(json.dumps(mask_json(detail), indent=2) + "\n")
        out.chmod(0o600)
        applied.append(
            Applied(
                name=doc.name, path=doc.path, sha256=doc.sha256,
                parameters=dict(doc.parameters), status=result.status,
                phases=tuple(wanted), duration=float(detail.get("duration", 0.0) or 0.0),
            )
        )  # fmt: skip
        if result.status == "Failed":
            raise StepFailed(
                mask(
                    f"component {doc.name}: step {result.failed_step} failed"
                    + (f":\n{result.failure_tail.rstrip()}" if result.failure_tail else "")
                )
            )
    return applied


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)[:60]
