"""JUnit XML for the components' test phases, beside testinfra's junit.xml.

One <testcase> per component document that ran its `test` phase: the name is the
component, the status comes from its DocumentResult, and a failure's message is the
failing `phase/step` with the step's own message (the output tail is the body). CI
systems that already read junit.xml pick up a second file the same way. Pure: no I/O
but the final write, so it is unit-tested on result objects.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path

from vmbuild.toe.results import DocumentResult, Status

SUITE = "vmbuild.components"


def _identity(text: str) -> str:
    return text


def component_junit(
    results: Sequence[DocumentResult], *, mask: Callable[[str], str] = _identity
) -> ET.Element:
    """A <testsuites> element with one suite and one testcase per document.

    `mask` hides secret parameter values in the messages (vmbuild.secrets.mask).
    A step failure ignored by `onFailure: Ignore` is not a failure in JUnit either.
    """
    failures = sum(1 for r in results if r.status is Status.FAILED)
    time = sum(r.duration for r in results)
    attrs = {"tests": str(len(results)), "failures": str(failures), "errors": "0",
             "skipped": "0", "time": f"{time:.3f}"}  # fmt: skip
    root = ET.Element("testsuites", attrs)
    suite = ET.SubElement(root, "testsuite", {"name": SUITE, **attrs})
    for result in results:
        case = ET.SubElement(
            suite, "testcase",
            {"classname": SUITE, "name": result.name, "time": f"{result.duration:.3f}"},
        )  # fmt: skip
        if result.status is Status.FAILED:
            failure = ET.SubElement(
                case, "failure", {"message": mask(result.failure_message), "type": "StepFailed"}
            )
            failure.text = mask(result.failure_tail) or None
    return root


def write_component_junit(
    results: Sequence[DocumentResult], path: Path, *, mask: Callable[[str], str] = _identity
) -> Path:
    tree = ET.ElementTree(component_junit(results, mask=mask))
    ET.indent(tree)
    tree.write(path, encoding="utf-8", xml_declaration=True)
    return path
