"""The guest command line that runs a script: one exec, one sudo, checked, on tmpfs."""

from __future__ import annotations

import hashlib
import re

from vmbuild.remote.ssh import run_command


def test_one_sudo_and_the_script_on_stdin() -> None:
    command = run_command("echo hi\n", timeout=None, env=None)
    assert command.stdin == b"echo hi\n"
    assert re.fullmatch(r"/dev/shm/vmbuild-[0-9a-f]{12}\.sh", command.path)
    assert re.fullmatch(r"vmbuild-upload-mismatch-[0-9a-f]{8}", command.marker)
    p, digest = command.path, hashlib.sha256(command.stdin).hexdigest()
    assert command.line == (
        f"(umask 077; cat > {p}) && echo '{digest}  {p}' | sha256sum -c --status 2>/dev/null"
        f" || {{ echo {command.marker} >&2; rm -f {p}; exit 250; }}; "
        f"sudo -n bash {p} </dev/null; rc=$?; rm -f {p}; exit $rc"
    )
    assert command.line.count("sudo -n ") == 1


def test_environment_goes_inside_the_script_not_the_command_line() -> None:
    command = run_command("env\n", timeout=2.5, env={"SECRET": "s3 cr'et"})
    assert command.stdin == b"export SECRET='s3 cr'\"'\"'et'\nenv\n"
    assert "s3" not in command.line
    # Rounded up: `timeout 0` would mean none at all.
    assert f"sudo -n timeout -k 10 3 bash {command.path} </dev/null" in command.line


def test_each_command_gets_its_own_file_and_marker() -> None:
    first = run_command("true", timeout=None, env=None)
    second = run_command("true", timeout=None, env=None)
    assert first.path != second.path and first.marker != second.marker
