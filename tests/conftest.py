"""Shared test configuration."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _private_component_library(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """Every test gets an empty local component library, never the user's."""
    library = tmp_path_factory.mktemp("component-library")
    monkeypatch.setenv("VMBUILD_COMPONENT_LIBRARY", str(library))
    yield library


# Each test session gets its own vmbuild state dir (the run registry and the
# failed-run logs): a test's CLI run never reaps, nor is reaped by, runs of
# the user or of another session on the same host. Set at import, before any
# module reads it; removed when the session's process exits.
os.environ["VMBUILD_STATE_DIR"] = _STATE = tempfile.mkdtemp(prefix="vmbuild-test-state-")
atexit.register(shutil.rmtree, _STATE, ignore_errors=True)
