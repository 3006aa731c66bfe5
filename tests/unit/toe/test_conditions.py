"""Comparison and logical operators, as AWSTOE documents them."""

from __future__ import annotations

from typing import Any

import pytest

from vmbuild.remote.base import RemoteResult
from vmbuild.toe.conditions import (
    Comparison,
    StepAction,
    evaluate,
    parse_condition,
    parse_if,
    probe_script,
)
from vmbuild.yamlio import load_yaml


def no_guest(script: str) -> RemoteResult:
    raise AssertionError(f"no guest call expected: {script}")


def check(yaml_text: str, guest: Any = no_guest) -> bool:
    condition, problems = parse_condition(load_yaml(yaml_text))
    assert condition is not None, problems
    return evaluate(condition, lambda v: v, guest)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("stringIsEmpty: ''", True),
        ("stringIsEmpty: ' '", False),
        ("stringIsWhitespace: '  '", True),
        ("stringIsWhitespace: ''", False),
        ("stringIsWhitespace: ' x'", False),
        ("{stringEquals: Hello, value: hello}", True),  # case-insensitive
        ("{stringEquals: ' a', value: a}", False),  # no trimming
        ("{stringEquals: 17, value: '17'}", True),  # numbers compared as text
        ("{stringLessThan: a, value: B}", True),
        ("{stringLessThanEquals: b, value: B}", True),
        ("{stringGreaterThan: b, value: a}", True),
        ("{stringGreaterThanEquals: a, value: b}", False),
        ("{patternMatches: '^v[0-9]+', value: v12.1}", True),
        ("{patternMatches: '^[0-9]+$', value: v12}", False),
        ("{numberEquals: 1, value: '1.0'}", True),
        ("{numberLessThan: 2, value: 3}", True),
        ("{numberLessThanEquals: 3, value: 3}", True),
        ("{numberGreaterThan: 2, value: 3}", False),
        ("{numberGreaterThanEquals: 3.5, value: 3}", True),
        ("{and: [{stringEquals: a, value: a}, {numberEquals: 1, value: 1}]}", True),
        ("{and: [{stringEquals: a, value: b}, {numberEquals: 1, value: 1}]}", False),
        ("{or: [{stringEquals: a, value: b}, {numberEquals: 1, value: 1}]}", True),
        ("{or: [{stringEquals: a, value: b}, {numberEquals: 1, value: 2}]}", False),
        ("{not: {stringEquals: a, value: b}}", True),
        ("{not: {not: {and: [{not: {stringIsEmpty: x}}]}}}", True),
    ],
)
def test_operators(text: str, expected: bool) -> None:
    assert check(text) is expected


def test_and_stops_at_the_first_false(tmp_path: Any) -> None:
    calls: list[str] = []

    def guest(script: str) -> RemoteResult:
        calls.append(script)
        return RemoteResult(0, "", "", 0.0)

    assert check("{and: [{stringEquals: a, value: b}, {binaryExists: x}]}", guest) is False
    assert calls == []


@pytest.mark.parametrize(
    ("text", "script", "answer", "expected"),
    [
        ("binaryExists: nginx", "command -v -- nginx >/dev/null 2>&1", (0, ""), True),
        ("binaryExists: nginx", "command -v -- nginx >/dev/null 2>&1", (1, ""), False),
        ("fileExists: /etc/my file", "test -f '/etc/my file'", (0, ""), True),
        ("folderExists: /etc", "test -d /etc", (1, ""), False),
        (
            "{fileSHA256Equals: ABC123, path: /x}",
            "test -f /x && sha256sum -- /x",
            (0, "abc123  /x\n"),
            True,
        ),
        ("{fileMD5Equals: abc, path: /x}", "test -f /x && md5sum -- /x", (0, "abd  /x\n"), False),
        ("{fileSHA1Equals: abc, path: /x}", "test -f /x && sha1sum -- /x", (1, ""), False),
        (
            "{fileSHA512Equals: abc, path: /x}",
            "test -f /x && sha512sum -- /x",
            (0, "abc -\n"),
            True,
        ),
    ],
)
def test_guest_operators_run_a_probe(
    text: str, script: str, answer: tuple[int, str], expected: bool
) -> None:
    seen: list[str] = []

    def guest(s: str) -> RemoteResult:
        seen.append(s)
        return RemoteResult(answer[0], answer[1], "", 0.0)

    assert check(text, guest) is expected
    assert seen == [script]


def test_probe_scripts_quote_their_operands() -> None:
    assert probe_script(Comparison("binaryExists", "a; rm -rf /")) == (
        "command -v -- 'a; rm -rf /' >/dev/null 2>&1"
    )


def test_if_clauses_default_to_execute_and_skip() -> None:
    clause, problems = parse_if(load_yaml("{stringEquals: a, value: a}"))
    assert clause is not None and not problems
    assert (clause.decide(True), clause.decide(False)) == (StepAction.EXECUTE, StepAction.SKIP)
    clause, _ = parse_if(load_yaml("[{stringEquals: a, value: a, then: skip, else: abort}]"))
    assert clause is not None
    assert (clause.decide(True), clause.decide(False)) == (StepAction.SKIP, StepAction.ABORT)


def test_a_value_that_is_not_a_number_makes_a_number_comparison_false() -> None:
    # A literal non-number is refused when the document is validated; a chained
    # value is only known at run time, and then the comparison is just false.
    condition, _ = parse_condition(load_yaml("{numberEquals: 1, value: '{{ V }}'}"))
    assert condition is not None
    assert evaluate(condition, lambda v: "a10" if v == "{{ V }}" else v, no_guest) is False
    _, problems = parse_condition(load_yaml("{numberEquals: 1, value: a10}"))
    assert problems == [("value", "expected a number, got 'a10'")]


def test_operands_are_rendered_before_comparing() -> None:
    condition, _ = parse_condition(load_yaml("{stringEquals: '{{ A }}', value: x}"))
    assert condition is not None
    assert evaluate(condition, lambda v: "x" if v == "{{ A }}" else v, no_guest)
