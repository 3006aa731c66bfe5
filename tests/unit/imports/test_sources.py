"""Reading import sources: what python-hcl2 gives back, evaluated where a literal allows."""

from __future__ import annotations


def test_yamlencode_literals_are_read_references_are_not() -> None:
    from vmbuild.imports.sources import encoded_literal

    doc = (
        '${yamlencode({schemaVersion = 1.0, phases = [{name = "build", steps = [{name = "W", '
        'action = "CreateFile", inputs = [{path = "/etc/a", content = "port=8080"}]}]}]})}'
    )
    assert encoded_literal(doc) == (
        {"schemaVersion": 1.0, "phases": [{"name": "build", "steps": [
            {"name": "W", "action": "CreateFile",
             "inputs": [{"path": "/etc/a", "content": "port=8080"}]}]}]},
        None,
    )  # fmt: skip
    assert encoded_literal("${jsonencode({a = true, b = 3})}") == ({"a": True, "b": 3}, None)
    assert encoded_literal('${yamlencode({phases = var.phases, c = "x ${local.y}"})}') == (
        None, "yamlencode(...) uses local.y, var.phases: only Terraform can evaluate it",
    )  # fmt: skip
    assert encoded_literal('${file("x.yaml")}') is None
