"""The SSH layer against a real guest (shared VM): streaming, root, timeouts,
file transfer, host-key pinning."""

from __future__ import annotations

import time

import pytest

from vmbuild.cache import aptproxy
from vmbuild.errors import SSHError
from vmbuild.hypervisor.guest import Guest
from vmbuild.remote.keys import generate_ed25519
from vmbuild.remote.ssh import SSHSession, StdinStalled, _send_within

pytestmark = pytest.mark.vm


def test_the_shared_guest_resumed_or_kept_the_booted_builder(
    guest_vm: Guest, guest_vm_status: list[str]
) -> None:
    """keep_boot: a booted builder was kept in this session (by a build) and
    came back, or none was and this VM was booted and kept as one."""
    resumed = "checkpoints: the booted builder is back, no boot" in guest_vm_status
    kept = any(s.startswith("checkpoint saved: booted builder (") for s in guest_vm_status)
    assert (resumed, kept) in ((True, False), (False, True)), guest_vm_status
    # Either way it runs on a disk layer above the kept one, its own to write.
    top = guest_vm.ssh.run("echo scratch > /var/tmp/scratch-write && cat /var/tmp/scratch-write")
    assert top.stdout == "scratch\n"


def test_commands_run_as_root_and_stream(guest_vm: Guest) -> None:
    lines: list[tuple[str, str]] = []
    result = guest_vm.ssh.run(
        "id -un; echo to-stderr >&2; echo $MYVAR; exit 7",
        on_output=lambda s, line: lines.append((s, line)),
        env={"MYVAR": "hello world"},
    )
    assert result.exit_code == 7
    assert result.stdout.splitlines() == ["root", "hello world"]
    assert ("stderr", "to-stderr") in lines and ("stdout", "root") in lines


def test_timeout_is_enforced_in_the_guest(guest_vm: Guest) -> None:
    result = guest_vm.ssh.run("sleep 300 & echo $! > /tmp/child; wait", timeout=3)
    assert result.timed_out and result.exit_code == 124
    assert result.duration < 30
    check = guest_vm.ssh.run("kill -0 $(cat /tmp/child) 2>/dev/null && echo alive || echo gone")
    assert check.stdout.strip() == "gone"  # the whole process group was killed


def test_put_and_get_as_root(guest_vm: Guest) -> None:
    guest_vm.ssh.put(b"\x00binary\xffdata", "/opt/vmbuild-test/deep/file.bin", mode=0o600)
    assert guest_vm.ssh.get("/opt/vmbuild-test/deep/file.bin") == b"\x00binary\xffdata"
    stat = guest_vm.ssh.run("stat -c '%U %a' /opt/vmbuild-test/deep/file.bin")
    assert stat.stdout.strip() == "root 600"
    with pytest.raises(SSHError, match="cannot read /nonexistent"):
        guest_vm.ssh.get("/nonexistent")


def test_put_streamed_writes_through_stdin_checked_by_sha256(guest_vm: Guest) -> None:
    data = bytes(range(256)) * 8192  # 2 MiB: two of the stdin chunks
    guest_vm.ssh.put_streamed(data, "/opt/vmbuild-test/streamed/layer.tar", mode=0o640)
    assert guest_vm.ssh.get("/opt/vmbuild-test/streamed/layer.tar") == data
    stat = guest_vm.ssh.run("stat -c '%U %a' /opt/vmbuild-test/streamed/layer.tar")
    assert stat.stdout.strip() == "root 640"


def test_a_guest_that_stops_reading_stdin_is_named_within_the_budget(guest_vm: Guest) -> None:
    """The budget is for the whole input, not for each blocked send: a guest command
    that never reads fails in the budget, and its channel is not left open."""
    transport = guest_vm.ssh._client.get_transport()
    assert transport is not None
    chan = transport.open_session()
    chan.exec_command("sleep 60")  # never reads its stdin
    start = time.monotonic()
    with pytest.raises(StdinStalled, match=r"the guest stopped reading after \d+ of 8388608 bytes"):
        _send_within(chan, b"x" * (8 << 20), budget=3)
    assert 3 <= time.monotonic() - start < 10
    chan.close()
    assert guest_vm.ssh.run("echo still here").stdout == "still here\n"


def test_the_host_key_is_pinned(guest_vm: Guest) -> None:
    impostor = generate_ed25519("not-the-guest")
    with pytest.raises(SSHError, match="unexpected SSH host key"):
        SSHSession.connect(
            "127.0.0.1", guest_vm.spec.ssh_port, guest_vm.user, guest_vm.client_key_path,
            host_key=impostor.public_openssh, timeout=30,
        )  # fmt: skip


def test_cloud_init_used_our_host_key_only(guest_vm: Guest) -> None:
    keys = guest_vm.ssh.run("ls /etc/ssh/ | grep '^ssh_host_.*key.pub$'").stdout.split()
    assert keys == ["ssh_host_ed25519_key.pub"]
    served = guest_vm.ssh.get("/etc/ssh/ssh_host_ed25519_key.pub").decode().split()[1]
    assert served == guest_vm.host_key.public_openssh.split()[1]


def test_cloud_init_accepted_the_seed_without_a_schema_warning(guest_vm: Guest) -> None:
    # 22.4 applies a config its schema rejects and only logs this line, so a
    # seed mistake would otherwise pass unseen (the empty ssh_genkeytypes did).
    found = guest_vm.ssh.run("grep -F 'Invalid cloud-config' /var/log/cloud-init.log")
    assert (found.exit_code, found.stdout) == (1, "")


def test_apt_goes_through_the_host_package_cache(
    guest_vm: Guest, package_cache: aptproxy.AptProxy
) -> None:
    conf = guest_vm.ssh.get(aptproxy.GUEST_CONF).decode()
    assert conf == aptproxy.guest_apt_conf(package_cache.guest_url, builder=True)
    assert package_cache.transfer_log is not None
    offset = package_cache.transfer_log.stat().st_size
    # apt's own HTTP method, so apt's proxy configuration is what is tested.
    url = "http://deb.debian.org/debian/dists/bookworm/Release"
    fetched = guest_vm.ssh.run(
        f"/usr/lib/apt/apt-helper download-file {url} /tmp/Release && head -1 /tmp/Release",
        timeout=120,
    )
    assert fetched.exit_code == 0, fetched.stderr
    assert fetched.stdout.splitlines()[-1] == "Origin: Debian"
    served = package_cache.transfer_log.read_bytes()[offset:].decode().splitlines()
    assert any(
        line.split("|")[1] == "O" and line.endswith("deb.debian.org/debian/dists/bookworm/Release")
        for line in served
    ), served
