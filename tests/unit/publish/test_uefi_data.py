"""The Secure Boot store an AMI carries: converted by uefivars from the OVMF vars
file the test VM used, checked for keys, refused where AWS cannot take it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vmbuild.config.distribution import DistributionConfig, ImageSettings
from vmbuild.errors import ConfigError, VmbuildError
from vmbuild.hypervisor import firmware
from vmbuild.manifest import Manifest
from vmbuild.publish.uefi_data import secure_boot_uefi_data, variable_names

pytestmark = pytest.mark.skipif(
    not firmware.FILES["uefi-secure"].vars_template.is_file(), reason="ovmf not installed"
)


def test_the_tested_store_converts_with_its_keys() -> None:
    names = variable_names(secure_boot_uefi_data())
    assert {"PK", "KEK", "db", "dbx"} <= set(names)


def test_a_store_without_keys_is_refused() -> None:
    with pytest.raises(VmbuildError) as err:
        secure_boot_uefi_data(firmware.FILES["uefi"].vars_template)
    assert "OVMF_VARS_4M.fd: no Secure Boot keys (PK, KEK, db, dbx missing)" in str(err.value)


def test_garbage_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "vars.fd"
    bad.write_bytes(b"\0" * 4096)
    with pytest.raises(VmbuildError, match=f"{bad}: cannot convert the UEFI variable store"):
        secure_boot_uefi_data(bad)


def test_sent_when_the_image_was_tested_with_secure_boot() -> None:
    tested: dict[str, Any] = {"status": "passed", "boots": [{"firmware": "uefi-secure"}]}
    manifest = Manifest(name="n", version="1.0.0", tests=tested)
    assert manifest.secure_boot_tested
    assert not Manifest(
        name="n", version="1.0.0", tests={**tested, "status": "failed"}
    ).secure_boot_tested
    image = ImageSettings().for_image("uefi", secure_boot=True)
    assert (image.mode, image.uefi_data) == ("uefi", True)
    assert ImageSettings().for_image("uefi", secure_boot=False).uefi_data is False
    assert ImageSettings(uefi_data=False).for_image("uefi", secure_boot=True).uefi_data is False


def _config(**image: object) -> dict[str, Any]:
    return {"image": image, "regions": [{"region": "us-east-1"}]}


def test_config_refusals() -> None:
    from vmbuild.config.distribution import load_distribution

    with pytest.raises(
        ConfigError, match=r"image\.uefi_data: a UEFI variable store needs boot_mode"
    ):
        load_distribution(_config(boot_mode="legacy-bios", uefi_data=True), "d.yaml")
    data = {
        **_config(boot_mode="uefi", uefi_data=True),
        "import": {"method": "import-image", "s3_bucket": "my-images"},
    }
    with pytest.raises(ConfigError, match=r"image\.uefi_data: VM Import"):
        load_distribution(data, "d.yaml")
    ok = load_distribution(_config(boot_mode="uefi", uefi_data=True), "d.yaml")
    assert isinstance(ok, DistributionConfig) and ok.image.uefi_data is True
