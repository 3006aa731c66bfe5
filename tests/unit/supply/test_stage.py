"""The build's attest stage: key created on first use, the recipe's scan threshold."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from tests.support.supply import fake_artifact
from tests.unit.supply.test_scan import TRACKER
from vmbuild.config.recipe import ScanSettings, load_recipe
from vmbuild.errors import ConfigError
from vmbuild.supply import PROVENANCE
from vmbuild.supply.scan import ScanFailed
from vmbuild.supply.stage import attest_stage
from vmbuild.supply.verify import verify_build


def staged(store: Path) -> tuple[Path, dict]:
    """A build dir as the attest stage finds it: disks and manifest, nothing signed yet."""
    build_dir = fake_artifact(store, sign=False)
    for name in (PROVENANCE, "sbom.spdx.json", "sbom.cdx.json"):
        (build_dir / name).unlink()
    return build_dir, json.loads((build_dir / "manifest.json").read_text())


def test_the_first_build_creates_the_key_and_signs(config_dir: Path, store: Path) -> None:
    build_dir, manifest = staged(store)
    result = attest_stage(build_dir, manifest, {"memory_mib": 2048, "cpus": 2})
    key = config_dir / "signing.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert result.signed_by == f"local:{key}"
    assert verify_build(build_dir, None).signed
    assert sorted(p.name for p in build_dir.iterdir()) == [
        "disk.qcow2", "manifest.json", PROVENANCE, "sbom.cdx.json", "sbom.spdx.json"
    ]  # fmt: skip


def test_a_scan_above_the_threshold_fails_before_signing(
    config_dir: Path, store: Path, tmp_path: Path
) -> None:
    (tmp_path / "tracker.json").write_text(json.dumps(TRACKER))
    build_dir, manifest = staged(store)
    with pytest.raises(ScanFailed, match=r"at or above high, e\.g\. CVE-2024-0727 in libssl3"):
        attest_stage(
            build_dir, manifest, scan_settings=ScanSettings(fail_on="high", data="tracker.json"),
            recipe_dir=tmp_path,
        )  # fmt: skip
    assert manifest["scan"]["failed"] is True
    assert not (build_dir / PROVENANCE).exists()


def test_a_scan_below_the_threshold_is_recorded_and_signed(
    config_dir: Path, store: Path, tmp_path: Path
) -> None:
    (tmp_path / "tracker.json").write_text(json.dumps(TRACKER))
    build_dir, manifest = staged(store)
    attest_stage(build_dir, manifest, scan_settings=ScanSettings(data="tracker.json"),
                 recipe_dir=tmp_path)  # fmt: skip
    assert manifest["scan"]["counts"]["high"] == 2 and manifest["scan"]["failed"] is False
    assert verify_build(build_dir, None).signed


def test_the_recipe_names_a_missing_tracker_file(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "name: x\nversion: 1.0.0\nbase: debian-12\nscan: {fail_on: high, data: nope.json}\n"
    )
    with pytest.raises(ConfigError, match=r"recipe\.yaml: scan\.data: file not found: nope\.json"):
        load_recipe(recipe)
    recipe.write_text("name: x\nversion: 1.0.0\nbase: debian-12\nscan: {fail_on: severe}\n")
    with pytest.raises(ConfigError, match=r"scan\.fail_on"):
        load_recipe(recipe)
