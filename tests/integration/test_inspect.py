"""`vmbuild inspect RECIPE`: the resolved plan through the real CLI, creating nothing."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from tests.support.cli import REPO, isolated_env, vmbuild

EXAMPLE = REPO / "examples" / "nginx" / "recipe.yaml"


def test_the_example_plan_with_precedence_and_nothing_created(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    proc = vmbuild(env, "inspect", str(EXAMPLE), "--json", "--backend", "libvirt", "--skip-tests")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["recipe"] == {
        "path": str(EXAMPLE), "sha256": hashlib.sha256(EXAMPLE.read_bytes()).hexdigest(),
        "name": "example-nginx", "version": "1.0.0",
    }  # fmt: skip
    # An empty cache: the base would be built, nothing about it is known yet.
    assert plan["base"] == {
        "spec": "debian-12", "kind": "built", "cached": False, "id": None, "sha256": None,
        "path": None, "format": None,
    }  # fmt: skip
    assert [(c["name"], c["parameters"]) for c in plan["components"]] == [
        ("update-linux", {"RebootIfRequired": "true"}),
        ("nginx-app", {"Content": "<h1>Built by vmbuild</h1>", "Port": "80"}),
    ]
    nginx = REPO / "vmbuild" / "components" / "nginx-app.yaml"
    assert plan["components"][1]["sha256"] == hashlib.sha256(nginx.read_bytes()).hexdigest()
    s = plan["settings"]
    assert s["backend"] == {"value": "libvirt", "source": "cli"}
    assert s["memory"] == {"value": 2 << 30, "source": "recipe"}
    assert s["cpus"] == {"value": 2, "source": "recipe"}
    assert s["accelerator"] == {"value": "auto", "source": "default"}
    assert s["run_tests"] == {"value": False, "source": "cli"}
    assert s["store"] == {"value": str(tmp_path / "store"), "source": "environment"}
    assert plan["outputs"] == ["qcow2", "raw", "vmdk", "vhd"]
    assert plan["tests"]["testinfra"] == [str(REPO / "examples/nginx/tests/test_image.py")]
    assert plan["distribution"] is None
    assert not (tmp_path / "store").exists() and not (tmp_path / "cache").exists()


def test_local_base_digest_recipe_settings_and_upload_targets(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    disk = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "name: web\nversion: 2.0.0-rc.1\nbase: base.qcow2\noutputs: [raw]\n"
        "vm: {backend: libvirt, cpus: 1}\n"
        "distribution:\n  import: {method: import-snapshot, s3_bucket: my-bucket}\n"
        "  regions:\n    - region: us-east-1\n    - region: eu-west-1\n      encrypted: true\n"
    )
    proc = vmbuild(env, "inspect", str(recipe), "--json", "--accel", "tcg")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    digest = hashlib.sha256(disk.read_bytes()).hexdigest()
    assert plan["base"] == {
        "spec": "base.qcow2", "kind": "file", "cached": True, "id": f"file-{digest[:16]}",
        "sha256": digest, "path": str(disk), "format": "qcow2",
    }  # fmt: skip
    assert plan["settings"]["backend"] == {"value": "libvirt", "source": "recipe"}
    assert plan["settings"]["cpus"] == {"value": 1, "source": "recipe"}
    assert plan["settings"]["memory"] == {"value": 2 << 30, "source": "default"}
    assert plan["settings"]["accelerator"] == {"value": "tcg", "source": "cli"}
    assert plan["distribution"]["method"] == "import-snapshot"
    assert [(r["region"], r["copy"], r["encrypted"]) for r in plan["distribution"]["regions"]] == [
        ("us-east-1", False, None), ("eu-west-1", True, True),
    ]  # fmt: skip
    human = vmbuild(env, "inspect", str(recipe))
    assert human.returncode == 0, human.stderr
    assert f"base:       base.qcow2 (cached file-{digest[:16]} sha256:{digest})\n" in human.stdout
    assert "upload:     us-east-1 (import-snapshot) AMI {{ name }}-{{ version }}" in human.stdout
    assert "upload:     eu-west-1 (copy) AMI " in human.stdout
    assert not (tmp_path / "store").exists() and not (tmp_path / "cache").exists()


def test_an_invalid_recipe_is_the_same_error_as_build(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\nversion: 1.0.0\nbase: debian-12\noutputs: [qcow2, qcow2]\n")
    inspect = vmbuild(env, "inspect", str(recipe))
    build = vmbuild(env, "build", str(recipe))
    assert inspect.returncode == build.returncode == 1
    assert inspect.stderr == build.stderr == f"error: {recipe}: outputs: a format is listed twice\n"
