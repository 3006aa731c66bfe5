"""Supply-chain verbs through the real CLI on real (small) disks: key, verify, scan,
images diff, and bundles (a 4 GiB image bundled and imported with bounded memory)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.disks import make_artifact, make_disk, sha256
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


def test_the_exported_public_key_verifies_on_another_host(
    keyed: dict[str, str], disk: Path, tmp_path: Path
) -> None:
    make_artifact(Path(keyed["VMBUILD_STORE"]), disk)
    pem = tmp_path / "builder.pem"
    assert vmbuild(keyed, "key", "export", "-o", str(pem)).returncode == 0
    shown = vmbuild(keyed, "key", "export")
    assert shown.stdout == pem.read_text()
    assert shown.stdout.startswith("-----BEGIN PUBLIC KEY-----\n")
    # The other host has its own (empty) config dir: no key of its own.
    other = {**keyed, "VMBUILD_CONFIG_DIR": str(tmp_path / "other-config")}
    one_error(vmbuild(other, "verify", "example-nginx"), "no key to verify the signature with")
    one_error(vmbuild(other, "key", "export"), f"no signing key in {tmp_path / 'other-config'}")
    ok = vmbuild(other, "verify", "example-nginx", "--key", str(pem), "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["signed"] is True
    # A different key does not verify it.
    assert vmbuild(other, "key", "generate").returncode == 0
    wrong = tmp_path / "wrong.pem"
    assert vmbuild(other, "key", "export", "-o", str(wrong)).returncode == 0
    one_error(vmbuild(other, "verify", "example-nginx", "--key", str(wrong)),
              "does not verify with the trusted key")  # fmt: skip


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


def test_images_diff_packages_files_contents_and_layout(
    keyed: dict[str, str], disk: Path, tmp_path: Path
) -> None:
    store = Path(keyed["VMBUILD_STORE"])
    payload = "/var/lib/payload.bin"  # 3 MiB of random bytes in the first disk

    def edit(root: Path) -> None:
        # Start from the first disk's tree (guest_tree writes random bytes), then change it.
        shutil.rmtree(root)
        shutil.copytree(disk.parent / "tree", root, symlinks=True)
        (root / "etc" / "motd").write_text("welcome\n")
        (root / "etc" / "fstab").write_text((root / "etc" / "fstab").read_text() + "# more\n")
        (root / "usr" / "sbin" / "sshd").unlink()
        (root / "etc" / "cloud" / "cloud.cfg").chmod(0o600)
        # Same size, owner and mode: only the bytes or the link target tell.
        cfg = root / "etc" / "cloud" / "cloud.cfg.d" / "90-vmbuild.cfg"
        cfg.write_text(cfg.read_text().replace("Ec2", "Gce"))
        (root / "usr" / "sbin" / "init").unlink()
        (root / "usr" / "sbin" / "init").symlink_to("../lib/systemd/systemX")
        flip_byte(root / payload.lstrip("/"), 1 << 20)

    a_tree = disk.parent / "tree"
    other = make_disk(tmp_path / "other", edit=edit, size_mib=80)
    b_tree = other.parent / "tree"
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

    def digest(tree: Path, path: str) -> str:
        return sha256(tree / path.lstrip("/"))

    proc = vmbuild(keyed, "images", "diff", "example-nginx/1.0.0", "example-nginx/1.1.0", "--json")
    assert proc.returncode == 1, proc.stderr
    d = json.loads(proc.stdout)
    assert (d["differ"], d["complete"]) == (True, True)
    assert d["packages"] == {
        "added": [{"name": "curl", "arch": "amd64", "version": "7.88.1-10"}],
        "removed": [{"name": "vim-tiny", "arch": "amd64", "version": "2:9.0.1378-2"}],
        "upgraded": [{"name": "nginx", "arch": "amd64", "from": "1.22.1-9", "to": "1.22.1-9+deb12u1"}],
        "downgraded": [{"name": "openssl", "arch": "amd64", "from": "3.0.11-1~deb12u2",
                        "to": "3.0.11-1~deb12u1"}],
    }  # fmt: skip
    files = d["files"]
    assert files["added"] == [{"path": "/etc/motd", "kind": "file", "mode": "644", "uid": os.getuid(),
                               "gid": os.getgid(), "size": 8, "sha256": digest(b_tree, "/etc/motd")}]  # fmt: skip
    sshd = a_tree / "usr" / "sbin" / "sshd"
    assert files["removed"] == [{"path": "/usr/sbin/sshd", "kind": "file", "mode": "755",
                                 "uid": os.getuid(), "gid": os.getgid(), "size": sshd.stat().st_size,
                                 "sha256": sha256(sshd)}]  # fmt: skip
    fstab, cfg = "/etc/fstab", "/etc/cloud/cloud.cfg.d/90-vmbuild.cfg"
    fstab_size = (a_tree / "etc" / "fstab").stat().st_size
    assert files["changed"] == [
        {"path": "/etc/cloud/cloud.cfg", "kind": "file", "mode": ["644", "600"]},
        {"path": cfg, "kind": "file", "sha256": [digest(a_tree, cfg), digest(b_tree, cfg)]},
        {"path": fstab, "kind": "file", "size": [fstab_size, fstab_size + len("# more\n")],
         "sha256": [digest(a_tree, fstab), digest(b_tree, fstab)]},
        {"path": "/usr/sbin/init", "kind": "symlink",
         "target": ["../lib/systemd/systemd", "../lib/systemd/systemX"]},
        {"path": payload, "kind": "file",
         "sha256": [digest(a_tree, payload), digest(b_tree, payload)]},
    ]  # fmt: skip
    assert files["unchecked"] == {"files": 0, "bytes": 0, "paths": []}
    layout = d["partitions"]
    assert layout["changed"] is True
    assert (layout["a"]["disk_size"], layout["b"]["disk_size"]) == (64 << 20, 80 << 20)
    assert layout["a"]["partitions"][0]["size"] == 55 << 20
    assert layout["b"]["partitions"][0]["size"] == 71 << 20

    # A content budget smaller than the payload: every small file is still compared, the
    # payload is reported as not compared (never as identical).
    limited = vmbuild(keyed, "images", "diff", "example-nginx/1.0.0", "example-nginx/1.1.0",
                      "--content-limit", "1M")  # fmt: skip
    assert limited.returncode == 1, limited.stderr
    lines = limited.stdout.splitlines()
    assert "~ package nginx:amd64 1.22.1-9 -> 1.22.1-9+deb12u1" in lines
    assert (
        f"- file /usr/sbin/sshd (file, mode 755, {os.getuid()}:{os.getgid()}, {sshd.stat().st_size} bytes, sha256 "
        f"{sha256(sshd)[:12]})" in lines
    )
    assert (
        f"~ file {cfg} (sha256 {digest(a_tree, cfg)[:12]} -> {digest(b_tree, cfg)[:12]})" in lines
    )
    assert (
        "~ file /usr/sbin/init (target ../lib/systemd/systemd -> ../lib/systemd/systemX)" in lines
    )
    assert not any(payload in line for line in lines)
    assert lines[-1] == (f"? 1 file(s), {3 << 20} bytes, with equal metadata were not compared "
                         "byte for byte (--content-limit; --json lists them)")  # fmt: skip

    same = vmbuild(keyed, "images", "diff", "example-nginx/1.0.0", "example-nginx/1.0.0")
    assert same.returncode == 0, same.stderr
    assert same.stdout.splitlines()[-1] == "identical"
    metadata_only = vmbuild(keyed, "images", "diff", "example-nginx/1.0.0", "example-nginx/1.0.0",
                            "--no-content", "--json")  # fmt: skip
    assert metadata_only.returncode == 0, metadata_only.stderr
    report = json.loads(metadata_only.stdout)
    assert (report["differ"], report["complete"]) == (False, False)
    assert payload in report["files"]["unchecked"]["paths"]


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
