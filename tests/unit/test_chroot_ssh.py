"""The testinfra backend for container recipes: every command runs in the image's root on
the builder, as root (chroot inside sudo), quoted once per shell."""

from __future__ import annotations

import shlex

import pytest
import testinfra.backend

from vmbuild.testing import chroot_ssh


def test_commands_run_in_the_chroot_inside_sudo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(chroot_ssh.ROOT_ENV, "/var/lib/vmbuild-oci/builds/ab/merged-test")
    monkeypatch.setitem(testinfra.backend.BACKENDS, chroot_ssh.NAME, "")
    chroot_ssh.pytest_configure(None)
    backend = testinfra.backend.get_backend(
        "vmbuild-chroot://vmbuild@127.0.0.1:2222?sudo=true", ssh_identity_file="/k"
    )
    assert isinstance(backend, chroot_ssh.ChrootOverSsh)
    command = backend.get_command("cat %s", "/etc/it's here")
    outer = shlex.split(command)
    assert outer[:3] == ["sudo", "/bin/sh", "-c"] and len(outer) == 4
    inner = shlex.split(outer[3])
    assert inner == [
        "chroot", "/var/lib/vmbuild-oci/builds/ab/merged-test", "/bin/sh", "-c",
        "cat '/etc/it'\"'\"'s here'",
    ]  # fmt: skip
    assert shlex.split(inner[4]) == ["cat", "/etc/it's here"]
