"""apt sources: read the host's configuration and find its Debian mirrors.

Shared by the offline Debian base build (which mirror to bootstrap from) and the
pipeline's dependency checks (which package indexes to compare an SBOM with).
"""

from __future__ import annotations

import logging
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vmbuild.errors import VmbuildError

log = logging.getLogger("vmbuild.debian.sources")


@dataclass(frozen=True)
class AptSource:
    """One `deb` entry (one URI) of an apt sources file."""

    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]


@dataclass(frozen=True)
class DebianMirrors:
    """Where the main and -updates suites, and the -security suite, come from."""

    mirror: str
    security: str | None


# --- apt sources ---------------------------------------------------------------


def parse_sources_list(text: str) -> list[AptSource]:
    """Parse one-line-style sources: `deb [options] URI SUITE COMPONENT...`."""
    entries = []
    for raw in text.splitlines():
        words = re.sub(r"\[[^\]]*\]", " ", raw.split("#", 1)[0]).split()
        if len(words) >= 3 and words[0] == "deb":
            entries.append(AptSource(words[1], (words[2],), tuple(words[3:])))
    return entries


def parse_deb822_sources(text: str) -> list[AptSource]:
    """Parse deb822-style `.sources` stanzas (Types, URIs, Suites, Components, Enabled)."""
    entries: list[AptSource] = []
    for stanza in re.split(r"\n[ \t]*\n", text):
        fields: dict[str, str] = {}
        key = ""
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0] in " \t" and key:  # continuation line
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, value = line.split(":", 1)
                key = key.strip().lower()
                fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() in ("no", "false", "0"):
            continue
        suites = tuple(fields.get("suites", "").split())
        components = tuple(fields.get("components", "").split())
        entries += [AptSource(uri, suites, components) for uri in fields.get("uris", "").split()]
    return entries


def _debian_score(uri: str, archive: str) -> int:
    """How much `uri` looks like a Debian archive named `archive` (0: not at all)."""
    parsed = urllib.parse.urlparse(uri)
    path = parsed.path.rstrip("/")
    # deb.debian.org/debian, MIRROR/debian, snapshot.debian.org/archive/debian/DATE
    score = 2 if path.endswith("/" + archive) or f"/{archive}/" in path else 0
    return score + (1 if (parsed.hostname or "").endswith("debian.org") else 0)


def pick_debian_mirrors(sources: Sequence[AptSource], codename: str) -> DebianMirrors | None:
    """Choose the Debian archive serving `codename` and its security archive.

    Third-party repositories are skipped (docker's `…/linux/debian bookworm
    stable`, nodesource, cloud-sdk): an entry must carry `main` and look like a
    Debian archive by path or host. Ties go to the first entry, as in apt.
    """

    def best(suite: str, archive: str) -> str | None:
        scored = [
            (score, -i, s.uri.rstrip("/"))
            for i, s in enumerate(sources)
            if suite in s.suites and "main" in s.components
            if (score := _debian_score(s.uri, archive)) > 0
        ]
        return max(scored)[2] if scored else None

    if (mirror := best(codename, "debian")) is None:
        return None
    return DebianMirrors(mirror, best(f"{codename}-security", "debian-security"))


def host_debian_mirrors(
    codename: str = "bookworm", etc_apt: Path = Path("/etc/apt")
) -> DebianMirrors:
    """The Debian mirrors in the host's apt sources (one-line and deb822 files)."""
    parts = etc_apt / "sources.list.d"
    sources: list[AptSource] = []
    for path in [etc_apt / "sources.list", *sorted(parts.glob("*.list"))]:
        if path.is_file():
            sources += parse_sources_list(path.read_text(errors="replace"))
    for path in sorted(parts.glob("*.sources")):
        sources += parse_deb822_sources(path.read_text(errors="replace"))
    found = pick_debian_mirrors(sources, codename)
    if found is None:
        raise VmbuildError(
            f"no Debian mirror serving {codename} in {etc_apt}/sources.list or {parts}/",
            hint="pass one explicitly: --mirror http://HOST/debian",
        )
    return found


def host_mirror() -> str:
    """The Debian mirror the host's apt uses for bookworm (vmbuild hard-codes none)."""
    return host_debian_mirrors().mirror


def mirrors_for(mirror: str | None, codename: str) -> DebianMirrors:
    """An explicit mirror, else the host's.

    An explicit `…/debian` mirror gets the conventional `…/debian-security` next
    to it; other layouts build without the security suite (with a warning).
    """
    if mirror is None:
        return host_debian_mirrors(codename)
    mirror = mirror.rstrip("/")
    if not mirror.endswith("/debian"):
        log.warning("no %s-security archive known for %s: building without it", codename, mirror)
        return DebianMirrors(mirror, None)
    return DebianMirrors(mirror, mirror + "-security")


def apt_source_lines(mirrors: DebianMirrors, codename: str) -> list[str]:
    lines = [f"deb {mirrors.mirror} {suite} main" for suite in (codename, f"{codename}-updates")]
    if mirrors.security:
        lines.append(f"deb {mirrors.security} {codename}-security main")
    return lines
