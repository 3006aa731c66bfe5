"""Unit tests never spawn a process: anything that tries fails loudly.

Tests that need real processes live in tests/vm (QEMU), tests/aws (moto) or
tests/integration (qemu-img, debugfs, sfdisk on small files).
"""

from __future__ import annotations

import subprocess
from typing import Any

import pytest


class SpawnForbidden(AssertionError):
    pass


@pytest.fixture(autouse=True)
def _no_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise SpawnForbidden(f"unit tests must not spawn processes: {args[:1]}")

    monkeypatch.setattr(subprocess.Popen, "__init__", forbidden)
    import os

    monkeypatch.setattr(os, "posix_spawn", forbidden)
    monkeypatch.setattr(os, "fork", forbidden)
