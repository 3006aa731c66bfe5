"""testinfra checks run against the libvirt-built image's test VM."""


def test_the_stamp_survived_generalization(host):
    stamp = host.file("/etc/vmbuild-libvirt-stamp")
    assert stamp.exists and stamp.content_string.strip() == "built in a libvirt domain"


def test_sshd_runs(host):
    assert host.service("ssh").is_running
