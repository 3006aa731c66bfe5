"""Pure parts of the stages: generalize script, SBOM parsing, JUnit, partitions."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from vmbuild.diskfs.rootfs import read_partition_table
from vmbuild.stages.generalize import generalize_script
from vmbuild.stages.image_tests import parse_junit, pytest_argv, summarize
from vmbuild.stages.sbom import parse_sbom


def test_generalize_script_covers_every_step() -> None:
    script = generalize_script("vmbuild-builder")
    for needle in (
        "cloud-init clean --logs --seed",
        "truncate -s 0 /etc/machine-id",
        "rm -f /etc/ssh/ssh_host_*",
        "rm -rf /var/lib/apt/lists/*",
        "rm -f /etc/apt/apt.conf.d/00vmbuild-build",
        "userdel --force --remove vmbuild-builder",
        "fstrim -av",
        "fsfreeze -f",
        "echo 'vmbuild-generalize: filesystems frozen' > /dev/ttyS0",
        "systemctl poweroff",  # when a filesystem cannot be frozen
    ):
        assert needle in script
    # No fixed sleep: the unit waits for the host to close its session.
    assert "sleep 1\n" not in script
    assert "pgrep -u vmbuild-builder -x sshd" in script
    # The user is removed from a transient unit, not from its own SSH session.
    assert script.index("systemd-run") > script.index("FINISH")
    # cloud-init clean runs in the background; the logs it deletes are emptied
    # only after it is done (a file deleted under `truncate` would fail `set -e`).
    clean = script.index("cloud-init clean --logs --seed &")
    waited = script.index('wait "$clean"')
    assert clean < waited < script.index("find /var/log -type f -exec truncate")


def test_generalize_script_quotes_the_user() -> None:
    assert "userdel --force --remove 'a b'" in generalize_script("a b")


def test_parse_sbom() -> None:
    text = "bash\t5.2.15-2+b7\tamd64\nnginx\t1.22.1-9\tamd64\n\ngarbage\n"
    assert parse_sbom(text) == [
        {"name": "bash", "version": "5.2.15-2+b7", "arch": "amd64"},
        {"name": "nginx", "version": "1.22.1-9", "arch": "amd64"},
    ]


def test_junit_counts(tmp_path: Path) -> None:
    junit = tmp_path / "j.xml"
    junit.write_text(
        '<testsuites><testsuite tests="5" failures="1" errors="0" skipped="2"/></testsuites>'
    )
    assert parse_junit(junit) == (5, 1, 0, 2)
    assert summarize((5, 1, 0, 2), "j.xml", []).status == "failed"
    assert summarize((5, 0, 0, 2), "j.xml", []).status == "passed"
    assert summarize(None, None, [{"name": "c", "status": "Failed"}]).status == "failed"


def test_pytest_argv_pins_host_key_plugin() -> None:
    argv = pytest_argv(
        [Path("/r/t.py")], "paramiko://u@127.0.0.1:2222", Path("/k"), Path("/j"), "py"
    )
    assert argv[:5] == ["py", "-m", "pytest", "-p", "vmbuild.testing.pinned_hostkey"]
    assert "--hosts=paramiko://u@127.0.0.1:2222" in argv
    assert "--ssh-identity-file=/k" in argv and argv[-1] == "/r/t.py"


def test_pytest_argv_paths_are_absolute(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # pytest runs in the tests' directory; a relative store (`./images`, the
    # default) once left it looking for the key and known_hosts there.
    monkeypatch.chdir(tmp_path)
    argv = pytest_argv(
        [Path("t/t.py")], "paramiko://u@127.0.0.1:2222", Path("w/key"), Path("w/j.xml"), "py"
    )
    assert f"--ssh-identity-file={tmp_path}/w/key" in argv
    assert f"--junitxml={tmp_path}/w/j.xml" in argv
    assert argv[-1] == f"{tmp_path}/t/t.py"


def _mbr(entries: list[tuple[int, int, int, int]]) -> bytes:
    data = bytearray(512)
    for i, (boot, ptype, start, count) in enumerate(entries):
        off = 446 + 16 * i
        data[off] = boot
        data[off + 4] = ptype
        data[off + 8 : off + 16] = struct.pack("<II", start, count)
    data[510:512] = b"\x55\xaa"
    return bytes(data)


def test_mbr_partition_table(tmp_path: Path) -> None:
    img = tmp_path / "d.raw"
    img.write_bytes(_mbr([(0x80, 0x83, 2048, 4000), (0, 0x82, 6048, 100)]))
    table = read_partition_table(img)
    assert table is not None and table.kind == "mbr"
    root, swap = table.partitions
    assert (root.number, root.start, root.size, root.bootable, root.is_linux) == (
        1, 2048 * 512, 4000 * 512, True, True,
    )  # fmt: skip
    assert (swap.type, swap.is_linux) == ("0x82", False)


def test_no_partition_table(tmp_path: Path) -> None:
    img = tmp_path / "d.raw"
    img.write_bytes(bytes(1024))
    assert read_partition_table(img) is None


def test_the_final_disk_is_scrubbed_before_any_output_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The build flattens once (flatten_final) and converts every other format
    # from that disk: the free-space scrub must sit between the raw flatten and
    # the qcow2 written from it, or deleted keys reach every output.
    from vmbuild.stages import convert

    calls: list[str] = []
    monkeypatch.setattr(
        convert, "flatten_raw", lambda src, dst, _r: calls.append(f"raw {dst.name}")
    )
    monkeypatch.setattr(convert, "zero_free_space", lambda raw: calls.append(f"zero {raw.name}"))
    monkeypatch.setattr(convert, "from_raw", lambda raw, dst, _r: calls.append(f"qcow2 {dst.name}"))
    overlay = tmp_path / "overlay.qcow2"
    overlay.write_bytes(b"")
    done = convert.flatten_final(overlay, ["raw"], tmp_path / "out", tmp_path)
    assert calls == ["raw scrubbed.raw", "zero scrubbed.raw", "qcow2 final.qcow2"]
    assert done.final == tmp_path / "final.qcow2"
    assert done.outputs == ()
    assert not overlay.exists()


def test_the_test_summary_names_the_components_junit_file() -> None:
    from vmbuild.stages.image_tests import TestSummary

    summary = summarize(
        (3, 0, 0, 0), "logs/junit.xml", [{"name": "nginx-app", "status": "Success"}],
        "logs/components-junit.xml",
    )  # fmt: skip
    data = summary.to_json()
    assert data["components_junit"] == "logs/components-junit.xml"
    assert TestSummary.from_json(data) == summary  # a checkpoint's cached result keeps it
    assert TestSummary.from_json({"status": "passed"}).components_junit is None  # older manifests


def test_the_test_stage_key_covers_the_boot_mode() -> None:
    """A result from a NoCloud boot never answers for an ec2 boot (nor one ec2 setting
    for another): the same image can pass one and fail the other."""
    from vmbuild.hypervisor.imds import Ec2Settings
    from vmbuild.stages.image_tests import TestInputs
    from vmbuild.stages.key import stage_key

    image = stage_key("convert", disk="d")

    def key(ec2: Ec2Settings | None) -> str:
        return TestInputs(documents=(), testinfra=(), env={}, ec2=ec2).key(image).digest

    keys = {key(None), key(Ec2Settings()), key(Ec2Settings(http_tokens="optional"))}
    assert len(keys) == 3
    assert key(Ec2Settings()) == key(Ec2Settings())
