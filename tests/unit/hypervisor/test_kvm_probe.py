"""The KVM probe boots the host's architecture: qemu-system-x86_64 on an x86_64
host, qemu-system-aarch64 (virt, AAVMF) on an arm64 host, so a native arm64 host
gets KVM for arm64 guests. No arm64 host here: the decision and the exact argv
are tested, the boot itself is not. No processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmbuild.hypervisor import accel, arch, firmware
from vmbuild.hypervisor.accel import Accel
from vmbuild.stages import base_image

W = Path("/w")


def test_x86_64_host_probe_is_unchanged() -> None:
    assert accel.probe_argv(W / "base.qcow2", "qcow2", W / "c.log", "x86_64") == [
        "qemu-system-x86_64", "-machine", "pc", "-accel", "kvm", "-cpu", "host", "-m", "512",
        "-smp", "1", "-nodefaults", "-display", "none", "-no-reboot", "-snapshot",
        "-drive", "file=/w/base.qcow2,format=qcow2,if=virtio", "-serial", "file:/w/c.log",
    ]  # fmt: skip


def test_x86_64_probe_of_a_uefi_only_base_boots_ovmf() -> None:
    argv = accel.probe_argv(W / "base.qcow2", "qcow2", W / "c.log", "x86_64", W / "vars.fd")
    assert argv == [
        "qemu-system-x86_64", "-machine", "pc", "-accel", "kvm", "-cpu", "host", "-m", "512",
        "-smp", "1", "-nodefaults", "-display", "none", "-no-reboot", "-snapshot",
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={firmware.FILES['uefi'].code}",
        "-drive", "if=pflash,format=raw,unit=1,file=/w/vars.fd",
        "-drive", "file=/w/base.qcow2,format=qcow2,if=virtio", "-serial", "file:/w/c.log",
    ]  # fmt: skip


def test_arm64_host_probe_boots_aarch64_under_kvm_with_aavmf() -> None:
    argv = accel.probe_argv(W / "base.qcow2", "qcow2", W / "c.log", "arm64", W / "vars.fd")
    assert argv == [
        "qemu-system-aarch64", "-machine", "virt,gic-version=host", "-accel", "kvm",
        "-cpu", "host", "-m", "512", "-smp", "1", "-nodefaults", "-display", "none",
        "-no-reboot", "-snapshot",
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={firmware.AAVMF.code}",
        "-drive", "if=pflash,format=raw,unit=1,file=/w/vars.fd",
        "-drive", "file=/w/base.qcow2,format=qcow2,if=virtio", "-serial", "file:/w/c.log",
    ]  # fmt: skip


def test_kvm_arm64_guests_use_the_hosts_interrupt_controller() -> None:
    kvm = Accel("kvm", "probed", 1.0)
    assert kvm.qemu_args(2, "virt", "cortex-a72")[:2] == ["-machine", "virt,gic-version=host"]
    assert kvm.qemu_args(2, "q35,smm=on")[:2] == ["-machine", "q35,smm=on"]
    # TCG arm64 guests keep the measured machine.
    assert accel.tcg("t").qemu_args(2, "virt", "cortex-a72")[:2] == ["-machine", "virt"]


@pytest.mark.parametrize(
    ("guest", "host", "probed", "kind"),
    [
        ("arm64", "arm64", True, "kvm"),  # native arm64: the probe decides (KVM)
        ("x86_64", "arm64", False, "tcg"),  # foreign on arm64: TCG, no probe
        ("arm64", "x86_64", False, "tcg"),
        ("x86_64", "x86_64", True, "kvm"),
    ],
)
def test_the_probe_runs_only_for_the_hosts_own_architecture(
    guest: arch.Arch, host: arch.Arch, probed: bool, kind: str
) -> None:
    calls: list[str] = []

    def choose() -> Accel:
        calls.append("probe")
        return Accel("kvm", "probed", 1.0)

    assert accel.guest_accel(guest, choose, host).kind == kind
    assert calls == (["probe"] if probed else [])


def test_probe_disk_is_a_base_of_the_hosts_architecture(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(base_image, "cache_dir", lambda: tmp_path)
    for name, meta_arch in (("a-arm64", "arm64"), ("b-x86", None), ("c-x86", "x86_64")):
        d = tmp_path / "bases" / name
        d.mkdir(parents=True)
        (d / "disk.qcow2").write_bytes(b"")
        meta = {"disk": "disk.qcow2", "format": "qcow2", "source": name, "virtual_size": 1,
                "sha256": "0" * 64} | ({"arch": meta_arch} if meta_arch else {})  # fmt: skip
        (d / "meta.json").write_text(json.dumps(meta))
    bases = tmp_path / "bases"
    assert base_image.probe_disk("arm64") == (bases / "a-arm64" / "disk.qcow2", "qcow2")
    # A base without a recorded arch (fetched, or built before arm64) is x86_64.
    assert base_image.probe_disk("x86_64") == (bases / "b-x86" / "disk.qcow2", "qcow2")
