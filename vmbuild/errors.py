"""One error hierarchy: the CLI prints `str(error)` plus the hint and exits non-zero."""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence


def quote_argv(argv: Sequence[str | os.PathLike[str]]) -> str:
    """An argv as a shell would need it typed (logs and error messages)."""
    return " ".join(shlex.quote(str(a)) for a in argv)


class VmbuildError(Exception):
    """Base of every error vmbuild reports to a user (no traceback unless --debug)."""

    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class ConfigError(VmbuildError):
    """Invalid user input, naming file and field: `recipe.yaml: components[1].name: ...`."""

    def __init__(self, file: str, field: str | None, message: str, *, hint: str | None = None):
        self.file = file
        self.field = field
        self.message = message
        where = f"{file}: {field}" if field else file
        super().__init__(f"{where}: {message}", hint=hint)


class CommandError(VmbuildError):
    """An external command failed: carries argv, exit code and the tail of its output."""

    def __init__(self, argv: Sequence[str], returncode: int, output_tail: str = "") -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.output_tail = output_tail
        message = f"command returned {returncode}: {quote_argv(self.argv)}"
        if output_tail.strip():
            message += "\n" + _indent(output_tail.rstrip())
        super().__init__(message)


class CommandTimeout(CommandError):
    def __init__(self, argv: Sequence[str], timeout: float, output_tail: str = "") -> None:
        super().__init__(argv, -1, output_tail)
        self.args = (f"command timed out after {timeout:.0f}s: {self.argv[0]}",)


class VMError(VmbuildError):
    """A VM failed to launch, boot or shut down; carries the tail of its serial console."""

    def __init__(self, message: str, *, console_tail: str = "", hint: str | None = None) -> None:
        self.console_tail = console_tail
        if console_tail.strip():
            message += "\n--- serial console (last lines) ---\n" + console_tail.rstrip()
        super().__init__(message, hint=hint)


class GuestStopped(VMError):
    """The guest can no longer run anything: its VM exited or its console shows a
    kernel panic, an oops or emergency mode. `cause` is the short reason."""

    def __init__(self, vm: str, cause: str, *, console_tail: str = "", during: str = "") -> None:
        self.vm = vm
        self.cause = cause
        self.during = during
        where = f" during {during}" if during else ""
        super().__init__(f"{vm}: {cause}{where}", console_tail=console_tail)


class SSHError(VmbuildError):
    pass


class SSHTimeout(SSHError):
    """No SSH login before the deadline (a VM that boots too slowly, or not at all)."""


class TransferError(SSHError):
    """A file could not be written to the guest intact (its disk full, the
    connection gone, or what landed differs from what was sent)."""


class StepFailed(VmbuildError):
    """A component step failed in the guest."""


class TestsFailed(VmbuildError):
    """The image's tests failed in the test VM; nothing was stored as passed."""

    __test__ = False  # not a pytest test class


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())
