"""A minimal QMP client: enough to power a VM down, cut disk layers, and move its
RAM state through a file descriptor (checkpoints that restore the running VM)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from vmbuild.errors import VMError

_MIGRATION_ENDS = ("completed", "failed", "cancelled")


class QMPClient:
    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._timeout = timeout
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
        except OSError as exc:
            self._sock.close()
            raise VMError(f"QMP socket {path}: {exc}") from exc
        self._buf = b""
        self._events: list[dict[str, Any]] = []
        self._read_message()  # greeting
        self.execute("qmp_capabilities")

    def _read_message(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise VMError("QMP connection closed")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        msg: dict[str, Any] = json.loads(line)
        return msg

    def execute(self, command: str, **arguments: Any) -> Any:
        req: dict[str, Any] = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        self._sock.sendall(json.dumps(req).encode() + b"\n")
        while True:
            msg = self._read_message()
            if "event" in msg:
                self._events.append(msg)  # not an answer; wait_migration reads them
                continue
            if "error" in msg:
                raise VMError(f"QMP {command}: {msg['error'].get('desc', msg['error'])}")
            return msg.get("return")

    def send_fd(self, name: str, fd: int) -> None:
        """Hand QEMU a file descriptor under `name` (QMP `getfd`: the descriptor
        travels with the command as SCM_RIGHTS ancillary data)."""
        req = {"execute": "getfd", "arguments": {"fdname": name}}
        socket.send_fds(self._sock, [json.dumps(req).encode() + b"\n"], [fd])
        while True:
            msg = self._read_message()
            if "event" in msg:
                self._events.append(msg)
                continue
            if "error" in msg:
                raise VMError(f"QMP getfd: {msg['error'].get('desc', msg['error'])}")
            return

    def wait_migration(self, timeout: float) -> str:
        """Wait for a migration (started after `watch_migration`) to end: "completed",
        "failed" or "cancelled". QEMU's MIGRATION events say so as it happens."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self._events:
                status = str(event.get("data", {}).get("status", ""))
                if event.get("event") == "MIGRATION" and status in _MIGRATION_ENDS:
                    self._events.clear()
                    return status
            self._events.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise VMError(f"the VM's state was not moved within {timeout:.0f}s")
            self._sock.settimeout(left)
            try:
                msg = self._read_message()
            except TimeoutError:
                continue
            finally:
                self._sock.settimeout(self._timeout)
            if "event" in msg:
                self._events.append(msg)

    def watch_migration(self) -> None:
        """Ask for MIGRATION events (QEMU sends them only when asked)."""
        self.execute(
            "migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}]
        )

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> QMPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
