"""Every built-in component, proved in a real guest: its build, validate and
test phases run on the shared Debian 12 VM (TCG, packages from the mirror).

This runs after the other component VM tests (file order): the components
change the guest for good (a firewall, sshd settings, chrony, nginx).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vmbuild.remote.ssh import SSHSession
from vmbuild.toe import Status, find_component, load_document, run_document

pytestmark = pytest.mark.vm

# In the order a recipe would use them; parameters chosen to exercise them.
LIBRARY = [
    ("update-linux", {}),
    ("firewall", {"AllowedTcpPorts": "22, 8080", "AllowedUdpPorts": "123"}),
    ("ssh-hardening", {"MaxAuthTries": "4"}),
    ("time-sync", {}),
    ("nginx-app", {"Content": "<p>vmbuild's test page & more</p>", "Port": "8080"}),
    ("cloud-ready", {}),
    ("aws-cli", {"DefaultRegion": "eu-west-1"}),
    ("java", {"Version": "17"}),
]


@pytest.mark.parametrize(("name", "parameters"), LIBRARY, ids=[n for n, _ in LIBRARY])
def test_component_builds_validates_and_tests(
    guest: SSHSession, name: str, parameters: dict[str, str]
) -> None:
    doc = load_document(find_component(name, Path(".")), parameters)
    lines: list[str] = []
    result = run_document(doc, guest, phases=["build", "validate", "test"], on_output=lines.append)
    print("\n".join(line for line in lines if line.startswith(("<==", "==="))))  # timings, with -s
    assert result.status is Status.SUCCESS, "\n".join(lines[-60:])
    assert [p.name for p in result.phases] == ["build", "validate", "test"]
