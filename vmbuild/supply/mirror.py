"""An offline Debian mirror served from a bundle's inputs, for `vmbuild bundle rebuild`.

The tree under `root` is `HOST/PATH/dists/SUITE/...` and `HOST/PATH/pool/...`, one
per mirror URI the build used (`deb.debian.org/debian`, `deb.debian.org/debian-security`),
as apt-cacher-ng lays out its cache. It answers two request forms:

- proxy form, `GET http://deb.debian.org/debian/dists/bookworm/InRelease`: the guest's
  apt keeps the sources the image was built with and sends every request here through
  `Acquire::http::Proxy`, so nothing in the image's own apt configuration changes;
- path form, `GET /deb.debian.org/debian/dists/...`: a `deb http://127.0.0.1:PORT/HOST/PATH`
  source, as the host's apt uses it in the tests.

`by-hash/SHA256/<digest>` requests (bookworm's Release says Acquire-By-Hash) are answered
with the index file of that digest. Nothing is signed or rewritten here: apt verifies the
bundled InRelease with Debian's archive keyring, the indexes against it and every .deb
against the indexes, as it does against the real mirror.

The guest reaches it through a QEMU guest forward (`restrict=on` user networking: the
guest reaches nothing else). Like the metadata service (vmbuild.hypervisor.imds), QEMU
carries every guest connection over ONE TCP connection, one after another: the handler
reads HTTP/1.1 requests off it in order, never closes it, and every response says
`Connection: close` so the guest's apt opens a new connection per request. The guest's
apt is told not to pipeline and to use one queue (vmbuild.cache.aptproxy).
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import unquote, urlsplit

from vmbuild.hypervisor.guest_http import GuestForwardServer

log = logging.getLogger("vmbuild.mirror")

BY_HASH = re.compile(r"/by-hash/SHA256/([0-9a-f]{64})$")
CHUNK = 1 << 20


def mirror_key(uri: str) -> str:
    """`http://deb.debian.org/debian/` -> `deb.debian.org/debian` (the tree's directory)."""
    parts = urlsplit(uri)
    return f"{parts.netloc}{parts.path}".rstrip("/")


class OfflineMirror:
    """`with OfflineMirror(root) as m:` serves `root` on 127.0.0.1:m.port until the block ends.

    `missing` lists every path asked for and not found (a .deb the bundle lacks is
    named by the rebuild's error); `served` counts the files answered.
    """

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.missing: list[str] = []
        self.served = 0
        self._by_hash: dict[str, Path] = {}
        for path in sorted(self.root.rglob("*")):
            if path.is_file() and "/dists/" in path.as_posix():
                with path.open("rb") as fh:
                    self._by_hash[hashlib.file_digest(fh, "sha256").hexdigest()] = path
        self._lock = threading.Lock()
        self._server: _Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "the mirror is not running"
        return self._server.port

    def lookup(self, target: str) -> Path | None:
        """The file a request target names, or None (never outside `root`)."""
        parts = urlsplit(target)
        key = f"{parts.netloc}{parts.path}" if parts.scheme else parts.path
        key = unquote(key).lstrip("/")
        if (m := BY_HASH.search("/" + key)) is not None and m.group(1) in self._by_hash:
            return self._by_hash[m.group(1)]
        if not key or "\0" in key:
            return None
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root) or not path.is_file():
            return None
        return path

    def note(self, target: str, found: bool) -> None:
        with self._lock:
            if found:
                self.served += 1
            else:
                self.missing.append(target)
        log.info("offline mirror: %s %s", "200" if found else "404", target)

    def missing_packages(self) -> list[str]:
        """The .deb files asked for and not in the bundle (their pool file names)."""
        with self._lock:
            return sorted({t.rsplit("/", 1)[-1] for t in self.missing if t.endswith(".deb")})

    def __enter__(self) -> Self:
        self._server = _Server(self)
        self._server.start(f"offline-mirror-{self.port}")
        log.info("offline mirror of %s on 127.0.0.1:%d", self.root, self.port)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is None:
            return
        self._server.stop()
        self._server = None
        log.info("offline mirror: %d files served, %d not found", self.served, len(self.missing))


class _Server(GuestForwardServer):
    def __init__(self, mirror: OfflineMirror) -> None:
        self.mirror = mirror
        super().__init__(_Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: QEMU's one stream carries many requests
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        """http.server's access log is off: OfflineMirror.note logs each request."""

    def handle(self) -> None:
        self.close_connection = False
        while not self.close_connection:
            self.handle_one_request()

    def parse_request(self) -> bool:
        ok = super().parse_request()
        # A guest client's `Connection: close` must not end QEMU's stream (EOF does).
        self.close_connection = False
        return ok

    def send_header(self, keyword: str, value: str) -> None:
        keep = self.close_connection
        super().send_header(keyword, value)
        self.close_connection = keep

    def do_GET(self) -> None:
        mirror = self.server.mirror
        path = mirror.lookup(self.path)
        mirror.note(self.path, path is not None)
        if path is None:
            body = b"not in the bundle\n"
            self.send_response(404)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(path.stat().st_size))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            with path.open("rb") as fh:
                shutil.copyfileobj(fh, self.wfile, CHUNK)

    do_HEAD = do_GET
