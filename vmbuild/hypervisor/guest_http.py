"""An HTTP server on the host's loopback that guests reach through a QEMU guest
forward (the metadata service, an offline rebuild's mirror).

QEMU's `guestfwd` carries the guest's connections over one host connection that
never ends by itself, so the server keeps every accepted connection and shuts
them down when it stops; its connection threads are joined, not left running.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class GuestForwardServer(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins them: nothing outlives the server
    allow_reuse_address = False

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        super().__init__(("127.0.0.1", 0), handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self, name: str) -> None:
        """Serve in a thread of its own, named `name`."""
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, name=name, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving, close every connection and join every thread."""
        self.shutdown()  # stops serve_forever; the thread returns
        if self._thread is not None:
            self._thread.join()
        with self._conns_lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)  # QEMU's stream never ends by itself
        self.server_close()  # joins the connection threads

    def process_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: socket.socket) -> None:  # type: ignore[override]
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)
