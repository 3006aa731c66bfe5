"""A running VM's state saved with its disk layer and resumed in a new QEMU
(hypervisor/vmstate.py), with real QEMU processes: SeaBIOS runs, no guest OS is
needed (the VM tests resume a real builder)."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from tests.integration.test_checkpoints import cut_test_vm, qemu_img
from vmbuild.hypervisor.base import VMSpec, free_port
from vmbuild.hypervisor.qemu import QemuMachine, qmp_path
from vmbuild.hypervisor.qmp import QMPClient
from vmbuild.hypervisor.vmstate import StateNotLoaded

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def status(spec: VMSpec) -> str:
    with QMPClient(qmp_path(spec)) as qmp:
        return str(qmp.execute("query-status")["status"])


def saved(tmp_path: Path) -> tuple[VMSpec, Path, str]:
    """A VM's state, saved while it ran, with the layer cut at that instant."""
    spec = cut_test_vm(tmp_path)
    state, top = tmp_path / "vmstate.zst", tmp_path / "top.qcow2"
    with QemuMachine(spec) as vm:
        vm.save_running(spec.disk, top, state)
        assert status(spec) == "running"  # it ran on after the save
        with QMPClient(qmp_path(spec)) as qmp:
            [disk] = [n for n in qmp.execute("query-block") if n["device"] == "disk0"]
        assert disk["inserted"]["file"] == str(top)  # the cut happened with the save
        signature = vm.state_signature()
        vm.shutdown(0.1)  # no OS to honour ACPI: QMP quit
    return spec, state, signature


def resumed_spec(spec: VMSpec, tmp_path: Path, state: Path) -> VMSpec:
    overlay = tmp_path / "resumed.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", spec.disk, "-F", "qcow2", overlay)
    return replace(
        spec, name=f"{spec.name}-resumed", disk=overlay, ssh_port=free_port(),
        console_log=tmp_path / "resumed-console.log", restore_from=state,
    )  # fmt: skip


def qemu_processes(spec: VMSpec) -> str:
    return subprocess.run(
        ["pgrep", "-af", f"-name {spec.name} "], capture_output=True, text=True
    ).stdout


def test_a_running_vm_is_saved_and_resumed_in_a_new_qemu(tmp_path: Path) -> None:
    spec, state, signature = saved(tmp_path)
    assert state.read_bytes()[:4] == ZSTD_MAGIC
    assert state.stat().st_mode & 0o777 == 0o600  # the guest's RAM: the owner's only
    again = resumed_spec(spec, tmp_path, state)
    vm = QemuMachine(again)
    assert vm.state_signature() == signature  # the same machine, other paths and port
    with vm:
        assert status(again) == "running"
        with QMPClient(qmp_path(again)) as qmp:
            assert qmp.execute("query-migrate")["status"] == "completed"
        vm.shutdown(0.1)


def test_a_damaged_state_is_refused_and_leaves_no_qemu(tmp_path: Path) -> None:
    spec, state, _ = saved(tmp_path)
    data = bytearray(state.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # zstd's frame checksum fails
    state.write_bytes(bytes(data))
    again = resumed_spec(spec, tmp_path, state)
    vm = QemuMachine(again)
    with pytest.raises(StateNotLoaded, match="loading the VM's saved state failed"):
        vm.launch()
    assert not vm.is_running() and qemu_processes(again) == ""
    assert not qmp_path(again).exists()


def test_a_state_cut_short_is_refused(tmp_path: Path) -> None:
    spec, state, _ = saved(tmp_path)
    with state.open("r+b") as f:
        f.truncate(state.stat().st_size // 3)  # a save killed midway
    again = resumed_spec(spec, tmp_path, state)
    vm = QemuMachine(again)
    with pytest.raises(StateNotLoaded, match="saved state"):
        vm.launch()
    assert not vm.is_running() and qemu_processes(again) == ""
