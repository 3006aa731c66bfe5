"""Shared test configuration."""

from __future__ import annotations

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
