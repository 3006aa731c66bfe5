"""testinfra checks run by `vmbuild build` against the test VM booted from the image.

vmbuild passes the builder's identity in the environment so the tests can
prove it did not survive generalization.
"""

from __future__ import annotations

import os

import pytest

BUILDER_USER = os.environ.get("VMBUILD_BUILDER_USER", "vmbuild-builder")


def test_nginx_is_running_and_enabled(host):
    nginx = host.service("nginx")
    assert nginx.is_running
    assert nginx.is_enabled


def test_port_80_listens(host):
    assert host.socket("tcp://0.0.0.0:80").is_listening


def test_port_80_serves_the_page(host):
    # python3 is in every cloud image (cloud-init needs it); curl is not.
    fetch = "import urllib.request as u; print(u.urlopen('http://127.0.0.1/').read().decode())"
    body = host.check_output("python3 -c %s", fetch)
    assert "Built by vmbuild" in body


def test_builder_user_is_gone(host):
    assert not host.user(BUILDER_USER).exists
    assert not host.file(f"/home/{BUILDER_USER}").exists


def test_builder_key_is_gone(host):
    pubkey = os.environ.get("VMBUILD_BUILDER_PUBKEY")
    if not pubkey:
        pytest.skip("run outside vmbuild: builder key unknown")
    blob = pubkey.split()[1]
    with host.sudo():
        found = host.run("grep -rlF %s /root /home /etc/ssh 2>/dev/null", blob)
    assert found.stdout.strip() == ""


def test_machine_id_was_empty_in_the_image(host):
    # systemd fills an empty /etc/machine-id on first boot: this instance's
    # id is new, and differs from the builder's.
    machine_id = host.file("/etc/machine-id").content_string.strip()
    assert len(machine_id) == 32
    assert machine_id != os.environ.get("VMBUILD_BUILDER_MACHINE_ID")
    # systemd says so before journald runs, so the message is in the kernel log.
    with host.sudo():
        kernel_log = host.check_output("journalctl -b -k -o cat")
    # "from VM UUID" under hypervisors that give the VM a UUID (libvirt, EC2).
    assert (
        "Initializing machine ID from random generator" in kernel_log
        or "Initializing machine ID from VM UUID" in kernel_log
    )


def test_host_keys_are_this_instances_own(host):
    with host.sudo():
        keys = host.check_output("ls /etc/ssh/ | grep -c '^ssh_host_.*_key$' || true")
    assert int(keys) >= 1


def test_root_filesystem_was_grown_to_disk_size(host):
    # The recipe asks for a 4G disk on a 2G base: growpart + resize2fs did it.
    size = int(host.check_output("df --output=size -B1 / | tail -n 1"))
    assert size > 3.5 * 2**30
