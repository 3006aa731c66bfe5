"""An arm64 image end to end on this x86_64 host: the offline Debian base built
for arm64 (mmdebstrap with the maintainer scripts under qemu-user), booted in
qemu-system-aarch64 (virt machine, AAVMF) under TCG as builder and test VM, one
component with a test phase; the manifest says arm64 and the test VM's CPU
was aarch64. Every guest instruction is translated (TCG), yet with the arm64
base cached it took 219 s here (builder 73 s, test VM 95 s; load ~3.5). A cold
cache adds the arm64 base build: 1322 s (mmdebstrap under qemu-user, load ~7)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.libvirtd import Libvirtd
from tests.vm.conftest import build_stored, lint_stored

# Not in `make test`: a cold arm64 base alone takes longer than the per-test
# timeout and a fifth of CI's budget. `make test-arm64` runs it.
pytestmark = pytest.mark.arm64_base

COMPONENT = """\
name: hello-arm64
description: writes the CPU architecture; the test phase reads it back
schemaVersion: 1.0
phases:
  - name: build
    steps:
      - name: Write
        action: ExecuteBash
        inputs:
          commands: ["uname -m > /etc/vmbuild-arch"]
  - name: test
    steps:
      - name: Read
        action: ExecuteBash
        inputs:
          commands: ["grep -qx aarch64 /etc/vmbuild-arch", "test \\"$(uname -m)\\" = aarch64"]
"""

RECIPE = """\
name: arm64-demo
version: 1.0.0
base: debian-12
arch: arm64
components:
  - name: ./hello.yaml
"""


def test_arm64_build_end_to_end(
    cli_env: dict[str, str], tmp_path: Path, no_leftover_qemu: None
) -> None:
    manifest, elapsed = build_stored(tmp_path, cli_env, RECIPE, {"hello.yaml": COMPONENT})
    assert (manifest["architecture"], manifest["boot_mode"]) == ("arm64", "uefi")
    assert manifest["base"]["id"].startswith("debian-12-arm64-uefi-")
    assert manifest["accelerator"]["kind"] == "tcg"
    assert manifest["accelerator"]["reason"].startswith("aarch64 guest on a x86_64 host")
    [boot] = manifest["tests"]["boots"]
    assert (boot["firmware"], boot["machine"]) == ("uefi", "aarch64")
    assert [c["status"] for c in manifest["tests"]["components"]] == ["Success"]
    assert {p["arch"] for p in manifest["packages"]} <= {"arm64", "all"}
    print(f"arm64 build: {elapsed:.0f}s; timings {manifest['timings']}")

    report = lint_stored(manifest, cli_env)
    assert report["partition_table"] == "gpt"
    assert [f for f in report["findings"] if f["severity"] == "error"] == []


def test_arm64_guest_boots_as_a_libvirt_domain(
    libvirtd: Libvirtd, tmp_path: Path, no_leftover_qemu: None
) -> None:
    """The arm64 base booted once as a libvirt domain (aarch64, virt, AAVMF loader and
    a per-VM nvram): the guest runs aarch64 under UEFI. A test-VM boot only."""
    from vmbuild.hypervisor import accel
    from vmbuild.hypervisor.guest import GuestRequest, booted_guest
    from vmbuild.plan import TEST_USER
    from vmbuild.stages import base_image
    from vmbuild.stages.image_tests import check_firmware

    base = base_image.build_debian("debian-12", layout="uefi", arch="arm64")
    req = GuestRequest(
        run_id="lva" + tmp_path.name[-6:].replace("_", ""), role="test", base=base.path,
        base_format=base.format, disk_size=None, memory_mib=1024, cpus=2,
        accel=accel.for_guest(accel.tcg("the VM tier runs on TCG"), "arm64", "x86_64"),
        workdir=tmp_path / "vm", user=TEST_USER, backend="libvirt", libvirt_uri=libvirtd.uri,
        dispose="kill", firmware="uefi", arch="arm64",
    )  # fmt: skip
    start = time.monotonic()
    with booted_guest(req) as guest:
        to_ssh = time.monotonic() - start
        boot = check_firmware(guest, "uefi")
    assert (boot["machine"], boot["guest"].split()[0]) == ("aarch64", "uefi")
    print(f"libvirt arm64 UEFI: SSH after {to_ssh:.1f}s")
