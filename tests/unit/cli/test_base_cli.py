"""`vmbuild base build` refuses what a recipe refuses, before building anything."""

from __future__ import annotations

import pytest

from vmbuild.cli import build_parser
from vmbuild.errors import VmbuildError


@pytest.mark.parametrize("mode", ["legacy-bios", "uefi-preferred"])
def test_arm64_base_with_a_bios_boot_mode_is_refused(mode: str) -> None:
    args = build_parser().parse_args(
        ["base", "build", "debian-12", "--arch", "arm64", "--boot-mode", mode]
    )
    with pytest.raises(VmbuildError) as info:
        args.handler(args)
    assert str(info.value) == f"--boot-mode {mode}: arm64 images boot UEFI only"
    assert info.value.hint == "drop --boot-mode, or pass --boot-mode uefi"
