"""What the rest of vmbuild needs from a connection to a guest.

The SSH session (`vmbuild.remote.ssh`) implements it; the component engine and
the stages only see this Protocol, so they can be tested with a fake remote.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class RemoteResult:
    exit_code: int
    stdout: str
    stderr: str
    duration: float
    timed_out: bool = False


OutputCallback = Callable[[str, str], None]
"""Called with (stream, line) where stream is "stdout" or "stderr"."""


class Remote(Protocol):
    def run(
        self,
        script: str,
        *,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
        env: dict[str, str] | None = None,
    ) -> RemoteResult:
        """Run `script` with bash as root in the guest; never raises on a non-zero exit.

        `timeout` (seconds, None = none) is enforced on the guest command itself
        (the process group is killed in the guest), and `timed_out` is set.
        """
        ...

    def put(self, data: bytes, path: str, *, mode: int = 0o644) -> None:
        """Write `data` to `path` in the guest (as root; parent directories created)."""
        ...

    def get(self, path: str) -> bytes:
        """Read a file from the guest (as root)."""
        ...

    def reboot(self) -> None:
        """Reboot the guest and return once SSH answers again (host key still pinned)."""
        ...
