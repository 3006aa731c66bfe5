"""WebDownload: fetched by the host, verified there, then written into the guest.

The host does the HTTP(S) work so that guests need neither curl nor wget (a
minimal base image has neither) and so that the checksum is checked before a
byte reaches the image. As documented: only HTTP 200 is success, redirects are
followed, each download gets up to 5 tries with exponential backoff (separate
from the step's maxAttempts), a destination ending in / is a folder, and with
overwrite and a matching checksum an existing file is kept as it is.
"""

from __future__ import annotations

import hashlib
import re
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import PurePosixPath
from urllib.parse import urlparse

from vmbuild import __version__
from vmbuild.toe.actions.base import (
    ActionFailed,
    ActionSpec,
    Field,
    HostContext,
    Item,
    Problems,
    Shape,
    q,
)

# name → (hashlib name, coreutils tool)
ALGORITHMS = {
    "MD5": ("md5", "md5sum"),
    "SHA1": ("sha1", "sha1sum"),
    "SHA256": ("sha256", "sha256sum"),
    "SHA512": ("sha512", "sha512sum"),
}
DOWNLOAD_TRIES = 5
sleep: Callable[[float], None] = time.sleep  # replaced in tests


def target_path(source: str, destination: str) -> str:
    """Where `source` lands: a destination ending in / is a folder."""
    if not destination.endswith("/"):
        return destination
    name = PurePosixPath(urlparse(source).path).name
    if not name:
        raise ActionFailed(f"WebDownload: no file name in {source}; give a destination file path")
    return destination + name


def probe_script(target: str, algorithm: str | None) -> str:
    """Prints `missing`, `folder`, or `file [DIGEST]` for what is at `target` in the guest."""
    digest = ""
    if algorithm:
        tool = ALGORITHMS[algorithm][1]
        digest = f' $({tool} < {q(target)} | cut -d" " -f1)'
    return (
        f"if [ -d {q(target)} ]; then echo folder\n"
        f'elif [ -e {q(target)} ]; then echo "file{digest}"\n'
        "else echo missing\nfi\n"
    )


def fetch(url: str, *, insecure: bool, timeout: float | None) -> bytes:
    """GET `url`; anything but 200 is an error. Retries network errors and 5xx."""
    context = ssl._create_unverified_context() if insecure else ssl.create_default_context()
    request = urllib.request.Request(url, headers={"User-Agent": f"vmbuild/{__version__}"})
    error = ""
    for attempt in range(DOWNLOAD_TRIES):
        if attempt:
            sleep(2 ** (attempt - 1))
        try:
            with urllib.request.urlopen(
                request, timeout=timeout or 300, context=context
            ) as response:
                if response.status != 200:
                    raise ActionFailed(
                        f"WebDownload: {url} answered HTTP {response.status}, expected 200"
                    )
                data: bytes = response.read()
                return data
        except urllib.error.HTTPError as exc:
            error = f"HTTP {exc.code} {exc.reason}"
            if exc.code < 500:
                break  # a 404 or 403 will not heal by retrying
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            error = str(reason)
    raise ActionFailed(f"WebDownload: {url}: {error}")


# A checksum given without its algorithm: told apart by its length (hex digits).
_BY_LENGTH = {32: "MD5", 40: "SHA1", 64: "SHA256", 128: "SHA512"}


def checksum_algorithm(checksum: str | None, algorithm: str | None) -> str | None:
    """The algorithm to verify `checksum` with, or None for no verification.

    AWSTOE verifies when both are given. A checksum alone is still verified
    (a user who wrote one wants it checked): its length names the algorithm,
    SHA256 when the length is not one of the four; an algorithm alone means
    nothing to verify.
    """
    if not checksum or not checksum.strip():
        return None
    return algorithm or _BY_LENGTH.get(len(checksum.strip()), "SHA256")


def run_web_download(items: Sequence[Item], ctx: HostContext) -> dict[str, str]:
    destinations = []
    for item in items:
        source = item["source"]
        algorithm = checksum_algorithm(item["checksum"], item["algorithm"])
        target = target_path(source, item["destination"])
        expected = (item["checksum"] or "").strip().lower() if algorithm else ""
        state = ctx.run(probe_script(target, algorithm if expected else None)).stdout.split()
        if state[:1] == ["folder"]:
            raise ActionFailed(f"WebDownload: {target} is a folder (end the destination with /)")
        if state[:1] == ["file"]:
            if not item["overwrite"]:
                raise ActionFailed(f"WebDownload: {target} already exists and overwrite is false")
            if expected and state[1:] == [expected]:
                ctx.log(f"{target} already has the expected checksum; not downloading")
                destinations.append(target)
                continue
        ctx.log(f"downloading {source} -> {target}")
        data = fetch(source, insecure=item["ignoreCertificateErrors"], timeout=ctx.remaining())
        if expected and algorithm:
            actual = hashlib.new(ALGORITHMS[algorithm][0], data).hexdigest()
            if actual != expected:
                raise ActionFailed(
                    f"WebDownload: {algorithm} checksum mismatch for {source}: "
                    f"expected {expected}, got {actual}"
                )
        ctx.remote.put(data, target)
        destinations.append(target)
    return {"destination": "\n".join(destinations)}


def _check(item: Item) -> Problems:
    problems: Problems = []
    if urlparse(item["source"]).scheme not in ("http", "https"):
        problems.append(("source", "expected an http:// or https:// URL"))
    algorithm = checksum_algorithm(item["checksum"], item["algorithm"])
    checksum = (item["checksum"] or "").strip()
    if algorithm and not re.fullmatch(r"[0-9A-Fa-f]+", checksum):
        problems.append(("checksum", "expected a hexadecimal digest"))
    return problems


WEB_DOWNLOAD = ActionSpec(
    name="WebDownload",
    summary="Download files over HTTP(S), with checksum verification.",
    shape=Shape.LIST,
    fields=(
        Field("source", "string", "http(s) URL of the file.", required=True),
        Field("destination", "string", "Guest path; ending in / means a folder.", required=True),
        Field("overwrite", "bool", "Replace an existing file (default true).", default=True),
        Field("checksum", "string", "Expected digest of the file (hex)."),
        Field(
            "algorithm",
            "string",
            "MD5, SHA1, SHA256 or SHA512 (without it, told from the checksum's length).",
            choices=tuple(ALGORITHMS),
        ),
        Field(
            "ignoreCertificateErrors",
            "bool",
            "Skip TLS verification (default false).",
            default=False,
        ),
    ),
    outputs=("destination",),
    host=run_web_download,
    item_check=_check,
)
