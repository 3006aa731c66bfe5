"""Pushing an OCI layout's image to a registry, with skopeo (a maintained client).

Idempotent by digest: a tag that already names the same manifest digest in the
registry is left alone, and `--preserve-digests` makes skopeo fail rather than
rewrite the manifest (re-compress, convert), so the digest vmbuild stored is
the digest the registry serves. Each tag is checked back after its push.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmbuild.errors import CommandError, VmbuildError
from vmbuild.run import run

TIMEOUT = 1800.0
_NOT_FOUND = ("manifest unknown", "name unknown", "not found")
_FATAL = re.compile(r'level=fatal msg="(.*)"\s*$', re.MULTILINE)


def _tls(flag: str, verify: bool) -> list[str]:
    return [] if verify else [f"--{flag}=false"]


def _auth(flag: str, authfile: Path | None) -> list[str]:
    # Credentials go in a file skopeo reads, never on the command line (ps, run log).
    return [] if authfile is None else [f"--{flag}", str(authfile)]


def inspect_argv(reference: str, *, tls_verify: bool, authfile: Path | None = None) -> list[str]:
    return ["skopeo", "inspect", *_tls("tls-verify", tls_verify), *_auth("authfile", authfile),
            "--format", "{{.Digest}}", reference]  # fmt: skip


def push_argv(
    layout: Path, tag: str, reference: str, *, tls_verify: bool, authfile: Path | None = None
) -> list[str]:
    return [
        "skopeo", "copy", "--quiet", "--preserve-digests", *_tls("dest-tls-verify", tls_verify),
        *_auth("dest-authfile", authfile), f"oci:{layout}:{tag}", reference,
    ]  # fmt: skip


def pull_argv(reference: str, layout: Path, tag: str, *, tls_verify: bool) -> list[str]:
    return [
        "skopeo", "copy", "--quiet", "--preserve-digests", *_tls("src-tls-verify", tls_verify),
        reference, f"oci:{layout}:{tag}",
    ]  # fmt: skip


def skopeo_message(exc: CommandError) -> str:
    """skopeo's own one-line reason (its `level=fatal msg=...`), else the output tail."""
    found = _FATAL.findall(exc.output_tail)
    text = found[-1] if found else exc.output_tail.strip().splitlines()[-1:]
    line = text if isinstance(text, str) else "".join(text)
    return line.replace('\\"', '"').replace("\\n", " ").strip()


def remote_digest(reference: str, *, tls_verify: bool, authfile: Path | None = None) -> str | None:
    """The manifest digest `reference` names in its registry; None if it names nothing.

    A registry that cannot be reached or refuses the request raises VmbuildError.
    """
    argv = inspect_argv(reference, tls_verify=tls_verify, authfile=authfile)
    try:
        out = run(argv, timeout=120, merge_stderr=False)
    except CommandError as exc:
        reason = skopeo_message(exc)
        if any(marker in reason for marker in _NOT_FOUND):
            return None
        raise VmbuildError(f"{reference}: {reason}") from None
    return out.stdout.strip()


@dataclass(frozen=True)
class Pushed:
    reference: str
    digest: str
    skipped: bool  # the registry had this digest under this tag already
    seconds: float


def push(
    layout: Path,
    tag: str,
    digest: str,
    references: Sequence[str],
    *,
    tls_verify: bool,
    authfile: Path | None = None,
    on_status: Callable[[str], None] = lambda _: None,
) -> list[Pushed]:
    """Push the image `tag` of `layout` (manifest `digest`) to every reference, with the
    registry credentials of `authfile` (containers-auth.json) if given."""
    import time

    pushed = []
    for reference in references:
        start = time.monotonic()
        if remote_digest(reference, tls_verify=tls_verify, authfile=authfile) == digest:
            on_status(f"{reference}: already at {digest}")
            pushed.append(Pushed(reference, digest, True, time.monotonic() - start))
            continue
        try:
            argv = push_argv(layout, tag, reference, tls_verify=tls_verify, authfile=authfile)
            run(argv, timeout=TIMEOUT)
        except CommandError as exc:
            raise VmbuildError(
                f"pushing to {reference} failed: {skopeo_message(exc)}",
                hint="the image stays in the store; `vmbuild images push IMAGE` pushes "
                "again only what is missing",
            ) from None
        landed = remote_digest(reference, tls_verify=tls_verify, authfile=authfile)
        if landed != digest:
            raise VmbuildError(f"{reference}: the registry serves {landed}, not {digest}")
        took = time.monotonic() - start
        on_status(f"{reference}: pushed {digest} in {took:.1f}s")
        pushed.append(Pushed(reference, digest, False, took))
    return pushed


def pull(reference: str, layout: Path, tag: str, *, tls_verify: bool) -> None:
    """Copy `reference` (by tag or @digest) into a local layout, digests unchanged.

    A failed pull into a new layout leaves no layout (skopeo creates it first)."""
    new = not layout.exists()
    try:
        run(pull_argv(reference, layout, tag, tls_verify=tls_verify), timeout=TIMEOUT)
    except CommandError as exc:
        if new:
            shutil.rmtree(layout, ignore_errors=True)
        raise VmbuildError(f"pulling {reference} failed: {skopeo_message(exc)}") from None
