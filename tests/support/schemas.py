"""The published JSON Schemas (vmbuild/schemas/), as validators for tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource

SCHEMAS = Path(__file__).resolve().parents[2] / "vmbuild" / "schemas"


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((SCHEMAS / name).read_text())
    Draft202012Validator.check_schema(data)
    return data


def validator(name: str) -> Draft202012Validator:
    """A validator for `name` (events.schema.json, manifest.schema.json); refs resolved."""
    schemas = [_load(n) for n in ("events.schema.json", "manifest.schema.json")]
    registry: Registry = Registry().with_resources(
        (s["$id"], Resource.from_contents(s)) for s in schemas
    )
    return Draft202012Validator(_load(name), registry=registry)


def event_lines(stdout: str) -> list[dict[str, Any]]:
    """Every stdout line parsed as JSON and validated against the events schema."""
    check = validator("events.schema.json")
    events = []
    for number, line in enumerate(stdout.splitlines(), 1):
        event = json.loads(line)
        errors = sorted(check.iter_errors(event), key=str)
        assert not errors, f"line {number}: {line}\n{errors[0]}"
        events.append(event)
    return events
