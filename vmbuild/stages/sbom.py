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

MACHINE_ID_MARK = "--- vmbuild: /etc/machine-id ---"
APT_INDEXES_MARK = "--- vmbuild: apt indexes ---"
# One command for the three things read (each remote command costs ~0.4 s
# under TCG): the package list, the builder's machine-id, and the index state
# the build's apt saw: the digest of each InRelease it read (an offline rebuild
# from a bundle must serve exactly these; vmbuild.supply.inputs).
_DPKG_FORMAT = r"${Package}\t${Version}\t${Architecture}\t${source:Package}\t${source:Version}\n"
SBOM_SCRIPT = rf"""
set -o pipefail
{{ if command -v dpkg-query >/dev/null; then
  dpkg-query -W -f='{_DPKG_FORMAT}'
elif command -v rpm >/dev/null; then
  rpm -qa --qf '%{{NAME}}\t%{{VERSION}}-%{{RELEASE}}\t%{{ARCH}}\n'
fi | sort; }} || exit $?
echo '{MACHINE_ID_MARK}'
cat /etc/machine-id || exit $?
echo '{APT_INDEXES_MARK}'
if cd /var/lib/apt/lists 2>/dev/null; then
  for f in *_InRelease; do if [ -f "$f" ]; then sha256sum -- "$f"; fi; done
fi
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
    packages, found, rest = result.stdout.partition(f"{MACHINE_ID_MARK}\n")
    machine_id, _, lists = rest.partition(f"{APT_INDEXES_MARK}\n")
    if result.exit_code != 0:
        what = "timed out" if result.timed_out else f"exit {result.exit_code}"
        # Without stderr, the output of the part that failed, as before the
        # three reads were one command.
        tail = (result.stderr or (machine_id if found else packages))[-2000:].rstrip()
        doing = "reading the guest's /etc/machine-id" if found else "listing the guest's packages"
        raise VmbuildError(f"{doing} failed ({what})" + (f":\n{tail}" if tail else ""))
    return Sbom(
        tuple(Package(**p) for p in parse_sbom(packages)),
        machine_id.strip(),
        parse_apt_indexes(lists),
    )


def parse_apt_indexes(text: str) -> dict[str, str]:
    """`sha256sum` lines -> {file name: sha256} (other lines ignored)."""
    found = {}
    for line in text.splitlines():
        digest, _, name = line.partition("  ")
        if len(digest) == 64 and name.endswith("_InRelease") and "/" not in name:
            found[name] = digest
    return found
