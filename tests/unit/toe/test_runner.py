"""The runner's semantics against a scripted Remote: outcomes, retries,
timeouts, reboots, loops, conditions, chaining, nesting and results."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.support.toe import ScriptedRemote, write
from vmbuild.errors import ConfigError
from vmbuild.remote.base import RemoteResult
from vmbuild.toe import MAX_REBOOTS, Status, load_document, run_document
from vmbuild.toe import runner as runner_mod

ALL = ("build", "validate", "test")


def steps(*lines: str, top: str = "", phase: str = "build") -> str:
    body = "\n".join(lines)
    return f"schemaVersion: 1.0\n{top}phases:\n  - name: {phase}\n    steps:\n{body}\n"


def bash(name: str, *commands: str, extra: str = "") -> str:
    cmds = ", ".join(json.dumps(c) for c in commands)
    return f"      - name: {name}\n        action: ExecuteBash\n{extra}        inputs: {{commands: [{cmds}]}}"


def run(
    tmp_path: Path, text: str, remote: ScriptedRemote, phases: tuple[str, ...] = ALL, **params: str
):  # type: ignore[no-untyped-def]
    doc = load_document(write(tmp_path, text), params)
    lines: list[str] = []
    result = run_document(doc, remote, phases=phases, on_output=lines.append)
    return result, lines


def exit_codes(mapping: dict[str, list[int]]) -> ScriptedRemote:
    """A remote where a script containing KEY exits with the next code of its list."""

    def handler(script: str) -> tuple[int, str, str]:
        for key, codes in mapping.items():
            if key in script:
                code = codes.pop(0) if len(codes) > 1 else codes[0]
                return code, f"{key} ran\n", "" if code == 0 else f"{key} failed\n"
        return 0, "", ""

    return ScriptedRemote(handler)


def statuses(result) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    return [(s.name, s.status.value) for p in result.phases for s in p.steps]


def test_steps_run_in_order_and_outputs_chain(tmp_path: Path) -> None:
    remote = ScriptedRemote(lambda s: (0, "v1.2\n", "") if "version" in s else (0, "", ""))
    text = steps(
        bash("Version", "echo version"),
        bash(
            "Use",
            "echo got {{ build.Version.outputs.stdout }} for {{ build.Version.inputs.commands }}",
        ),
    )
    result, _ = run(tmp_path, text, remote)
    assert result.status is Status.SUCCESS
    assert remote.scripts == ["echo version\n", 'echo got v1.2 for ["echo version"]\n']


def test_on_failure_abort_stops_the_document(tmp_path: Path) -> None:
    remote = exit_codes({"bad": [3]})
    text = steps(bash("Bad", "bad"), bash("Never", "never"))
    result, _ = run(tmp_path, text, remote)
    assert result.status is Status.FAILED
    assert statuses(result) == [("Bad", "Failed")]
    assert result.failed_step == "build/Bad"
    assert result.failure_message == "build/Bad: exit code 3: bad failed"
    assert result.failure_tail == "bad ran\n(stderr) bad failed"


def test_on_failure_continue_runs_on_but_fails_the_document(tmp_path: Path) -> None:
    remote = exit_codes({"bad": [1]})
    text = steps(bash("Bad", "bad", extra="        onFailure: Continue\n"), bash("Next", "next"))
    result, _ = run(tmp_path, text, remote)
    assert statuses(result) == [("Bad", "Failed"), ("Next", "Success")]
    assert result.status is Status.FAILED and result.phases[0].status is Status.FAILED


def test_on_failure_ignore_gives_success_with_ignored_failure(tmp_path: Path) -> None:
    remote = exit_codes({"bad": [1]})
    text = steps(bash("Bad", "bad", extra="        onFailure: Ignore\n"), bash("Next", "next"))
    result, _ = run(tmp_path, text, remote)
    assert statuses(result) == [("Bad", "IgnoredFailure"), ("Next", "Success")]
    assert result.status is Status.SUCCESS_WITH_IGNORED_FAILURE
    assert result.failed_step is None


def test_a_retry_that_succeeds_on_the_second_attempt(tmp_path: Path) -> None:
    remote = exit_codes({"flaky": [1, 0]})
    result, lines = run(
        tmp_path, steps(bash("Flaky", "flaky", extra="        maxAttempts: 3\n")), remote
    )
    step = result.phases[0].steps[0]
    assert (step.status, step.attempts, step.failure_message) == (Status.SUCCESS, 2, "")
    assert len(remote.scripts) == 2
    assert any("attempt 1 failed: exit code 1" in line for line in lines)


def test_attempts_run_out(tmp_path: Path) -> None:
    remote = exit_codes({"bad": [1]})
    result, _ = run(tmp_path, steps(bash("Bad", "bad", extra="        maxAttempts: 3\n")), remote)
    assert result.phases[0].steps[0].attempts == 3 and len(remote.scripts) == 3


def test_the_timeout_is_given_to_the_guest_and_a_timeout_fails_the_step(tmp_path: Path) -> None:
    remote = ScriptedRemote(lambda s: RemoteResult(124, "", "", 5.0, timed_out=True))
    result, _ = run(
        tmp_path, steps(bash("Slow", "sleep 100", extra="        timeoutSeconds: 5\n")), remote
    )
    assert 4.5 < (remote.calls[0][1] or 0) <= 5
    step = result.phases[0].steps[0]
    assert step.status is Status.FAILED
    assert step.failure_message == "timed out after 5s (timeoutSeconds)"


def test_no_timeout_with_minus_one(tmp_path: Path) -> None:
    remote = ScriptedRemote()
    run(tmp_path, steps(bash("Long", "x", extra="        timeoutSeconds: -1\n")), remote)
    assert remote.calls[0][1] is None


def test_exit_194_reboots_and_runs_the_same_step_again(tmp_path: Path) -> None:
    remote = exit_codes({"kernel": [194, 0]})
    text = steps(bash("Before", "before"), bash("Kernel", "kernel"), bash("After", "after"))
    result, lines = run(tmp_path, text, remote)
    assert remote.reboots == 1
    assert [s.splitlines()[0] for s in remote.scripts] == ["before", "kernel", "kernel", "after"]
    kernel = result.phases[0].steps[1]
    assert (kernel.status, kernel.attempts, kernel.reboots) == (Status.SUCCESS, 1, 1)
    assert any("rebooting the guest (build/Kernel exited 194)" in line for line in lines)


def test_a_step_that_always_asks_for_a_reboot_fails_after_the_cap(tmp_path: Path) -> None:
    remote = exit_codes({"forever": [194]})
    result, _ = run(tmp_path, steps(bash("Forever", "forever")), remote)
    assert remote.reboots == MAX_REBOOTS
    step = result.phases[0].steps[0]
    assert (
        step.status is Status.FAILED and f"more than {MAX_REBOOTS} reboots" in step.failure_message
    )


def test_the_reboot_action_reboots_and_continues(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slept: list[float] = []
    monkeypatch.setattr(runner_mod, "sleep", slept.append)
    remote = ScriptedRemote()
    text = steps(
        "      - name: Restart\n        action: Reboot\n        inputs: {delaySeconds: 7}",
        bash("After", "after"),
    )
    result, _ = run(tmp_path, text, remote)
    assert (remote.reboots, slept, remote.scripts) == (1, [7], ["after\n"])
    assert result.status is Status.SUCCESS


def test_loops_run_each_iteration_and_join_outputs(tmp_path: Path) -> None:
    remote = ScriptedRemote(lambda s: (0, s.replace("echo ", ""), ""))
    text = steps(
        bash("Each", "echo {{ loop.index }}:{{ L.value }}",
             extra="        loop:\n          name: L\n          forEach: [a, b, c]\n"),
        bash("For", "echo {{ loop.value }}",
             extra="        loop:\n          for: {start: 10, end: 0, updateBy: -5}\n"),
        bash("Split", "echo {{ loop.value }}",
             extra="        loop:\n          forEach: {list: 'x;y', delimiter: ';'}\n"),
        bash("Joined", "echo {{ build.Each.outputs.stdout }}"),
    )  # fmt: skip
    result, _ = run(tmp_path, text, remote)
    assert remote.scripts[:3] == ["echo 0:a\n", "echo 1:b\n", "echo 2:c\n"]
    assert remote.scripts[3:6] == ["echo 10\n", "echo 5\n", "echo 0\n"]
    assert remote.scripts[6:8] == ["echo x\n", "echo y\n"]
    assert remote.scripts[8] == "echo 0:a\n1:b\n2:c\n"
    assert result.phases[0].steps[0].outputs == {"stdout": "0:a\n1:b\n2:c"}


def test_a_failing_iteration_names_itself_and_a_retry_reruns_every_iteration(
    tmp_path: Path,
) -> None:
    remote = exit_codes({"b": [1, 1, 0]})
    text = steps(
        bash("Each", "echo {{ loop.value }}",
             extra="        maxAttempts: 2\n        loop:\n          forEach: [a, b]\n"),
    )  # fmt: skip
    result, _ = run(tmp_path, text, remote)
    step = result.phases[0].steps[0]
    assert step.status is Status.FAILED
    assert step.failure_message == "iteration 1 (b): exit code 1: b failed"
    assert [s.strip() for s in remote.scripts] == ["echo a", "echo b", "echo a", "echo b"]


def test_if_skips_a_step_and_a_skip_counts_as_success(tmp_path: Path) -> None:
    remote = ScriptedRemote()
    text = steps(
        bash(
            "Maybe",
            "maybe",
            extra="        if:\n          stringEquals: yes\n          value: '{{ Flag }}'\n",
        ),
        bash("Next", "next"),
        top="parameters:\n  - Flag: {type: string, default: 'no'}\n",
    )
    result, lines = run(tmp_path, text, remote)
    assert statuses(result) == [("Maybe", "Skipped"), ("Next", "Success")]
    assert result.status is Status.SUCCESS and remote.scripts == ["next\n"]
    assert "    if: false -> Skip" in lines


def test_if_then_else_and_abort(tmp_path: Path) -> None:
    remote = ScriptedRemote()
    text = steps(
        bash("Inverted", "inverted", extra="        if:\n          stringIsEmpty: ''\n          then: Skip\n          else: Execute\n"),
        bash("Stop", "stop", extra="        onFailure: Continue\n        if:\n          numberGreaterThan: 1\n          value: 2\n          else: Abort\n"),
        bash("Never", "never"),
    )  # fmt: skip
    result, _ = run(tmp_path, text, remote)
    assert statuses(result) == [("Inverted", "Skipped"), ("Stop", "Failed")]
    assert result.phases[0].steps[1].failure_message == "the if condition chose Abort"
    assert remote.scripts == []


def test_a_condition_that_cannot_be_evaluated_fails_the_step_by_its_on_failure(
    tmp_path: Path,
) -> None:
    # A child run for its test phase only: its condition chains to its build phase.
    write(
        tmp_path,
        "schemaVersion: 1.0\nphases:\n"
        "  - {name: build, steps: [{name: Pick, action: ExecuteBash, inputs: {commands: [p]}}]}\n"
        "  - name: test\n    steps:\n"
        "      - name: Check\n        action: ExecuteBash\n        onFailure: Ignore\n"
        "        if: {stringEquals: x, value: '{{ build.Pick.outputs.stdout }}'}\n"
        "        inputs: {commands: [check]}\n"
        "      - {name: Next, action: ExecuteBash, inputs: {commands: [next]}}\n",
        "child.yaml",
    )
    text = steps(
        "      - name: Nested\n        action: ExecuteDocument\n"
        "        inputs: {document: child.yaml, phases: test}"
    )
    remote = ScriptedRemote()
    result, _ = run(tmp_path, text, remote)
    child = result.phases[0].steps[0].nested[0]
    assert statuses(child) == [("Check", "IgnoredFailure"), ("Next", "Success")]
    assert child.phases[0].steps[0].failure_message == (
        "if: 'build.Pick.outputs.stdout': step build.Pick has not run"
    )
    assert remote.scripts == ["next\n"]


def test_conditions_that_look_at_the_guest(tmp_path: Path) -> None:
    remote = ScriptedRemote(lambda s: (1 if "command -v" in s and "dnf" in s else 0, "", ""))
    text = steps(
        bash("Apt", "apt", extra="        if: {binaryExists: apt-get}\n"),
        bash("Dnf", "dnf", extra="        if: {binaryExists: dnf}\n"),
    )
    result, _ = run(tmp_path, text, remote)
    assert statuses(result) == [("Apt", "Success"), ("Dnf", "Skipped")]
    assert remote.scripts[0] == "command -v -- apt-get >/dev/null 2>&1"


def test_assert_passes_and_fails_with_what_it_compared(tmp_path: Path) -> None:
    remote = ScriptedRemote(lambda s: (0, "2.1.1\n", ""))
    text = steps(
        bash("Version", "app --version"),
        "      - name: Ok\n        action: Assert\n        inputs:\n"
        "          stringEquals: '2.1.1'\n          value: '{{ build.Version.outputs.stdout }}'",
        "      - name: Newer\n        action: Assert\n        inputs:\n"
        "          numberGreaterThanEquals: 3\n          value: '{{ build.Version.outputs.stdout }}'",
    )
    result, _ = run(tmp_path, text, remote)
    assert statuses(result) == [("Version", "Success"), ("Ok", "Success"), ("Newer", "Failed")]
    assert result.phases[0].steps[2].failure_message == (
        "assertion is false: numberGreaterThanEquals 3, value '2.1.1'"
    )


def test_only_selected_phases_run_in_document_order(tmp_path: Path) -> None:
    text = (
        "schemaVersion: 1.0\nphases:\n"
        "  - {name: build, steps: [{name: B, action: ExecuteBash, inputs: {commands: [b]}}]}\n"
        "  - {name: validate, steps: [{name: V, action: ExecuteBash, inputs: {commands: [v]}}]}\n"
        "  - {name: test, steps: [{name: T, action: ExecuteBash, inputs: {commands: [t]}}]}\n"
    )
    remote = ScriptedRemote()
    result, _ = run(tmp_path, text, remote, phases=("test", "build"))
    assert remote.scripts == ["b\n", "t\n"]
    assert [p.name for p in result.phases] == ["build", "test"]


def test_chaining_to_a_phase_that_does_not_run_is_refused_before_anything_runs(
    tmp_path: Path,
) -> None:
    text = (
        "schemaVersion: 1.0\nphases:\n"
        "  - {name: build, steps: [{name: B, action: ExecuteBash, inputs: {commands: [b]}}]}\n"
        "  - name: test\n    steps:\n"
        "      - {name: T, action: ExecuteBash, inputs: {commands: ['echo {{ build.B.outputs.stdout }}']}}\n"
    )
    remote = ScriptedRemote()
    with pytest.raises(
        ConfigError,
        match=re.escape("refers to 'build.B.outputs.stdout', but phase 'build' is not run"),
    ):
        run(tmp_path, text, remote, phases=("test",))
    assert remote.calls == []


def test_a_remote_that_does_not_stream_still_fills_the_log(tmp_path: Path) -> None:
    remote = ScriptedRemote(lambda s: (0, "out line\n", "err line\n"), stream=False)
    _, lines = run(tmp_path, steps(bash("Quiet", "x")), remote)
    assert "[build/Quiet] out line" in lines and "[build/Quiet] (stderr) err line" in lines


def test_read_file_content_stays_out_of_the_log_unless_asked(tmp_path: Path) -> None:
    remote = ScriptedRemote(lambda s: (0, "c2VjcmV0\n", ""))  # base64 of "secret"
    text = steps(
        "      - name: Quiet\n        action: ReadFile\n        inputs: [{path: /a}]",
        "      - name: Loud\n        action: ReadFile\n        inputs: [{path: /a, printFileContent: true}]",
    )
    result, lines = run(tmp_path, text, remote)
    assert result.phases[0].steps[0].outputs == {"content": "secret"}
    assert [line for line in lines if "secret" in line or "c2Vj" in line] == ["[build/Loud] secret"]


def test_inputs_rendered_at_run_time_are_type_checked_then(tmp_path: Path) -> None:
    text = steps(
        "      - name: Write\n        action: CreateFile\n"
        "        inputs: [{path: /x, overwrite: '{{ Over }}'}]",
        top="parameters:\n  - Over: {type: string, default: perhaps}\n",
    )
    remote = ScriptedRemote()
    result, _ = run(tmp_path, text, remote)
    assert result.phases[0].steps[0].failure_message == (
        "inputs[0].overwrite: expected true or false, got 'perhaps'"
    )
    assert remote.calls == []


def test_execute_document_runs_the_child_and_nests_its_output(tmp_path: Path) -> None:
    write(
        tmp_path,
        steps(bash("Hello", "echo {{ Who }}"), top="parameters:\n  - Who: {type: string}\n"),
        "child.yaml",
    )
    text = steps(
        "      - name: Nested\n        action: ExecuteDocument\n        inputs:\n"
        "          document: child.yaml\n          phases: build\n"
        "          parameters:\n            - {name: Who, value: '{{ Greeting }}'}",
        top="parameters:\n  - Greeting: {type: string, default: world}\n",
    )
    remote = ScriptedRemote()
    result, _ = run(tmp_path, text, remote)
    assert remote.scripts == ["echo world\n"]
    nested = result.phases[0].steps[0].nested[0]
    assert nested.status is Status.SUCCESS and nested.parameters == {"Who": "world"}
    detail = result.to_detailed_output()
    inner = detail["documents"][0]["phases"][0]["steps"][0]["detailedOutput"][0]
    assert inner["documents"][0]["phases"][0]["steps"][0]["name"] == "Hello"
    json.dumps(detail)  # all JSON-able


def test_execute_document_fails_with_its_child(tmp_path: Path) -> None:
    write(tmp_path, steps(bash("Bad", "bad")), "child.yaml")
    text = steps(
        "      - name: Nested\n        action: ExecuteDocument\n        inputs: {document: child.yaml}"
    )
    result, _ = run(tmp_path, text, exit_codes({"bad": [2]}))
    step = result.phases[0].steps[0]
    assert step.status is Status.FAILED
    assert step.failure_message.endswith("child.yaml: build/Bad: exit code 2: bad failed")


def test_a_cycle_known_only_at_run_time_fails_the_step(tmp_path: Path) -> None:
    text = steps(
        bash("Pick", "pick"),
        "      - name: Again\n        action: ExecuteDocument\n"
        "        inputs: {document: '{{ build.Pick.outputs.stdout }}'}",
    )
    remote = ScriptedRemote(lambda s: (0, "doc.yaml\n", ""))
    result, _ = run(tmp_path, text, remote)
    step = result.phases[0].steps[1]
    assert (
        step.status is Status.FAILED
        and "ExecuteDocument cycle: doc.yaml -> doc.yaml" in step.failure_message
    )


def test_a_child_downloaded_on_the_instance_runs_and_its_summary_chains(
    tmp_path: Path,
) -> None:
    child = steps(
        bash("Inner", "echo inner"),
        bash("Skipped", "never", extra="        if: {stringEquals: a, value: b}\n"),
    )
    text = steps(
        bash("Fetch", "fetch child"),
        "      - name: Nested\n        action: ExecuteDocument\n"
        "        inputs: {document: /opt/docs/child.yaml, phases: build}",
        bash(
            "Report",
            "echo {{ build.Nested.outputs.status }} {{ build.Nested.outputs.executedStepCount }}",
        ),
    )
    remote = ScriptedRemote(
        lambda script: (0, "/opt/docs/child.yaml", "") if "readlink -f" in script else (0, "", "")
    )
    remote.files["/opt/docs/child.yaml"] = child.encode()
    result, lines = run(tmp_path, text, remote)
    assert result.status is Status.SUCCESS, result.failure_message
    assert remote.scripts[0] == "fetch child\n"
    assert "readlink -f -- /opt/docs/child.yaml" in remote.scripts[1]
    assert remote.scripts[2:] == ["echo inner\n", "echo success 1\n"]
    nested = result.phases[0].steps[1]
    assert nested.outputs == {
        "executedStepCount": "1",
        "executionId": nested.nested[0].execution_id,
        "failedStepCount": "0",
        "failureMessage": "",
        "ignoredFailedStepCount": "0",
        "logUrl": "",
        "status": "success",
    }
    assert "=== /opt/docs/child.yaml: phases build" in lines


def test_a_child_found_nowhere_names_the_parent_step(tmp_path: Path) -> None:
    text = steps(
        "      - name: Nested\n        action: ExecuteDocument\n"
        "        inputs: {document: child.yaml}"
    )
    remote = ScriptedRemote(lambda script: (1, "", "") if "readlink" in script else (0, "", ""))
    result, _ = run(tmp_path, text, remote)
    step = result.phases[0].steps[0]
    assert step.status is Status.FAILED
    assert step.failure_message == (
        f"document 'child.yaml' not found: next to {tmp_path / 'doc.yaml'} nor on the instance "
        f"at child.yaml (ExecuteDocument step build/Nested of {tmp_path / 'doc.yaml'})"
    )


def test_a_managed_component_arn_runs_the_built_in(tmp_path: Path) -> None:
    text = steps(
        "      - name: Managed\n        action: ExecuteDocument\n        inputs:\n"
        "          document: arn:aws:imagebuilder:eu-west-1:aws:component/update-linux/x.x.x\n"
        "          phases: build\n"
        "          parameters: [{name: RebootIfRequired, value: 'false'}]"
    )
    remote = ScriptedRemote()
    result, _ = run(tmp_path, text, remote)
    assert result.status is Status.SUCCESS, result.failure_message
    assert result.phases[0].steps[0].nested[0].name == "update-linux"
    assert any("apt-get" in script for script in remote.scripts)


def test_steps_run_in_the_working_directory(tmp_path: Path) -> None:
    doc = load_document(write(tmp_path, steps(bash("Here", "pwd"))))
    remote = ScriptedRemote()
    run_document(doc, remote, phases=["build"], working_directory="/var/tmp/work dir")
    assert remote.scripts == [
        "mkdir -p -- '/var/tmp/work dir' && cd -- '/var/tmp/work dir' || exit 1\npwd\n"
    ]


def test_a_long_for_loop_is_never_materialised(tmp_path: Path) -> None:
    text = steps(
        "      - name: Many\n        action: ExecuteBash\n"
        "        loop: {for: {start: 1, end: 10000, updateBy: 1}}\n"
        "        inputs: {commands: ['echo {{ loop.value }}']}"
    )
    calls = []

    def handler(script: str) -> tuple[int, str, str]:
        calls.append(script)
        return (1, "", "stop") if len(calls) == 3 else (0, "", "")

    result, _ = run(tmp_path, text, ScriptedRemote(handler))
    step = result.phases[0].steps[0]
    # (The largest loop validation accepts: 10**12 iterations is refused at load.)
    assert step.loop == {"name": "", "iterations": 10000}
    assert calls == ["echo 1\n", "echo 2\n", "echo 3\n"]
    assert step.failure_message == "iteration 2 (3): exit code 1: stop"


def test_detailed_output_looks_like_awstoe(tmp_path: Path) -> None:
    remote = ScriptedRemote(lambda s: (0, "hi\n", ""))
    result, _ = run(
        tmp_path, steps(bash("Say", "echo hi", extra="        timeoutSeconds: 30\n")), remote
    )
    detail = result.to_detailed_output()
    assert detail["status"] == "Success" and detail["failureMessage"] == ""
    document = detail["documents"][0]
    assert document["filePath"].endswith("doc.yaml") and len(document["sha256"]) == 64
    step = document["phases"][0]["steps"][0]
    assert step["action"] == "ExecuteBash" and step["timeoutSeconds"] == 30
    assert step["onFailure"] == "Abort" and step["maxAttempts"] == 1 and step["attempts"] == 1
    assert json.loads(step["inputs"]) == [{"commands": ["echo hi"]}]
    assert json.loads(step["outputs"]) == [{"stdout": "hi"}]
    assert step["startTime"] and step["endTime"] and step["duration"] >= 0


def test_a_script_that_cannot_be_uploaded_fails_its_step_with_the_reason(tmp_path: Path) -> None:
    from vmbuild.errors import TransferError

    def handler(script: str) -> tuple[int, str, str]:
        if "second" in script:
            raise TransferError(
                "cannot upload /dev/shm/vmbuild-1.sh to the guest: OSError: Failure; "
                "the guest's memory (tmpfs) is full (/dev/shm: 0 KiB free)"
            )
        return 0, "", ""

    remote = ScriptedRemote(handler)
    result, _ = run(tmp_path, steps(bash("First", "echo first"), bash("Second", "echo second"),
                                         bash("Third", "echo third")), remote)  # fmt: skip
    assert statuses(result) == [("First", "Success"), ("Second", "Failed")]
    failed = result.phases[0].steps[1]
    assert failed.failure_message == (
        "the step's script could not be uploaded: cannot upload /dev/shm/vmbuild-1.sh to the "
        "guest: OSError: Failure; the guest's memory (tmpfs) is full (/dev/shm: 0 KiB free)"
    )
    assert not any("third" in s for s in remote.scripts)


def test_out_of_space_in_a_step_is_named(tmp_path: Path) -> None:
    remote = ScriptedRemote(
        lambda s: (1, "", "dd: error writing '/var/fill': No space left on device\n")
    )
    result, _ = run(tmp_path, steps(bash("Fill", "dd if=/dev/zero of=/var/fill")), remote)
    assert result.phases[0].steps[0].failure_message == (
        "exit code 1: dd: error writing '/var/fill': No space left on device "
        "(the guest's disk is full)"
    )


def test_a_guest_that_stops_ends_the_run_naming_the_step(tmp_path: Path) -> None:
    from vmbuild.errors import GuestStopped

    def handler(script: str) -> tuple[int, str, str]:
        raise GuestStopped("vm1", "guest kernel panic", console_tail="Kernel panic - not syncing")

    with pytest.raises(GuestStopped) as info:
        run(tmp_path, steps(bash("Crash", "echo c > /proc/sysrq-trigger")), ScriptedRemote(handler))
    assert info.value.cause == "guest kernel panic"
    assert str(info.value).splitlines()[0] == "vm1: guest kernel panic during step build/Crash"
