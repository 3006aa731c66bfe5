"""testinfra checks, run against the test VM booted from the built image."""


def test_motd(host):
    assert host.file("/etc/motd").exists


def test_ssh_is_running(host):
    assert host.service("ssh").is_running
