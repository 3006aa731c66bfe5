from __future__ import annotations

from pathlib import Path

import pytest

from vmbuild.supply.signing import KeyPaths, generate_local_key


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "config"
    monkeypatch.setenv("VMBUILD_CONFIG_DIR", str(path))
    monkeypatch.delenv("VMBUILD_KMS_KEY", raising=False)
    return path


@pytest.fixture
def local_key(config_dir: Path) -> KeyPaths:
    return generate_local_key()


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "images"
