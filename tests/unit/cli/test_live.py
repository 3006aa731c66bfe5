"""The live line of a running stage: elapsed time and bytes on a terminal, text
literal, gone (transient) once the stage ends; never on a pipe."""

from __future__ import annotations

import io
import re

from rich.console import Console

from vmbuild import console
from vmbuild.log import Progress, clock, live_line

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def terminal(buf: io.StringIO, width: int = 60) -> Console:
    return Console(
        file=buf, force_terminal=True, width=width, markup=False, highlight=False,
        emoji=False, soft_wrap=True, color_system="standard",
    )  # fmt: skip


def test_the_line_shows_the_title_literally_with_time_and_bytes() -> None:
    assert live_line("boot [bold]vm[/]", 3.9).plain == "… boot [bold]vm[/] 3s"
    assert live_line("upload", 125.0, (512 * 1024**2, 2 * 1024**3)).plain == (
        "… upload 2m05s  512.0 MiB / 2.0 GiB (25%)"
    )
    assert live_line("fetch", 1.0, (1000, None)).plain == "… fetch 1s  1000 B"
    assert clock(3599.9) == "59m59s"


def test_a_long_stage_gets_a_transient_live_line_on_a_terminal() -> None:
    buf = io.StringIO()
    progress = Progress(terminal(buf), live_after=0.0)
    assert progress.live
    with progress.stage("convert", "convert to [raw]"):
        assert progress.live_shown.wait(10)
        progress.output("guest line")
        progress.bytes(1024, 4096)
        progress._live.refresh()  # type: ignore[union-attr]  # a frame with the bytes, now
    assert not progress.live_shown.is_set()
    frames = ANSI.sub("", buf.getvalue())
    assert re.search(r"… convert to \[raw\] \d+s", frames)
    assert "… convert to [raw] 0s  1.0 KiB / 4.0 KiB (25%)" in frames
    # What stays once the live line is erased: the lines printed outside it.
    lines = [ln for ln in frames.replace("\r", "\n").splitlines() if ln and "…" not in ln]
    assert lines[0] == "▶ convert to [raw]"
    assert lines[1] == "  │ guest line"
    assert re.fullmatch(r"✓ convert to \[raw\] \(\d+\.\ds\)", lines[2])
    assert len(lines) == 3


def test_a_stage_shorter_than_the_delay_shows_no_live_line() -> None:
    buf = io.StringIO()
    progress = Progress(terminal(buf), live_after=3600.0)
    with progress.stage("x", "quick"):
        pass
    assert "…" not in buf.getvalue()
    assert progress._waiter is None  # the waiter thread was stopped and joined


def test_pipes_and_quiet_never_get_one() -> None:
    buf = io.StringIO()
    progress = Progress(console.make_console(buf), live_after=0.0)
    assert not progress.live
    with progress.stage("x", "piped"):
        pass
    assert [ln[:8] for ln in buf.getvalue().splitlines()] == ["▶ piped", "✓ piped "]
    assert not Progress(terminal(io.StringIO()), quiet=True).live
