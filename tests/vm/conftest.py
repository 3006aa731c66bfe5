"""Real VMs for the VM tier: the offline Debian base (cached under the user
cache dir between runs) and one shared, booted guest for read-only tests.

No KVM here means TCG: these tests are slow but never skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.libvirtd import Libvirtd, running_libvirtd
from vmbuild import paths
from vmbuild.cache import aptproxy, checkpoints
from vmbuild.hypervisor.guest import Guest
from vmbuild.remote.ssh import SSHSession
from vmbuild.scratch import scratch_guest
from vmbuild.stages import base_image

REPO = Path(__file__).resolve().parents[2]
VMBUILD = [sys.executable, "-m", "vmbuild"]


def vmbuild(
    *args: str, env: dict[str, str], timeout: float = 1800
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI from the repository root, capturing its output."""
    return subprocess.run(
        [*VMBUILD, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def build_stored(
    tmp_path: Path, env: dict[str, str], recipe: str, files: dict[str, str]
) -> tuple[dict[str, Any], float]:
    """Write `recipe` (and the files it names) into `tmp_path`, build it with the
    real CLI, and return the one manifest stored and the build's wall time."""
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "recipe.yaml").write_text(recipe)
    started = time.monotonic()
    proc = vmbuild("build", str(tmp_path / "recipe.yaml"), "--json", env=env)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-4000:]
    [manifest_path] = Path(env["VMBUILD_STORE"]).rglob("manifest.json")
    return json.loads(manifest_path.read_text()), elapsed


def lint_stored(manifest: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """`vmbuild lint --json` of a stored build; it must pass."""
    ref = f"{manifest['name']}/{manifest['version']}/{manifest['build']}"
    lint = vmbuild("lint", ref, "--json", env=env)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    report: dict[str, Any] = json.loads(lint.stdout)
    return report


def qemu_pids(using: str | Path = "") -> set[int]:
    """vmbuild's QEMU processes (-name vmbuild-...), only those whose command line
    mentions `using` (a test's own store or work dir) when given: other VMs on a
    shared host are not this test's leaks."""
    out = subprocess.run(
        # libvirt's QEMU is started as `-name guest=vmbuild-...`.
        ["pgrep", "-a", "-f", "qemu-system-x86_64 -name (guest=)?vmbuild-"],
        capture_output=True,
        text=True,
    ).stdout
    return {int(line.split()[0]) for line in out.splitlines() if str(using) in line}


@pytest.fixture(scope="session", autouse=True)
def package_cache() -> Iterator[aptproxy.AptProxy]:
    """ONE apt-cacher-ng for the whole suite, its cache persistent under the user
    cache dir: every package is downloaded once, ever, not once per VM. Named in
    the environment, so every build (in-process or a CLI subprocess, whatever
    its VMBUILD_CACHE_DIR) uses this instance."""
    with aptproxy.shared_instance(paths.cache_dir() / "apt-cacher-ng") as proxy:
        previous = os.environ.get(aptproxy.ENV)
        os.environ[aptproxy.ENV] = proxy.host_url
        try:
            yield proxy
        finally:
            if previous is None:
                os.environ.pop(aptproxy.ENV, None)
            else:
                os.environ[aptproxy.ENV] = previous


@pytest.fixture(scope="session", autouse=True)
def session_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Builds in one run may share checkpoints, never with earlier runs: a test
    of the full build path must not be answered from yesterday's cache."""
    path = tmp_path_factory.mktemp("checkpoints")
    previous = os.environ.get(checkpoints.ENV_DIR)
    os.environ[checkpoints.ENV_DIR] = str(path)
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop(checkpoints.ENV_DIR, None)
        else:
            os.environ[checkpoints.ENV_DIR] = previous


@pytest.fixture(scope="session")
def debian_base() -> base_image.BaseImage:
    """The offline Debian 12 base: built once (~75 s), then reused from the cache."""
    return base_image.build_debian("debian-12")


@pytest.fixture(scope="session")
def guest_vm_status(debian_base: base_image.BaseImage) -> list[str]:
    """What the shared guest's start said (test_guest checks how it came up)."""
    return []


@pytest.fixture(scope="session")
def guest_vm(debian_base: base_image.BaseImage, guest_vm_status: list[str]) -> Iterator[Guest]:
    """One VM shared by every test that does not need a fresh one: the booted
    builder a build kept in this session, resumed, or booted and kept (later
    scratch VMs resume it, as `component run` does)."""
    with scratch_guest(
        "debian-12", base_dir=REPO, keep_boot=True, on_status=guest_vm_status.append
    ) as guest:
        yield guest


@pytest.fixture(scope="session")
def guest(guest_vm: Guest) -> SSHSession:
    """The shared guest as a `Remote` (SSH session, commands run as root)."""
    return guest_vm.ssh


@pytest.fixture
def no_leftover_qemu(tmp_path: Path) -> Iterator[None]:
    """Fails the test if a VM whose files live under its tmp_path outlives it."""
    yield
    leaked = qemu_pids(tmp_path)
    assert not leaked, f"QEMU processes left behind: {leaked}"


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["VMBUILD_STORE"] = str(tmp_path / "store")
    # Builds sign their provenance; the key they create stays in the test's own dir.
    env["VMBUILD_CONFIG_DIR"] = str(tmp_path / "config")
    # The run registry and failed runs' logs, per test.
    env["VMBUILD_STATE_DIR"] = str(tmp_path / "state")
    env.pop("VMBUILD_KMS_KEY", None)
    return env


def _destroy_leftovers(uri: str) -> list[str]:
    import libvirt

    conn = libvirt.open(uri)
    try:
        names = []
        for dom in conn.listAllDomains():
            if dom.name().startswith("vmbuild-"):
                names.append(dom.name())
                if dom.isActive():
                    dom.destroy()
                if dom.isPersistent():
                    dom.undefine()
        return names
    finally:
        conn.close()


@pytest.fixture(scope="session")
def libvirtd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Libvirtd]:
    """A system libvirtd for the session; ours is stopped at the end, a running one reused."""
    with running_libvirtd(tmp_path_factory.mktemp("libvirtd")) as daemon:
        try:
            yield daemon
        finally:
            # Stopping libvirtd does not stop its QEMUs: never leave one behind,
            # even after a test failed halfway.
            _destroy_leftovers(daemon.uri)
