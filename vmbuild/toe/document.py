"""Parse and validate a component document, all of it, before anything runs.

Every problem is reported with the file and the path of the field, phase and
step first (`hello.yaml: build.Install.inputs.commands: expected a list of
strings`). `validate_file` returns them all; `load_document` raises the first as
a ConfigError. ExecuteDocument children whose path and parameters are known
before the run are loaded and validated too, so cycles and nesting deeper than
three levels are caught here rather than halfway through a build.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmbuild import yamllimits as limits
from vmbuild.errors import ConfigError
from vmbuild.toe.actions import ACTIONS
from vmbuild.toe.actions.base import Shape, typed_items
from vmbuild.toe.conditions import condition_values, parse_condition, parse_if
from vmbuild.toe.expressions import (
    EarlierStep,
    LoopVars,
    Scope,
    StaticScope,
    UnresolvedReference,
    check_references,
    render,
)
from vmbuild.toe.loops import parse_loop, whole_number
from vmbuild.toe.model import (
    DEFAULT_TIMEOUT_SECONDS,
    NO_TIMEOUT,
    PARAMETER_TYPES,
    DelimitedLoop,
    Document,
    ForEachLoop,
    ForLoop,
    Loop,
    OnFailure,
    ParameterSpec,
    Phase,
    Step,
)
from vmbuild.toe.windows import MESSAGE as WINDOWS_MESSAGE
from vmbuild.toe.windows import windows_evidence
from vmbuild.yamlio import parse_bytes, scalar_text

log = logging.getLogger("vmbuild.toe")

MAX_STEPS = 1000  # per phase: a bound for validation time, far above real documents
MAX_NESTING = 3  # ExecuteDocument levels below the top document (AWSTOE's limit)
STANDARD_PHASES = ("build", "validate", "test")
_VARIABLE_NAME = re.compile(r"^[A-Za-z0-9_-]{3,128}$")
_TOP_KEYS = ("name", "description", "schemaVersion", "parameters", "constants", "phases")
_STEP_KEYS = (
    "name",
    "action",
    "inputs",
    "timeoutSeconds",
    "onFailure",
    "maxAttempts",
    "loop",
    "if",
)


@dataclass(frozen=True)
class Problem:
    file: str
    field: str | None
    message: str

    def __str__(self) -> str:
        return (
            f"{self.file}: {self.field}: {self.message}"
            if self.field
            else f"{self.file}: {self.message}"
        )

    def error(self, hint: str | None = None) -> ConfigError:
        return ConfigError(self.file, self.field, self.message, hint=hint)


def load_document(
    path: Path,
    parameters: Mapping[str, Any] | None = None,
    *,
    display_name: str | None = None,
) -> Document:
    """Parse and validate `path` (and statically known ExecuteDocument children).

    `parameters` are the caller's values (strings, or Image Builder's lists of
    strings; YAML scalars are accepted and turned into their text). A parameter
    without a default and without a value is an error; an unknown one is ignored
    with a warning (logged, and in `Document.warnings`), as AWSTOE does. Raises
    ConfigError naming file, phase, step, field.
    """
    doc, problems = parse(path, parameters or {}, display_name=display_name, require_values=True)
    if problems or doc is None:
        first = problems[0] if problems else Problem(str(path), None, "invalid document")
        more = len(problems) - 1
        hint = f"{more} more problem(s): vmbuild component validate {path}" if more > 0 else None
        raise first.error(hint)
    for warning in doc.warnings:
        log.warning("%s", warning)
    return doc


def validate_file(path: Path) -> list[str]:
    """Every problem in the document at `path`, one line each (empty when valid).

    Parameters are not required to have values here: this checks the document,
    not one run of it.
    """
    _, problems = parse(path, {}, display_name=str(path), require_values=False)
    return [str(p) for p in problems]


def declared_parameters(path: Path) -> dict[str, bool]:
    """The document's parameters: name → True when required (no default).

    Raises ConfigError when the document itself is invalid.
    """
    doc, problems = parse(path, {}, require_values=False)
    if doc is None:
        raise (problems[0] if problems else Problem(str(path), None, "invalid document")).error()
    return {spec.name: spec.default is None for spec in doc.parameter_specs}


def parse(
    path: Path,
    parameters: Mapping[str, Any],
    *,
    display_name: str | None = None,
    require_values: bool = True,
    ancestors: tuple[str, ...] = (),
    identity: str | None = None,
) -> tuple[Document | None, list[Problem]]:
    """The document and its problems; the Document is None when there are any."""
    parser = _Parser(path, display_name or str(path), ancestors, identity=identity or "")
    try:
        doc = parser.parse(parameters, require_values)
    except RecursionError:
        parser.problems = [Problem(parser.display, None, "nested too deeply to be a document")]
        doc = None
    return (doc if not parser.problems else None), parser.problems


INSTANCE = "instance:"  # identity prefix of a document read from the guest


def host_identity(path: Path) -> str:
    return str(path.resolve())


def child_path(parent: Document, document: str) -> Path | None:
    """The host file an ExecuteDocument `document` names, when it is one: a
    relative path next to a parent that is a host file. Anything else (an
    absolute path, a file a previous step wrote on the instance, an S3 URI, an
    ARN) is resolved when the step runs."""
    if document.startswith(("s3://", "arn:")) or Path(document).is_absolute():
        return None
    if parent.identity.startswith((INSTANCE, "s3://")):
        return None  # the parent came from the instance or S3: its siblings are there
    candidate = parent.path.parent / document
    return candidate if candidate.is_file() else None


def child_display(parent: Document, document: str) -> str:
    candidate = Path(document)
    if candidate.is_absolute() or document.startswith(("s3://", "arn:")):
        return document
    return str(Path(parent.display_name or str(parent.path)).parent / candidate)


@dataclass
class _StepDraft:
    phase: str
    where: str
    step: Step
    raw_inputs: Any


@dataclass
class _Parser:
    path: Path
    display: str
    ancestors: tuple[str, ...]
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    identity: str = ""

    def add(self, where: str | None, message: str) -> None:
        self.problems.append(Problem(self.display, where or None, message))

    # --- top level ------------------------------------------------------------

    def parse(self, given: Mapping[str, Any], require_values: bool) -> Document | None:
        try:
            data = limits.read_bytes(self.path)
        except limits.UnsafeInput as exc:
            self.add(None, f"cannot read the document: {exc}")
            return None
        except OSError as exc:
            self.add(None, f"cannot read the document: {exc.strerror or exc}")
            return None
        try:
            raw = parse_bytes(data, self.display)  # the loader every file kind shares
        except ConfigError as exc:
            self.problems.append(Problem(exc.file, exc.field, exc.message))
            return None
        if not isinstance(raw, dict):
            self.add(None, "expected a YAML map with schemaVersion and phases")
            return None
        windows = windows_evidence(raw)
        if windows is not None:
            where, why = windows
            self.add(where, f"{WINDOWS_MESSAGE} (this document is for Windows: {why})")
            return None
        for key in raw:
            if key not in _TOP_KEYS:
                self.add(str(key), f"unknown key (expected: {', '.join(_TOP_KEYS)})")
        self._schema_version(raw.get("schemaVersion"))
        name = self._text(raw, "name")
        description = self._text(raw, "description")
        specs = self._parameters(raw.get("parameters"))
        constants = self._constants(raw.get("constants"), {s.name for s in specs})
        values = self._parameter_values(specs, given, require_values)
        drafts = self._phases(raw.get("phases"))
        variables = set(values) | set(constants) | {s.name for s in specs}
        self._check_references(drafts, variables)
        phases = self._assemble(drafts)
        doc = Document(
            name=name or self.path.stem,
            description=description,
            path=self.path,
            sha256=hashlib.sha256(data).hexdigest(),
            parameters=values,
            phases=tuple(p.name for p in phases),
            phase_defs=phases,
            constants=constants,
            parameter_specs=tuple(specs),
            display_name=self.display,
            warnings=tuple(self.warnings),
            identity=self.identity or host_identity(self.path),
        )
        if not self.problems:
            self._check_children(doc, drafts)
        return doc

    def _schema_version(self, value: Any) -> None:
        if value is None:
            self.add("schemaVersion", "required (schemaVersion: 1.0)")
        elif scalar_text(value) not in ("1.0", "1"):
            self.add("schemaVersion", f"only 1.0 is supported, got {scalar_text(value) or value!r}")

    def _text(self, raw: dict[Any, Any], key: str) -> str:
        value = raw.get(key)
        if value is None:
            return ""
        text = scalar_text(value)
        if text is None or isinstance(value, bool):
            self.add(key, "expected a string")
            return ""
        return text

    # --- parameters and constants ----------------------------------------------

    def _named_entries(
        self, raw: Any, section: str, types: tuple[str, ...] = ("string",)
    ) -> list[tuple[str, str, dict[Any, Any]]]:
        """`- Name: {..}` entries as (where, name, body)."""
        if raw is None:
            return []
        if not isinstance(raw, list):
            self.add(section, "expected a list of '- Name: {type: string, ...}' entries")
            return []
        entries = []
        seen: set[str] = set()
        for i, entry in enumerate(raw):
            where = f"{section}[{i}]"
            if not isinstance(entry, dict) or len(entry) != 1:
                self.add(where, "expected one '- Name: {type: string, ...}' entry")
                continue
            ((key, body),) = entry.items()
            name = str(key)
            where = f"{section}.{name}"
            if not _VARIABLE_NAME.match(name):
                self.add(where, "names are 3-128 characters of letters, digits, - and _")
            if name in seen:
                self.add(where, "declared twice")
            seen.add(name)
            if not isinstance(body, dict):
                self.add(where, "expected a map with type (and default/value, description)")
                continue
            kind = body.get("type")
            if not isinstance(kind, str) or kind.lower() not in types:
                shown = ", ".join(types)
                self.add(f"{where}.type", f"required, one of: {shown}")
            entries.append((where, name, body))
        return entries

    def _value_text(self, where: str, value: Any) -> str | None:
        """A parameter value as AWSTOE sees it: a string. Image Builder's API gives
        values as lists of strings: one item is that string, several are joined
        with commas (a StringList)."""
        if isinstance(value, list):
            texts = [scalar_text(v) for v in value]
            if all(t is not None for t in texts):
                return ",".join(t for t in texts if t is not None)
            self.add(where, "expected a string or a list of strings")
            return None
        text = scalar_text(value)
        if text is None:
            self.add(where, "expected a string, not a map")
        return text

    def _parameters(self, raw: Any) -> list[ParameterSpec]:
        specs = []
        keys = ("type", "default", "description", "allowedValues")
        for where, name, body in self._named_entries(raw, "parameters", PARAMETER_TYPES):
            for key in body:
                if key not in keys:
                    self.add(f"{where}.{key}", f"unknown key (expected {', '.join(keys)})")
            default = None
            if body.get("default") is not None:
                default = self._value_text(f"{where}.default", body["default"])
            allowed: tuple[str, ...] = ()
            if body.get("allowedValues") is not None:
                values = body["allowedValues"]
                texts = [scalar_text(v) for v in values] if isinstance(values, list) else [None]
                if not texts or any(t is None for t in texts):
                    self.add(f"{where}.allowedValues", "expected a non-empty list of strings")
                else:
                    allowed = tuple(t for t in texts if t is not None)
            if default is not None and allowed and default not in allowed:
                self.add(f"{where}.default", f"{default!r} is not one of the allowedValues")
            description = scalar_text(body.get("description") or "") or ""
            kind = body.get("type")
            kind = kind.lower() if isinstance(kind, str) else "string"
            specs.append(ParameterSpec(name, default, description, kind, allowed))
        return specs

    def _constants(self, raw: Any, parameter_names: set[str]) -> dict[str, str]:
        constants = {}
        for where, name, body in self._named_entries(raw, "constants"):
            for key in body:
                if key not in ("type", "value", "description"):
                    self.add(f"{where}.{key}", "unknown key (expected type, value)")
            if name in parameter_names:
                self.add(where, "a parameter has the same name")
            value = scalar_text(body.get("value")) if body.get("value") is not None else None
            if value is None:
                self.add(f"{where}.value", "required, a string")
                continue
            constants[name] = value
        return constants

    def _parameter_values(
        self, specs: list[ParameterSpec], given: Mapping[str, Any], require_values: bool
    ) -> dict[str, str]:
        names = {s.name for s in specs}
        for key in given:
            if key not in names:
                # AWSTOE ignores a parameter the document does not declare.
                known = ", ".join(sorted(names)) or "none"
                close = difflib.get_close_matches(str(key), list(names), n=1)
                suggestion = f"; did you mean '{close[0]}'?" if close else ""
                self.warnings.append(
                    f"{self.display}: parameters.{key}: unknown parameter, ignored "
                    f"(the document has: {known}){suggestion}"
                )
        values = {}
        for spec in specs:
            if spec.name in given:
                value = self._value_text(f"parameters.{spec.name}", given[spec.name])
                if value is None:
                    continue
                if spec.allowed and value not in spec.allowed:
                    self.add(
                        f"parameters.{spec.name}",
                        f"{value!r} is not allowed (allowedValues: {', '.join(spec.allowed)})",
                    )
                values[spec.name] = value
            elif spec.default is not None:
                values[spec.name] = spec.default
            elif require_values:
                self.add(f"parameters.{spec.name}", "has no default and no value was given")
        return values

    # --- phases and steps --------------------------------------------------------

    def _phases(self, raw: Any) -> list[tuple[str, list[_StepDraft]]]:
        if raw is None:
            self.add("phases", "required: a list of {name, steps}")
            return []
        if not isinstance(raw, list) or not raw:
            self.add("phases", "expected a non-empty list of {name, steps}")
            return []
        phases: list[tuple[str, list[_StepDraft]]] = []
        seen: set[str] = set()
        for i, entry in enumerate(raw):
            if not isinstance(entry, dict):
                self.add(f"phases[{i}]", "expected a map with name and steps")
                continue
            name = entry.get("name")
            if not isinstance(name, str) or not name:
                self.add(f"phases[{i}].name", "required, a string")
                continue
            if name in seen:
                self.add(f"phases[{i}].name", f"phase '{name}' is declared twice")
            seen.add(name)
            for key in entry:
                if key not in ("name", "steps"):
                    self.add(f"{name}.{key}", "unknown key in a phase (expected name, steps)")
            phases.append((name, self._steps(name, entry.get("steps"))))
        if phases and not seen & set(STANDARD_PHASES):
            self.add("phases", "at least one of the phases build, validate or test is required")
        return phases

    def _steps(self, phase: str, raw: Any) -> list[_StepDraft]:
        if not isinstance(raw, list) or not raw:
            self.add(f"{phase}.steps", "expected a non-empty list of steps")
            return []
        if len(raw) > MAX_STEPS:
            # Bounded before anything walks them (later checks compare steps pairwise).
            self.add(f"{phase}.steps", f"{len(raw)} steps; at most {MAX_STEPS} in a phase")
            return []
        drafts: list[_StepDraft] = []
        names: set[str] = set()
        loops: set[str] = set()
        for i, entry in enumerate(raw):
            where = f"{phase}.steps[{i}]"
            if not isinstance(entry, dict):
                self.add(where, "expected a map with name, action and inputs")
                continue
            name = entry.get("name")
            if not isinstance(name, str) or not name:
                self.add(f"{where}.name", "required, a string")
                continue
            where = f"{phase}.{name}"
            if name in names:
                self.add(where, f"step '{name}' appears twice in phase '{phase}'")
            names.add(name)
            step = self._step(where, name, entry, loops)
            if step is not None:
                drafts.append(_StepDraft(phase, where, step, entry.get("inputs")))
        return drafts

    def _step(self, where: str, name: str, raw: dict[Any, Any], loops: set[str]) -> Step | None:
        for key in raw:
            if key not in _STEP_KEYS:
                self.add(
                    f"{where}.{key}", f"unknown key in a step (expected: {', '.join(_STEP_KEYS)})"
                )
        action = raw.get("action")
        spec = ACTIONS.get(action) if isinstance(action, str) else None
        if spec is None:
            self._unknown_action(where, action)
        nested = spec is not None and spec.name == "ExecuteDocument"
        timeout = self._timeout(where, raw.get("timeoutSeconds"), nested)
        attempts = self._attempts(where, raw.get("maxAttempts"), nested)
        on_failure = self._on_failure(where, raw.get("onFailure"))
        loop = parse_loop(f"{where}.loop", raw["loop"], loops, self.add) if "loop" in raw else None
        condition = None
        if "if" in raw:
            condition, problems = parse_if(raw["if"])
            for sub, message in problems:
                self.add(f"{where}.if" + (f".{sub}" if sub else ""), message)
        if spec is None:
            return None
        inputs = raw.get("inputs")
        if spec.shape is Shape.CONDITION:
            _, problems = parse_condition(inputs)
            for sub, message in problems:
                self.add(f"{where}.inputs" + (f".{sub}" if sub else ""), message)
        else:
            if inputs is None and not spec.inputs_optional:
                self.add(f"{where}.inputs", f"required for {spec.name}")
            else:
                _, problems = typed_items(spec, inputs, final=False)
                for sub, message in problems:
                    self.add(f"{where}.{sub}", message)
        return Step(
            name=name,
            action=spec.name,
            inputs=inputs,
            timeout_seconds=timeout,
            on_failure=on_failure,
            max_attempts=attempts,
            loop=loop,
            condition=condition,
        )

    def _unknown_action(self, where: str, action: Any) -> None:
        if action is None:
            self.add(f"{where}.action", "required")
        elif not isinstance(action, str):
            self.add(f"{where}.action", "expected the name of an action module")
        else:
            close = difflib.get_close_matches(str(action), list(ACTIONS), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            self.add(f"{where}.action", f"unknown action '{action}'{hint}")

    def _timeout(self, where: str, value: Any, nested: bool) -> int:
        default = NO_TIMEOUT if nested else DEFAULT_TIMEOUT_SECONDS
        if value is None:
            return default
        seconds = whole_number(f"{where}.timeoutSeconds", value, self.add)
        if seconds is None:
            return default
        if nested and seconds != NO_TIMEOUT:
            self.add(
                f"{where}.timeoutSeconds", "ExecuteDocument has no timeout: leave it out or use -1"
            )
        elif seconds == 0 or seconds < NO_TIMEOUT:
            self.add(
                f"{where}.timeoutSeconds",
                f"{seconds} is not allowed (a positive number, or -1 for no limit)",
            )
            return default
        return seconds

    def _attempts(self, where: str, value: Any, nested: bool) -> int:
        if value is None:
            return 1
        attempts = whole_number(f"{where}.maxAttempts", value, self.add)
        if attempts is None:
            return 1
        if attempts < 1:
            self.add(f"{where}.maxAttempts", f"must be at least 1, got {attempts}")
            return 1
        if nested and attempts != 1:
            self.add(f"{where}.maxAttempts", "ExecuteDocument runs once: leave it out or use 1")
        return attempts

    def _on_failure(self, where: str, value: Any) -> OnFailure:
        if value is None:
            return OnFailure.ABORT
        for choice in OnFailure:
            if isinstance(value, str) and value.lower() == choice.value.lower():
                return choice
        self.add(f"{where}.onFailure", f"expected Abort, Continue or Ignore, got {value!r}")
        return OnFailure.ABORT

    # --- references ----------------------------------------------------------------

    def _check_references(
        self, phases: list[tuple[str, list[_StepDraft]]], variables: set[str]
    ) -> None:
        earlier: dict[tuple[str, str], EarlierStep] = {}
        pending = {(d.phase, d.step.name) for _, drafts in phases for d in drafts}
        for _, drafts in phases:
            for draft in drafts:
                step = draft.step
                pending.discard((draft.phase, step.name))
                base = StaticScope(variables, earlier=dict(earlier), later=set(pending))
                if step.condition is not None:
                    for sub, value in condition_values(step.condition.condition):
                        self._report_refs(f"{draft.where}.if.{sub}", value, base)
                if isinstance(step.loop, ForEachLoop):
                    self._report_refs(f"{draft.where}.loop.forEach", list(step.loop.items), base)
                elif isinstance(step.loop, DelimitedLoop):
                    self._report_refs(f"{draft.where}.loop.forEach.list", step.loop.text, base)
                in_loop = StaticScope(
                    variables,
                    loop_name=step.loop.name if step.loop else None,
                    in_loop=step.loop is not None,
                    earlier=base.earlier,
                    later=base.later,
                )
                spec = ACTIONS[step.action]
                self._report_refs(
                    f"{draft.where}.inputs", draft.raw_inputs, in_loop, templates=spec.templates
                )
                earlier[(draft.phase, step.name)] = EarlierStep(
                    inputs=draft.raw_inputs,
                    input_names=frozenset(f.name for f in spec.fields),
                    outputs=spec.outputs,
                    action=spec.name,
                )

    def _report_refs(
        self, where: str, value: Any, scope: StaticScope, templates: tuple[str, ...] = ()
    ) -> None:
        for sub, message in check_references(value, scope, templates=templates):
            suffix = sub if sub.startswith("[") or not sub else f".{sub}"
            self.add(f"{where}{suffix}", message)

    def _assemble(self, phases: list[tuple[str, list[_StepDraft]]]) -> tuple[Phase, ...]:
        return tuple(Phase(name, tuple(d.step for d in drafts)) for name, drafts in phases)

    # --- ExecuteDocument children -----------------------------------------------------

    def _check_children(self, doc: Document, phases: list[tuple[str, list[_StepDraft]]]) -> None:
        checked: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
        for _, drafts in phases:
            for draft in drafts:
                if draft.step.action != "ExecuteDocument" or not isinstance(draft.raw_inputs, dict):
                    continue
                count = loop_count(draft.step.loop)
                if count is not None and count > MAX_EXECUTE_ITERATIONS:
                    self.add(
                        f"{draft.where}.loop",
                        f"runs ExecuteDocument {count} times; vmbuild allows at most "
                        f"{MAX_EXECUTE_ITERATIONS} nested documents per step",
                    )
                    continue
                for variables, loop in _static_iterations(draft.step, doc.variables):
                    scope = Scope(variables, loop=loop)
                    try:
                        document = render(str(draft.raw_inputs.get("document", "")), scope)
                        params = {
                            render(str(p["name"]), scope): render(str(p["value"]), scope)
                            for p in draft.raw_inputs.get("parameters") or []
                        }
                    except UnresolvedReference:
                        continue  # depends on outputs of earlier steps: checked when it runs
                    key = (document, tuple(sorted(params.items())))
                    if key in checked:
                        continue  # the same child with the same parameters: checked once
                    checked.add(key)
                    self._check_child(doc, draft, document, params)

    def _check_child(
        self, doc: Document, draft: _StepDraft, document: str, params: dict[str, str]
    ) -> None:
        where = f"{draft.where}.inputs.document"
        if document.startswith("arn:"):
            from vmbuild.toe.library import ComponentNotFound, find_component

            try:
                path = find_component(document, doc.path.parent)
            except ComponentNotFound as exc:
                self.add(where, str(exc))
                return
            display = document
        else:
            found = child_path(doc, document)
            if found is None:
                return  # on the instance or in S3: resolved when the step runs
            path, display = found, child_display(doc, document)
        _, problems = load_child(doc, path, host_identity(path), display, params, self.ancestors)
        for problem in problems:
            if problem.file == self.display:
                self.add(where, problem.message)
            else:
                self.problems.append(problem)


MAX_EXECUTE_ITERATIONS = 1000


def loop_count(loop: Loop | None) -> int | None:
    """How many iterations a loop has, when known before the run (never expanded)."""
    if isinstance(loop, ForLoop):
        return len(loop.range())
    if isinstance(loop, ForEachLoop):
        return len(loop.items)
    return None


def load_child(
    parent: Document,
    path: Path,
    identity: str,
    display: str,
    parameters: Mapping[str, str],
    ancestors: tuple[str, ...],
) -> tuple[Document | None, list[Problem]]:
    """The document `parent` runs through ExecuteDocument (read from the host
    file `path`), or the problems with it (a cycle, nesting deeper than
    MAX_NESTING, or its own content). `identity` says where it really lives."""
    chain = (*ancestors, parent.identity)
    if identity in chain:
        names = " -> ".join([*(_short(i) for i in chain), _short(identity)])
        return None, [Problem(parent.display_name, None, f"ExecuteDocument cycle: {names}")]
    if len(chain) > MAX_NESTING:
        message = f"ExecuteDocument nests deeper than {MAX_NESTING} levels ({_short(identity)})"
        return None, [Problem(parent.display_name, None, message)]
    return parse(path, parameters, display_name=display, ancestors=chain, identity=identity)


def _short(identity: str) -> str:
    return identity if identity.startswith("arn:") else identity.rsplit("/", 1)[-1]


def _static_iterations(
    step: Step, variables: dict[str, str]
) -> list[tuple[dict[str, str], LoopVars | None]]:
    """The loop iterations of a step as far as they are known before the run."""
    if step.loop is None:
        return [(variables, None)]
    scope = Scope(variables)
    try:
        if isinstance(step.loop, ForLoop):
            values = step.loop.values()
        elif isinstance(step.loop, ForEachLoop):
            values = [render(v, scope) for v in step.loop.items]
        else:
            values = render(step.loop.text, scope).split(step.loop.delimiter)
    except UnresolvedReference:
        return []
    if len(values) > MAX_EXECUTE_ITERATIONS:
        return []
    return [(variables, LoopVars(step.loop.name, i, v)) for i, v in enumerate(values)]
