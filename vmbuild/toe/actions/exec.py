"""ExecuteBash and ExecuteBinary: run the user's commands as root in the guest.

The step's exit code is the script's; 194 asks the runner for a reboot.
"""

from __future__ import annotations

from collections.abc import Sequence

from vmbuild.remote.base import RemoteResult
from vmbuild.toe.actions.base import ActionSpec, Field, Item, Shape, q


def bash_script(items: Sequence[Item]) -> str:
    # Remote.run already runs its script as a bash file with stdin closed, the
    # way AWSTOE runs input.sh, so the commands are the script.
    return "\n".join(items[0]["commands"]) + "\n"


def binary_script(items: Sequence[Item]) -> str:
    item = items[0]
    return " ".join(q(a) for a in [item["path"], *(item["arguments"] or [])]) + "\n"


def stdout_output(result: RemoteResult, items: Sequence[Item]) -> dict[str, str]:
    # Trailing newlines would make `stringEquals: '2.1.1'` against an echoed
    # version fail; AWSTOE's documented outputs show them trimmed too.
    return {"stdout": result.stdout.rstrip("\n")}


EXECUTE_BASH = ActionSpec(
    name="ExecuteBash",
    summary="Run bash commands as one script.",
    shape=Shape.MAP,
    fields=(
        Field(
            "commands",
            "strings",
            "Commands or script lines, run as one bash script.",
            required=True,
        ),
    ),
    outputs=("stdout",),
    script=bash_script,
    parse_outputs=stdout_output,
)

EXECUTE_BINARY = ActionSpec(
    name="ExecuteBinary",
    summary="Run a program with arguments (no shell).",
    shape=Shape.MAP,
    fields=(
        Field("path", "string", "Path of the program to run.", required=True),
        Field("arguments", "strings", "Command-line arguments, passed as they are.", default=()),
    ),
    outputs=("stdout",),
    script=binary_script,
    parse_outputs=stdout_output,
)
