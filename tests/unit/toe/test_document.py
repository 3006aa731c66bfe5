"""Parsing and validation of component documents: every problem is found before
anything runs, and each names the file, phase, step and field."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.toe import write
from vmbuild.errors import ConfigError
from vmbuild.toe import declared_parameters, load_document, validate_file
from vmbuild.toe.model import ForEachLoop, ForLoop, OnFailure

GOOD = """
name: Example
description: An example.
schemaVersion: 1.0
parameters:
  - Greeting:
      type: string
      default: hello
      description: What to say.
  - Who:
      type: string
      description: Required.
constants:
  - Folder:
      type: string
      value: /opt/example
phases:
  - name: build
    steps:
      - name: Say
        action: ExecuteBash
        timeoutSeconds: 60
        onFailure: Continue
        maxAttempts: 3
        inputs:
          commands:
            - echo "{{ Greeting }} {{ Who }}"
      - name: Write
        action: CreateFile
        inputs:
          - path: "{{ Folder }}/out.txt"
            content: "{{ build.Say.outputs.stdout }}"
            permissions: 0640
  - name: custom-phase
    steps:
      - name: Loop
        action: ExecuteBash
        loop:
          name: L
          for: {start: 1, end: 5, updateBy: 2}
        inputs:
          commands: ['echo {{ L.value }} {{ loop.index }}']
  - name: test
    steps:
      - name: Read
        action: ReadFile
        timeoutSeconds: -1
        inputs:
          - path: "{{ build.Write.inputs[0].path }}"
"""


def problems(tmp_path: Path, text: str) -> list[str]:
    return validate_file(write(tmp_path, text))


def one_problem(tmp_path: Path, text: str) -> str:
    found = problems(tmp_path, text)
    assert len(found) == 1, found
    return found[0]


def step_doc(step: str, extra_top: str = "") -> str:
    """A document with one build step (given as YAML indented for a step)."""
    body = "\n".join("      " + line if line else line for line in step.strip("\n").splitlines())
    return f"schemaVersion: 1.0\n{extra_top}phases:\n  - name: build\n    steps:\n{body}\n"


def test_a_good_document_loads_with_everything_typed(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    doc = load_document(path, {"Who": "world"}, display_name="example.yaml")
    assert doc.name == "Example" and doc.description == "An example."
    assert doc.phases == ("build", "custom-phase", "test")  # document order, custom names kept
    assert doc.parameters == {"Greeting": "hello", "Who": "world"}
    assert doc.constants == {"Folder": "/opt/example"}
    import hashlib

    assert doc.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    say = doc.phase("build").steps[0]
    assert (say.timeout, say.on_failure, say.max_attempts) == (60.0, OnFailure.CONTINUE, 3)
    write_step = doc.phase("build").steps[1]
    assert write_step.timeout == 7200.0  # the AWSTOE default
    assert write_step.inputs[0]["permissions"].source == "0640"  # octal text is kept
    loop = doc.phase("custom-phase").steps[0].loop
    assert isinstance(loop, ForLoop) and loop.values() == ["1", "3", "5"]
    assert doc.phase("test").steps[0].timeout is None  # -1: no limit


def test_parameters_from_the_caller_are_strings(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    doc = load_document(path, {"Who": 17, "Greeting": True})
    assert doc.parameters == {"Greeting": "true", "Who": "17"}


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({}, "doc.yaml: parameters.Who: has no default and no value was given"),
        ({"Who": {"a": "b"}}, "parameters.Who: expected a string, not a map"),
        ({"Who": ["a", {"b": 1}]}, "parameters.Who: expected a string or a list of strings"),
    ],
)
def test_bad_parameter_values_are_config_errors(
    tmp_path: Path, given: dict[str, object], message: str
) -> None:
    path = write(tmp_path, GOOD)
    with pytest.raises(ConfigError) as err:
        load_document(path, given, display_name="doc.yaml")
    assert message in str(err.value)


def test_an_unknown_parameter_is_ignored_with_a_warning_naming_the_close_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    doc = load_document(write(tmp_path, GOOD), {"Who": "x", "Greting": "hi"}, display_name="d")
    assert doc.parameters == {"Greeting": "hello", "Who": "x"}
    expected = (
        "d: parameters.Greting: unknown parameter, ignored "
        "(the document has: Greeting, Who); did you mean 'Greeting'?"
    )
    assert doc.warnings == (expected,)
    assert [r.getMessage() for r in caplog.records] == [expected]


def test_values_as_image_builder_lists_of_strings(tmp_path: Path) -> None:
    doc = load_document(write(tmp_path, GOOD), {"Who": ["world"], "Greeting": ["a", "b"]})
    assert doc.parameters == {"Greeting": "a,b", "Who": "world"}


def test_image_builder_parameter_types_and_allowed_values(tmp_path: Path) -> None:
    text = step_doc(
        "- name: A\n  action: ExecuteBash\n  inputs: {commands: ['echo {{ Mode }} {{ Num }}']}",
        "parameters:\n"
        "  - Mode: {type: String, default: [fast], allowedValues: [fast, slow]}\n"
        "  - Num: {type: Integer, default: 3}\n"
        "  - Flags: {type: StringList, default: [a, b]}\n"
        "  - Enabled: {type: Boolean, default: true}\n",
    )
    path = write(tmp_path, text)
    doc = load_document(path)
    assert doc.parameters == {"Mode": "fast", "Num": "3", "Flags": "a,b", "Enabled": "true"}
    assert [s.type for s in doc.parameter_specs] == ["string", "integer", "stringlist", "boolean"]
    assert load_document(path, {"Mode": "slow"}).parameters["Mode"] == "slow"
    with pytest.raises(
        ConfigError, match=r"parameters.Mode: 'medium' is not allowed \(allowedValues: fast, slow\)"
    ):
        load_document(path, {"Mode": "medium"})
    bad_default = step_doc(
        "- name: A\n  action: ExecuteBash\n  inputs: {commands: [x]}",
        "parameters:\n  - Mode: {type: string, default: x, allowedValues: [a]}\n",
    )
    assert one_problem(tmp_path, bad_default).endswith(
        "parameters.Mode.default: 'x' is not one of the allowedValues"
    )


def test_validate_file_does_not_need_parameter_values(tmp_path: Path) -> None:
    assert problems(tmp_path, GOOD) == []


def test_declared_parameters_says_which_are_required(tmp_path: Path) -> None:
    assert declared_parameters(write(tmp_path, GOOD)) == {"Greeting": False, "Who": True}


def test_load_document_reports_the_first_problem_and_counts_the_rest(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        step_doc(
            """
- name: A
  action: Nope
- name: B
  action: ExecuteBash
  timeoutSeconds: 0
  inputs: {commands: [x]}
"""
        ),
    )
    with pytest.raises(ConfigError) as err:
        load_document(path, display_name="d.yaml")
    assert str(err.value) == "d.yaml: build.A.action: unknown action 'Nope'"
    assert err.value.hint is not None and "1 more problem" in err.value.hint


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("phases: []\n", "schemaVersion: required"),
        ("schemaVersion: 2.0\nphases: []\n", "schemaVersion: only 1.0 is supported"),
        ("schemaVersion: 1.0\n", "phases: required"),
        ("- just a list\n", "expected a YAML map"),
        ("schemaVersion: 1.0\nphases: {a: 1}\n", "phases: expected a non-empty list"),
        ("schemaVersion: 1.0\nnmae: x\nphases: []\n", "nmae: unknown key"),
        ("schemaVersion: 1.0\nphases:\n  - name: custom\n    steps: []\n", "custom.steps"),
        ("schemaVersion: [1\n", "invalid YAML"),
    ],
)
def test_document_level_problems(tmp_path: Path, text: str, expected: str) -> None:
    assert any(expected in p for p in problems(tmp_path, text)), problems(tmp_path, text)


def test_a_standard_phase_is_required(tmp_path: Path) -> None:
    text = step_doc("- name: A\n  action: ExecuteBash\n  inputs: {commands: [x]}\n")
    found = problems(tmp_path, text.replace("name: build", "name: custom"))
    assert found == [
        f"{tmp_path / 'doc.yaml'}: phases: at least one of the phases build, validate or test is required"
    ]


def test_duplicate_yaml_keys_are_reported_with_their_line(tmp_path: Path) -> None:
    text = step_doc("- name: A\n  action: ExecuteBash\n  action: ExecuteBinary\n  inputs: {}\n")
    assert "line 7: key 'action' appears twice" in one_problem(tmp_path, text)


def test_duplicate_phase_and_step_names(tmp_path: Path) -> None:
    text = (
        "schemaVersion: 1.0\nphases:\n"
        "  - name: build\n    steps:\n"
        "      - {name: A, action: ExecuteBash, inputs: {commands: [x]}}\n"
        "      - {name: A, action: ExecuteBash, inputs: {commands: [y]}}\n"
        "  - name: build\n    steps:\n"
        "      - {name: B, action: ExecuteBash, inputs: {commands: [x]}}\n"
    )
    found = problems(tmp_path, text)
    assert any("build.A: step 'A' appears twice in phase 'build'" in p for p in found)
    assert any("phases[1].name: phase 'build' is declared twice" in p for p in found)


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (
            "- name: A\n  action: ExecuteBsh\n  inputs: {}",
            "build.A.action: unknown action 'ExecuteBsh' (did you mean ExecuteBash?)",
        ),
        (
            "- name: A\n  action: ExecutePowerShell\n  inputs: {commands: [x]}",
            "build.A.action: Windows guests are not supported yet",
        ),
        ("- name: A\n  inputs: {}", "build.A.action: required"),
        ("- action: ExecuteBash\n  inputs: {commands: [x]}", "build.steps[0].name: required"),
        (
            "- name: A\n  action: ExecuteBash\n  timeoutSeconds: 0\n  inputs: {commands: [x]}",
            "build.A.timeoutSeconds: 0 is not allowed",
        ),
        (
            "- name: A\n  action: ExecuteBash\n  timeoutSeconds: -5\n  inputs: {commands: [x]}",
            "build.A.timeoutSeconds: -5 is not allowed",
        ),
        (
            "- name: A\n  action: ExecuteBash\n  timeoutSeconds: '60'\n  inputs: {commands: [x]}",
            "build.A.timeoutSeconds: expected a whole number",
        ),
        (
            "- name: A\n  action: ExecuteBash\n  onFailure: Retry\n  inputs: {commands: [x]}",
            "build.A.onFailure: expected Abort, Continue or Ignore",
        ),
        (
            "- name: A\n  action: ExecuteBash\n  maxAttempts: 0\n  inputs: {commands: [x]}",
            "build.A.maxAttempts: must be at least 1",
        ),
        (
            "- name: A\n  action: ExecuteBash\n  retries: 2\n  inputs: {commands: [x]}",
            "build.A.retries: unknown key in a step",
        ),
        ("- name: A\n  action: ExecuteBash", "build.A.inputs: required for ExecuteBash"),
        (
            "- name: A\n  action: ExecuteBash\n  inputs: {commands: echo hi}",
            "build.A.inputs.commands: expected a list of strings",
        ),
        (
            "- name: A\n  action: ExecuteBash\n  inputs: {command: [x]}",
            "build.A.inputs.command: unknown input for ExecuteBash",
        ),
        (
            "- name: A\n  action: ExecuteBash\n  inputs: [{commands: [x]}]",
            "build.A.inputs: ExecuteBash expects a map of inputs",
        ),
        (
            "- name: A\n  action: CreateFile\n  inputs: [{content: x}]",
            "build.A.inputs[0].path: required input is missing",
        ),
        (
            "- name: A\n  action: CreateFile\n  inputs: [{path: /x, overwrite: maybe}]",
            "build.A.inputs[0].overwrite: expected true or false, got 'maybe'",
        ),
        (
            "- name: A\n  action: CreateFile\n  inputs: [{path: /x, content: yes}]",
            "build.A.inputs[0].content: expected a string, got true (quote it)",
        ),
        (
            "- name: A\n  action: CreateFile\n  inputs: [{path: /x, encoding: latin1}]",
            "build.A.inputs[0].encoding: expected one of utf8",
        ),
        (
            "- name: A\n  action: CreateFile\n  inputs: [{path: /x, permissions: rwx}]",
            "build.A.inputs[0].permissions: expected permissions such as 0644",
        ),
        (
            "- name: A\n  action: CreateFile\n  inputs: [{path: /x, owner: 'a:b'}]",
            "build.A.inputs[0].owner: expected a user or group name",
        ),
        (
            "- name: A\n  action: CopyFile\n  inputs: [{source: /a/*.log, destination: /b}]",
            "build.A.inputs[0].destination: must end with / when the source has a wildcard",
        ),
        (
            "- name: A\n  action: DeleteFolder\n  inputs: [{path: /, force: true}]",
            "build.A.inputs[0].path: refusing to delete /",
        ),
        (
            "- name: A\n  action: WebDownload\n  inputs: [{source: ftp://x/y, destination: /tmp/}]",
            "build.A.inputs[0].source: expected an http:// or https:// URL",
        ),
        (
            "- name: A\n  action: WebDownload\n  inputs: [{source: 'https://x/y', destination: /tmp/, checksum: 'not hex'}]",
            "build.A.inputs[0].checksum: expected a hexadecimal digest",
        ),
        (
            "- name: A\n  action: S3Download\n  inputs: [{source: /not/s3, destination: /tmp/}]",
            "build.A.inputs[0].source: expected an s3://bucket/key URI",
        ),
        (
            "- name: A\n  action: Reboot\n  inputs: {delaySeconds: soon}",
            "build.A.inputs.delaySeconds: expected a whole number",
        ),
        (
            "- name: A\n  action: ExecuteDocument\n  timeoutSeconds: 60\n  inputs: {document: x.yaml}",
            "ExecuteDocument has no timeout",
        ),
        (
            "- name: A\n  action: ExecuteDocument\n  maxAttempts: 2\n  inputs: {document: x.yaml}",
            "ExecuteDocument runs once",
        ),
        (
            "- name: A\n  action: ExecuteDocument\n  inputs: {document: ' '}",
            "build.A.inputs.document: must not be empty",
        ),
        (
            "- name: A\n  action: ExecuteDocument\n  inputs: {document: x.yaml, parameters: {a: b}}",
            "build.A.inputs.parameters: expected a list of {name, value} maps",
        ),
        (
            "- name: A\n  action: Assert\n  inputs: {stringEquals: a}",
            "build.A.inputs: stringEquals needs 'value'",
        ),
        (
            "- name: A\n  action: Assert\n  inputs: {numberEquals: x, value: 1}",
            "build.A.inputs.numberEquals: expected a number, got 'x'",
        ),
        (
            "- name: A\n  action: Assert\n  inputs: {numberEquals: 1, value: x}",
            "build.A.inputs.value: expected a number, got 'x'",
        ),
    ],
)
def test_step_problems_name_phase_step_and_field(tmp_path: Path, step: str, expected: str) -> None:
    found = problems(tmp_path, step_doc(step))
    assert any(expected in p for p in found), found


def test_optional_inputs_may_be_left_out(tmp_path: Path) -> None:
    text = step_doc("- name: U\n  action: UpdateOS\n- name: R\n  action: Reboot\n")
    assert problems(tmp_path, text) == []


@pytest.mark.parametrize(
    ("loop", "expected"),
    [
        ("for: {start: 1, end: 3, updateBy: 0}", "never reaches the end"),
        ("for: {start: 5, end: 1, updateBy: 1}", "never reaches the end"),
        ("for: {start: 1, end: '{{ N }}', updateBy: 1}", "loop.for.end: expected a whole number"),
        ("for: {start: 1, end: 3}", "loop.for.updateBy: required"),
        ("forEach: {list: 'a|b', delimiter: '|'}", "loop.forEach.delimiter: one character of"),
        ("forEach: []", "loop.forEach: expected a non-empty list of strings"),
        (
            "forEach: [a]\n    for: {start: 1, end: 2, updateBy: 1}",
            "needs exactly one of for or forEach",
        ),
        ("name: 'bad name'\n    forEach: [a]", "loop.name: letters, digits"),
    ],
)
def test_loop_problems(tmp_path: Path, loop: str, expected: str) -> None:
    step = f"- name: A\n  action: ExecuteBash\n  loop:\n    {loop}\n  inputs: {{commands: [x]}}"
    found = problems(tmp_path, step_doc(step))
    assert any(expected in p for p in found), found


def test_loops_parse(tmp_path: Path) -> None:
    text = step_doc(
        """
- name: A
  action: ExecuteBash
  loop:
    forEach: [a, 2, "{{ Pre }}"]
  inputs: {commands: ['echo {{ loop.value }}']}
""",
        "parameters:\n  - Pre: {type: string, default: x}\n",
    )
    doc = load_document(write(tmp_path, text))
    loop = doc.phase("build").steps[0].loop
    assert isinstance(loop, ForEachLoop) and loop.items == ("a", "2", "{{ Pre }}")


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        ("echo {{ Missing }}", "unknown parameter or constant 'Missing' (the document declares no"),
        ("echo {{ build.Nope.outputs.stdout }}", "there is no step 'Nope' in a phase 'build'"),
        ("echo {{ build.Later.outputs.stdout }}", "refers to a step that has not run yet"),
        (
            "echo {{ build.First.outputs.stdot }}",
            "ExecuteBash has no output 'stdot' (its outputs: stdout)",
        ),
        ("echo {{ build.First.inputs[3].commands }}", "the inputs of step 'First' are not a list"),
        ("echo {{ build.Files.inputs[2].path }}", "step 'Files' has 1 input item(s)"),
        ("echo {{ build.Files.inputs[0].size }}", "step 'Files' has no input 'size'"),
        ("echo {{ a.b.c }}", "'{{ a.b.c }}' is not a valid reference"),
    ],
)
def test_unresolvable_references_are_found_before_running(
    tmp_path: Path, inputs: str, expected: str
) -> None:
    text = step_doc(
        f"""
- name: First
  action: ExecuteBash
  inputs: {{commands: [x]}}
- name: Files
  action: CreateFile
  inputs: [{{path: /tmp/x}}]
- name: Uses
  action: ExecuteBash
  inputs:
    commands: ['{inputs}']
- name: Later
  action: ExecuteBash
  inputs: {{commands: [y]}}
"""
    )
    found = problems(tmp_path, text)
    assert len(found) == 1 and "build.Uses.inputs.commands[0]: " in found[0], found
    assert expected in found[0]


def test_references_are_case_sensitive_and_suggest(tmp_path: Path) -> None:
    text = step_doc(
        "- name: A\n  action: ExecuteBash\n  inputs: {commands: ['echo {{ version }}']}",
        "parameters:\n  - Version: {type: string, default: '1'}\n",
    )
    assert "unknown parameter or constant 'version' (did you mean 'Version'?)" in one_problem(
        tmp_path, text
    )


def test_text_that_is_not_a_reference_is_left_alone(tmp_path: Path) -> None:
    text = step_doc(
        "- name: A\n  action: ExecuteBash\n"
        "  inputs: {commands: [\"docker inspect -f '{{ .State.Status }}' x\", 'echo {{}}']}"
    )
    assert problems(tmp_path, text) == []


def test_references_in_conditions_and_loops_are_checked(tmp_path: Path) -> None:
    text = step_doc(
        """
- name: A
  action: ExecuteBash
  if:
    stringEquals: x
    value: '{{ Nope }}'
  loop:
    forEach: ['{{ loop.value }}']
  inputs: {commands: [x]}
"""
    )
    found = problems(tmp_path, text)
    # `{{ loop.value }}` in the loop's own list is left as written, as AWSTOE does
    assert found == [
        f"{tmp_path / 'doc.yaml'}: build.A.if.value: unknown parameter or constant 'Nope' (the document declares no parameters or constants)"
    ]


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ("if: {stringEqual: a, value: b}", "build.A.if: no operator in condition"),
        ("if: {stringEquals: a, numberEquals: 1, value: b}", "more than one operator"),
        (
            "if: {stringEquals: a, value: b, then: Run}",
            "build.A.if.then: expected Execute, Skip or Abort",
        ),
        (
            "if: {and: {stringEquals: a, value: b}}",
            "build.A.if.and: 'and' takes a list of conditions",
        ),
        ("if: {patternMatches: '(', value: b}", "invalid regular expression"),
        ("if: {fileMD5Equals: abc}", "fileMD5Equals needs 'path'"),
        (
            "if: {not: {not: {not: {not: {not: {stringIsEmpty: ''}}}}}}",
            "logical operators nest at most 4 deep",
        ),
    ],
)
def test_condition_problems(tmp_path: Path, condition: str, expected: str) -> None:
    step = f"- name: A\n  action: ExecuteBash\n  {condition}\n  inputs: {{commands: [x]}}"
    found = problems(tmp_path, step_doc(step))
    assert any(expected in p for p in found), found


def test_parameter_and_constant_declarations(tmp_path: Path) -> None:
    text = step_doc(
        "- name: A\n  action: ExecuteBash\n  inputs: {commands: [x]}",
        "parameters:\n"
        "  - ab: {type: string}\n"
        "  - Dup: {type: string}\n"
        "  - Dup: {type: string}\n"
        "  - Num: {type: number}\n"
        "  - Lst: {type: string, default: {a: 1}}\n"
        "constants:\n"
        "  - Dup: {type: string, value: x}\n"
        "  - NoValue: {type: string}\n",
    )
    found = problems(tmp_path, text)
    for expected in (
        "parameters.ab: names are 3-128 characters",
        "parameters.Dup: declared twice",
        "parameters.Num.type: required, one of: string, integer, boolean, stringlist",
        "parameters.Lst.default: expected a string, not a map",
        "constants.Dup: a parameter has the same name",
        "constants.NoValue.value: required, a string",
    ):
        assert any(expected in p for p in found), (expected, found)


# --- ExecuteDocument ------------------------------------------------------------


def nested(name: str, target: str, params: str = "") -> str:
    return step_doc(
        f"- name: Run{name}\n  action: ExecuteDocument\n"
        f"  inputs:\n    document: {target}\n    phases: build\n{params}"
    )


def leaf(extra_top: str = "") -> str:
    return step_doc("- name: Leaf\n  action: ExecuteBash\n  inputs: {commands: [x]}", extra_top)


def test_execute_document_children_are_validated_with_their_parameters(tmp_path: Path) -> None:
    write(tmp_path, leaf("parameters:\n  - Needed: {type: string}\n"), "child.yaml")
    ok = nested(
        "Child", "child.yaml", "    parameters:\n      - {name: Needed, value: yes-it-is}\n"
    )
    assert problems(tmp_path, ok) == []
    missing = problems(tmp_path, nested("Child", "child.yaml"))
    assert missing == [
        f"{tmp_path / 'child.yaml'}: parameters.Needed: has no default and no value was given"
    ]


def test_a_broken_child_is_reported_in_its_own_file(tmp_path: Path) -> None:
    write(tmp_path, step_doc("- name: Bad\n  action: Nope\n  inputs: {}"), "child.yaml")
    assert problems(tmp_path, nested("Child", "child.yaml")) == [
        f"{tmp_path / 'child.yaml'}: build.Bad.action: unknown action 'Nope'"
    ]


def test_a_child_not_on_the_host_is_left_to_the_run(tmp_path: Path) -> None:
    # It may be on the instance (downloaded by an earlier step): AWSTOE resolves
    # ExecuteDocument's document when the step runs.
    assert problems(tmp_path, nested("Child", "missing.yaml")) == []
    assert problems(tmp_path, nested("Child", "/opt/docs/child.yaml")) == []
    assert problems(tmp_path, nested("Child", "s3://bucket/child.yaml")) == []


def test_cyclic_execute_document_is_rejected(tmp_path: Path) -> None:
    write(tmp_path, nested("B", "b.yaml"), "a.yaml")
    write(tmp_path, nested("A", "a.yaml"), "b.yaml")
    found = validate_file(tmp_path / "a.yaml")
    assert any("ExecuteDocument cycle: a.yaml -> b.yaml -> a.yaml" in p for p in found), found
    self_cycle = write(tmp_path, nested("Self", "self.yaml"), "self.yaml")
    assert "cycle: self.yaml -> self.yaml" in validate_file(self_cycle)[0]


def test_nesting_deeper_than_three_levels_is_rejected(tmp_path: Path) -> None:
    write(tmp_path, leaf(), "d4.yaml")
    for name, target in (("d3", "d4"), ("d2", "d3"), ("d1", "d2"), ("d0", "d1")):
        write(tmp_path, nested(target, f"{target}.yaml"), f"{name}.yaml")
    assert validate_file(tmp_path / "d1.yaml") == []  # d1 -> d2 -> d3 -> d4: three levels
    found = validate_file(tmp_path / "d0.yaml")
    assert any("nests deeper than 3 levels" in p for p in found), found


def test_children_named_by_a_loop_are_each_checked(tmp_path: Path) -> None:
    write(tmp_path, leaf(), "Sample-1.yaml")
    write(tmp_path, step_doc("- name: Bad\n  action: Nope\n  inputs: {}"), "Sample-2.yaml")
    text = step_doc(
        "- name: Each\n  action: ExecuteDocument\n  loop:\n    name: L\n"
        "    for: {start: 1, end: 2, updateBy: 1}\n"
        "  inputs:\n    document: 'Sample-{{ L.value }}.yaml'\n"
    )
    found = problems(tmp_path, text)
    assert found == [f"{tmp_path / 'Sample-2.yaml'}: build.Bad.action: unknown action 'Nope'"]


def test_execute_document_in_a_huge_loop_is_rejected_without_expanding_it(
    tmp_path: Path,
) -> None:
    write(tmp_path, leaf(), "child.yaml")
    text = step_doc(
        "- name: Each\n  action: ExecuteDocument\n  loop:\n"
        # Within the loop bound (toe/loops.py), past the nested-document bound.
        "    for: {start: 1, end: 5000, updateBy: 1}\n"
        "  inputs:\n    document: child.yaml\n"
    )
    started = time.monotonic()
    found = problems(tmp_path, text)
    assert time.monotonic() - started < 2
    assert found == [
        f"{tmp_path / 'doc.yaml'}: build.Each.loop: runs ExecuteDocument 5000 times; "
        "vmbuild allows at most 1000 nested documents per step"
    ]


def test_a_component_arn_child_must_be_known(tmp_path: Path) -> None:
    arn = "arn:aws:imagebuilder:us-east-1:aws:component/update-linux/x.x.x"
    assert problems(tmp_path, nested("Managed", arn)) == []
    unknown = "arn:aws:imagebuilder:us-east-1:aws:component/no-such-thing/1.0.0"
    found = one_problem(tmp_path, nested("Managed", unknown))
    assert "build.RunManaged.inputs.document: the AWS-managed component 'no-such-thing'" in found


def test_children_known_only_at_run_time_are_checked_then(tmp_path: Path) -> None:
    text = step_doc(
        "- name: Pick\n  action: ExecuteBash\n  inputs: {commands: [echo child.yaml]}\n"
        "- name: Run\n  action: ExecuteDocument\n"
        "  inputs:\n    document: '{{ build.Pick.outputs.stdout }}'\n"
    )
    assert problems(tmp_path, text) == []


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (
            "- name: Get\n  action: WebDownload\n"
            "  inputs: [{source: 'https://x/y.zip', destination: 'C:\\Temp\\y.zip'}]",
            "build.Get.inputs: Windows guests are not supported yet (this document is for "
            "Windows: it uses the Windows path 'C:\\\\Temp\\\\y.zip')",
        ),
        (
            "- name: Run\n  action: ExecuteBinary\n  inputs: {path: setup.exe}",
            "build.Run.inputs.path: Windows guests are not supported yet (this document is for "
            "Windows: it runs the Windows program 'setup.exe')",
        ),
    ],
)
def test_a_windows_document_gets_one_clear_error(tmp_path: Path, step: str, expected: str) -> None:
    assert problems(tmp_path, step_doc(step)) == [f"{tmp_path / 'doc.yaml'}: {expected}"]


def test_shell_regexes_are_not_windows_paths(tmp_path: Path) -> None:
    step = (
        "- name: A\n  action: ExecuteBash\n  inputs: {commands: ['grep -E \"port:\\d+\" /etc/x']}"
    )
    assert problems(tmp_path, step_doc(step)) == []


@pytest.mark.parametrize("value", ["{x: 1}", "[a, {b: 1}]", "{}", "[]"])
def test_an_action_written_as_a_map_or_list_is_a_problem_not_a_crash(
    tmp_path: Path, value: str
) -> None:
    step = f"- name: A\n  action: {value}\n  inputs: {{commands: [x]}}"
    assert problems(tmp_path, step_doc(step)) == [
        f"{tmp_path / 'doc.yaml'}: build.A.action: expected the name of an action module"
    ]


def test_a_document_nested_too_deeply_is_a_problem(tmp_path: Path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("schemaVersion: 1.0\nphases: " + "[" * 5000 + "]" * 5000 + "\n")
    found = validate_file(path)
    assert len(found) == 1 and found[0].startswith(str(path)), found


def test_unknown_names_in_created_file_content_are_kept(tmp_path: Path) -> None:
    step = (
        "- name: Template\n  action: CreateFile\n"
        "  inputs: [{path: /etc/app.conf.j2, content: 'listen {{ port }}; {{ Name }}'}]"
    )
    assert (
        problems(tmp_path, step_doc(step, "constants:\n  - Name: {type: string, value: n}\n")) == []
    )
