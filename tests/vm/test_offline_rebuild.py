"""An offline rebuild from a --with-inputs bundle (TCG): a small recipe that installs a
package is built online (through the shared package cache, tests skipped: the rebuild
runs them), exported with its inputs, and rebuilt from the bundle into a second store
with every guest on a restricted user network. The rebuild's testinfra file came from
the bundle; it proves the test VM reaches neither the host's package cache nor the
internet; the package versions and the index state equal the original's."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.vm.conftest import vmbuild
from vmbuild.cache import aptproxy

pytestmark = pytest.mark.vm

COMPONENT = """\
name: hello-pkg
description: installs a package from the Debian mirror
schemaVersion: 1.0
phases:
  - name: build
    steps:
      - name: Install
        action: ExecuteBash
        inputs:
          commands:
            - apt-get update
            - DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends hello
"""

RECIPE = """\
name: offline-hello
version: 1.0.0
base: debian-12
components:
  - name: ./hello.yaml
tests:
  - tests/test_offline.py
outputs: [qcow2]
"""

# Run by the rebuild's test VM only (the original build skips its tests).
TESTINFRA = """\
def test_hello_is_installed(host):
    assert host.package("hello").is_installed


def test_no_way_out_but_the_bundle_mirror(host):
    # restrict=on: a SYN to the host's package cache or to the internet goes nowhere.
    for address, port in [("10.0.2.2", {cache_port}), ("{internet}", 80)]:
        probe = host.run(f"timeout 8 bash -c 'exec 3<>/dev/tcp/{{address}}/{{port}}'")
        assert probe.rc != 0, (address, port)
"""


def test_rebuild_from_a_bundle_offline(
    cli_env: dict[str, str], tmp_path: Path, no_leftover_qemu: None
) -> None:
    src = tmp_path / "src"
    (src / "tests").mkdir(parents=True)
    cache_port = urlsplit(os.environ[aptproxy.ENV]).port
    (src / "hello.yaml").write_text(COMPONENT)
    # deb.debian.org's Fastly address: by number, a guest without DNS could still try it.
    (src / "tests" / "test_offline.py").write_text(
        TESTINFRA.format(cache_port=cache_port, internet="151.101.2.132")
    )
    (src / "recipe.yaml").write_text(RECIPE)

    started = time.monotonic()
    built = vmbuild("build", str(src / "recipe.yaml"), "--skip-tests", env=cli_env)
    original_s = time.monotonic() - started
    assert built.returncode == 0, built.stderr[-4000:]
    [path] = Path(cli_env["VMBUILD_STORE"]).rglob("manifest.json")
    original = json.loads(path.read_text())
    assert any(p["name"] == "hello" for p in original["packages"])
    assert sorted(original["apt_indexes"]) == [
        "deb.debian.org_debian-security_dists_bookworm-security_InRelease",
        "deb.debian.org_debian_dists_bookworm-updates_InRelease",
        "deb.debian.org_debian_dists_bookworm_InRelease",
    ]
    files = {
        "hello.yaml": src / "hello.yaml",
        "tests/test_offline.py": src / "tests/test_offline.py",
    }
    assert original["recipe_files"] == {
        rel: hashlib.sha256(path.read_bytes()).hexdigest() for rel, path in files.items()
    }
    ref = f"{original['name']}/{original['version']}/{original['build']}"

    bundle = tmp_path / "offline-hello.tar"
    exported = vmbuild("bundle", "export", ref, "--with-inputs", "-o", str(bundle), env=cli_env)
    assert exported.returncode == 0, exported.stderr[-4000:]

    other = {**cli_env, "VMBUILD_STORE": str(tmp_path / "other-store")}
    started = time.monotonic()
    rebuilt_proc = vmbuild("bundle", "rebuild", str(bundle), env=other)
    rebuild_s = time.monotonic() - started
    assert rebuilt_proc.returncode == 0, rebuilt_proc.stderr[-4000:]
    [path] = Path(other["VMBUILD_STORE"]).rglob("manifest.json")
    rebuilt = json.loads(path.read_text())

    def versions(m: dict[str, object]) -> list[tuple[str, str, str]]:
        return sorted((p["name"], p["version"], p["arch"]) for p in m["packages"])  # type: ignore[attr-defined, index]

    assert versions(rebuilt) == versions(original)
    assert rebuilt["apt_indexes"] == original["apt_indexes"]
    assert rebuilt["recipe_files"] == original["recipe_files"]
    assert rebuilt["rebuilt_from"] == {
        "bundle": str(bundle),
        "sha256": hashlib.sha256(bundle.read_bytes()).hexdigest(),
        "ref": ref,
    }
    assert rebuilt["base"]["sha256"] == original["base"]["sha256"]
    assert rebuilt["tests"]["status"] == "passed"
    assert rebuilt["tests"]["testinfra"]["tests"] == 2
    print(f"original build {original_s:.0f}s, offline rebuild {rebuild_s:.0f}s; "
          f"rebuild timings {rebuilt['timings']}")  # fmt: skip
