"""run()'s carriage-return reader with real processes: a frame reaches on_frame
while the tool still holds its line, and `qemu-img convert -p` turns into
byte progress with one log line per conversion (not one per frame)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from tests.support.reporting import RecordingReporter
from vmbuild.run import run
from vmbuild.stages.convert import from_raw


def test_a_frame_arrives_before_the_tool_ends_its_line(tmp_path: Path) -> None:
    # The tool draws a frame, then waits on a FIFO that only the on_frame
    # callback opens: a reader that waited for `\n` would never release it
    # (the timeout fails the test instead of hanging it).
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    frames: list[str] = []
    lines: list[str] = []

    def on_frame(text: str) -> None:
        frames.append(text)
        if text == "step 1/2":
            with gate.open("w") as release:
                release.write("go\n")

    script = f'printf "step 1/2\\r"; read x < "{gate}"; printf "step 2/2\\r\\n"; echo done'
    proc = run(["sh", "-c", script], timeout=30, on_line=lines.append, on_frame=on_frame)
    assert frames == ["step 1/2", "step 2/2"]
    assert lines == ["step 2/2", "done"]
    assert proc.stdout == "step 1/2\rstep 2/2\r\ndone\n"  # the bytes as written


def test_qemu_img_convert_progress_becomes_bytes_and_one_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    raw = tmp_path / "disk.raw"
    size = 64 << 20
    with raw.open("wb") as f:  # data qemu-img has to copy, not holes it skips
        for _ in range(size >> 20):
            f.write(os.urandom(1 << 20))
    reporter = RecordingReporter()
    with caplog.at_level(logging.DEBUG, logger="vmbuild.run"):
        from_raw(raw, tmp_path / "disk.qcow2", reporter)
    assert reporter.transfers[0] == (0, size)
    assert reporter.transfers[-1] == (size, size)
    done = [d for d, _ in reporter.transfers]
    assert done == sorted(done) and all(t == size for _, t in reporter.transfers)
    progress = [r.getMessage() for r in caplog.records if "/100%)" in r.getMessage()]
    assert progress == ["      (100.00/100%)"]
