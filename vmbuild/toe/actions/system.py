"""UpdateOS, and the schemas of the modules the runner executes itself.

Reboot, Assert and ExecuteDocument change the course of the run (reconnect,
evaluate a condition, run another document), so the runner implements them;
their inputs are declared here like every other module's.
"""

from __future__ import annotations

from collections.abc import Sequence

from vmbuild.toe.actions.base import PRELUDE, ActionSpec, Field, Item, Problems, Shape, q

# Wait for a dpkg lock (unattended-upgrades on first boot) and keep changed
# configuration files without asking.
_APT = (
    "apt-get -y -o DPkg::Lock::Timeout=300"
    " -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold"
)


def update_os_script(items: Sequence[Item]) -> str:
    """Install updates with apt-get, dnf or yum, whichever the guest has.

    With both lists, only included packages that are not excluded are updated
    (AWSTOE's rule). apt has no --exclude: excluded packages are held for the
    upgrade and released afterwards, even if it fails.
    """
    include = list(items[0]["include"] or [])
    exclude = list(items[0]["exclude"] or [])
    if include:
        include = [p for p in include if p not in exclude]
    inc = " ".join(q(p) for p in include)
    rpm_excludes = "".join(f" --exclude={q(p)}" for p in exclude)
    apt = ["export DEBIAN_FRONTEND=noninteractive", "apt-get -o DPkg::Lock::Timeout=300 update"]
    if exclude:
        apt += [
            "held=()",
            f"for p in {' '.join(q(p) for p in exclude)}; do",
            "  if dpkg-query -W -f='${Status}' \"$p\" 2>/dev/null | grep -q ' installed$'"
            ' && ! apt-mark showhold | grep -qx "$p"; then',
            '    apt-mark hold "$p" >/dev/null && held+=("$p")',
            "  fi",
            "done",
            "trap '[ ${#held[@]} -eq 0 ] || apt-mark unhold \"${held[@]}\" >/dev/null' EXIT",
        ]
    if include:
        apt.append(f"{_APT} install --only-upgrade -- {inc}")
    else:
        apt.append(f"{_APT} upgrade --with-new-pkgs")
    rpm_args = f"{rpm_excludes} {inc}".rstrip()
    return (
        PRELUDE
        + "if command -v apt-get >/dev/null 2>&1; then\n"
        + "".join(f"  {line}\n" for line in apt)
        + "elif command -v dnf >/dev/null 2>&1; then\n"
        + f"  dnf -y upgrade{rpm_args}\n"
        + "elif command -v yum >/dev/null 2>&1; then\n"
        + f"  yum -y update{rpm_args}\n"
        + "else\n"
        + "  echo 'UpdateOS: no supported package manager (apt-get, dnf or yum)' >&2; exit 1\n"
        + "fi\n"
    )


UPDATE_OS = ActionSpec(
    name="UpdateOS",
    summary="Install OS updates (apt-get, dnf or yum).",
    shape=Shape.MAP,
    fields=(
        Field("include", "strings", "Only update these packages.", default=()),
        Field("exclude", "strings", "Never update these packages.", default=()),
    ),
    script=update_os_script,
    inputs_optional=True,
)

REBOOT = ActionSpec(
    name="Reboot",
    summary="Reboot the guest, reconnect and continue with the next step.",
    shape=Shape.MAP,
    fields=(
        Field("delaySeconds", "int", "Wait this long before rebooting (default 0).", default=0),
    ),
    inputs_optional=True,
)

ASSERT = ActionSpec(
    name="Assert",
    summary="Fail the step unless a condition is true.",
    shape=Shape.CONDITION,
)


def _document_check(item: Item) -> Problems:
    if not item["document"].strip():
        return [("document", "must not be empty")]
    return []


# The run summary AWSTOE documents as ExecuteDocument's `outputs`.
EXECUTE_DOCUMENT_OUTPUTS = (
    "executedStepCount",
    "executionId",
    "failedStepCount",
    "failureMessage",
    "ignoredFailedStepCount",
    "logUrl",
    "status",
)

EXECUTE_DOCUMENT = ActionSpec(
    name="ExecuteDocument",
    summary="Run another component document (nested at most 3 levels, no cycles).",
    shape=Shape.MAP,
    fields=(
        Field(
            "document",
            "string",
            "The document: a path relative to this one or on the instance (e.g. one a "
            "previous step downloaded), an s3:// URI, or an Image Builder component ARN.",
            required=True,
        ),
        Field(
            "document-s3-bucket-owner",
            "string",
            "Expected owner account of the bucket of an s3:// document.",
        ),
        Field("phases", "string", "Comma-separated phases to run (default: all)."),
        Field("parameters", "pairs", "List of {name, value} passed to the document.", default=()),
    ),
    outputs=EXECUTE_DOCUMENT_OUTPUTS,
    item_check=_document_check,
)
