"""Console progress (rich) and the per-build run log."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.text import Text

from vmbuild import console as consoles
from vmbuild.secrets import MaskingFilter, mask

log = logging.getLogger("vmbuild")


LIVE_AFTER = 2.0  # seconds a stage runs before its live line appears


def clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def live_line(title: str, elapsed: float, transfer: tuple[int, int | None] | None = None) -> Text:
    """The running stage's line: its title (literal text), elapsed time, bytes if any."""
    line = Text.assemble(("…", "bold cyan"), f" {title} ", (clock(elapsed), "dim"))
    if transfer is not None:
        done, total = transfer
        moved = (
            size(done) if not total else f"{size(done)} / {size(total)} ({done * 100 // total}%)"
        )
        line.append(f"  {moved}", style="dim")
    return line


@dataclass
class _Running:
    title: str
    start: float
    transfer: tuple[int, int | None] | None = None


class _LiveLine:
    """Renders the innermost running stage at each refresh (so the time moves on)."""

    def __init__(self, running: list[_Running]) -> None:
        self.running = running

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if not self.running:
            yield Text("")
            return
        top = self.running[-1]
        line = live_line(top.title, time.monotonic() - top.start, top.transfer)
        # The one line vmbuild does cut: a live line that wrapped would leave its
        # old frames on the screen (Live redraws exactly the lines it rendered).
        line.truncate(max(options.max_width - 1, 1), overflow="ellipsis")
        yield line


class Progress:
    """The console Reporter (vmbuild.progress): per-stage progress on the terminal;
    the run log gets everything.

    On a terminal, a stage that runs longer than `live_after` seconds gets a live
    line under the output (title, elapsed time, bytes moved): silent waits (a TCG
    boot, apt under load) no longer look hung. It is transient: once the stage ends
    only the ✓/✗ line with its time stays. Pipes and --quiet never get one.
    """

    def __init__(
        self, console: Console | None = None, *, quiet: bool = False,
        live: bool | None = None, live_after: float = LIVE_AFTER,
    ) -> None:  # fmt: skip
        # Titles, status and guest output are data: never markup (see vmbuild.console).
        self.console = console or consoles.stderr()
        self.quiet = quiet
        self.timings: dict[str, float] = {}
        self.live = (not quiet and self.console.is_terminal) if live is None else live
        self.live_after = live_after
        self.live_shown = threading.Event()  # set while a live line is on the screen
        self._running: list[_Running] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._waiter: threading.Thread | None = None
        self._live: Live | None = None

    def _start_live(self) -> None:
        self._stop.clear()
        self._waiter = threading.Thread(target=self._show_after, daemon=True)
        self._waiter.start()

    def _show_after(self) -> None:
        if self._stop.wait(self.live_after):
            return  # the stage ended first: no live line at all
        with self._lock:
            if self._stop.is_set():
                return
            self._live = Live(
                _LiveLine(self._running), console=self.console, transient=True,
                refresh_per_second=2, redirect_stdout=False, redirect_stderr=False,
            )  # fmt: skip
            self._live.start(refresh=True)
            self.live_shown.set()

    def _stop_live(self) -> None:
        with self._lock:
            self._stop.set()
            if self._live is not None:
                self._live.stop()
                self._live = None
                self.live_shown.clear()
        if self._waiter is not None:
            self._waiter.join()
            self._waiter = None

    @contextlib.contextmanager
    def stage(self, name: str, title: str) -> Iterator[None]:
        with logged_stage(name, title):
            yield from self._shown_stage(name, title)

    def _shown_stage(self, name: str, title: str) -> Iterator[None]:
        start = time.monotonic()
        if not self.quiet:
            self.console.print(Text.assemble(("▶", "bold cyan"), f" {title}"))
        if self.live and not self._running:
            self._start_live()
        self._running.append(_Running(title, start))
        try:
            yield
        except BaseException:
            self._end_running()
            took = time.monotonic() - start
            self.timings[name] = round(took, 2)
            if not self.quiet:
                self.console.print(
                    Text.assemble(("✗", "bold red"), f" {title} ", (f"({took:.1f}s)", "dim"))
                )
            raise
        self._end_running()
        took = time.monotonic() - start
        self.timings[name] = round(took, 2)
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
        # Shown on the live line only: a byte bar of its own belongs to commands
        # that draw one (`vmbuild base fetch`).
        if self._running:
            self._running[-1].transfer = (done, total)

    def _end_running(self) -> None:
        self._running.pop()
        if not self._running and self.live:
            self._stop_live()


@contextlib.contextmanager
def logged_stage(name: str, title: str) -> Iterator[None]:
    """A stage's markers in the run log, the same whichever reporter shows the
    stage (the console, `--json` events)."""
    start = time.monotonic()
    log.info("== stage %s: %s", name, title)
    try:
        yield
    except BaseException:
        log.info("== stage %s failed after %.1fs", name, time.monotonic() - start)
        raise
    log.info("== stage %s done in %.1fs", name, time.monotonic() - start)


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
