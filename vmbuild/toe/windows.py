"""Recognise a document written for Windows, so it gets one clear error.

vmbuild runs Linux guests. A Windows document uses a Windows-only module
(ExecutePowerShell, SetRegistry, InstallMSI, UninstallMSI), or only
cross-platform modules with Windows paths (`C:\\Temp\\x.zip`); either way every
step would fail in a Linux guest, so the whole document is refused once instead
of step by step.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

# Documented by AWS for Windows only.
WINDOWS_ONLY = frozenset({"ExecutePowerShell", "SetRegistry", "InstallMSI", "UninstallMSI"})
# A drive-letter path (`C:\Temp\x.zip`, `D:\data`) at the start of a word, or
# an environment variable in Windows form. A shell regex such as `"x:\d+"` is
# not a path: after the folder name must come another backslash, an extension
# or the end of the text.
_WINDOWS_TEXT = re.compile(
    r"(?:^|[\s\"'=(])[A-Za-z]:\\[\w .$()-]+(?:\\|\.\w{1,5}\b|$)"
    r"|%(?:ProgramFiles|ProgramData|SystemRoot|SystemDrive|USERPROFILE|windir)%",
    re.IGNORECASE,
)
_WINDOWS_PROGRAM = re.compile(r"\.(?:exe|ps1|bat|cmd|msi)$", re.IGNORECASE)
MESSAGE = "Windows guests are not supported yet"
_MAX_SCAN = 100_000  # strings looked at; a document is never that large


def windows_evidence(raw: Any) -> tuple[str, str] | None:
    """(field, why) for the first sign that `raw` (a parsed document) is for
    Windows, or None."""
    phases = raw.get("phases") if isinstance(raw, dict) else None
    if not isinstance(phases, list):
        return None
    for phase in phases:
        if not isinstance(phase, dict) or not isinstance(phase.get("steps"), list):
            continue
        phase_name = phase.get("name") if isinstance(phase.get("name"), str) else "?"
        for step in phase["steps"]:
            if not isinstance(step, dict):
                continue
            step_name = step.get("name") if isinstance(step.get("name"), str) else "?"
            where = f"{phase_name}.{step_name}"
            action = step.get("action")
            if isinstance(action, str) and action in WINDOWS_ONLY:
                return f"{where}.action", f"it uses {action}, a Windows module"
            inputs = step.get("inputs")
            program = inputs.get("path") if isinstance(inputs, dict) else None
            windows_program = isinstance(program, str) and _WINDOWS_PROGRAM.search(program.strip())
            if action == "ExecuteBinary" and windows_program:
                return f"{where}.inputs.path", f"it runs the Windows program {program!r}"
            for text in _strings(step.get("inputs")):
                if _WINDOWS_TEXT.search(text):
                    shown = text if len(text) <= 60 else text[:57] + "..."
                    return f"{where}.inputs", f"it uses the Windows path {shown!r}"
    return None


def _strings(value: Any) -> Iterator[str]:
    stack = [value]
    seen = 0
    while stack and seen < _MAX_SCAN:
        item = stack.pop()
        seen += 1
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
