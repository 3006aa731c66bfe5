"""`{{ }}` references: parameters and constants, loop variables and chaining.

Three shapes are references (names are `[A-Za-z0-9_-]+`, spaces inside the braces
are trimmed):

* `{{ Name }}` - a parameter or constant;
* `{{ loop.index }}`, `{{ loop.value }}`, `{{ MyLoop.value }}` - the current
  iteration of the step's own loop;
* `{{ phase.step.inputs[0].key }}`, `{{ phase.step.outputs.stdout }}` - chaining.

Anything else between braces (a Go template such as `{{ .State.Status }}` in a
`docker inspect` command) is not a reference and is left exactly as written, so
documents that pass such text to tools keep working. So is `{{ loop.* }}` in a step
without a loop (the AWSTOE looping page: "AWSTOE does not resolve the expressions
and they appear in the step with no replacement"), and an unknown `{{ name }}` in
a field that holds a file's content (a Jinja template written with CreateFile).
Any other reference-shaped text that does not resolve is an error, reported
before anything runs.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

_NAME = r"[A-Za-z0-9_-]+"
_BRACES = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_SHAPE = re.compile(rf"^{_NAME}(?:\.{_NAME})*(?:\[\d+\])?(?:\.{_NAME})*$")
_CHAIN = re.compile(
    rf"^(?P<phase>{_NAME})\.(?P<step>{_NAME})\.(?P<kind>inputs|outputs)"
    rf"(?:\[(?P<index>\d+)\])?\.(?P<key>{_NAME})$"
)
_LOOP = re.compile(rf"^(?P<loop>{_NAME})\.(?P<attr>index|value)$")
_VARIABLE = re.compile(rf"^{_NAME}$")


class UnresolvedReference(Exception):
    """A reference that cannot be resolved; the message is one line for the user."""


@dataclass(frozen=True)
class VariableRef:
    name: str


@dataclass(frozen=True)
class LoopRef:
    loop: str
    attr: str


@dataclass(frozen=True)
class ChainRef:
    phase: str
    step: str
    kind: str
    index: int | None
    key: str

    def __str__(self) -> str:
        index = "" if self.index is None else f"[{self.index}]"
        return f"{self.phase}.{self.step}.{self.kind}{index}.{self.key}"


Reference = VariableRef | LoopRef | ChainRef


class NotAReference(Exception):
    """Reference-shaped text that matches none of the three forms."""


def parse_reference(expr: str) -> Reference | None:
    """The reference inside `{{ expr }}`, or None when the text is not reference-shaped."""
    expr = expr.strip()
    if not _SHAPE.match(expr):
        return None
    if _VARIABLE.match(expr):
        return VariableRef(expr)
    if m := _LOOP.match(expr):
        return LoopRef(m["loop"], m["attr"])
    if m := _CHAIN.match(expr):
        index = int(m["index"]) if m["index"] is not None else None
        return ChainRef(m["phase"], m["step"], m["kind"], index, m["key"])
    raise NotAReference(
        f"'{{{{ {expr} }}}}' is not a valid reference (expected Name, loop.value, "
        "loop.index, phase.step.inputs[i].key or phase.step.outputs.key)"
    )


def find_references(text: str) -> list[Reference]:
    """Every reference in `text`; raises NotAReference for malformed ones."""
    found = []
    for match in _BRACES.finditer(text):
        ref = parse_reference(match.group(1))
        if ref is not None:
            found.append(ref)
    return found


def has_references(value: Any) -> bool:
    """True if a string (or any string inside lists/maps) holds a reference."""
    if isinstance(value, str):
        try:
            return bool(find_references(value))
        except NotAReference:
            return True
    if isinstance(value, dict):
        return any(has_references(v) for v in value.values())
    if isinstance(value, list):
        return any(has_references(v) for v in value)
    return False


@dataclass(frozen=True)
class LoopVars:
    name: str | None
    index: int
    value: str


@dataclass(frozen=True)
class Scope:
    """What references resolve to while one step (or one iteration) runs."""

    variables: Mapping[str, str]
    loop: LoopVars | None = None
    chain: Callable[[ChainRef], str] | None = None
    keep_unknown: bool = False  # unknown `{{ Name }}` stays as written (file content)


class _Keep(Exception):
    """This reference is left exactly as written."""


def resolve(ref: Reference, scope: Scope) -> str:
    if isinstance(ref, VariableRef):
        if ref.name in scope.variables:
            return scope.variables[ref.name]
        if scope.keep_unknown:
            raise _Keep
        raise UnresolvedReference(unknown_variable_message(ref.name, scope.variables))
    if isinstance(ref, LoopRef):
        loop = scope.loop
        if loop is None:
            raise _Keep  # AWSTOE leaves loop references in a step without a loop
        if ref.loop != "loop" and ref.loop != loop.name:
            raise UnresolvedReference(f"'{ref.loop}.{ref.attr}' is not this step's loop")
        return str(loop.index) if ref.attr == "index" else loop.value
    if scope.chain is None:
        raise UnresolvedReference(f"'{ref}': chaining is only allowed in step inputs")
    return scope.chain(ref)


def render(text: str, scope: Scope) -> str:
    """`text` with every reference replaced; raises UnresolvedReference."""

    def substitute(match: re.Match[str]) -> str:
        try:
            ref = parse_reference(match.group(1))
        except NotAReference as exc:
            if scope.keep_unknown:
                return match.group(0)
            raise UnresolvedReference(str(exc)) from None
        if ref is None:
            return match.group(0)
        try:
            return resolve(ref, scope)
        except _Keep:
            return match.group(0)

    return _BRACES.sub(substitute, text)


def render_value(value: Any, scope: Scope, *, templates: Collection[str] = ()) -> Any:
    """Render every string inside nested lists and maps; other scalars pass through.

    Map keys named in `templates` hold file content: unknown names stay as written.
    """
    if isinstance(value, str):
        return render(value, scope)
    if isinstance(value, dict):
        lenient = replace(scope, keep_unknown=True)
        return {
            k: render_value(v, lenient if k in templates else scope, templates=templates)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [render_value(v, scope, templates=templates) for v in value]
    return value


def unknown_variable_message(name: str, known: Collection[str]) -> str:
    message = f"unknown parameter or constant '{name}'"
    close = difflib.get_close_matches(name, list(known), n=1)
    if close:
        message += f" (did you mean '{close[0]}'?)"
    elif not known:
        message += " (the document declares no parameters or constants)"
    return message


# --- static checks, before anything runs ------------------------------------


@dataclass(frozen=True)
class EarlierStep:
    """What a chaining reference may use from a step that runs before this one."""

    inputs: Any
    input_names: frozenset[str]
    outputs: tuple[str, ...]
    action: str


@dataclass
class StaticScope:
    variables: Collection[str]
    loop_name: str | None = None
    in_loop: bool = False
    chaining: bool = True
    earlier: dict[tuple[str, str], EarlierStep] = field(default_factory=dict)
    later: set[tuple[str, str]] = field(default_factory=set)
    keep_unknown: bool = False


def check_references(
    value: Any, scope: StaticScope, *, templates: Collection[str] = ()
) -> list[tuple[str, str]]:
    """(sub-field, message) for each reference in `value` that can never resolve.

    Map keys named in `templates` hold file content, where unknown names are kept.
    """
    problems: list[tuple[str, str]] = []
    lenient = replace(scope, keep_unknown=True)

    def visit(item: Any, where: str, here: StaticScope) -> None:
        if isinstance(item, str):
            problems.extend((where, message) for message in _check_text(item, here))
        elif isinstance(item, dict):
            for key, sub in item.items():
                inner = lenient if key in templates else here
                visit(sub, f"{where}.{key}" if where else str(key), inner)
        elif isinstance(item, list):
            for i, sub in enumerate(item):
                visit(sub, f"{where}[{i}]", here)

    visit(value, "", scope)
    return problems


def _check_text(text: str, scope: StaticScope) -> list[str]:
    try:
        refs = find_references(text)
    except NotAReference as exc:
        return [] if scope.keep_unknown else [str(exc)]
    messages = []
    for ref in refs:
        message = _check_reference(ref, scope)
        if message:
            messages.append(message)
    return messages


def _check_reference(ref: Reference, scope: StaticScope) -> str | None:
    if isinstance(ref, VariableRef):
        if ref.name in scope.variables or scope.keep_unknown:
            return None
        return unknown_variable_message(ref.name, scope.variables)
    if isinstance(ref, LoopRef):
        if not scope.in_loop:
            return None  # left as written, as AWSTOE does outside a loop
        if ref.loop == "loop" or ref.loop == scope.loop_name:
            return None
        return f"'{ref.loop}' is not the name of this step's loop"
    if not scope.chaining:
        return f"'{ref}': chaining references are only allowed in step inputs and conditions"
    key = (ref.phase, ref.step)
    target = scope.earlier.get(key)
    if target is None:
        if key in scope.later:
            return f"'{ref}' refers to a step that has not run yet at this point"
        return f"'{ref}': there is no step '{ref.step}' in a phase '{ref.phase}'"
    if ref.kind == "outputs":
        if ref.index not in (None, 0):
            return f"'{ref}': a step has one set of outputs, use index 0 or none"
        if ref.key not in target.outputs:
            have = ", ".join(target.outputs) or "none"
            return f"'{ref}': {target.action} has no output '{ref.key}' (its outputs: {have})"
        return None
    return _check_input_reference(ref, target)


def _check_input_reference(ref: ChainRef, target: EarlierStep) -> str | None:
    inputs = target.inputs
    index = ref.index or 0
    if isinstance(inputs, list):
        if index >= len(inputs):
            return f"'{ref}': step '{ref.step}' has {len(inputs)} input item(s)"
        inputs = inputs[index]
    elif ref.index not in (None, 0):
        return f"'{ref}': the inputs of step '{ref.step}' are not a list"
    written = set(inputs) if isinstance(inputs, dict) else set()
    if ref.key in written or ref.key in target.input_names:
        return None
    return f"'{ref}': step '{ref.step}' has no input '{ref.key}'"
