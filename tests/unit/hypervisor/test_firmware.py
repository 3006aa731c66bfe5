"""Firmware per boot mode: QEMU flags, libvirt loader/nvram, and what the test
VM concludes from the guest's answer."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from vmbuild.errors import VmbuildError
from vmbuild.hypervisor import firmware
from vmbuild.hypervisor import libvirt as lv
from vmbuild.hypervisor.accel import tcg
from vmbuild.hypervisor.base import VMSpec
from vmbuild.hypervisor.qemu import qemu_argv
from vmbuild.stages.image_tests import firmware_problem

W = Path("/w")
SPEC = VMSpec(
    name="vmbuild-abc123-test", disk=W / "test.qcow2", seed=W / "seed.iso", memory_mib=2048,
    cpus=2, accel=tcg("t"), ssh_port=40022, console_log=W / "console.log", workdir=W,
)  # fmt: skip


def test_boot_modes_follow_ec2_names() -> None:
    assert firmware.boot_modes("legacy-bios", False) == ["bios"]
    assert firmware.boot_modes("uefi", False) == ["uefi"]
    assert firmware.boot_modes("uefi", True) == ["uefi-secure"]
    assert firmware.boot_modes("uefi-preferred", True) == ["uefi-secure", "bios"]
    assert firmware.builder_firmware("uefi-preferred") == "uefi"
    assert firmware.builder_firmware("legacy-bios") == "bios"


def test_bios_adds_nothing() -> None:
    argv = qemu_argv(SPEC)
    assert "if=pflash" not in " ".join(argv)
    assert argv[argv.index("-machine") + 1] == "pc"


def test_uefi_has_shared_code_and_own_vars() -> None:
    spec = dataclasses.replace(SPEC, firmware="uefi", uefi_vars=W / "test-uefi-vars.fd")
    argv = qemu_argv(spec)
    assert argv[argv.index("-machine") + 1] == "pc"
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    assert "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd" in drives
    assert "if=pflash,format=raw,unit=1,file=/w/test-uefi-vars.fd" in drives
    assert "-global" not in argv


def test_secure_boot_needs_q35_smm_and_locked_flash() -> None:
    spec = dataclasses.replace(SPEC, firmware="uefi-secure", uefi_vars=W / "v.fd")
    argv = qemu_argv(spec)
    assert argv[argv.index("-machine") + 1] == "q35,smm=on"
    assert argv[argv.index("-global") + 1] == "driver=cfi.pflash01,property=secure,value=on"
    assert any("OVMF_CODE_4M.secboot.fd" in a for a in argv)


def test_uefi_without_vars_file_is_refused() -> None:
    with pytest.raises(VmbuildError, match="per-VM vars file"):
        firmware.qemu_args("uefi", None)


def test_vars_copy_is_a_copy_of_the_template(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, template = tmp_path / "CODE.secboot.fd", tmp_path / "VARS.ms.fd"
    code.write_bytes(b"c" * 16)
    template.write_bytes(b"v" * 16)
    monkeypatch.setitem(firmware.FILES, "uefi-secure", firmware.UefiFiles(code, template))
    dest = firmware.vars_copy("uefi-secure", tmp_path / "mine.fd")
    assert dest.read_bytes() == b"v" * 16
    dest.write_bytes(b"x")
    assert template.read_bytes() == b"v" * 16


def test_missing_ovmf_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        firmware.FILES, "uefi", firmware.UefiFiles(tmp_path / "no-code.fd", tmp_path / "v.fd")
    )
    with pytest.raises(VmbuildError) as err:
        firmware.uefi_files("uefi")
    assert "no-code.fd is missing" in str(err.value)
    assert err.value.hint == "apt-get install ovmf"


@pytest.mark.skipif(not firmware.FILES["uefi"].code.is_file(), reason="ovmf not installed")
def test_libvirt_uefi_loader_and_nvram() -> None:
    import xml.etree.ElementTree as ET

    spec = dataclasses.replace(SPEC, firmware="uefi-secure", uefi_vars=W / "v.fd")
    dom = ET.fromstring(lv.domain_xml(spec, uri_kind="session"))
    assert dom.find("os/type").get("machine") == "q35"  # type: ignore[union-attr]
    loader = dom.find("os/loader")
    assert loader is not None and loader.get("secure") == "yes"
    assert loader.text == "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd"
    assert dom.findtext("os/nvram") == "/w/v.fd"
    assert dom.find("features/smm") is not None
    args = [a.get("value", "") for a in dom.iter("{http://libvirt.org/schemas/domain/qemu/1.0}arg")]
    # q35's slot 0x1f is the ICH9 LPC bridge (QEMU refused 0x1f there: found by the
    # libvirt Secure Boot VM test); the user-network NIC takes 0x1e.
    assert [a for a in args if a.startswith("virtio-net-pci")] == [
        "virtio-net-pci,netdev=vmbuildnet0,bus=pcie.0,addr=0x1e"
    ]


@pytest.mark.parametrize(
    ("fw", "said", "problem"),
    [
        ("bios", "bios\n", None),
        ("uefi", "uefi\nSecureBoot disabled\n", None),
        ("uefi-secure", "uefi\nSecureBoot enabled\n", None),
        ("uefi-secure", "uefi\nSecureBoot 1\n", None),
        ("uefi", "bios\n", "the image booted under bios, not uefi"),
        ("bios", "uefi\nSecureBoot disabled\n", "the image booted under uefi, not bios"),
        ("uefi-secure", "uefi\nSecureBoot disabled\n",
         "Secure Boot is not enforced in the guest: SecureBoot disabled"),
        ("uefi-secure", "uefi\n", "Secure Boot is not enforced in the guest: no answer"),
        ("uefi", "", "the image booted under unknown firmware, not uefi"),
    ],
)  # fmt: skip
def test_firmware_problem(fw: firmware.Firmware, said: str, problem: str | None) -> None:
    assert firmware_problem(fw, said) == problem
