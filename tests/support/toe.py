"""Helpers for the component engine's unit tests: a scripted Remote (no
processes, no VM) and a writer for small documents."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

from vmbuild.remote.base import OutputCallback, RemoteResult

Answer = RemoteResult | tuple[int, str, str]


class ScriptedRemote:
    """Records each script and answers with `handler(script)` (default: success)."""

    def __init__(self, handler: Callable[[str], Answer] | None = None, *, stream: bool = True):
        self.handler = handler or (lambda script: (0, "", ""))
        self.stream = stream
        self.calls: list[tuple[str, float | None]] = []
        self.files: dict[str, bytes] = {}
        self.reboots = 0

    @property
    def scripts(self) -> list[str]:
        return [script for script, _ in self.calls]

    def run(
        self,
        script: str,
        *,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
        env: dict[str, str] | None = None,
    ) -> RemoteResult:
        self.calls.append((script, timeout))
        answer = self.handler(script)
        result = answer if isinstance(answer, RemoteResult) else RemoteResult(*answer, 0.01)
        if on_output is not None and self.stream:
            for line in result.stdout.splitlines():
                on_output("stdout", line)
            for line in result.stderr.splitlines():
                on_output("stderr", line)
        return result

    def put(self, data: bytes, path: str, *, mode: int = 0o644) -> None:
        self.files[path] = data

    def get(self, path: str) -> bytes:
        return self.files[path]

    def reboot(self) -> None:
        self.reboots += 1


def write(directory: Path, text: str, name: str = "doc.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path
