"""Console progress (rich) and the per-build run log."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.text import Text

from vmbuild import console as consoles
from vmbuild.secrets import MaskingFilter, mask

log = logging.getLogger("vmbuild")


class Progress:
    """The console Reporter (vmbuild.progress): per-stage progress on the terminal;
    the run log gets everything."""

    def __init__(self, console: Console | None = None, *, quiet: bool = False) -> None:
        # Titles, status and guest output are data: never markup (see vmbuild.console).
        self.console = console or consoles.stderr()
        self.quiet = quiet
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str, title: str) -> Iterator[None]:
        start = time.monotonic()
        log.info("== stage %s: %s", name, title)
        if not self.quiet:
            self.console.print(Text.assemble(("▶", "bold cyan"), f" {title}"))
        try:
            yield
        except BaseException:
            took = time.monotonic() - start
            self.timings[name] = round(took, 2)
            log.info("== stage %s failed after %.1fs", name, took)
            if not self.quiet:
                self.console.print(
                    Text.assemble(("✗", "bold red"), f" {title} ", (f"({took:.1f}s)", "dim"))
                )
            raise
        took = time.monotonic() - start
        self.timings[name] = round(took, 2)
        log.info("== stage %s done in %.1fs", name, took)
        if not self.quiet:
            self.console.print(
                Text.assemble(("✓", "bold green"), f" {title} ", (f"({took:.1f}s)", "dim"))
            )

    def status(self, text: str) -> None:
        text = mask(text)
        log.info("%s", text)
        if not self.quiet:
            self.console.print(Text(f"  {text}", style="dim"), soft_wrap=True)

    def output(self, line: str) -> None:
        """A line of guest or tool output: streamed to the terminal and the run log."""
        line = mask(line)
        log.debug("| %s", line)
        # apt and curl redraw one line with carriage returns: show its final state,
        # not every frame glued together.
        line = line.rstrip("\r").rsplit("\r", 1)[-1]
        if not self.quiet:
            # Guest output is data, not markup; never re-wrap it.
            self.console.print(Text.assemble(("  │", "dim"), f" {line}"), soft_wrap=True)

    def bytes(self, done: int, total: int | None) -> None:
        # Stage and status lines are what the build console shows; a byte bar
        # belongs to commands that draw one (`vmbuild base fetch`).
        pass


def setup_console_logging(debug: bool) -> None:
    root = logging.getLogger("vmbuild")
    root.setLevel(logging.DEBUG)
    if not any(getattr(h, "_vmbuild_console", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setLevel(logging.DEBUG if debug else logging.WARNING)
        handler.setFormatter(logging.Formatter("vmbuild: %(levelname)s: %(message)s"))
        handler.addFilter(MaskingFilter())
        handler._vmbuild_console = True  # type: ignore[attr-defined]
        root.addHandler(handler)


@contextlib.contextmanager
def run_log(path: Path) -> Iterator[Path]:
    """Send every vmbuild log record (debug included) to `path` while active."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Run logs may quote parameters: private to the user (and secrets masked).
    path.touch(mode=0o600)
    path.chmod(0o600)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.addFilter(MaskingFilter())
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger("vmbuild")
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        handler.close()
