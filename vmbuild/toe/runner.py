"""Run a validated document against a guest, step by step, as AWSTOE does.

Semantics (AWSTOE's, from its documentation):

* phases run in document order, steps in order; `if` is evaluated once, before
  the step, and a skipped step counts as a success;
* a failed attempt is retried up to maxAttempts, re-running every loop
  iteration; timeoutSeconds covers one attempt of the whole step;
* onFailure: Abort stops the document (Failed), Continue goes on but the phase
  and document end Failed, Ignore records IgnoredFailure and the document ends
  SuccessWithIgnoredFailure;
* a command exiting 194 reboots the guest and the same step (the same loop
  iteration) runs again; the Reboot action reboots and continues with the next
  step. More than MAX_REBOOTS reboots in one run is a failure, not a loop forever.

Step failures never raise: they are in the DocumentResult. Losing the guest
(SSH gone, reboot that never comes back) raises, since nothing can go on.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmbuild.errors import ConfigError
from vmbuild.remote.base import Remote, RemoteResult
from vmbuild.toe.actions import ACTIONS, S3Config
from vmbuild.toe.actions.base import ActionFailed, ActionSpec, HostContext, Item, Shape, typed_items
from vmbuild.toe.conditions import (
    Condition,
    Logical,
    StepAction,
    condition_values,
    evaluate,
    parse_condition,
)
from vmbuild.toe.document import load_child
from vmbuild.toe.expressions import (
    ChainRef,
    LoopVars,
    NotAReference,
    Scope,
    UnresolvedReference,
    find_references,
    render,
    render_value,
)
from vmbuild.toe.model import DelimitedLoop, Document, ForEachLoop, ForLoop, OnFailure, Step
from vmbuild.toe.results import DocumentResult, PhaseResult, Status, StepResult, now, overall
from vmbuild.toe.yamlio import scalar_text

MAX_REBOOTS = 10
REBOOT_EXIT_CODE = 194
TAIL_LINES = 30
PROBE_TIMEOUT = 120.0
sleep: Callable[[float], None] = time.sleep  # replaced in tests

Log = Callable[[str], None]


class StepError(Exception):
    """This attempt of the step failed; the message is its failureMessage."""


def run_document(
    doc: Document,
    remote: Remote,
    *,
    phases: Sequence[str],
    on_output: Callable[[str], None] | None = None,
    s3: S3Config | None = None,
) -> DocumentResult:
    """Run the document's `phases` (those it has, in document order) on `remote`.

    `on_output` receives the run log line by line (step headers, command
    output, outcomes). Raises ConfigError, before running anything, if a selected
    phase chains to a phase that is not selected (Image Builder runs build and
    test on different machines, so such a reference could never resolve).
    """
    check_phase_selection(doc, phases)
    run = _Run(remote, on_output or (lambda line: None), s3)
    return _execute(doc, phases, run, ancestors=())


def check_phase_selection(doc: Document, selected: Sequence[str]) -> None:
    """Raise ConfigError if a selected phase chains to one of the document's
    phases that is not selected (its outputs would never exist)."""
    for phase in doc.phase_defs:
        if phase.name not in selected:
            continue
        for step in phase.steps:
            for ref in _chain_refs([step.inputs, step.loop, _condition_operands(step)]):
                if ref.phase not in selected and ref.phase in doc.phases:
                    raise ConfigError(
                        doc.display_name or str(doc.path),
                        f"{phase.name}.{step.name}",
                        f"refers to '{ref}', but phase '{ref.phase}' is not run "
                        f"(phases run: {', '.join(p for p in doc.phases if p in selected)})",
                    )


def _condition_operands(step: Step) -> list[Any]:
    return (
        [value for _, value in condition_values(step.condition.condition)] if step.condition else []
    )


def _chain_refs(value: Any) -> Iterator[ChainRef]:
    if isinstance(value, str):
        try:
            yield from (r for r in find_references(value) if isinstance(r, ChainRef))
        except NotAReference:
            return
    elif isinstance(value, dict):
        for sub in value.values():
            yield from _chain_refs(sub)
    elif isinstance(value, list | tuple):
        for sub in value:
            yield from _chain_refs(sub)
    elif isinstance(value, ForEachLoop):
        yield from _chain_refs(list(value.items))
    elif isinstance(value, DelimitedLoop):
        yield from _chain_refs(value.text)


@dataclass
class _Run:
    """State shared by a run and its nested documents."""

    remote: Remote
    log: Log
    s3: S3Config | None
    reboots: int = 0

    def reboot(self, why: str) -> None:
        self.reboots += 1
        if self.reboots > MAX_REBOOTS:
            raise StepError(
                f"more than {MAX_REBOOTS} reboots in one run ({why}); "
                "a step that exits 194 must succeed once the reboot has happened"
            )
        self.log(f"--- rebooting the guest ({why})")
        started = time.monotonic()
        self.remote.reboot()
        self.log(f"--- guest is back after {time.monotonic() - started:.0f}s")


@dataclass
class _DocState:
    doc: Document
    ancestors: tuple[Path, ...]
    inputs: dict[tuple[str, str], Any] = field(default_factory=dict)
    outputs: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)

    def chain(self, ref: ChainRef) -> str:
        key = (ref.phase, ref.step)
        if key not in self.outputs:
            raise UnresolvedReference(f"'{ref}': step {ref.phase}.{ref.step} has not run")
        if ref.kind == "outputs":
            return self.outputs[key].get(ref.key, "")
        inputs = self.inputs.get(key)
        if isinstance(inputs, list):
            inputs = inputs[ref.index or 0] if (ref.index or 0) < len(inputs) else {}
        value = inputs.get(ref.key) if isinstance(inputs, dict) else None
        if isinstance(value, list | dict):
            return json.dumps(value)  # e.g. `commands`: no better text for a list
        return scalar_text(value) or ""

    def scope(self, loop: LoopVars | None = None) -> Scope:
        return Scope(self.doc.variables, loop=loop, chain=self.chain)


def _execute(
    doc: Document, selected: Sequence[str], run: _Run, ancestors: tuple[Path, ...]
) -> DocumentResult:
    result = DocumentResult(
        name=doc.name,
        path=doc.path,
        sha256=doc.sha256,
        description=doc.description,
        parameters=dict(doc.parameters),
    )
    state = _DocState(doc, ancestors)
    label = doc.display_name or doc.path.name
    run.log(f"=== {label}: phases {', '.join(p for p in doc.phases if p in selected) or '(none)'}")
    for phase in doc.phase_defs:
        if phase.name not in selected:
            continue
        phase_result = PhaseResult(phase.name)
        result.phases.append(phase_result)
        aborted = False
        for step in phase.steps:
            step_result = _run_step(step, phase.name, state, run)
            phase_result.steps.append(step_result)
            if step_result.status is Status.FAILED and (
                step.on_failure is OnFailure.ABORT or step_result.stops_document
            ):
                aborted = True
                break
        phase_result.status = overall(s.status for s in phase_result.steps)
        phase_result.ended = now()
        if aborted:
            break
    result.status = overall(p.status for p in result.phases)
    result.ended = now()
    run.log(f"=== {label}: {result.status.value}")
    return result


def _run_step(step: Step, phase: str, state: _DocState, run: _Run) -> StepResult:
    spec = ACTIONS[step.action]
    result = StepResult(
        name=step.name,
        action=step.action,
        timeout_seconds=step.timeout_seconds,
        on_failure=step.on_failure.value,
        max_attempts=step.max_attempts,
        inputs=step.inputs,
    )
    runner = _StepRunner(step, spec, phase, state, run, result)
    run.log(f"==> {phase}/{step.name} ({step.action})")
    reboots_before = run.reboots
    try:
        decision = runner.decide()
    except (StepError, UnresolvedReference) as exc:
        decision = None
        result.failure_message = f"if: {exc}"
    if decision is StepAction.EXECUTE:
        runner.attempts()
    else:
        # Not run: later references to it see empty outputs, as for AWSTOE's skips.
        state.outputs[(phase, step.name)] = {key: "" for key in spec.outputs}
        state.inputs[(phase, step.name)] = step.inputs
        if decision is StepAction.SKIP:
            result.status = Status.SKIPPED
        else:
            result.status = Status.FAILED
        if decision is StepAction.ABORT:
            result.failure_message = "the if condition chose Abort"
            result.stops_document = True  # an explicit Abort stops whatever onFailure says
    ignore = step.on_failure is OnFailure.IGNORE and not result.stops_document
    if result.status is Status.FAILED and ignore:
        result.status = Status.IGNORED_FAILURE
    result.reboots = run.reboots - reboots_before
    result.ended = now()
    outcome = f"<== {phase}/{step.name}: {result.status.value} ({result.duration:.1f}s"
    if result.attempts > 1:
        outcome += f", {result.attempts} attempts"
    outcome += ")"
    if result.failure_message and result.status is not Status.SUCCESS:
        outcome += f": {result.failure_message}"
    run.log(outcome)
    return result


class _Deadline:
    """The time left for one attempt of a step (restarted after a reboot)."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.restart()

    def restart(self) -> None:
        self.at = None if self.seconds is None else time.monotonic() + self.seconds

    def remaining(self) -> float | None:
        if self.at is None:
            return None
        left = self.at - time.monotonic()
        if left <= 0:
            raise StepError(f"timed out after {self.seconds:.0f}s (timeoutSeconds)")
        # Whole seconds, rounded up: guest-side timeout(1) takes integers and
        # would read a truncated 0 as "no limit".
        return float(math.ceil(left))


@dataclass
class _StepRunner:
    step: Step
    spec: ActionSpec
    phase: str
    state: _DocState
    run: _Run
    result: StepResult
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))

    @property
    def label(self) -> str:
        return f"{self.phase}/{self.step.name}"

    def decide(self) -> StepAction:
        clause = self.step.condition
        if clause is None:
            return StepAction.EXECUTE
        scope = self.state.scope()
        value = evaluate(clause.condition, lambda v: render_value(v, scope), self._probe)
        decision = clause.decide(value)
        self.run.log(f"    if: {str(value).lower()} -> {decision.value}")
        return decision

    def _probe(self, script: str) -> RemoteResult:
        return self.run.remote.run(script, timeout=PROBE_TIMEOUT)

    def attempts(self) -> None:
        key = (self.phase, self.step.name)
        for attempt in range(1, self.step.max_attempts + 1):
            self.result.attempts = attempt
            try:
                outputs = self._attempt()
            except (StepError, ActionFailed, UnresolvedReference) as exc:
                self.result.status = Status.FAILED
                self.result.failure_message = str(exc)
                left = self.step.max_attempts - attempt
                self.run.log(
                    f"    attempt {attempt} failed: {exc}" + (f"; {left} left" if left else "")
                )
                continue
            self.result.status = Status.SUCCESS
            self.result.failure_message = ""
            self.result.outputs = outputs
            break
        self.result.output_tail = list(self.tail)
        self.state.outputs[key] = self.result.outputs or {k: "" for k in self.spec.outputs}
        self.result.inputs = self.state.inputs.get(key, self.step.inputs)

    def _iterations(self) -> list[LoopVars | None]:
        loop = self.step.loop
        if loop is None:
            return [None]
        scope = self.state.scope()
        if isinstance(loop, ForLoop):
            values = loop.values()
        elif isinstance(loop, ForEachLoop):
            values = [render(v, scope) for v in loop.items]
        else:
            values = render(loop.text, scope).split(loop.delimiter)
        self.result.loop = {"name": loop.name or "", "iterations": len(values)}
        return [LoopVars(loop.name, i, v) for i, v in enumerate(values)]

    def _attempt(self) -> dict[str, str]:
        deadline = _Deadline(self.step.timeout)
        collected: dict[str, list[str]] = {}
        for loop in self._iterations():
            if loop is not None:
                self.run.log(f"    iteration {loop.index}: {loop.value}")
            try:
                outputs = self._iteration(loop, deadline)
            except (StepError, ActionFailed, UnresolvedReference) as exc:
                if loop is None:
                    raise
                raise StepError(f"iteration {loop.index} ({loop.value}): {exc}") from exc
            for key, value in outputs.items():
                collected.setdefault(key, []).append(value)
        # Loop outputs are the iterations' outputs joined by newlines, as AWSTOE does.
        return {key: "\n".join(values) for key, values in collected.items()}

    def _iteration(self, loop: LoopVars | None, deadline: _Deadline) -> dict[str, str]:
        scope = self.state.scope(loop)
        key = (self.phase, self.step.name)
        if self.spec.shape is Shape.CONDITION:
            self.state.inputs[key] = render_value(self.step.inputs, scope)
            return self._assert(scope)
        rendered = render_value(self.step.inputs, scope)
        items, problems = typed_items(self.spec, rendered, final=True)
        if problems:
            where, message = problems[0]
            raise StepError(f"{where}: {message}")
        self.state.inputs[key] = items if self.spec.shape is Shape.LIST else items[0]
        if self.spec.name == "Reboot":
            return self._reboot(items[0])
        if self.spec.name == "ExecuteDocument":
            return self._execute_document(items[0])
        if self.spec.host is not None:
            context = HostContext(self.run.remote, self.run.s3, deadline.at, self._log_line)
            deadline.remaining()
            return self.spec.host(items, context)
        return self._script(items, deadline)

    def _script(self, items: list[Item], deadline: _Deadline) -> dict[str, str]:
        assert self.spec.script is not None
        script = self.spec.script(items)
        streamed = [0]

        def on_output(stream: str, line: str) -> None:
            streamed[0] += 1
            self._remote_line(stream, line)

        while True:
            streamed[0] = 0
            result = self.run.remote.run(script, timeout=deadline.remaining(), on_output=on_output)
            if not streamed[0]:  # a Remote that does not stream still fills the run log
                for stream, text in (("stdout", result.stdout), ("stderr", result.stderr)):
                    for line in text.splitlines():
                        self._remote_line(stream, line)
            if result.timed_out:
                raise StepError(f"timed out after {self.step.timeout_seconds}s (timeoutSeconds)")
            if result.exit_code == REBOOT_EXIT_CODE:
                self.run.reboot(f"{self.label} exited {REBOOT_EXIT_CODE}")
                deadline.restart()
                self.run.log(f"    running {self.label} again after the reboot")
                continue
            break
        if result.exit_code != 0:
            last = next((line for line in reversed(result.stderr.splitlines()) if line.strip()), "")
            raise StepError(f"exit code {result.exit_code}" + (f": {last.strip()}" if last else ""))
        outputs = self.spec.parse_outputs(result, items) if self.spec.parse_outputs else {}
        if self.spec.name == "ReadFile" and any(item["printFileContent"] for item in items):
            for line in outputs.get("content", "").splitlines():
                self._log_line(line)
        return outputs

    def _remote_line(self, stream: str, line: str) -> None:
        if stream == "stdout" and not self.spec.log_stdout:
            return
        self._log_line(line if stream == "stdout" else f"(stderr) {line}")

    def _log_line(self, line: str) -> None:
        self.tail.append(line)
        self.run.log(f"[{self.label}] {line}")

    def _assert(self, scope: Scope) -> dict[str, str]:
        condition, _ = parse_condition(self.step.inputs)
        assert condition is not None  # validated when the document was loaded
        if not evaluate(condition, lambda v: render_value(v, scope), self._probe):
            raise StepError(f"assertion is false: {_describe(condition, scope)}")
        return {}

    def _reboot(self, item: Item) -> dict[str, str]:
        delay = int(item["delaySeconds"] or 0)
        if delay > 0:
            self.run.log(f"    waiting {delay}s before rebooting")
            sleep(delay)
        self.run.reboot(f"{self.label}: Reboot action")
        return {}

    def _execute_document(self, item: Item) -> dict[str, str]:
        parameters = {p["name"]: p["value"] for p in item["parameters"] or []}
        child, problems = load_child(
            self.state.doc, item["document"], parameters, self.state.ancestors
        )
        if child is None:
            raise StepError(str(problems[0]) if problems else f"cannot load {item['document']}")
        wanted = [p.strip() for p in (item["phases"] or "").split(",") if p.strip()]
        missing = [p for p in wanted if p not in child.phases]
        if missing:
            raise StepError(f"{child.display_name} has no phase {', '.join(missing)}")
        nested = _execute(
            child,
            wanted or list(child.phases),
            self.run,
            (*self.state.ancestors, self.state.doc.path),
        )
        self.result.nested.append(nested)
        if nested.status is Status.FAILED:
            raise StepError(f"{child.display_name}: {nested.failure_message}")
        return {}


def _describe(condition: Condition, scope: Scope) -> str:
    if isinstance(condition, Logical):
        inner = ", ".join(_describe(c, scope) for c in condition.operands)
        return f"{condition.operator}({inner})"
    operand = render_value(condition.operand, scope)
    if condition.value is None:
        return f"{condition.operator} {operand!r}"
    return f"{condition.operator} {operand!r}, value {render_value(condition.value, scope)!r}"
