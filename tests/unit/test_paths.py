"""Where vmbuild keeps things: always absolute, whatever the setting says."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmbuild import paths
from vmbuild.cache import checkpoints


def test_relative_settings_resolve_against_the_working_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # `make image` builds into ./images: a relative store once broke checkpoint
    # layers (qemu-img reads a backing name relative to the overlay's dir).
    monkeypatch.chdir(tmp_path)
    for var in ("VMBUILD_STORE", "VMBUILD_CACHE_DIR", "VMBUILD_CONFIG_DIR", "VMBUILD_STATE_DIR",
                checkpoints.ENV_DIR):  # fmt: skip
        monkeypatch.setenv(var, f"rel/{var}")
    assert paths.store_dir() == tmp_path / "rel/VMBUILD_STORE"
    assert paths.store_dir("mine") == tmp_path / "mine"
    assert paths.cache_dir() == tmp_path / "rel/VMBUILD_CACHE_DIR"
    assert paths.config_dir() == tmp_path / "rel/VMBUILD_CONFIG_DIR"
    assert paths.state_dir() == tmp_path / "rel/VMBUILD_STATE_DIR"
    assert checkpoints.root() == tmp_path / f"rel/{checkpoints.ENV_DIR}"
    monkeypatch.delenv("VMBUILD_STORE")
    assert paths.store_dir() == tmp_path / "images"
