"""Build output on a real terminal (a pty) at 80 and 200 columns: stage lines with their
times, colours as ANSI styles (never markup), and long paths never broken by vmbuild (the
terminal wraps them, so they copy whole). No VM: the build fails in its base stage."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from tests.support.cli import REPO, isolated_env
from tests.support.disks import qcow2_header

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_in_pty(argv: list[str], env: dict[str, str], columns: int) -> str:
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {**env, "COLUMNS": str(columns), "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        argv, stdin=terminal, stdout=terminal, stderr=terminal, env=env, cwd=REPO
    )
    os.close(terminal)
    chunks = []
    while True:
        try:
            data = os.read(controller, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(controller)
    assert proc.wait(120) == 1
    return b"".join(chunks).decode()


@pytest.mark.parametrize("columns", [80, 200])
def test_build_output_on_a_terminal(tmp_path: Path, columns: int) -> None:
    env = isolated_env(tmp_path)
    env.pop("COLUMNS", None)
    deep = tmp_path / ("a-rather-long-directory-name-" * 3)
    deep.mkdir()
    (deep / "bad.qcow2").write_bytes(qcow2_header())  # passes load, fails in the base stage
    recipe = deep / "recipe.yaml"
    recipe.write_text("name: bad\nversion: 1.0.0\nbase: bad.qcow2\n")
    raw = run_in_pty(
        [sys.executable, "-m", "vmbuild", "build", str(recipe), "--skip-tests"], env, columns
    )
    assert "\x1b[" in raw  # a terminal gets colour
    text = ANSI.sub("", raw).replace("\r\n", "\n")
    lines = text.splitlines()
    assert lines[0] == "▶ base image bad.qcow2"
    assert any(re.fullmatch(r"✗ base image bad\.qcow2 \(\d+\.\d+s\)", line) for line in lines)
    # vmbuild never breaks a line itself (the terminal wraps it): the long path is one
    # word, copy-pasteable from the screen, at any width.
    assert f"    qemu-img: Could not open '{deep / 'bad.qcow2'}': qcow2 header too short" in lines
    assert (
        lines[2]
        == f"error: command returned 1: qemu-img info -U --output=json {deep / 'bad.qcow2'}"
    )
    assert any(line.startswith("hint: run log: /") for line in lines)
