"""testinfra checks run against the libvirt-built image's test VM."""


def test_the_stamp_survived_generalization(host):
    stamp = host.file("/etc/vmbuild-libvirt-stamp")
    assert stamp.exists and stamp.content_string.strip() == "built in a libvirt domain"


def test_sshd_runs(host):
    assert host.service("ssh").is_running


def test_booted_as_on_ec2(host):
    # The test VM had no NoCloud seed: cloud-init found its Ec2 datasource on
    # EC2's SMBIOS and read the instance metadata (IMDSv2) through vmbuild's service.
    assert host.run("cloud-id").stdout.strip() == "aws"
    # The recipe's instance type, as SMBIOS product name and in the metadata cloud-init read.
    assert host.file("/sys/class/dmi/id/product_name").content_string.strip() == "m5.large"
    data = host.run("cat /run/cloud-init/instance-data.json").stdout
    assert '"instance-type": "m5.large"' in data
