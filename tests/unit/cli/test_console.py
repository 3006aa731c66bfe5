"""The consoles print user and guest text literally and do not wrap piped output."""

from __future__ import annotations

import io

from vmbuild import console
from vmbuild.log import Progress


def test_progress_prints_guest_output_and_titles_literally() -> None:
    buf = io.StringIO()
    progress = Progress(console.make_console(buf))
    with progress.stage("x", "stage [bold]one[/]"):
        progress.status("status [/etc/fstab] [name]")
        progress.output("guest [/x] [red]" + "y" * 200)
    lines = buf.getvalue().splitlines()
    assert lines[0] == "▶ stage [bold]one[/]"
    assert lines[1] == "  status [/etc/fstab] [name]"
    assert lines[2] == "  │ guest [/x] [red]" + "y" * 200
    assert lines[3].startswith("✓ stage [bold]one[/] (")
    assert len(lines) == 4


def test_styled_keeps_the_text() -> None:
    buf = io.StringIO()
    console.make_console(buf).print(console.styled("error:", "bold red", " a [/b] [c]"))
    assert buf.getvalue() == "error: a [/b] [c]\n"


def test_carriage_return_progress_shows_its_last_frame() -> None:
    buf = io.StringIO()
    Progress(console.make_console(buf)).output("Reading... 0%\rReading... 50%\rReading... Done\r")
    assert buf.getvalue() == "  │ Reading... Done\n"


def test_the_build_summary_counts_tests() -> None:
    from vmbuild.cli.build import test_summary

    tests = {
        "status": "passed",
        "testinfra": {"tests": 7, "failures": 0, "errors": 0, "skipped": 1},
        "components": [{"name": "a", "status": "Success"}, {"name": "b", "status": "Success"}],
    }
    assert test_summary(tests) == (
        "passed: testinfra 6 passed (0 failed, 0 errors, 1 skipped); component tests 2/2 passed"
    )
    assert test_summary({"status": "skipped"}) == "skipped (--skip-tests)"
