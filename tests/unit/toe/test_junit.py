"""The components' JUnit file from real run results (run_document on a scripted
remote): one testcase per document, the failing step as the failure message, secret
values masked, an ignored failure not counted as one."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from tests.support.toe import ScriptedRemote
from vmbuild.stages.image_tests import parse_junit
from vmbuild.toe import load_document, run_document
from vmbuild.toe.junit import write_component_junit

DOC = """\
schemaVersion: 1.0
phases:
  - name: test
    steps:
      - name: {step}
        action: ExecuteBash
        {on_failure}
        inputs: {{commands: ["{command}"]}}
"""


def result(tmp_path: Path, name: str, command: str, step: str = "Check", on_failure: str = ""):  # type: ignore[no-untyped-def]
    path = tmp_path / f"{name}.yaml"
    path.write_text(DOC.format(step=step, command=command, on_failure=on_failure))
    remote = ScriptedRemote(
        lambda s: (1, "curl: connection refused\nlast line\n", "") if "fail" in s else (0, "", "")
    )
    return run_document(load_document(path, {}), remote, phases=("test",))


def test_one_testcase_per_component_with_the_failing_step(tmp_path: Path) -> None:
    results = [
        result(tmp_path, "nginx-app", "echo ok"),
        result(tmp_path, "web-check", "fail please", step="Serves"),
        result(tmp_path, "optional", "fail too", on_failure="onFailure: Ignore"),
    ]
    out = write_component_junit(results, tmp_path / "components-junit.xml")
    # The same reader as testinfra's file counts it: CI reads both the same way.
    assert parse_junit(out) == (3, 1, 0, 0)
    cases = ET.parse(out).getroot().findall("./testsuite/testcase")
    assert [(c.get("classname"), c.get("name")) for c in cases] == [
        ("vmbuild.components", "nginx-app"),
        ("vmbuild.components", "web-check"),
        ("vmbuild.components", "optional"),
    ]
    assert [c.find("failure") is None for c in cases] == [True, False, True]
    failure = cases[1].find("failure")
    assert failure is not None
    assert failure.get("message", "").startswith("test/Serves: ")
    assert failure.get("message") == results[1].failure_message
    assert failure.text == "curl: connection refused\nlast line"


def test_messages_go_through_the_mask(tmp_path: Path) -> None:
    failed = result(tmp_path, "c", "fail", step="Login")
    out = write_component_junit(
        [failed], tmp_path / "j.xml", mask=lambda t: t.replace("connection", "***")
    )
    failure = ET.parse(out).getroot().find("./testsuite/testcase/failure")
    assert failure is not None
    assert failure.text == "curl: *** refused\nlast line"
