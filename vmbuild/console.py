"""The terminal consoles every verb prints through: text is always printed literally.

Messages carry user and guest text (paths, image refs like `NAME[/VERSION]`, console tails,
component output), so rich markup is switched off on every console: a `[` in a message can
neither crash the printer (MarkupError) nor make `[name]` vanish. Colour is applied with
explicit `Text` styles instead. When output is not a terminal, lines are never wrapped or
cut to 80 columns, and on a terminal long lines are left to the terminal to wrap: paths
and sha256 digests stay whole and copy-pasteable.
"""

from __future__ import annotations

import sys
from typing import TextIO

from rich.console import Console
from rich.text import Text

# Wide enough for any path or digest line; rich only pads tables to their content.
PIPE_WIDTH = 4096


def make_console(file: TextIO | None = None, *, stderr: bool = False) -> Console:
    stream = file or (sys.stderr if stderr else sys.stdout)
    tty = stream.isatty()
    return Console(
        file=stream,
        markup=False,
        highlight=False,
        emoji=False,
        width=None if tty else PIPE_WIDTH,
        # Lines are never broken by vmbuild, not even on a terminal: the terminal wraps
        # them, so a path or digest copied from the screen stays one word.
        soft_wrap=True,
    )


def stdout() -> Console:
    return make_console()


def stderr() -> Console:
    return make_console(stderr=True)


def styled(label: str, style: str, rest: str = "") -> Text:
    """`label` in `style` followed by `rest` printed as is."""
    return Text.assemble((label, style), rest)
