"""The UEFI-only offline Debian base (`boot_mode: uefi`: GPT with the ESP and the
root, no BIOS boot partition, no BIOS boot code) under real firmware (TCG):

- it boots under OVMF: the guest has /sys/firmware/efi;
- Secure Boot refuses what is not signed: a copy whose EFI/BOOT/BOOTX64.EFI is an
  unsigned GRUB (grub-mkimage from grub-efi-amd64-bin) is refused by OVMF's Secure
  Boot build within seconds, and the test VM says so (not an SSH timeout minutes
  later); the same disk under OVMF without Secure Boot starts its kernel, so the
  refusal is the signature's, not a broken loader's.

The base is built once (~45 s, then cached) and booted; nothing else is built.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from vmbuild.debian import bootstrap as b
from vmbuild.diskfs.lint import check_partition_table
from vmbuild.diskfs.rootfs import GPT_ESP, image_partition_table
from vmbuild.errors import VMError
from vmbuild.hypervisor import accel, firmware
from vmbuild.hypervisor.base import VMSpec, free_port
from vmbuild.hypervisor.guest import GuestRequest, booted_guest, create_overlay
from vmbuild.hypervisor.qemu import QemuMachine
from vmbuild.plan import TEST_USER
from vmbuild.run import qemu_img, run
from vmbuild.stages import base_image
from vmbuild.stages.image_tests import check_firmware

pytestmark = pytest.mark.vm

TCG = accel.tcg("the VM tier runs on TCG")
# The modules an unsigned GRUB needs to find the root by UUID and run its grub.cfg
# (which sets up the serial console).
UNSIGNED_GRUB_MODULES = (
    "part_gpt", "fat", "ext2", "search_fs_uuid", "search", "configfile", "normal", "linux",
    "echo", "test", "serial", "terminal", "terminfo",
)  # fmt: skip


@pytest.fixture(scope="module")
def uefi_base() -> base_image.BaseImage:
    return base_image.build_debian("debian-12", layout="uefi")


def request(base: Path, fmt: str, work: Path, fw: firmware.Firmware) -> GuestRequest:
    return GuestRequest(
        run_id="uefi" + work.name[-6:].replace("_", ""), role="test", base=base,
        base_format=fmt, disk_size=None, memory_mib=1024, cpus=2, accel=TCG, workdir=work,
        user=TEST_USER, dispose="kill", firmware=fw,
    )  # fmt: skip


def test_uefi_only_base_boots_under_ovmf(
    uefi_base: base_image.BaseImage, tmp_path: Path, no_leftover_qemu: None
) -> None:
    assert uefi_base.id.startswith("debian-12-uefi-")
    table = image_partition_table(uefi_base.path, uefi_base.format, tmp_path)
    assert table is not None and table.kind == "gpt"
    assert [p.type for p in table.partitions] == [GPT_ESP, b.GPT_ROOT_X86_64.lower()]
    assert not any(table.boot_code)
    assert check_partition_table(table, "uefi") == []

    start = time.monotonic()
    with booted_guest(request(uefi_base.path, uefi_base.format, tmp_path / "vm", "uefi")) as g:
        to_ssh = time.monotonic() - start
        assert g.ssh.run("test -d /sys/firmware/efi").exit_code == 0
        boot = check_firmware(g, "uefi")
    assert boot["guest"].startswith("uefi SecureBoot disabled")
    print(f"UEFI-only base under OVMF: SSH after {to_ssh:.1f}s")


def _unsigned_copy(base: base_image.BaseImage, work: Path) -> Path:
    """A raw copy of `base` whose removable-media loader is an unsigned GRUB that
    boots the root's own grub.cfg, as the signed chain does."""
    work.mkdir()
    disk, efi, early = work / "unsigned.raw", work / "grubx64-unsigned.efi", work / "early.cfg"
    qemu_img("convert", "-f", base.format, "-O", "raw", base.path, disk)
    meta = json.loads((base.path.parent / "meta.json").read_text())
    early.write_text(b.grub_early_config(meta["root_uuid"]))
    run(["grub-mkimage", "-O", "x86_64-efi", "-d", "/usr/lib/grub/x86_64-efi", "-o", str(efi),
         "-c", str(early), "-p", "/boot/grub", *UNSIGNED_GRUB_MODULES])  # fmt: skip
    run(["mcopy", "-o", "-i", b.esp_image(disk), str(efi), "::/EFI/BOOT/BOOTX64.EFI"],
        env={"MTOOLS_SKIP_CHECK": "1"})  # fmt: skip
    return disk


def _wait_console(machine: QemuMachine, console: Path, marker: bytes, timeout: float) -> float:
    """Seconds until `marker` is on the serial console; fails if QEMU exits first."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        machine.check_alive()
        if console.exists() and marker in console.read_bytes():
            return time.monotonic() - start
        time.sleep(0.25)
    raise AssertionError(f"no {marker!r} on the console in {timeout:.0f}s:\n{console.read_text()}")


def test_secure_boot_refuses_an_unsigned_boot_loader(
    uefi_base: base_image.BaseImage, tmp_path: Path, no_leftover_qemu: None
) -> None:
    disk = _unsigned_copy(uefi_base, tmp_path / "disk")

    start = time.monotonic()
    req = request(disk, "raw", tmp_path / "secure", "uefi-secure")
    with pytest.raises(VMError) as info, booted_guest(req):
        pass
    refused_after = time.monotonic() - start
    assert str(info.value).split("\n")[0] == (
        f"vmbuild-{req.run_id}-test did not boot under UEFI with Secure Boot enforced "
        "(OVMF, Microsoft's keys): the UEFI firmware refused to start the disk's boot loader: "
        'BdsDxe: failed to load Boot0001 "UEFI Misc Device" from PciRoot(0x0)/Pci(0x3,0x0): '
        "Access Denied"
    )
    assert info.value.hint is not None and "signed by a key in the firmware's db" in info.value.hint
    # Fails fast: the boot-to-SSH timeout under TCG is minutes.
    assert refused_after < 120, refused_after

    # The same disk without Secure Boot: OVMF starts the unsigned GRUB, which starts
    # the kernel (its first console line is the event).
    work = tmp_path / "plain"
    work.mkdir()
    overlay, vars_file = work / "disk.qcow2", work / "vars.fd"
    create_overlay(disk, "raw", overlay, None)
    firmware.vars_copy("uefi", vars_file)
    spec = VMSpec(
        name=f"vmbuild-{req.run_id}-plain", disk=overlay, seed=None, memory_mib=1024, cpus=2,
        accel=TCG, ssh_port=free_port(), console_log=work / "console.log", workdir=work,
        firmware="uefi", uefi_vars=vars_file,
    )  # fmt: skip
    with QemuMachine(spec) as machine:
        to_kernel = _wait_console(machine, spec.console_log, b"Linux version", 300)
        machine.kill()
    print(f"Secure Boot refusal after {refused_after:.1f}s; plain OVMF kernel at {to_kernel:.1f}s")
