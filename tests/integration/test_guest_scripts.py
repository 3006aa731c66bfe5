"""The shell scripts vmbuild runs in guests parse as bash (`bash -n`), for every
architecture: a syntax error would otherwise first show in a VM, minutes in."""

from __future__ import annotations

import subprocess

import pytest

from vmbuild.hypervisor.arch import Arch
from vmbuild.stages.generalize import generalize_script


@pytest.mark.parametrize("arch", ["x86_64", "arm64"])
def test_generalize_script_is_valid_bash(arch: Arch) -> None:
    script = generalize_script("vmbuild-builder", arch)
    checked = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert (checked.returncode, checked.stderr) == (0, "")
    # The finishing unit's own script, cut out of the heredoc that writes it.
    finish = script.split("<<'FINISH'\n", 1)[1].split("\nFINISH\n", 1)[0]
    checked = subprocess.run(["bash", "-n"], input=finish, text=True, capture_output=True)
    assert (checked.returncode, checked.stderr) == (0, "")
