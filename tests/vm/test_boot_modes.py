"""Boot modes under real firmware (TCG): one uefi-preferred build with Secure Boot,
on the hybrid offline Debian base, tested under OVMF with Secure Boot enforced
(Microsoft's keys, Debian's signed shim, GRUB and kernel) and again under
SeaBIOS; the stored image passes the ESP lint. One build serves every mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vm.conftest import build_stored, lint_stored

pytestmark = pytest.mark.vm

COMPONENT = """\
name: hello
description: writes a file the test phase reads back
schemaVersion: 1.0
phases:
  - name: build
    steps:
      - name: Write
        action: ExecuteBash
        inputs:
          commands: ["echo booted-both-ways > /etc/vmbuild-hello"]
  - name: test
    steps:
      - name: Read
        action: ExecuteBash
        inputs:
          commands: ["grep -qx booted-both-ways /etc/vmbuild-hello"]
"""

RECIPE = """\
name: uefi-demo
version: 1.0.0
base: debian-12
boot_mode: uefi-preferred
secure_boot: true
components:
  - name: ./hello.yaml
"""


def test_uefi_preferred_secure_boot_build(
    cli_env: dict[str, str], tmp_path: Path, no_leftover_qemu: None
) -> None:
    manifest, elapsed = build_stored(tmp_path, cli_env, RECIPE, {"hello.yaml": COMPONENT})
    assert manifest["boot_mode"] == "uefi-preferred"
    assert manifest["base"]["id"].startswith("debian-12-hybrid-")
    boots = manifest["tests"]["boots"]
    assert [b["firmware"] for b in boots] == ["uefi-secure", "bios"]
    assert boots[0]["guest"] == "uefi SecureBoot enabled"
    assert boots[1]["guest"].startswith("bios")
    assert [c["status"] for c in manifest["tests"]["components"]] == ["Success"]
    print(f"uefi-preferred + Secure Boot build: {elapsed:.0f}s; timings {manifest['timings']}")

    report = lint_stored(manifest, cli_env)
    assert report["partition_table"] == "gpt"
    assert [f for f in report["findings"] if f["severity"] == "error"] == []
