"""The `vmbuild` command line: one module per verb, each with `add_parser(sub)`;
this module assembles the parser and turns errors into one line + hint."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import traceback
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import Any

from vmbuild import __version__, console
from vmbuild.cli.common import Handler
from vmbuild.errors import VmbuildError
from vmbuild.secrets import mask

# Exit status: 0 success; 1 an error vmbuild reports (one line + hint); 2 a usage
# error (argparse) or an internal error (a bug; --debug shows the traceback);
# 130 interrupted (Ctrl-C, SIGTERM), after cleanup; 141 stdout closed by its reader.
# Verbs with their own meanings: `pipeline check` 0 changed / 1 unchanged / 2 could
# not check; `pipeline run` 75 when the pipeline is already running.
EXIT_BROKEN_PIPE = 141

# The verb modules, in `vmbuild --help` order. A new verb is a new module here.
VERB_MODULES = (
    "validate",
    "inspect",
    "build",
    "base",
    "images",
    "component",
    "toe",
    "import_",
    "distribute",
    "pipeline",
    "scale",
    "doctor",
    "key",
    "verify",
    "bundle",
    "scan",
    "init",
    "completion",
    "cache",
)


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    # SIGTERM/SIGHUP become KeyboardInterrupt, once, so every context manager
    # unwinds (VMs reaped, staging removed); a second signal is not re-raised
    # inside that cleanup.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmbuild", description="Build, test and distribute VM images locally."
    )
    parser.add_argument("--version", action="version", version=f"vmbuild {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for module in _extension_modules():
        module.add_parser(sub)
    _debug_everywhere(parser)
    return parser


def _debug_everywhere(parser: argparse.ArgumentParser) -> None:
    """Accept --debug after the verb too (`vmbuild build r.yaml --debug`).

    SUPPRESS: a sub-parser's default must not reset a --debug given before the verb.
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                if "--debug" not in child._option_string_actions:
                    child.add_argument(
                        "--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks and debug logs",
                    )  # fmt: skip
                _debug_everywhere(child)


def _extension_modules() -> list[Any]:
    """Every verb module (vmbuild.cli.<verb>), each contributing `add_parser(sub)`."""
    return [importlib.import_module(f"vmbuild.cli.{name}") for name in VERB_MODULES]


@contextlib.contextmanager
def _registered(argv: list[str]) -> Iterator[None]:
    """Clean up after earlier vmbuild processes that died (SIGKILL, OOM, host
    crash), then register this one so a later command can do the same for it."""
    from vmbuild import runs

    runs.reap()  # each one is logged as a warning
    with runs.registered(argv):
        yield


def main(argv: Sequence[str] | None = None) -> int:
    from vmbuild.log import setup_console_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    setup_console_logging(args.debug)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    err = console.stderr()
    try:
        handler: Handler = args.handler
        with _registered(list(sys.argv if argv is None else ["vmbuild", *argv])):
            return handler(args)
    except VmbuildError as exc:
        if args.debug:
            traceback.print_exc()
        # Error text is data (paths, refs like NAME[/VERSION], console tails): literal.
        err.print(console.styled("error:", "bold red", f" {mask(str(exc))}"))
        if exc.hint:
            err.print(console.styled("hint:", "yellow", f" {exc.hint}"))
        return 1
    except KeyboardInterrupt:
        err.print(console.styled("interrupted", "bold red", ": cleaned up"))
        return 130
    except BrokenPipeError:
        # The reader went away (`vmbuild images list | head`): not an error to
        # report. Point stdout at /dev/null so the final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except Exception as exc:  # a bug: say so, with the traceback in --debug
        if args.debug:
            traceback.print_exc()
        err.print(console.styled("internal error:", "bold red", f" {type(exc).__name__}: {exc}"))
        err.print(console.styled("hint:", "yellow", " rerun with --debug for the traceback"))
        return 2
    finally:
        with contextlib.suppress(BrokenPipeError):
            sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
