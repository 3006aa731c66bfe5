"""Conditions: `if:` on a step and the `Assert` action.

A condition is one comparison operator or one logical operator (`and`, `or`,
`not`, nested at most four deep). String comparisons ignore case and do not trim,
number comparisons convert strings and are false when a value is not a number,
as AWSTOE documents. The operator's own argument is the left-hand side:
`numberLessThan: 2` with `value: 3` is 2 < 3, true.

Operators that look at the guest (binaryExists, fileExists, folderExists and the
file hash checks) are evaluated by running a tiny script there; `probe_script`
builds it so that it is testable without a VM.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from vmbuild.remote.base import RemoteResult
from vmbuild.toe.expressions import has_references
from vmbuild.yamlio import scalar_text

STRING_BINARY = {
    "stringEquals",
    "stringLessThan",
    "stringLessThanEquals",
    "stringGreaterThan",
    "stringGreaterThanEquals",
    "patternMatches",
}
NUMBER_BINARY = {
    "numberEquals",
    "numberLessThan",
    "numberLessThanEquals",
    "numberGreaterThan",
    "numberGreaterThanEquals",
}
STRING_UNARY = {"stringIsEmpty", "stringIsWhitespace"}
GUEST_UNARY = {"binaryExists", "fileExists", "folderExists"}
FILE_HASH = {
    "fileMD5Equals": "md5sum",
    "fileSHA1Equals": "sha1sum",
    "fileSHA256Equals": "sha256sum",
    "fileSHA512Equals": "sha512sum",
}
LOGICAL = {"and", "or", "not"}
COMPARISONS = STRING_BINARY | NUMBER_BINARY | STRING_UNARY | GUEST_UNARY | set(FILE_HASH)
OPERATORS = COMPARISONS | LOGICAL
MAX_LOGICAL_DEPTH = 4


class StepAction(StrEnum):
    EXECUTE = "Execute"
    SKIP = "Skip"
    ABORT = "Abort"


@dataclass(frozen=True)
class Comparison:
    operator: str
    operand: Any
    value: Any = None  # `value` for binary operators, `path` for file hashes


@dataclass(frozen=True)
class Logical:
    operator: str
    operands: tuple[Condition, ...]


Condition = Comparison | Logical


@dataclass(frozen=True)
class IfClause:
    condition: Condition
    then: StepAction = StepAction.EXECUTE
    otherwise: StepAction = StepAction.SKIP

    def decide(self, result: bool) -> StepAction:
        return self.then if result else self.otherwise


Problems = list[tuple[str, str]]


def parse_if(raw: Any) -> tuple[IfClause | None, Problems]:
    """Parse `if:`: a condition map with optional `then`/`else` (or a one-item list of it)."""
    if isinstance(raw, list) and len(raw) == 1:
        raw = raw[0]
    if not isinstance(raw, dict):
        return None, [("", "expected a condition (a map with one operator)")]
    problems: Problems = []
    branches = {}
    body = dict(raw)
    for key in ("then", "else"):
        if key in body:
            choice = body.pop(key)
            action = _step_action(choice)
            if action is None:
                problems.append((key, f"expected Execute, Skip or Abort, got {choice!r}"))
            else:
                branches[key] = action
    condition, more = parse_condition(body)
    problems += more
    if condition is None or problems:
        return None, problems
    return (
        IfClause(
            condition,
            branches.get("then", StepAction.EXECUTE),
            branches.get("else", StepAction.SKIP),
        ),
        [],
    )


def _step_action(value: Any) -> StepAction | None:
    for action in StepAction:
        if isinstance(value, str) and value.lower() == action.value.lower():
            return action
    return None


def parse_condition(raw: Any, where: str = "", depth: int = 0) -> tuple[Condition | None, Problems]:
    if not isinstance(raw, dict) or not raw:
        return None, [(where, "expected a condition: a map with one operator")]
    operators = [k for k in raw if k in OPERATORS]
    if len(operators) != 1:
        found = ", ".join(map(str, raw)) or "nothing"
        what = "no operator" if not operators else "more than one operator"
        return None, [(where, f"{what} in condition (found: {found})")]
    op = operators[0]
    here = f"{where}.{op}" if where else op
    if op in LOGICAL:
        return _parse_logical(op, raw, here, where, depth)
    allowed = {op, "value"} if op in STRING_BINARY | NUMBER_BINARY else {op}
    if op in FILE_HASH:
        allowed = {op, "path"}
    extra = [k for k in raw if k not in allowed]
    if extra:
        return None, [(where, f"unexpected key(s) for {op}: {', '.join(map(str, extra))}")]
    companion = "path" if op in FILE_HASH else "value" if len(allowed) > 1 else None
    if companion and companion not in raw:
        return None, [(where, f"{op} needs '{companion}'")]
    comparison = Comparison(op, raw[op], raw.get(companion) if companion else None)
    problems = _check_comparison(comparison, here, where)
    return (None if problems else comparison), problems


def _parse_logical(
    op: str, raw: dict[Any, Any], here: str, where: str, depth: int
) -> tuple[Condition | None, Problems]:
    if depth >= MAX_LOGICAL_DEPTH:
        return None, [(here, f"logical operators nest at most {MAX_LOGICAL_DEPTH} deep")]
    extra = [k for k in raw if k != op]
    if extra:
        return None, [(where, f"unexpected key(s) beside {op}: {', '.join(map(str, extra))}")]
    body = raw[op]
    if op == "not":
        items = body if isinstance(body, list) else [body]
        if len(items) != 1:
            return None, [(here, "'not' takes exactly one condition")]
    else:
        if not isinstance(body, list) or not body:
            return None, [(here, f"'{op}' takes a list of conditions")]
        items = body
    operands: list[Condition] = []
    problems: Problems = []
    for i, item in enumerate(items):
        sub, more = parse_condition(item, f"{here}[{i}]" if op != "not" else here, depth + 1)
        problems += more
        if sub is not None:
            operands.append(sub)
    if problems:
        return None, problems
    return Logical(op, tuple(operands)), []


def _check_comparison(c: Comparison, here: str, where: str) -> Problems:
    problems: Problems = []
    value_label = f"{where}.value" if where else "value"
    for label, value in ((here, c.operand), (value_label, c.value)):
        if value is not None and scalar_text(value) is None:
            problems.append((label, "expected a single value, not a list or map"))
    if problems:
        return problems
    if c.operator in NUMBER_BINARY:
        for label, value in ((here, c.operand), (value_label, c.value)):
            if not has_references(value) and _number(value) is None:
                problems.append((label, f"expected a number, got {value!r}"))
    if c.operator == "patternMatches" and not has_references(c.operand):
        try:
            re.compile(str(scalar_text(c.operand)))
        except re.error as exc:
            problems.append((here, f"invalid regular expression: {exc}"))
    if c.operator in GUEST_UNARY | set(FILE_HASH) and not scalar_text(c.operand):
        problems.append((here, "must not be empty"))
    return problems


def condition_values(condition: Condition, where: str = "") -> Iterator[tuple[str, Any]]:
    """(field, value) of every operand, for reference checks."""
    if isinstance(condition, Logical):
        here = f"{where}.{condition.operator}" if where else condition.operator
        for i, sub in enumerate(condition.operands):
            yield from condition_values(sub, f"{here}[{i}]")
        return
    yield (f"{where}.{condition.operator}" if where else condition.operator), condition.operand
    if condition.value is not None:
        companion = "path" if condition.operator in FILE_HASH else "value"
        yield (f"{where}.{companion}" if where else companion), condition.value


# --- evaluation ---------------------------------------------------------------

GuestRunner = Callable[[str], RemoteResult]
Renderer = Callable[[Any], Any]


def evaluate(condition: Condition, render: Renderer, guest: GuestRunner) -> bool:
    """Evaluate with references rendered by `render`; guest checks run through `guest`."""
    if isinstance(condition, Logical):
        if condition.operator == "not":
            return not evaluate(condition.operands[0], render, guest)
        results = (evaluate(sub, render, guest) for sub in condition.operands)
        return all(results) if condition.operator == "and" else any(results)
    operand = render(condition.operand)
    value = render(condition.value) if condition.value is not None else None
    op = condition.operator
    if op in GUEST_UNARY or op in FILE_HASH:
        result = guest(probe_script(Comparison(op, operand, value)))
        if op in FILE_HASH:
            digest = result.stdout.split()[0] if result.stdout.split() else ""
            return result.exit_code == 0 and digest.lower() == _text(operand).strip().lower()
        return result.exit_code == 0
    if op in NUMBER_BINARY:
        return _compare_numbers(op, operand, value)
    left = _text(operand)
    if op == "stringIsEmpty":
        return left == ""
    if op == "stringIsWhitespace":
        return left != "" and left.isspace()
    right = _text(value)
    if op == "patternMatches":
        return re.search(left, right) is not None
    a, b = left.casefold(), right.casefold()
    return {
        "stringEquals": a == b,
        "stringLessThan": a < b,
        "stringLessThanEquals": a <= b,
        "stringGreaterThan": a > b,
        "stringGreaterThanEquals": a >= b,
    }[op]


def probe_script(c: Comparison) -> str:
    """The guest command whose exit code (and, for hashes, output) decides `c`."""
    target = shlex.quote(_text(c.operand))
    if c.operator == "binaryExists":
        return f"command -v -- {target} >/dev/null 2>&1"
    if c.operator == "fileExists":
        return f"test -f {target}"
    if c.operator == "folderExists":
        return f"test -d {target}"
    path = shlex.quote(_text(c.value))
    return f"test -f {path} && {FILE_HASH[c.operator]} -- {path}"


def _compare_numbers(op: str, operand: Any, value: Any) -> bool:
    a, b = _number(operand), _number(value)
    if a is None or b is None:
        return False
    return {
        "numberEquals": a == b,
        "numberLessThan": a < b,
        "numberLessThanEquals": a <= b,
        "numberGreaterThan": a > b,
        "numberGreaterThanEquals": a >= b,
    }[op]


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(str(value).strip())
    except ValueError:
        return None


def _text(value: Any) -> str:
    text = scalar_text(value)
    return "" if text is None else text
