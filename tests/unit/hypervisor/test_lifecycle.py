"""One VM lifecycle: backends by name, the backend's context manager, QEMU's own log."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmbuild.errors import VmbuildError
from vmbuild.hypervisor.accel import tcg
from vmbuild.hypervisor.base import MachineContext, VMSpec
from vmbuild.hypervisor.guest import BACKENDS, GuestRequest, make_machine
from vmbuild.hypervisor.qemu import QemuMachine


def spec(tmp_path: Path) -> VMSpec:
    return VMSpec(
        name="vmbuild-abc123-builder", disk=tmp_path / "d.qcow2", seed=tmp_path / "s.iso",
        memory_mib=2048, cpus=2, accel=tcg("test"), ssh_port=40022,
        console_log=tmp_path / "builder-console.log", workdir=tmp_path,
    )  # fmt: skip


def request(tmp_path: Path, backend: str) -> GuestRequest:
    return GuestRequest(
        run_id="abc123", role="builder", base=tmp_path / "b.qcow2", base_format="qcow2",
        disk_size=None, memory_mib=2048, cpus=2, accel=tcg("test"), workdir=tmp_path,
        user="u", backend=backend,
    )  # fmt: skip


def test_backends_are_registered_by_name(tmp_path: Path) -> None:
    assert list(BACKENDS) == ["qemu", "libvirt"]
    machine = make_machine(request(tmp_path, "qemu"), spec(tmp_path))
    assert isinstance(machine, QemuMachine) and machine.spec == spec(tmp_path)
    with pytest.raises(VmbuildError) as err:
        make_machine(request(tmp_path, "xen"), spec(tmp_path))
    assert (str(err.value), err.value.hint) == ("unknown backend 'xen'", "use qemu or libvirt")


def test_qemu_output_goes_to_a_log_file_beside_the_console(tmp_path: Path) -> None:
    assert spec(tmp_path).qemu_log == tmp_path / "vmbuild-abc123-builder-qemu.log"


class Recorder(MachineContext):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def launch(self) -> None:
        self.calls.append("launch")

    def shutdown(self, timeout: float) -> None:
        self.calls.append(f"shutdown {timeout}")

    def kill(self) -> None:
        self.calls.append("kill")


def test_the_context_shuts_down_in_order_or_kills_after_an_error() -> None:
    ok = Recorder()
    ok.shutdown_timeout = 144.0
    with ok:
        pass
    assert ok.calls == ["launch", "shutdown 144.0"]
    failed = Recorder()
    with pytest.raises(RuntimeError), failed:
        raise RuntimeError("boom")
    assert failed.calls == ["launch", "kill"]
