"""`{{ }}` references: parsing, rendering and what is left alone."""

from __future__ import annotations

import re

import pytest

from vmbuild.toe.expressions import (
    ChainRef,
    LoopRef,
    LoopVars,
    NotAReference,
    Scope,
    UnresolvedReference,
    VariableRef,
    has_references,
    parse_reference,
    render,
    render_value,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Name", VariableRef("Name")),
        ("  my-param_2 ", VariableRef("my-param_2")),
        ("loop.value", LoopRef("loop", "value")),
        ("MyLoop.index", LoopRef("MyLoop", "index")),
        ("build.Step.outputs.stdout", ChainRef("build", "Step", "outputs", None, "stdout")),
        ("build.Step.inputs[2].path", ChainRef("build", "Step", "inputs", 2, "path")),
        (".State.Status", None),
        ("json .", None),
        ("", None),
    ],
)
def test_parse_reference(text: str, expected: object) -> None:
    assert parse_reference(text) == expected


def test_malformed_references_are_errors() -> None:
    with pytest.raises(NotAReference, match="is not a valid reference"):
        parse_reference("a.b.c")


def chain(ref: ChainRef) -> str:
    return f"<{ref}>"


def test_render_substitutes_everything_in_one_pass() -> None:
    scope = Scope({"Who": "world", "Brace": "{{ Who }}"}, LoopVars("L", 2, "x"), chain)
    text = "{{Who}} {{ Who}} {{ loop.index }} {{ L.value }} {{ b.s.outputs.stdout }} {{ Brace }}"
    assert render(text, scope) == "world world 2 x <b.s.outputs.stdout> {{ Who }}"


def test_render_leaves_non_references_alone() -> None:
    scope = Scope({})
    assert render("docker inspect -f '{{ .State.Status }}' {{}}", scope) == (
        "docker inspect -f '{{ .State.Status }}' {{}}"
    )


@pytest.mark.parametrize(
    ("text", "scope", "message"),
    [
        (
            "{{ Nope }}",
            Scope({"Nop": "1"}),
            "unknown parameter or constant 'Nope' (did you mean 'Nop'?)",
        ),
        (
            "{{ Other.value }}",
            Scope({}, LoopVars("L", 0, "v")),
            "'Other.value' is not this step's loop",
        ),
        ("{{ a.b.outputs.c }}", Scope({}), "chaining is only allowed in step inputs"),
    ],
)
def test_unresolved_references(text: str, scope: Scope, message: str) -> None:
    with pytest.raises(UnresolvedReference, match=re.escape(message)):
        render(text, scope)


def test_loop_references_outside_a_loop_stay_as_written() -> None:
    assert render("ping {{ loop.value }} {{ L.index }}", Scope({})) == (
        "ping {{ loop.value }} {{ L.index }}"
    )


def test_unknown_names_in_file_content_stay_as_written() -> None:
    inputs = [{"path": "/etc/app.j2", "content": "{{ Name }} {{ host_name }} {{ x | upper }}"}]
    rendered = render_value(inputs, Scope({"Name": "n"}), templates=("content",))
    assert rendered == [{"path": "/etc/app.j2", "content": "n {{ host_name }} {{ x | upper }}"}]
    with pytest.raises(UnresolvedReference, match="unknown parameter or constant 'host_name'"):
        render_value([{"path": "{{ host_name }}"}], Scope({}), templates=("content",))


def test_render_value_walks_lists_and_maps_and_keeps_other_scalars() -> None:
    value = {"a": ["{{ X }}", 1, True], "b": {"c": "{{ X }}!"}}
    assert render_value(value, Scope({"X": "y"})) == {"a": ["y", 1, True], "b": {"c": "y!"}}


def test_has_references() -> None:
    assert has_references({"a": ["{{ X }}"]})
    assert has_references("{{ a.b.c }}")  # malformed counts: it must be looked at
    assert not has_references(["{{ .Go }}", 3])
