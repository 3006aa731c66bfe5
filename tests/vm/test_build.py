"""End-to-end builds through the real CLI: real QEMU (TCG here), cloud-init, sshd,
components, generalization, conversion, a test VM and testinfra."""

from __future__ import annotations

import base64
import hashlib
import json
import shlex
import signal
import stat
import subprocess
import time
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
from spdx_tools.spdx.parser.parse_anything import parse_file
from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

from tests.support.schemas import event_lines
from tests.vm.conftest import REPO, VMBUILD, qemu_pids, vmbuild
from vmbuild import paths
from vmbuild.build import STEPS
from vmbuild.stages import base_image

pytestmark = pytest.mark.vm


def staging_leftovers(store: Path) -> list[Path]:
    return [p for p in store.rglob("*") if p.name.startswith((".staging-", "work-"))]


def test_example_recipe_builds_tests_and_stores(
    debian_base: base_image.BaseImage, cli_env: dict[str, str], no_leftover_qemu: None
) -> None:
    store = Path(cli_env["VMBUILD_STORE"])
    proc = vmbuild("build", "examples/nginx/recipe.yaml", "--json", env=cli_env)
    assert proc.returncode == 0, proc.stderr[-6000:]
    # One schema-valid event per line, streamed; the last is the result.
    events = event_lines(proc.stdout)
    result = events[-1]
    assert result["type"] == "result"
    stages = [e["stage"] for e in events if e["type"] == "stage-end"]
    assert stages == [step.name for step in STEPS]  # every stage, in order, tests included
    assert all(e["status"] == "ok" for e in events if e["type"] == "stage-end")
    assert any(e["type"] == "output" and e["stage"] == "components" for e in events)
    build_dir = Path(result["path"])
    m = result["manifest"]

    assert build_dir.parent.parent == store / "example-nginx"
    assert (m["name"], m["version"]) == ("example-nginx", "1.0.0")
    assert m["accelerator"]["kind"] in ("kvm", "tcg") and m["accelerator"]["reason"]
    assert m["base"]["sha256"] == debian_base.sha256
    assert [c["name"] for c in m["components"]] == ["update-linux", "nginx-app"]
    assert all(len(c["sha256"]) == 64 for c in m["components"])
    assert {p["name"] for p in m["packages"]} >= {"nginx", "openssh-server", "cloud-init"}
    for stage in ("builder", "components", "generalize", "convert", "test"):
        assert m["timings"][stage] > 0
    # The manifest is written inside the store stage, so it holds every stage before it.
    assert {"base", "sbom", "verify", "total"} <= set(m["timings"])

    # Tests passed, in the test VM, with JUnit kept.
    assert m["tests"]["status"] == "passed"
    ti = m["tests"]["testinfra"]
    assert ti["tests"] >= 6 and ti["failures"] == ti["errors"] == 0
    assert (build_dir / ti["junit"]).is_file()
    # The component test phases as JUnit, named by the manifest: one passing
    # testcase per component that ran its test phase, in order.
    tested = [c["name"] for c in m["tests"]["components"]]
    assert tested == ["update-linux", "nginx-app"]
    assert m["tests"]["components_junit"] == "logs/components-junit.xml"
    suites = ElementTree.parse(build_dir / m["tests"]["components_junit"]).getroot()
    (suite,) = suites.findall("testsuite")
    assert (suite.get("tests"), suite.get("failures")) == (str(len(tested)), "0")
    cases = suite.findall("testcase")
    assert [(c.get("classname"), c.get("name")) for c in cases] == [
        ("vmbuild.components", name) for name in tested
    ]
    assert all(not list(c) for c in cases)  # no <failure>, <error> or <skipped>

    # Every output exists, in its format, with the recorded checksum.
    formats = {"qcow2": "qcow2", "raw": "raw", "vmdk": "vmdk", "vhd": "vpc"}
    assert [o["format"] for o in m["outputs"]] == ["qcow2", "raw", "vmdk", "vhd"]
    for out in m["outputs"]:
        disk = build_dir / out["file"]
        info = json.loads(
            subprocess.run(
                ["qemu-img", "info", "--output=json", str(disk)], capture_output=True, check=True
            ).stdout
        )
        assert info["format"] == formats[out["format"]]
        assert info["virtual-size"] == 4 << 30 == out["virtual_size"]
        assert hashlib.sha256(disk.read_bytes()).hexdigest() == out["sha256"]
    vmdk = build_dir / "disk.vmdk"
    assert b"streamOptimized" in vmdk.read_bytes()[:2048]
    cmp = subprocess.run(
        ["qemu-img", "compare", str(build_dir / "disk.qcow2"), str(build_dir / "disk.raw")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert cmp.returncode == 0, cmp.stdout

    logs = build_dir / "logs"
    assert (logs / "build.log").stat().st_size > 0
    assert "cloud-init" in (logs / "builder-console.log").read_text(errors="replace")
    assert (logs / "test-console.log").exists()
    assert list((logs / "components").glob("*.json"))
    assert not list(build_dir.glob("*.iso")) and not list(build_dir.glob("*id_ed25519*"))
    assert staging_leftovers(store) == []
    assert_signed_provenance_and_sboms(build_dir, m, cli_env)

    assert_images_run_boots_it_untouched(build_dir, cli_env)

    # The store CLI sees it.
    listed = json.loads(vmbuild("images", "list", "--json", env=cli_env).stdout)
    assert [r["ref"] for r in listed] == [f"example-nginx/1.0.0/{m['build']}"]
    shown = json.loads(vmbuild("images", "show", "example-nginx", "--json", env=cli_env).stdout)
    assert shown["build"] == m["build"]
    assert vmbuild("images", "rm", "example-nginx/1.0.0", "--yes", env=cli_env).returncode == 0
    assert list(store.iterdir()) == []


def assert_images_run_boots_it_untouched(build_dir: Path, cli_env: dict[str, str]) -> None:
    """`images run` boots the stored image (its first boot, as a user would) on a
    throwaway overlay: the printed ssh command logs in, nginx runs, SIGTERM stops
    it and removes what it wrote, and the stored disk is byte for byte unchanged."""
    disk = build_dir / "disk.qcow2"
    before = hashlib.sha256(disk.read_bytes()).hexdigest()
    # A cache dir of its own: what it leaves there is its own (another test
    # worker's scratch VMs come and go in the shared one).
    cache = Path(cli_env["VMBUILD_STORE"]).with_name("run-cache")
    env = {**cli_env, "VMBUILD_CACHE_DIR": str(cache)}
    proc = subprocess.Popen(
        [*VMBUILD, "images", "run", "example-nginx/1.0.0"], env=env, cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        login: list[str] = []
        for line in proc.stdout:  # the ssh command is printed once the VM answers
            if line.startswith("  ssh "):
                login = shlex.split(line)
                break
        assert login, f"no ssh command (exit {proc.wait()})"
        *options, destination = login
        nginx = subprocess.run(
            [*options, "-o", "BatchMode=yes", destination, "systemctl is-active nginx"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert nginx.stdout.strip() == "active", nginx.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert hashlib.sha256(disk.read_bytes()).hexdigest() == before
    assert list(cache.glob("scratch-*")) == []


def assert_signed_provenance_and_sboms(
    build_dir: Path, m: dict[str, Any], cli_env: dict[str, str]
) -> None:
    """The build signed its provenance with the key it created, wrote both SBOMs, and
    `verify` catches a one-byte change in a disk."""
    key = Path(cli_env["VMBUILD_CONFIG_DIR"]) / "signing.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert m["provenance"]["signed_by"] == f"local:{key}"
    assert len(m["provenance"]["keyids"]) == 1
    envelope = json.loads((build_dir / "provenance.intoto.jsonl").read_text())
    statement = json.loads(base64.b64decode(envelope["payload"]))
    assert statement["predicateType"] == "https://slsa.dev/provenance/v1"
    subjects = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
    assert set(subjects) == {
        "disk.qcow2", "disk.raw", "disk.vmdk", "disk.vhd", "sbom.spdx.json", "sbom.cdx.json",
        "manifest.json",
    }  # fmt: skip
    for out in m["outputs"]:
        assert subjects[out["file"]] == out["sha256"]
    deps = statement["predicate"]["buildDefinition"]["resolvedDependencies"]
    assert {"name": f"base:{m['base']['id']}", "digest": {"sha256": m["base"]["sha256"]},
            "uri": m["base"]["source"]} in deps  # fmt: skip

    cdx = (build_dir / "sbom.cdx.json").read_text()
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(cdx) is None
    bom = json.loads(cdx)
    assert bom["metadata"]["component"]["name"] == "example-nginx"
    nginx = next(c for c in bom["components"] if c["name"] == "nginx")
    assert nginx["purl"].startswith("pkg:deb/debian/nginx@")
    assert nginx["purl"].endswith("?arch=amd64&distro=debian-12")
    libssl = next(c for c in bom["components"] if c["name"].startswith("libssl"))
    assert libssl["properties"][0]["value"].startswith("openssl ")
    spdx = parse_file(str(build_dir / "sbom.spdx.json"))
    assert validate_full_spdx_document(spdx, "SPDX-2.3") == []
    assert len(spdx.packages) == len(m["packages"]) + 1  # the image itself is the root

    ok = vmbuild("verify", "example-nginx", "--json", env=cli_env)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["signed"] is True
    disk = build_dir / "disk.vhd"
    with disk.open("r+b") as fh:
        fh.seek(4096)
        byte = fh.read(1)
        fh.seek(4096)
        fh.write(bytes([byte[0] ^ 0xFF]))
    bad = vmbuild("verify", "example-nginx", env=cli_env)
    assert bad.returncode == 1
    assert f"error: {disk}: differs from the signed provenance" in bad.stderr


FAILING_COMPONENT = """\
name: breaks
description: a component whose second build step fails
schemaVersion: 1.0
phases:
  - name: build
    steps:
      - name: Fine
        action: ExecuteBash
        inputs:
          commands: ["echo all good"]
      - name: InstallThing
        action: ExecuteBash
        inputs:
          commands:
            - 'echo "about to fail - missing dependency libfoo" >&2'
            - exit 3
"""


def test_failing_component_fails_cleanly(
    debian_base: base_image.BaseImage,
    cli_env: dict[str, str],
    tmp_path: Path,
    no_leftover_qemu: None,
) -> None:
    # A cache dir of its own, the shared bases in it: all it holds after the
    # build is the build's doing (another test worker writes to the shared one).
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "bases").symlink_to(paths.cache_dir() / "bases")
    cli_env["VMBUILD_CACHE_DIR"] = str(cache)
    (tmp_path / "breaks.yaml").write_text(FAILING_COMPONENT)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "name: broken\nversion: 0.1.0\nbase: debian-12\ncomponents:\n  - name: ./breaks.yaml\n"
    )
    proc = vmbuild("build", str(recipe), env=cli_env)
    assert proc.returncode == 1
    assert "component breaks: step build/InstallThing failed" in proc.stderr
    assert "missing dependency libfoo" in proc.stderr
    assert "Traceback" not in proc.stderr
    store = Path(cli_env["VMBUILD_STORE"])
    assert not store.exists() or list(store.rglob("*")) == []
    # The one thing a failed build leaves is its run log (state, not cache), by design.
    new = {p.name for p in cache.iterdir()} - {"bases"}
    assert new <= {"accel-probe.json"}  # the accelerator probe's result, if this came first
    [run_log] = (Path(cli_env["VMBUILD_STATE_DIR"]) / "logs").glob("broken-*/build.log")
    assert f"run log: {run_log}" in proc.stderr
    assert "missing dependency libfoo" in run_log.read_text()


def test_sigterm_mid_build_leaves_nothing(
    debian_base: base_image.BaseImage, cli_env: dict[str, str], no_leftover_qemu: None
) -> None:
    store = Path(cli_env["VMBUILD_STORE"])
    proc = subprocess.Popen(
        # --no-cache: the example's generalized disk may be cached by now, and
        # then no builder VM would boot to be interrupted.
        [*VMBUILD, "build", "examples/nginx/recipe.yaml", "--no-cache"], env=cli_env, cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not qemu_pids(store):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "the builder VM never started"
        time.sleep(0.5)
    time.sleep(3)  # mid-boot
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert not qemu_pids(store)
    assert not store.exists() or list(store.rglob("*")) == []
