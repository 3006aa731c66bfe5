"""The package list (SBOM) of the builder, read over SSH before generalizing.

The guest's package manager is the source of truth: dpkg-query on Debian
family guests, rpm elsewhere. A failing query fails the build instead of
storing an empty list that would look like "no packages".
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vmbuild.errors import VmbuildError
from vmbuild.manifest import Package
from vmbuild.remote.base import Remote
from vmbuild.stages.key import StageKey, stage_key

SBOM_SCRIPT = r"""
set -o pipefail
if command -v dpkg-query >/dev/null; then
  dpkg-query -W -f='${Package}\t${Version}\t${Architecture}\t${source:Package}\t${source:Version}\n'
elif command -v rpm >/dev/null; then
  rpm -qa --qf '%{NAME}\t%{VERSION}-%{RELEASE}\t%{ARCH}\n'
fi | sort
"""
# The index state the build's apt saw: the digest of each InRelease it read (an
# offline rebuild from a bundle must serve exactly these; vmbuild.supply.inputs).
APT_INDEXES_SCRIPT = r"""
cd /var/lib/apt/lists 2>/dev/null || exit 0
for f in *_InRelease; do [ -f "$f" ] && sha256sum -- "$f"; done
exit 0
"""
TIMEOUT = 60.0  # KVM seconds; the caller scales it for the accelerator


@dataclass(frozen=True)
class Sbom:
    packages: tuple[Package, ...]
    machine_id: str  # the builder's, so the offline check can prove it is gone
    # apt list file name (deb.debian.org_debian_dists_bookworm_InRelease) -> sha256
    apt_indexes: dict[str, str] = field(default_factory=dict)


def key(disk_key: StageKey) -> StageKey:
    """The package list is a function of the disk the builder ran on, nothing else."""
    return stage_key("sbom", disk=disk_key.digest)


def parse_sbom(text: str) -> list[dict[str, str]]:
    packages = []
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) in (3, 5) and fields[0]:
            pkg = {"name": fields[0], "version": fields[1], "arch": fields[2]}
            # The source package is what the Debian security tracker is keyed by.
            if len(fields) == 5 and fields[3]:
                pkg.update(source=fields[3], source_version=fields[4])
            packages.append(pkg)
    return packages


def collect(remote: Remote, timeout: float) -> Sbom:
    result = remote.run(SBOM_SCRIPT, timeout=timeout)
    if result.exit_code != 0:
        what = "timed out" if result.timed_out else f"exit {result.exit_code}"
        tail = (result.stderr or result.stdout)[-2000:].rstrip()
        raise VmbuildError(
            f"listing the guest's packages failed ({what})" + (f":\n{tail}" if tail else "")
        )
    packages = tuple(Package(**p) for p in parse_sbom(result.stdout))
    machine_id = remote.get("/etc/machine-id").decode().strip()
    lists = remote.run(APT_INDEXES_SCRIPT, timeout=timeout)
    return Sbom(packages, machine_id, parse_apt_indexes(lists.stdout))


def parse_apt_indexes(text: str) -> dict[str, str]:
    """`sha256sum` lines -> {file name: sha256} (other lines ignored)."""
    found = {}
    for line in text.splitlines():
        digest, _, name = line.partition("  ")
        if len(digest) == 64 and name.endswith("_InRelease") and "/" not in name:
            found[name] = digest
    return found
