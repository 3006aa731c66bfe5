"""The Debian equivalents of AWS-managed components, proved in a real guest
(their build, validate and test phases on the shared Debian 12 VM, TCG,
packages from Debian's mirror), and an ExecuteDocument child that only exists
once an earlier step downloaded it onto the instance.

Runs after the other component VM tests (file order): these change the guest
for good (docker, hardening, reboots).
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.toe import write
from vmbuild.remote.ssh import SSHSession
from vmbuild.toe import Status, find_component, load_document, run_document

pytestmark = pytest.mark.vm

MANAGED = [
    "arn:aws:imagebuilder:us-east-1:aws:component/update-linux/x.x.x",
    "python-3-linux",
    "aws-cli-version-2-linux",
    "amazon-cloudwatch-agent-linux",
    "chrony-time-configuration-test",
    "docker-ce-linux",
    "reboot-linux",
    "reboot-test-linux",
    "simple-boot-test-linux",
    "stig-build-linux-medium",  # last: it hardens sshd for whatever follows
]


@pytest.mark.parametrize(
    "ref", MANAGED, ids=[r.rsplit("/", 2)[-2] if "/" in r else r for r in MANAGED]
)
def test_managed_equivalent_builds_validates_and_tests(guest: SSHSession, ref: str) -> None:
    parameters = {"RebootIfRequired": "false"} if "update-linux" in ref else {}
    doc = load_document(find_component(ref, Path(".")), parameters)
    lines: list[str] = []
    result = run_document(
        doc, guest, phases=["build", "validate", "test"], on_output=lines.append,
        working_directory="/tmp",
    )  # fmt: skip
    print("\n".join(line for line in lines if line.startswith(("<==", "==="))))
    assert result.status is Status.SUCCESS, "\n".join(lines[-60:])
    assert [p.name for p in result.phases] == ["build", "validate", "test"]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP on the host's loopback, which the guest
    reaches through QEMU's user network as 10.0.2.2."""
    folder = tmp_path / "www"
    folder.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_child_downloaded_at_run_time_runs_through_execute_document(
    guest: SSHSession, tmp_path: Path, served: tuple[Path, str]
) -> None:
    folder, url = served
    write(
        folder,
        "schemaVersion: 1.0\nparameters:\n  - Word: {type: string}\nphases:\n"
        "  - name: build\n    steps:\n"
        "      - name: Say\n        action: ExecuteBash\n"
        "        inputs: {commands: ['echo child says {{ Word }} in $(pwd)']}\n",
        "child.yaml",
    )
    # WebDownload is done by the host (which reaches 127.0.0.1) and written
    # into the guest; the child exists only on the instance afterwards.
    parent = write(
        tmp_path,
        f"""
schemaVersion: 1.0
phases:
  - name: build
    steps:
      - name: Fetch
        action: WebDownload
        inputs:
          - source: {url}/child.yaml
            destination: /tmp/vmbuild-runtime-docs/
      - name: RunIt
        action: ExecuteDocument
        inputs:
          document: "{{{{ build.Fetch.outputs.destination }}}}"
          parameters:
            - name: Word
              value: hello
      - name: Summary
        action: ExecuteBash
        inputs:
          commands:
            - echo "child {{{{ build.RunIt.outputs.status }}}} after {{{{ build.RunIt.outputs.executedStepCount }}}} step(s)"
""",
        "parent.yaml",
    )
    doc = load_document(parent)
    lines: list[str] = []
    result = run_document(
        doc, guest, phases=["build"], on_output=lines.append, working_directory="/var/tmp"
    )
    assert result.status is Status.SUCCESS, "\n".join(lines[-40:])
    assert "[build/Say] child says hello in /var/tmp" in lines
    assert "[build/Summary] child success after 1 step(s)" in lines
    nested = result.phases[0].steps[1].nested[0]
    assert nested.name == "child" and str(nested.path).endswith("child.yaml")
