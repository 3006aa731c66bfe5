"""The libvirt backend end to end: a real libvirtd (started here, by hand), a
full build (builder and test VM) through the CLI, and a failing build that leaves nothing.

"Nothing left" is checked three ways: no `vmbuild-*` domain in libvirt (active
or defined), no QEMU started by libvirt for vmbuild, no staged files.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.libvirtd import Libvirtd
from tests.support.schemas import event_lines
from tests.vm.conftest import REPO, VMBUILD, vmbuild
from vmbuild.stages import base_image

# One xdist worker runs every test here and the other libvirtd users, in order:
# they count the QEMUs libvirt runs, host-wide.
pytestmark = [pytest.mark.vm, pytest.mark.xdist_group("libvirtd")]

# One quick component and one testinfra file: the example's packages are proved
# by the QEMU backend's build; this proves both VMs run as libvirt domains.
LIGHT = REPO / "tests" / "data" / "recipes" / "libvirt" / "recipe.yaml"


def libvirt_qemu_pids() -> set[int]:
    """QEMU processes libvirt started for vmbuild (libvirt passes `-name guest=NAME,...`)."""
    out = subprocess.run(
        ["pgrep", "-f", "qemu-system-x86_64 -name guest=vmbuild-"], capture_output=True, text=True
    ).stdout
    return {int(p) for p in out.split()}


def vmbuild_domains(uri: str) -> list[str]:
    """Every vmbuild domain libvirt knows, running or merely defined."""
    import libvirt

    conn = libvirt.open(uri)
    try:
        return sorted(d.name() for d in conn.listAllDomains() if d.name().startswith("vmbuild-"))
    finally:
        conn.close()


@pytest.fixture
def libvirt_env(cli_env: dict[str, str], libvirtd: Libvirtd) -> dict[str, str]:
    return {**cli_env, "LIBVIRT_DEFAULT_URI": libvirtd.uri}


@pytest.fixture
def nothing_left(libvirtd: Libvirtd) -> Iterator[None]:
    before = libvirt_qemu_pids()
    assert vmbuild_domains(libvirtd.uri) == [], "vmbuild domains exist before the test"
    yield
    assert vmbuild_domains(libvirtd.uri) == [], "vmbuild domains left behind"
    leaked = libvirt_qemu_pids() - before
    assert not leaked, f"QEMU processes left behind: {leaked}"


class DomainWatcher:
    """Records the vmbuild domains seen while a build runs: proof the VMs ran in libvirt."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.seen.update(vmbuild_domains(self.uri))
            except Exception:  # a transient domain vanishing mid-listing
                continue

    def __enter__(self) -> DomainWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def test_example_recipe_builds_and_passes_on_libvirt(
    debian_base: base_image.BaseImage,
    libvirtd: Libvirtd,
    libvirt_env: dict[str, str],
    nothing_left: None,
) -> None:
    with DomainWatcher(libvirtd.uri) as watcher:
        proc = vmbuild("build", str(LIGHT), "--backend", "libvirt", "--json", env=libvirt_env)
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = event_lines(proc.stdout)[-1]  # --json streams events; the last is the result
    assert result["type"] == "result"
    m = result["manifest"]
    assert m["backend"] == "libvirt"
    assert m["tests"]["status"] == "passed"
    ti = m["tests"]["testinfra"]
    assert (ti["tests"], ti["failures"], ti["errors"]) == (3, 0, 0)
    assert [c["name"] for c in m["components"]] == ["stamp", "cloud-ready"]
    # Checkpoint layers are cut through libvirt (a disk-only external snapshot),
    # and the image flattened from them passed the offline secret scan.
    assert m["checkpoints"]["saved"] == ["1/2 stamp", "2/2 cloud-ready", "generalized disk"]
    # The cloud-ready test phase passed in the test VM booted as on EC2.
    assert m["tests"]["components"][-1] == {"name": "cloud-ready", "status": "Success"}
    assert [o["format"] for o in m["outputs"]]
    for out in m["outputs"]:
        assert (Path(result["path"]) / out["file"]).is_file()
    # Both VMs really were libvirt domains, named vmbuild-<run>-<role>.
    roles = {name.rsplit("-", 1)[-1] for name in watcher.seen}
    assert roles == {"builder", "test"}, watcher.seen
    logs = Path(result["path"]) / "logs"
    assert "cloud-init" in (logs / "builder-console.log").read_text(errors="replace")
    # What the guest read from the metadata service is in the run log.
    build_log = (logs / "build.log").read_text()
    assert "IMDS GET /2021-03-23/meta-data/public-keys/0/openssh-key 200 v2" in build_log
    assert "IMDS GET /2021-03-23/dynamic/instance-identity/document 200 v2" in build_log


FAILING_COMPONENT = """\
name: breaks
description: a component whose build step fails
schemaVersion: 1.0
phases:
  - name: build
    steps:
      - name: Fails
        action: ExecuteBash
        inputs:
          commands:
            # No ": " in a plain YAML scalar: it would turn the line into a mapping.
            - echo "the libvirt backend is failing on purpose" >&2
            - exit 1
"""


def test_failing_build_leaves_no_domain(
    debian_base: base_image.BaseImage,
    libvirtd: Libvirtd,
    libvirt_env: dict[str, str],
    tmp_path: Path,
    nothing_left: None,
) -> None:
    (tmp_path / "breaks.yaml").write_text(FAILING_COMPONENT)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "name: broken\nversion: 0.1.0\nbase: debian-12\ncomponents:\n  - name: ./breaks.yaml\n"
    )
    with DomainWatcher(libvirtd.uri) as watcher:
        proc = vmbuild("build", str(recipe), "--backend", "libvirt", env=libvirt_env)
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "failing on purpose" in proc.stderr, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    assert {n.rsplit("-", 1)[-1] for n in watcher.seen} == {"builder"}
    store = Path(libvirt_env["VMBUILD_STORE"])
    assert not store.exists() or list(store.rglob("*")) == []


def test_unreachable_libvirt_is_a_clear_error(
    debian_base: base_image.BaseImage, cli_env: dict[str, str], tmp_path: Path
) -> None:
    """No daemon at the URI: one line naming it and what to start, no traceback, no VM."""
    (tmp_path / "breaks.yaml").write_text(FAILING_COMPONENT)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "name: unreachable\nversion: 0.1.0\nbase: debian-12\ncomponents:\n  - name: ./breaks.yaml\n"
    )
    uri = f"qemu+unix:///system?socket={tmp_path}/no-such-sock"
    env = {**cli_env, "LIBVIRT_DEFAULT_URI": uri}
    before = libvirt_qemu_pids()
    proc = vmbuild("build", str(recipe), "--backend", "libvirt", env=env)
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert f"cannot connect to libvirt at {uri}" in proc.stderr
    assert "libvirtd" in proc.stderr  # the hint: what to start
    assert "Traceback" not in proc.stderr
    assert libvirt_qemu_pids() == before


def test_sigterm_mid_boot_destroys_the_domain(
    debian_base: base_image.BaseImage,
    libvirtd: Libvirtd,
    libvirt_env: dict[str, str],
    nothing_left: None,
) -> None:
    """Ctrl-C/SIGTERM while the builder domain boots: destroyed, and libvirt forgets it.

    --no-cache: the session's checkpoints hold the example's generalized disk (the
    direct backend's build made it), which would leave no builder to interrupt."""
    proc = subprocess.Popen(
        [*VMBUILD, "build", "examples/nginx/recipe.yaml", "--backend", "libvirt", "--no-cache"],
        env=libvirt_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not vmbuild_domains(libvirtd.uri):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the builder domain never appeared"
            time.sleep(0.5)
        time.sleep(3)  # mid-boot
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    store = Path(libvirt_env["VMBUILD_STORE"])
    assert not store.exists() or list(store.rglob("*")) == []


def test_uefi_secure_boot_guest_boots_as_a_libvirt_domain(
    libvirtd: Libvirtd, tmp_path: Path, nothing_left: None
) -> None:
    """The UEFI-only base booted once as a libvirt domain under OVMF's Secure Boot
    build (loader secure=yes, per-VM nvram, SMM on q35): the guest sees UEFI with
    Secure Boot enforced. A test-VM boot only; nothing is built but the cached base."""
    from vmbuild.hypervisor import accel
    from vmbuild.hypervisor.guest import GuestRequest, booted_guest
    from vmbuild.plan import TEST_USER
    from vmbuild.stages.image_tests import check_firmware

    base = base_image.build_debian("debian-12", layout="uefi")
    req = GuestRequest(
        run_id="lvsb" + tmp_path.name[-6:].replace("_", ""), role="test", base=base.path,
        base_format=base.format, disk_size=None, memory_mib=1024, cpus=2,
        accel=accel.tcg("the VM tier runs on TCG"), workdir=tmp_path / "vm", user=TEST_USER,
        backend="libvirt", libvirt_uri=libvirtd.uri, dispose="kill", firmware="uefi-secure",
    )  # fmt: skip
    start = time.monotonic()
    with booted_guest(req) as guest:
        to_ssh = time.monotonic() - start
        assert vmbuild_domains(libvirtd.uri) == [f"vmbuild-{req.run_id}-test"]
        boot = check_firmware(guest, "uefi-secure")
    assert boot["guest"] == "uefi SecureBoot enabled"
    print(f"libvirt UEFI Secure Boot: SSH after {to_ssh:.1f}s")
