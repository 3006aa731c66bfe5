"""arm64 guests: the exact QEMU argv (virt machine, AAVMF flash, the same virtio
devices), libvirt's aarch64 domain, the accelerator a foreign guest gets, and the
guest's `uname -m` checked by the test VM. No processes."""

from __future__ import annotations

import dataclasses
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vmbuild.errors import VmbuildError
from vmbuild.hypervisor import accel, arch, firmware
from vmbuild.hypervisor import libvirt as lv
from vmbuild.hypervisor.accel import TCG_SCALE, Accel, tcg
from vmbuild.hypervisor.base import VMSpec
from vmbuild.hypervisor.qemu import qemu_argv
from vmbuild.stages.image_tests import firmware_problem, guest_machine

W = Path("/w")
ARM = VMSpec(
    name="vmbuild-abc123-test", disk=W / "test.qcow2", seed=W / "seed.iso", memory_mib=2048,
    cpus=2, accel=accel.for_guest(tcg("t"), "arm64", "x86_64"), ssh_port=40022,
    console_log=W / "console.log", workdir=W, firmware="uefi", uefi_vars=W / "test-uefi-vars.fd",
    arch="arm64",
)  # fmt: skip


def test_qemu_argv_arm64_is_exact() -> None:
    assert qemu_argv(ARM) == [
        "qemu-system-aarch64", "-name", "vmbuild-abc123-test",
        "-machine", "virt", "-accel", "tcg,thread=multi", "-cpu", arch.TCG_CPU["arm64"],
        "-smp", "2", "-m", "2048",
        "-drive", "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/AAVMF/AAVMF_CODE.fd",
        "-drive", "if=pflash,format=raw,unit=1,file=/w/test-uefi-vars.fd",
        "-nodefaults", "-display", "none",
        "-drive",
        "file=/w/test.qcow2,format=qcow2,if=virtio,id=disk0,discard=unmap,detect-zeroes=unmap",
        "-drive", "file=/w/seed.iso,format=raw,if=virtio,readonly=on",
        "-netdev", "user,id=net0,hostfwd=tcp:127.0.0.1:40022-:22",
        "-device", "virtio-net-pci,netdev=net0",
        "-device", "virtio-rng-pci",
        "-chardev", "file,id=serial0,path=/w/console.log", "-serial", "chardev:serial0",
        "-qmp", f"unix:{tempfile.gettempdir()}/vmbuild-abc123-test.qmp,server=on,wait=off",
    ]  # fmt: skip


def test_arm64_has_no_bios_and_no_secure_boot() -> None:
    with pytest.raises(VmbuildError, match="arm64 guests have no BIOS"):
        qemu_argv(dataclasses.replace(ARM, firmware="bios", uefi_vars=None))
    with pytest.raises(VmbuildError, match="arm64 guests boot plain UEFI only, not uefi-secure"):
        qemu_argv(dataclasses.replace(ARM, firmware="uefi-secure"))


def test_aavmf_vars_copy_and_missing_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, template = tmp_path / "AAVMF_CODE.fd", tmp_path / "AAVMF_VARS.fd"
    code.write_bytes(b"code")
    template.write_bytes(b"vars-template")
    monkeypatch.setattr(firmware, "AAVMF", firmware.UefiFiles(code, template))
    dest = firmware.vars_copy("uefi", tmp_path / "vm-vars.fd", "arm64")
    assert dest.read_bytes() == b"vars-template"
    dest.write_bytes(b"written by the guest")
    assert template.read_bytes() == b"vars-template"
    code.unlink()
    with pytest.raises(VmbuildError) as info:
        firmware.uefi_files("uefi", "arm64")
    assert info.value.hint == "apt-get install qemu-efi-aarch64"


def test_foreign_guest_runs_tcg_with_scaled_timeouts() -> None:
    kvm = Accel("kvm", "probed", 1.0)
    assert accel.for_guest(kvm, "x86_64", "x86_64") is kvm
    foreign = accel.for_guest(kvm, "arm64", "x86_64")
    assert (foreign.kind, foreign.scale) == ("tcg", TCG_SCALE * arch.FOREIGN_TCG_SCALE)
    assert foreign.reason == "aarch64 guest on a x86_64 host: TCG"
    assert foreign.timeout(45) == 45 * TCG_SCALE * arch.FOREIGN_TCG_SCALE
    # A native arm64 host keeps what its probe chose (KVM where it works).
    assert accel.for_guest(kvm, "arm64", "arm64") is kvm


def test_foreign_guest_skips_the_kvm_probe() -> None:
    probed: list[str] = []

    def choose() -> Accel:
        probed.append("probe")
        return Accel("kvm", "probed", 1.0)

    assert accel.guest_accel("arm64", choose, "x86_64").kind == "tcg"
    assert probed == []
    assert accel.guest_accel("x86_64", choose, "x86_64").kind == "kvm"
    assert probed == ["probe"]


@pytest.mark.skipif(not firmware.AAVMF.code.is_file(), reason="qemu-efi-aarch64 not installed")
def test_libvirt_aarch64_domain() -> None:
    dom = ET.fromstring(lv.domain_xml(ARM, uri_kind="session"))
    os_type = dom.find("os/type")
    assert os_type is not None
    assert (os_type.get("arch"), os_type.get("machine")) == ("aarch64", "virt")
    assert dom.findtext("os/loader") == "/usr/share/AAVMF/AAVMF_CODE.fd"
    assert dom.findtext("os/nvram") == "/w/test-uefi-vars.fd"
    assert dom.find("features/acpi") is not None and dom.find("features/apic") is None
    assert dom.findtext("cpu/model") == arch.TCG_CPU["arm64"]
    assert dom.get("type") == "qemu"
    args = [a.get("value", "") for a in dom.iter("{http://libvirt.org/schemas/domain/qemu/1.0}arg")]
    assert any("bus=pcie.0" in a for a in args)


@pytest.mark.parametrize(
    ("said", "problem"),
    [
        ("machine aarch64\nuefi\nSecureBoot disabled\n", None),
        ("machine x86_64\nuefi\n", "the guest runs x86_64, not aarch64"),
        ("uefi\n", "the guest runs an unknown machine, not aarch64"),
        ("machine aarch64\nbios\n", "the image booted under bios, not uefi"),
    ],
)
def test_the_test_vm_checks_the_guest_architecture(said: str, problem: str | None) -> None:
    assert firmware_problem("uefi", said, "arm64") == problem


def test_guest_machine_is_read_from_the_probe() -> None:
    assert guest_machine("machine aarch64\nuefi\n") == "aarch64"
    assert guest_machine("uefi\n") is None
    # Without an arch the old firmware-only check is unchanged.
    assert firmware_problem("bios", "machine x86_64\nbios\n") is None


def test_generalize_marks_the_frozen_disk_on_the_guests_serial_port() -> None:
    from vmbuild.stages.generalize import FROZEN_MARKER, generalize_script

    assert f"echo '{FROZEN_MARKER}' > /dev/ttyAMA0\n" in generalize_script("b", "arm64")
    assert f"echo '{FROZEN_MARKER}' > /dev/ttyS0\n" in generalize_script("b")
    assert "ttyAMA0" not in generalize_script("b")
