"""Supply-chain verbs through the real CLI on real (small) disks: key, verify, scan,
images diff, and bundles (a 4 GiB image bundled and imported with bounded memory)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.disks import make_artifact, make_disk
from tests.support.supply import flip_byte

REPO = Path(__file__).resolve().parents[2]
GIB = 1 << 30


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    e = dict(os.environ)
    e["VMBUILD_STORE"] = str(tmp_path / "images")
    e["VMBUILD_CACHE_DIR"] = str(tmp_path / "cache")
    e["VMBUILD_CONFIG_DIR"] = str(tmp_path / "config")
    e.pop("VMBUILD_KMS_KEY", None)
    # make_artifact signs in this process with the same key the CLI uses.
    monkeypatch.setenv("VMBUILD_CONFIG_DIR", e["VMBUILD_CONFIG_DIR"])
    return e


def vmbuild(
    env: dict[str, str], *args: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmbuild", *args], env=env, capture_output=True, text=True,
        timeout=timeout, cwd=REPO,
    )  # fmt: skip


def one_error(proc: subprocess.CompletedProcess[str], text: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error: "), proc.stderr
    assert text in proc.stderr.splitlines()[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture
def keyed(env: dict[str, str]) -> dict[str, str]:
    proc = vmbuild(env, "key", "generate", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert stat.S_IMODE(Path(info["private"]).stat().st_mode) == 0o600
    assert len(info["keyid"]) == 64
    return env


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_disk(tmp_path_factory.mktemp("disk"))


def test_verify_cli_catches_a_one_byte_change(keyed: dict[str, str], disk: Path) -> None:
    build_dir = make_artifact(Path(keyed["VMBUILD_STORE"]), disk, formats=("qcow2", "raw"))
    ok = vmbuild(keyed, "verify", "example-nginx", "--json")
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["signed"] is True
    assert set(report["subjects"]) == {
        "disk.qcow2", "disk.raw", "sbom.spdx.json", "sbom.cdx.json", "manifest.json"
    }  # fmt: skip
    flip_byte(build_dir / "disk.raw", 2 * (1 << 20))
    one_error(vmbuild(keyed, "verify", "example-nginx"),
              f"{build_dir / 'disk.raw'}: differs from the signed provenance")  # fmt: skip


def test_key_generate_twice_is_one_clear_error(keyed: dict[str, str]) -> None:
    one_error(vmbuild(keyed, "key", "generate"), "signing.key: a signing key already exists")


TRACKER = {
    "nginx": {
        "CVE-2025-0001": {"description": "request smuggling",
                          "releases": {"bookworm": {"status": "resolved",
                                                    "fixed_version": "1.22.1-9+deb12u1",
                                                    "urgency": "high"}}},
        "CVE-2022-9999": {"releases": {"bookworm": {"status": "resolved",
                                                    "fixed_version": "1.22.1-1", "urgency": "high"}}},
    },
    "openssl": {"CVE-2025-0002": {"releases": {"bookworm": {"status": "open", "urgency": "low"}}}},
}  # fmt: skip


def test_scan_flags_what_the_tracker_marks_vulnerable(
    keyed: dict[str, str], disk: Path, tmp_path: Path
) -> None:
    build_dir = make_artifact(Path(keyed["VMBUILD_STORE"]), disk)  # nginx 1.22.1-9
    data = tmp_path / "tracker.json"
    data.write_text(json.dumps(TRACKER))
    proc = vmbuild(keyed, "scan", "example-nginx", "--data", str(data), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert [(f["package"], f["cve"], f["severity"], f["fixed_version"]) for f in result["findings"]] == [
        ("nginx", "CVE-2025-0001", "high", "1.22.1-9+deb12u1")
    ]  # fmt: skip
    assert json.loads((build_dir / "manifest.json").read_text())["scan"] == result
    failing = vmbuild(keyed, "scan", "example-nginx", "--data", str(data), "--fail-on", "high")
    one_error(failing, "CVE scan: 1 finding(s) at or above high, e.g. CVE-2025-0001 in nginx")
    assert (
        "high        CVE-2025-0001    nginx 1.22.1-9 (fixed, fixed in 1.22.1-9+deb12u1)"
        in failing.stdout
    )
    # The scan result is not part of the signed identity: the artifact still verifies.
    assert vmbuild(keyed, "verify", "example-nginx").returncode == 0
    bad = tmp_path / "bad.json"
    bad.write_text("<html>rate limited</html>")
    one_error(vmbuild(keyed, "scan", "example-nginx", "--data", str(bad)), f"{bad}: not JSON")


def test_images_diff_packages_files_and_layout(
    keyed: dict[str, str], disk: Path, tmp_path: Path
) -> None:
    store = Path(keyed["VMBUILD_STORE"])

    def edit(root: Path) -> None:
        (root / "etc" / "motd").write_text("welcome\n")
        (root / "etc" / "fstab").write_text((root / "etc" / "fstab").read_text() + "# more\n")
        (root / "usr" / "sbin" / "sshd").unlink()
        (root / "etc" / "cloud" / "cloud.cfg").chmod(0o600)

    other = make_disk(tmp_path / "other", edit=edit, size_mib=80)
    make_artifact(store, disk, version="1.0.0", packages=[
        {"name": "nginx", "version": "1.22.1-9", "arch": "amd64"},
        {"name": "openssl", "version": "3.0.11-1~deb12u2", "arch": "amd64"},
        {"name": "vim-tiny", "version": "2:9.0.1378-2", "arch": "amd64"},
    ])  # fmt: skip
    make_artifact(store, other, version="1.1.0", packages=[
        {"name": "nginx", "version": "1.22.1-9+deb12u1", "arch": "amd64"},
        {"name": "openssl", "version": "3.0.11-1~deb12u1", "arch": "amd64"},
        {"name": "curl", "version": "7.88.1-10", "arch": "amd64"},
    ])  # fmt: skip
    proc = vmbuild(keyed, "images", "diff", "example-nginx/1.0.0", "example-nginx/1.1.0", "--json")
    assert proc.returncode == 1, proc.stderr
    d = json.loads(proc.stdout)
    assert d["differ"] is True
    assert d["packages"] == {
        "added": [{"name": "curl", "arch": "amd64", "version": "7.88.1-10"}],
        "removed": [{"name": "vim-tiny", "arch": "amd64", "version": "2:9.0.1378-2"}],
        "upgraded": [{"name": "nginx", "arch": "amd64", "from": "1.22.1-9", "to": "1.22.1-9+deb12u1"}],
        "downgraded": [{"name": "openssl", "arch": "amd64", "from": "3.0.11-1~deb12u2",
                        "to": "3.0.11-1~deb12u1"}],
    }  # fmt: skip
    assert d["files"]["added"] == ["/etc/motd"]
    assert d["files"]["removed"] == ["/usr/sbin/sshd"]
    changed = {c["path"]: c for c in d["files"]["changed"]}
    assert set(changed) == {"/etc/fstab", "/etc/cloud/cloud.cfg"}
    assert changed["/etc/cloud/cloud.cfg"]["mode"] == ["644", "600"]
    assert changed["/etc/fstab"]["size"][1] == changed["/etc/fstab"]["size"][0] + len("# more\n")
    layout = d["partitions"]
    assert layout["changed"] is True
    assert (layout["a"]["disk_size"], layout["b"]["disk_size"]) == (64 << 20, 80 << 20)
    assert layout["a"]["partitions"][0]["size"] == 55 << 20
    assert layout["b"]["partitions"][0]["size"] == 71 << 20

    human = vmbuild(keyed, "images", "diff", "example-nginx/1.0.0", "example-nginx/1.1.0")
    assert human.returncode == 1
    assert "~ package nginx:amd64 1.22.1-9 -> 1.22.1-9+deb12u1" in human.stdout
    assert "- file /usr/sbin/sshd" in human.stdout

    same = vmbuild(keyed, "images", "diff", "example-nginx/1.0.0", "example-nginx/1.0.0")
    assert same.returncode == 0, same.stderr
    assert same.stdout.splitlines()[-1] == "identical"


# The child's peak RSS as its parent sees it (getrusage of children). Measured from a small
# intermediate process: Linux counts the memory a child had at fork time (before exec) in its
# peak, so forking vmbuild straight from a large pytest process would report pytest's size.
MEASURE = """
import resource, subprocess, sys
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def run_measured(env: dict[str, str], *args: str) -> tuple[int, int, str]:
    """Exit code, peak RSS in bytes and stderr of `vmbuild ARGS`."""
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, sys.executable, "-m", "vmbuild", *args], env=env,
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    rc, rss = (int(x) for x in proc.stdout.split())
    return rc, rss, proc.stderr


def test_a_4_gib_image_bundles_and_imports_in_bounded_memory(
    keyed: dict[str, str], tmp_path: Path
) -> None:
    raw = make_disk(tmp_path / "big", size_mib=4096, data_mib=64)
    build_dir = make_artifact(Path(keyed["VMBUILD_STORE"]), raw, formats=("raw",))
    assert (build_dir / "disk.raw").stat().st_size == 4 * GIB
    bundle = tmp_path / "big.tar"
    rc, rss, err = run_measured(keyed, "bundle", "export", "example-nginx", "-o", str(bundle))
    assert rc == 0, err
    assert rss < 200 << 20, f"export peaked at {rss >> 20} MiB"
    assert bundle.stat().st_size > 4 * GIB
    other = dict(keyed, VMBUILD_STORE=str(tmp_path / "second"))
    rc, rss, err = run_measured(other, "bundle", "import", str(bundle))
    assert rc == 0, err
    assert rss < 200 << 20, f"import peaked at {rss >> 20} MiB"
    imported = tmp_path / "second" / "example-nginx" / "1.0.0" / build_dir.name / "disk.raw"
    assert imported.stat().st_size == 4 * GIB
    assert imported.stat().st_blocks * 512 < GIB  # zeros came back as holes
    bundle.unlink()
