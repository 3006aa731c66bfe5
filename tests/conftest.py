"""Shared test configuration."""

from __future__ import annotations

import os
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
# the user or of another session on the same host.
os.environ["VMBUILD_STATE_DIR"] = tempfile.mkdtemp(prefix="vmbuild-test-state-")
