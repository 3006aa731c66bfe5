"""The shell scripts vmbuild runs in guests parse as bash (`bash -n`), for every
architecture: a syntax error would otherwise first show in a VM, minutes in."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from vmbuild.hypervisor.arch import Arch
from vmbuild.stages.generalize import FIND_SESSION, generalize_script


@pytest.mark.parametrize("arch", ["x86_64", "arm64"])
def test_generalize_script_is_valid_bash(arch: Arch) -> None:
    script = generalize_script("vmbuild-builder", arch)
    checked = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert (checked.returncode, checked.stderr) == (0, "")
    # The finishing unit's own script, cut out of the heredoc that writes it.
    finish = script.split("<<'FINISH'\n", 1)[1].split("\nFINISH\n", 1)[0]
    checked = subprocess.run(["bash", "-n"], input=finish, text=True, capture_output=True)
    assert (checked.returncode, checked.stderr) == (0, "")


@pytest.mark.parametrize(
    ("shell", "name"), [("bash", "sshd"), ("dash", "sshd"), ("bash", "sshd-session")]
)
def test_the_finishing_unit_waits_for_its_own_session_alone(
    tmp_path: Path, shell: str, name: str
) -> None:
    """FIND_SESSION, run as the generalize script is (a shell under a shell under
    the session's sshd, with `set -eu`), names that sshd: not an older session's,
    not init."""
    # A process named as the session's is (OpenSSH 9.8+ runs it as sshd-session).
    sshd = tmp_path / name
    shutil.copy("/bin/bash", sshd)
    older = subprocess.Popen([str(sshd), "-c", "sleep 60"])  # a stale session of the user
    try:
        probe = f"set -eu\n{FIND_SESSION}echo $session $PPID"
        inner = f"{shell} -c {shlex.quote(probe)}; true"
        out = subprocess.run(
            # "; true": no shell execs its last command in place of itself here.
            [str(sshd), "-c", f"echo $$; bash -c {shlex.quote(inner)}; true"],
            capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip
        session_pid, found, parent = int(out[0]), int(out[1]), int(out[2])
        assert found == session_pid != older.pid
        assert parent != session_pid  # it walked up more than one level
    finally:
        older.kill()
        older.wait()


@pytest.mark.parametrize("shell", ["bash", "dash"])
def test_without_an_sshd_above_it_the_finder_ends_at_one(shell: str) -> None:
    """No session found (run outside SSH): $session is 1, and the finishing unit
    then waits for the user's sshd processes as before."""
    probe = f"set -eu\n{FIND_SESSION}echo $session"
    out = subprocess.run([shell, "-c", probe], capture_output=True, text=True, check=True)
    assert (out.stdout, out.stderr) == ("1\n", "")
