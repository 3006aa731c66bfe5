"""Checkpoint layers on the libvirt backend: a real libvirtd and a real domain.

The domain has no guest (an empty disk: SeaBIOS finds nothing to boot), which is
all a disk-layer cut needs. Like the direct backend's test in test_checkpoints:
after the cut the disk goes on in the new file, backed by the old one, and a
discard through the guest's drive writes a zero cluster that hides what the
layer below holds (what generalize deletes stays deleted).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_checkpoints import assert_the_discard_hid_the_layer_below, cut_test_vm
from tests.support.libvirtd import Libvirtd, running_libvirtd
from vmbuild.hypervisor.libvirt import LibvirtMachine

# The virtio disk's backend as libvirt's -blockdev configuration names it.
DRIVE = "/machine/peripheral/virtio-disk0/virtio-backend"


@pytest.fixture(scope="module")
def libvirtd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Libvirtd]:
    with running_libvirtd(tmp_path_factory.mktemp("libvirtd")) as daemon:
        yield daemon


def monitor(dom: Any, command: str, **arguments: Any) -> Any:
    import libvirt_qemu

    said = libvirt_qemu.qemuMonitorCommand(
        dom, json.dumps({"execute": command, "arguments": arguments}), 0
    )
    return json.loads(said)["return"]


def test_a_libvirt_cut_layer_passes_the_guests_discards_down(
    tmp_path: Path, libvirtd: Libvirtd
) -> None:
    spec = cut_test_vm(tmp_path)
    lower, new_top = spec.disk, tmp_path / "top.qcow2"
    machine = LibvirtMachine(spec, uri=libvirtd.uri, autodestroy=True)
    with machine:
        machine.cut_layer(lower, new_top)
        dom = machine._dom
        nodes = monitor(dom, "query-named-block-nodes")
        [top] = [n for n in nodes if n["drv"] == "qcow2" and n["file"] == str(new_top)]
        assert top["backing_file"] == str(lower)
        # Through the guest's own drive, as a guest's fstrim would.
        said = monitor(
            dom, "human-monitor-command",
            **{"command-line": f'qemu-io -d {DRIVE} "discard 0 64k"'},
        )  # fmt: skip
        assert said == ""
        machine.kill()
    assert_the_discard_hid_the_layer_below(new_top, lower)
