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
import shlex
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmbuild import runs
from vmbuild.errors import ConfigError, GuestStopped, TransferError
from vmbuild.remote.base import OutputCallback, Remote, RemoteResult
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
from vmbuild.toe.document import INSTANCE, child_display, child_path, host_identity, load_child
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
from vmbuild.toe.loops import MAX_ITERATIONS
from vmbuild.toe.model import DelimitedLoop, Document, ForEachLoop, ForLoop, OnFailure, Step
from vmbuild.toe.results import DocumentResult, PhaseResult, Status, StepResult, now, overall
from vmbuild.yamlio import scalar_text

MAX_REBOOTS = 10
REBOOT_EXIT_CODE = 194
TAIL_LINES = 30
PROBE_TIMEOUT = 120.0
NO_SPACE = "No space left on device"  # strerror(ENOSPC), as every tool prints it
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
    working_directory: str | None = None,
) -> DocumentResult:
    """Run the document's `phases` (those it has, in document order) on `remote`.

    `on_output` receives the run log line by line (step headers, command
    output, outcomes). Steps run in `working_directory` on the guest (created
    if missing; Image Builder's recipe WorkingDirectory) when given. Raises
    ConfigError, before running anything, if a selected phase chains to a phase
    that is not selected (Image Builder runs build and test on different
    machines, so such a reference could never resolve).
    """
    check_phase_selection(doc, phases)
    if working_directory:
        remote = InDirectory(remote, working_directory)
    # Owned: a SIGKILLed build leaves it for the next vmbuild command to delete.
    with tempfile.TemporaryDirectory(prefix="vmbuild-toe-") as scratch, runs.owning(Path(scratch)):
        run = _Run(remote, on_output or (lambda line: None), s3, Path(scratch))
        return _execute(doc, phases, run, ancestors=())


@dataclass(frozen=True)
class InDirectory:
    """A Remote whose scripts start in `directory` (created if missing) and whose
    relative file paths are relative to it: AWSTOE's working directory."""

    remote: Remote
    directory: str

    def _path(self, path: str) -> str:
        return path if path.startswith("/") else f"{self.directory.rstrip('/')}/{path}"

    def run(
        self,
        script: str,
        *,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
        env: dict[str, str] | None = None,
    ) -> RemoteResult:
        folder = shlex.quote(self.directory)
        prefix = f"mkdir -p -- {folder} && cd -- {folder} || exit 1\n"
        return self.remote.run(prefix + script, timeout=timeout, on_output=on_output, env=env)

    def put(self, data: bytes, path: str, *, mode: int = 0o644) -> None:
        self.remote.put(data, self._path(path), mode=mode)

    def get(self, path: str) -> bytes:
        return self.remote.get(self._path(path))

    def reboot(self) -> None:
        self.remote.reboot()


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
    scratch: Path  # host folder for documents fetched from the instance or S3
    reboots: int = 0
    fetched: int = 0

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
    ancestors: tuple[str, ...]
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
    doc: Document, selected: Sequence[str], run: _Run, ancestors: tuple[str, ...]
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
            except GuestStopped as exc:
                # Nothing can run any more: end the step (and the run) at once,
                # saying which step the guest died in.
                raise GuestStopped(
                    exc.vm, exc.cause, console_tail=exc.console_tail, during=f"step {self.label}"
                ) from None
            except (StepError, ActionFailed, UnresolvedReference, TransferError) as exc:
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

    def _iterations(self) -> Iterator[LoopVars | None]:
        loop = self.step.loop
        if loop is None:
            yield None
            return
        scope = self.state.scope()
        values: Sequence[str] | range
        if isinstance(loop, ForLoop):
            values = loop.range()  # never materialised: a loop may be very long
        elif isinstance(loop, ForEachLoop):
            values = [render(v, scope) for v in loop.items]
        else:
            values = render(loop.text, scope).split(loop.delimiter)
            if len(values) > MAX_ITERATIONS:
                raise StepError(
                    f"the list splits into {len(values)} items; at most {MAX_ITERATIONS}"
                )
        self.result.loop = {"name": loop.name or "", "iterations": len(values)}
        for i, value in enumerate(values):
            yield LoopVars(loop.name, i, str(value))

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
        rendered = render_value(self.step.inputs, scope, templates=self.spec.templates)
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
            try:
                result = self.run.remote.run(
                    script, timeout=deadline.remaining(), on_output=on_output
                )
            except TransferError as exc:
                raise StepError(f"the step's script could not be uploaded: {exc}") from None
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
            message = f"exit code {result.exit_code}" + (f": {last.strip()}" if last else "")
            if NO_SPACE in result.stderr or NO_SPACE in result.stdout:
                message += " (the guest's disk is full)"
            raise StepError(message)
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
        parent = self.state.doc
        document = item["document"].strip()
        parameters = {p["name"]: p["value"] for p in item["parameters"] or []}
        path, identity, display = self._find_document(document, item)
        child, problems = load_child(
            parent, path, identity, display, parameters, self.state.ancestors
        )
        if child is None:
            raise StepError(str(problems[0]) if problems else f"cannot load {document}")
        for warning in child.warnings:
            self.run.log(f"    warning: {warning}")
        wanted = [p.strip() for p in (item["phases"] or "").split(",") if p.strip()]
        missing = [p for p in wanted if p not in child.phases]
        if missing:
            raise StepError(f"{child.display_name} has no phase {', '.join(missing)}")
        nested = _execute(
            child,
            wanted or list(child.phases),
            self.run,
            (*self.state.ancestors, parent.identity),
        )
        self.result.nested.append(nested)
        outputs = _summary(nested)
        if nested.status is Status.FAILED:
            self.result.outputs = outputs
            raise StepError(f"{child.display_name}: {nested.failure_message}")
        return outputs

    def _find_document(self, document: str, item: Item) -> tuple[Path, str, str]:
        """(host file holding the document, where it really lives, display name).

        Resolved as AWSTOE does when the step runs: an ARN through the component
        library, an S3 URI through the host's S3 access, a path relative to a
        parent file on the host, else a path on the instance (absolute, relative
        to a parent fetched from the instance, or to the working directory).
        """
        parent = self.state.doc
        where = f"(ExecuteDocument step {self.label} of {parent.display_name or parent.path})"
        if document.startswith("arn:"):
            from vmbuild.toe.library import ComponentNotFound, find_component

            try:
                path = find_component(document, parent.path.parent)
            except ComponentNotFound as exc:
                raise StepError(f"{exc} {where}") from None
            return path, host_identity(path), document
        if document.startswith("s3://"):
            return self._from_s3(document, item["document-s3-bucket-owner"], where)
        on_host = child_path(parent, document)
        if on_host is not None:
            return on_host, host_identity(on_host), child_display(parent, document)
        guest = document
        if not document.startswith("/") and parent.identity.startswith(INSTANCE):
            guest = f"{parent.identity[len(INSTANCE) :].rsplit('/', 1)[0]}/{document}"
        found = self.run.remote.run(
            f'p=$(readlink -f -- {shlex.quote(guest)}) && [ -f "$p" ] && printf \'%s\' "$p"\n',
            timeout=PROBE_TIMEOUT,
        )
        if found.exit_code != 0 or not found.stdout.strip():
            host_hint = "" if document.startswith("/") else f" next to {parent.path} nor"
            raise StepError(
                f"document {document!r} not found:{host_hint} on the instance at {guest} {where}"
            )
        absolute = found.stdout.strip()
        return (
            self._scratch_file(self.run.remote.get(absolute), absolute),
            INSTANCE + absolute,
            absolute,
        )

    def _from_s3(self, uri: str, owner: str | None, where: str) -> tuple[Path, str, str]:
        from vmbuild.toe.actions.s3 import S3Config, parse_s3_uri

        try:
            bucket, key = parse_s3_uri(uri)
            extra = {"ExpectedBucketOwner": owner} if owner else {}
            client = (self.run.s3 or S3Config()).client()
            data = client.get_object(Bucket=bucket, Key=key, **extra)["Body"].read()
        except Exception as exc:  # botocore's errors, a bad URI: the step fails, with why
            raise StepError(f"cannot read {uri}: {exc} {where}") from None
        return self._scratch_file(data, uri), uri, uri

    def _scratch_file(self, data: bytes, origin: str) -> Path:
        # One folder per fetched document, so it keeps its own file name (a
        # document without `name:` is named after its file, as AWSTOE shows it).
        self.run.fetched += 1
        name = origin.rstrip("/").rsplit("/", 1)[-1] or "document.yaml"
        folder = self.run.scratch / f"{self.run.fetched:03d}"
        folder.mkdir()
        path = folder / name
        path.write_bytes(data)
        return path


def _summary(nested: DocumentResult) -> dict[str, str]:
    """ExecuteDocument's outputs: the nested run's summary, as AWSTOE writes it."""
    steps = [s for p in nested.phases for s in p.steps]
    status = nested.status.value
    return {
        "executedStepCount": str(sum(1 for s in steps if s.status is not Status.SKIPPED)),
        "executionId": nested.execution_id,
        "failedStepCount": str(sum(1 for s in steps if s.status is Status.FAILED)),
        "failureMessage": nested.failure_message,
        "ignoredFailedStepCount": str(sum(1 for s in steps if s.status is Status.IGNORED_FAILURE)),
        "logUrl": "",
        "status": status[:1].lower() + status[1:],
    }


def _describe(condition: Condition, scope: Scope) -> str:
    if isinstance(condition, Logical):
        inner = ", ".join(_describe(c, scope) for c in condition.operands)
        return f"{condition.operator}({inner})"
    operand = render_value(condition.operand, scope)
    if condition.value is None:
        return f"{condition.operator} {operand!r}"
    return f"{condition.operator} {operand!r}, value {render_value(condition.value, scope)!r}"
