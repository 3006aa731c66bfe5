"""Stage keys: what determines a stage's output, as one hashable digest.

Every stage names the inputs its result depends on (digests of disks and
documents, the settings it reads); equal keys mean an equal result, which is
what a checkpoint cache keys on. Inputs are canonical JSON, so a key is stable
across runs, processes and hosts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class StageKey:
    stage: str
    digest: str  # sha256 hex of the stage name and its inputs

    def __str__(self) -> str:
        return f"{self.stage}:{self.digest[:16]}"


def stage_key(stage: str, **inputs: object) -> StageKey:
    """The key of `stage` over `inputs` (JSON-serializable; order does not matter)."""
    blob = json.dumps(
        {"stage": stage, "inputs": inputs}, sort_keys=True, separators=(",", ":"), default=str
    )
    return StageKey(stage, hashlib.sha256(blob.encode()).hexdigest())
