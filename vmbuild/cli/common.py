"""Helpers shared by the verb modules: JSON-or-human output and the common flags."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any, TypeAlias

Handler = Callable[[argparse.Namespace], int]
SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


# How an image is named on the command line (images show/rm/run/diff ...).
REF_HELP = "NAME[/VERSION[/BUILD]] (latest match), or the path of a build inside the store"


def out(args: argparse.Namespace, data: Any, human: Callable[[], None]) -> int:
    """Print `data` as JSON under --json, else run `human()`; exit status 0."""
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
    else:
        human()
    return 0


def verb(parent: SubParsers, name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = parent.add_parser(name, help=help, description=help)
    p.set_defaults(handler=handler)
    return p


def json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


def store_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", help="artifact store (default: $VMBUILD_STORE or ./images)")


def confirm(question: str) -> bool:
    """Ask on stderr, read one line from stdin; no answer (EOF) is a no."""
    sys.stderr.write(question)
    sys.stderr.flush()
    answer = sys.stdin.readline()
    if not answer.endswith("\n"):
        sys.stderr.write("\n")
    return answer.strip().lower() in ("y", "yes")
