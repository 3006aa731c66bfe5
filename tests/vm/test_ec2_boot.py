"""The `ec2` boot mode on real QEMU (TCG here): no NoCloud seed, the SSH key and
user-data from vmbuild's metadata service at 169.254.169.254, EC2's SMBIOS; and an
image whose cloud-init has only NoCloud enabled fails, saying why.

Both boot the shared offline Debian base (its cloud-init lists NoCloud, Ec2, None),
the image every build starts from; the libvirt build test boots its test VM in this
mode too, with the cloud-ready component's test phase.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from vmbuild.cache import aptproxy
from vmbuild.diskfs.rootfs import root_view
from vmbuild.errors import VMError
from vmbuild.hypervisor import accel, imds
from vmbuild.hypervisor.guest import GuestRequest, booted_guest
from vmbuild.hypervisor.imds import Ec2Settings, Request
from vmbuild.plan import TEST_USER
from vmbuild.remote.ssh import SSHSession
from vmbuild.stages import base_image

pytestmark = pytest.mark.vm

# The guest's python3 (cloud-init needs it; the base has no curl) as an IMDS client.
IMDS_GET = """python3 - <<'EOF'
import urllib.error, urllib.request
base = "http://169.254.169.254/latest"
def call(method, path, headers):
    req = urllib.request.Request(base + path, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""
print("v1 %s %s" % call("GET", "/meta-data/instance-id", {}))
status, token = call("PUT", "/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "60"})
print("token", status)
print("v2 %s %s" % call("GET", "/meta-data/instance-id", {"X-aws-ec2-metadata-token": token}))
EOF"""


def request(
    base: base_image.BaseImage | tuple[Path, str], work: Path, **kw: object
) -> GuestRequest:
    path, fmt = (base.path, base.format) if isinstance(base, base_image.BaseImage) else base
    settings: dict[str, object] = {
        "run_id": "ec2" + work.name[-6:].replace("_", ""), "role": "test", "base": path,
        "base_format": fmt, "disk_size": None, "memory_mib": 1024, "cpus": 2,
        "accel": accel.tcg("the VM tier runs on TCG"), "workdir": work, "user": TEST_USER,
        "first_boot": "full", "dispose": "kill", "ec2": Ec2Settings(http_tokens="required"),
    }  # fmt: skip
    settings.update(kw)
    return GuestRequest(**settings)  # type: ignore[arg-type]


def out(ssh: SSHSession, script: str, timeout: float = 600) -> str:
    result = ssh.run(script, timeout=timeout)
    assert result.exit_code == 0, (script, result.stdout, result.stderr)
    return result.stdout


def test_ec2_boot_gets_key_and_user_data_from_imds(
    debian_base: base_image.BaseImage,
    package_cache: aptproxy.AptProxy,
    tmp_path: Path,
    no_leftover_qemu: None,
) -> None:
    start = time.monotonic()
    req = request(debian_base, tmp_path / "vm", apt_proxy=package_cache.guest_url)
    with booted_guest(req) as guest:
        to_ssh = time.monotonic() - start
        assert guest.imds is not None and guest.spec.seed is None
        assert not list(req.workdir.glob("*.iso"))  # no NoCloud seed anywhere
        # The login key was only ever in IMDS, and the guest read it there.
        assert guest.imds.read_key()
        key_read = Request(
            "GET", "/2021-03-23/meta-data/public-keys/0/openssh-key", 200, "v2"
        )  # cloud-init 22.4.2 asks for the 2021-03-23 API
        assert key_read in guest.imds.requests

        status = out(guest.ssh, "cloud-init status --wait --long")
        assert "status: done" in status and "DataSourceEc2" in status, status
        assert out(guest.ssh, "cloud-id").strip() == "aws"
        ds_log = out(guest.ssh, "sudo cat /run/cloud-init/ds-identify.log")
        assert "Found single datasource: Ec2" in ds_log, ds_log
        assert f"DMI_CHASSIS_ASSET_TAG={guest.imds.instance.instance_id}" in ds_log
        # The user-data came from IMDS too: its locale and the package cache.
        assert out(guest.ssh, "hostname").strip() == "ip-169-254-0-15"
        proxy = out(guest.ssh, f"cat {aptproxy.GUEST_CONF}")
        assert f"http://{imds.GATEWAY}:{package_cache.port}" in proxy

        # IMDSv1 refused (tokens required); IMDSv2 answers with this instance's id.
        before = len(guest.imds.requests)
        lines = out(guest.ssh, IMDS_GET).splitlines()
        assert lines == ["v1 401 ", "token 200", f"v2 200 {guest.imds.instance.instance_id}"]
        assert guest.imds.requests[before:] == [
            Request("GET", "/latest/meta-data/instance-id", 401, "-"),
            Request("PUT", "/latest/api/token", 200, "v2"),
            Request("GET", "/latest/meta-data/instance-id", 200, "v2"),
        ]

        # apt reaches the package cache through this network's gateway.
        fetched = out(
            guest.ssh,
            "mirror=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list) && "
            '/usr/lib/apt/apt-helper download-file "$mirror/dists/bookworm/Release" /tmp/Release'
            " && head -c 200 /tmp/Release",
        )
        assert "Codename: bookworm" in fetched
    print(f"\nec2 boot: SSH after {to_ssh:.1f}s, test {time.monotonic() - start:.1f}s")


def nocloud_only_copy(base: base_image.BaseImage, dest: Path) -> Path:
    """The base as a raw disk whose cloud-init enables only NoCloud (a file written into
    its ext4 with debugfs, after the base's own 90_vmbuild.cfg, so it wins)."""
    raw = dest / "nocloud-only.raw"
    subprocess.run(
        ["qemu-img", "convert", "-O", "raw", str(base.path), str(raw)], check=True, timeout=300
    )
    cfg = dest / "99-nocloud-only.cfg"
    cfg.write_text("datasource_list: [ NoCloud ]\n")
    script = dest / "debugfs.cmds"
    script.write_text(f"cd /etc/cloud/cloud.cfg.d\nwrite {cfg} 99-nocloud-only.cfg\n")
    view = root_view(raw)
    subprocess.run(["debugfs", "-w", "-f", str(script), view.spec], check=True, timeout=120)
    written = root_view(raw).read("/etc/cloud/cloud.cfg.d/99-nocloud-only.cfg")
    assert written == b"datasource_list: [ NoCloud ]\n"
    return raw


def test_nocloud_only_image_fails_the_ec2_boot_clearly(
    debian_base: base_image.BaseImage, tmp_path: Path, no_leftover_qemu: None
) -> None:
    start = time.monotonic()
    raw = nocloud_only_copy(debian_base, tmp_path)
    req = request((raw, "raw"), tmp_path / "vm")
    with pytest.raises(VMError) as failed, booted_guest(req):
        pytest.fail("an image without the Ec2 datasource logged in")
    message = str(failed.value)
    assert "cloud-init did not find the Ec2 datasource" in message, message
    assert "never read its SSH key from the instance metadata" in message
    assert "datasource_list" in (failed.value.hint or "")
    assert failed.value.console_tail  # how far the boot got
    left = {p.name for p in (tmp_path / "vm").iterdir()}
    assert left <= {"test-console.log", f"vmbuild-{req.run_id}-test-qemu.log"}, left
    print(f"\nNoCloud-only image refused after {time.monotonic() - start:.1f}s")
