"""Unit tests never spawn a process: anything that tries fails loudly.

Tests that need real processes live in tests/vm (QEMU), tests/aws (moto) or
tests/integration (qemu-img, debugfs, sfdisk on small files).
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

import pytest

from vmbuild import runs


class SpawnForbidden(AssertionError):
    pass


@pytest.fixture(autouse=True)
def _no_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise SpawnForbidden(f"unit tests must not spawn processes: {args[:1]}")

    monkeypatch.setattr(subprocess.Popen, "__init__", forbidden)
    monkeypatch.setattr(os, "posix_spawn", forbidden)
    monkeypatch.setattr(os, "fork", forbidden)


@pytest.fixture(autouse=True)
def _no_outside_state(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A unit test's inputs are its own. Not the developer's VMBUILD_* settings,
    nor what the VM tier set up earlier in this process: a parallel run's worker
    may run unit tests after VM tests, while their session fixtures still hold
    the package cache in the environment and the shared guest's run registration.

    That registration is set aside, and the test gets a state dir of its own: a
    registration is named after the process, so one the test opened in the
    session's state dir would be the session's, and closing it would delete it."""
    for name in [n for n in os.environ if n.startswith("VMBUILD_")]:
        if name != "VMBUILD_COMPONENT_LIBRARY":  # tests/conftest.py's, per test
            monkeypatch.delenv(name)
    # Beside the test's tmp_path, not in it: tests list what they left there.
    monkeypatch.setenv("VMBUILD_STATE_DIR", str(tmp_path_factory.mktemp("vmbuild-state")))
    monkeypatch.setattr(runs, "_current", None)
    monkeypatch.setattr(runs, "_depth", 0)
