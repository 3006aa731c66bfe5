"""pytest plugin (`-p vmbuild.testing.pinned_hostkey`) pinning testinfra's SSH host key.

testinfra's paramiko backend accepts any host key (WarningPolicy) and reads
no known_hosts. vmbuild knows the test VM's host key (it generated it), so in
the pytest process that runs a recipe's testinfra files it gives testinfra's
backend an SSHClient that loads `$VMBUILD_KNOWN_HOSTS` and rejects any other
key. The swap is scoped to testinfra's module; paramiko itself is untouched.
"""

from __future__ import annotations

import os
import types
from typing import Any

import paramiko


class _PinnedClient(paramiko.SSHClient):
    known_hosts = ""

    def __init__(self) -> None:
        super().__init__()
        self.load_host_keys(self.known_hosts)
        super().set_missing_host_key_policy(paramiko.RejectPolicy())

    def set_missing_host_key_policy(self, policy: Any) -> None:
        """Ignored: testinfra would weaken the pinned policy."""


def pytest_configure(config: Any) -> None:
    known_hosts = os.environ.get("VMBUILD_KNOWN_HOSTS")
    if not known_hosts:
        return
    import testinfra.backend.paramiko as backend

    _PinnedClient.known_hosts = known_hosts
    shim = types.ModuleType("paramiko")
    shim.__dict__.update(paramiko.__dict__)
    shim.SSHClient = _PinnedClient  # type: ignore[attr-defined]
    backend.paramiko = shim
