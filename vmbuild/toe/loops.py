"""Step loops: `for: {start, end, updateBy}`, `forEach: [..]` and
`forEach: {list, delimiter}`, parsed and checked before anything runs."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from vmbuild.toe.model import DelimitedLoop, ForEachLoop, ForLoop, Loop
from vmbuild.yamlio import scalar_text

Report = Callable[[str | None, str], None]
# Iterations of one loop, checked at validate time (a delimited list, known
# only once rendered, is checked by the runner): every iteration is a remote
# command, so 10**12 of them is a mistake, never a plan.
MAX_ITERATIONS = 10_000
_LOOP_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
# The one-character delimiters AWSTOE accepts for `forEach: {list, delimiter}`.
DELIMITERS = (".", ",", ";", ":", "\n", "\t", " ", "-", "_")


def whole_number(where: str, value: Any, add: Report) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        add(where, f"expected a whole number, got {value!r}")
        return None
    return int(value)


def parse_loop(where: str, raw: Any, loops: set[str], add: Report) -> Loop | None:
    """A step's `loop:`; problems go to `add(field, message)`. `loops` holds the
    loop names already used in the phase."""
    if not isinstance(raw, dict):
        add(where, "expected a map with for or forEach")
        return None
    for key in raw:
        if key not in ("name", "for", "forEach"):
            add(f"{where}.{key}", "unknown key in a loop (expected name, for, forEach)")
    name = raw.get("name")
    if name is not None:
        if not isinstance(name, str) or not _LOOP_NAME.match(name):
            add(f"{where}.name", "letters, digits, - and _ only")
            name = None
        elif name in loops:
            add(f"{where}.name", f"loop name '{name}' is already used in this phase")
        else:
            loops.add(name)
    if ("for" in raw) == ("forEach" in raw):
        add(where, "needs exactly one of for or forEach")
        return None
    if "for" in raw:
        return _for_loop(f"{where}.for", name, raw["for"], add)
    return _for_each(f"{where}.forEach", name, raw["forEach"], add)


def _for_loop(where: str, name: str | None, raw: Any, add: Report) -> Loop | None:
    if not isinstance(raw, dict):
        add(where, "expected {start, end, updateBy}")
        return None
    numbers = {}
    for key in ("start", "end", "updateBy"):
        if key not in raw:
            add(f"{where}.{key}", "required (a whole number; references are not allowed)")
            continue
        value = whole_number(f"{where}.{key}", raw[key], add)
        if value is not None:
            numbers[key] = value
    if len(numbers) < 3:
        return None
    start, end, by = numbers["start"], numbers["end"], numbers["updateBy"]
    if by == 0 or (end - start) * by < 0:
        add(where, f"from {start} to {end} by {by} never reaches the end")
        return None
    if (end - start) // by + 1 > MAX_ITERATIONS:
        add(where, f"from {start} to {end} by {by} is more than {MAX_ITERATIONS} iterations")
        return None
    return ForLoop(name, start, end, by)


def _for_each(where: str, name: str | None, raw: Any, add: Report) -> Loop | None:
    if isinstance(raw, list):
        if len(raw) > MAX_ITERATIONS:
            add(where, f"{len(raw)} items; at most {MAX_ITERATIONS}")
            return None
        items = [scalar_text(v) for v in raw]
        if not items or any(v is None for v in items):
            add(where, "expected a non-empty list of strings")
            return None
        return ForEachLoop(name, tuple(v for v in items if v is not None))
    if isinstance(raw, dict):
        text = scalar_text(raw.get("list"))
        delimiter = raw.get("delimiter", ",")
        if text is None:
            add(f"{where}.list", "required, a string")
        if not isinstance(delimiter, str) or delimiter not in DELIMITERS:
            shown = " ".join(repr(d) for d in DELIMITERS)
            add(f"{where}.delimiter", f"one character of {shown}")
            return None
        return None if text is None else DelimitedLoop(name, text, delimiter)
    add(where, "expected a list, or {list, delimiter}")
    return None
