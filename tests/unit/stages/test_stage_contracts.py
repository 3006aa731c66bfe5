"""Stage contracts without a VM: keys, the SBOM's exit-code check, the progress adapter."""

from __future__ import annotations

import pytest

from tests.support.reporting import RecordingReporter
from tests.support.toe import ScriptedRemote
from vmbuild.errors import VmbuildError
from vmbuild.manifest import Package
from vmbuild.publish.events import DistributionEvent, to_reporter
from vmbuild.stages import convert, sbom
from vmbuild.stages.key import stage_key


def test_stage_keys_depend_on_every_input_and_nothing_else() -> None:
    a = stage_key("base", sha256="x", disk_size=1)
    assert a == stage_key("base", disk_size=1, sha256="x")  # order does not matter
    assert a != stage_key("base", sha256="x", disk_size=2)
    assert a != stage_key("convert", sha256="x", disk_size=1)
    assert convert.key(a, ["qcow2"]) != convert.key(a, ["qcow2", "vmdk"])
    assert str(a) == f"base:{a.digest[:16]}" and len(a.digest) == 64


def test_sbom_collects_packages_the_machine_id_and_the_apt_indexes_in_one_command() -> None:
    out = (
        "bash\t5.2\tamd64\nnginx\t1.22\tamd64\n"
        f"{sbom.MACHINE_ID_MARK}\nabc123\n{sbom.APT_INDEXES_MARK}\n"
        f"{'a' * 64}  deb.debian.org_debian_dists_bookworm_InRelease\n"
        f"{'b' * 64}  deb.debian.org_debian-security_dists_bookworm-security_InRelease\n"
    )
    remote = ScriptedRemote(lambda s: (0, out, "sha256sum: x_InRelease: Permission denied\n"))
    result = sbom.collect(remote, timeout=60)
    assert result == sbom.Sbom(
        (Package("bash", "5.2", "amd64"), Package("nginx", "1.22", "amd64")), "abc123",
        {"deb.debian.org_debian_dists_bookworm_InRelease": "a" * 64,
         "deb.debian.org_debian-security_dists_bookworm-security_InRelease": "b" * 64},
    )  # fmt: skip
    assert remote.calls == [(sbom.SBOM_SCRIPT, 60)]


def test_sbom_failure_is_an_error_not_an_empty_list() -> None:
    remote = ScriptedRemote(lambda s: (2, "", "dpkg-query: error: database locked\n"))
    with pytest.raises(VmbuildError) as err:
        sbom.collect(remote, timeout=60)
    assert str(err.value) == (
        "listing the guest's packages failed (exit 2):\ndpkg-query: error: database locked"
    )


def test_a_failure_without_stderr_shows_the_failed_part_s_output() -> None:
    remote = ScriptedRemote(lambda s: (3, "rpmdb: partial listing\n", ""))
    with pytest.raises(VmbuildError) as err:
        sbom.collect(remote, timeout=60)
    assert str(err.value) == "listing the guest's packages failed (exit 3):\nrpmdb: partial listing"


def test_a_missing_machine_id_is_an_error_naming_it() -> None:
    out = f"bash\t5.2\tamd64\n{sbom.MACHINE_ID_MARK}\n"
    remote = ScriptedRemote(lambda s: (1, out, "cat: /etc/machine-id: No such file or directory\n"))
    with pytest.raises(VmbuildError) as err:
        sbom.collect(remote, timeout=60)
    assert str(err.value) == (
        "reading the guest's /etc/machine-id failed (exit 1):\n"
        "cat: /etc/machine-id: No such file or directory"
    )


def test_distribution_events_reach_a_reporter() -> None:
    rec = RecordingReporter()
    forward = to_reporter(rec)
    forward(DistributionEvent("upload", "us-east-1", 512, 1024, "1 MiB sent"))
    forward(DistributionEvent("import", "us-east-1", 50, 100, "task"))
    assert rec.statuses == ["upload us-east-1 50% 1 MiB sent", "import us-east-1 50% task"]
    assert rec.transfers == [(512, 1024)]  # percentages are not bytes
