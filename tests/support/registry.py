"""Debian's `docker-registry` (the CNCF distribution registry, 2.8) on 127.0.0.1,
started by the tests with their own config and storage, stopped after. Ready
when it logs its `listening on` line."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.motoext import free_port
from tests.support.services import _start, _stop


@dataclass(frozen=True)
class Registry:
    address: str  # HOST:PORT
    storage: Path

    def ref(self, repository: str, tag_or_digest: str) -> str:
        sep = "@" if tag_or_digest.startswith("sha256:") else ":"
        return f"docker://{self.address}/{repository}{sep}{tag_or_digest}"


def config(
    storage: Path, port: int, *, read_only: bool = False, htpasswd: Path | None = None
) -> str:
    readonly = "\n  maintenance: {readonly: {enabled: true}}" if read_only else ""
    auth = f"auth:\n  htpasswd: {{realm: vmbuild-test, path: '{htpasswd}'}}\n" if htpasswd else ""
    return (
        "version: 0.1\nlog: {level: info}\n"
        f"storage:\n  filesystem: {{rootdirectory: {storage}}}{readonly}\n"
        f"http: {{addr: '127.0.0.1:{port}'}}\n{auth}"
    )


@contextlib.contextmanager
def docker_registry(
    workdir: Path, *, read_only: bool = False, login: tuple[str, str] | None = None
) -> Iterator[Registry]:
    """A throwaway registry (plain HTTP); `read_only` refuses every push; `login`
    (user, password) makes every request need those credentials (htpasswd, bcrypt)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    htpasswd = None
    if login is not None:
        import bcrypt

        htpasswd = workdir / "htpasswd"
        hashed = bcrypt.hashpw(login[1].encode(), bcrypt.gensalt(rounds=4)).decode()
        htpasswd.write_text(f"{login[0]}:{hashed}\n")
    cfg = workdir / "config.yml"
    cfg.write_text(config(workdir / "data", port, read_only=read_only, htpasswd=htpasswd))
    proc, out = _start(["docker-registry", "serve", str(cfg)], workdir / "registry.log")
    try:
        out.wait_for(f"listening on 127.0.0.1:{port}", 30)
        yield Registry(f"127.0.0.1:{port}", workdir / "data")
    finally:
        _stop(proc)
