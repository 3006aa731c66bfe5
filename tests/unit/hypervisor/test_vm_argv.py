"""The exact argv vmbuild builds for QEMU and qemu-img, and the NoCloud seed."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from vmbuild.hypervisor import qemu
from vmbuild.hypervisor.accel import Accel, tcg
from vmbuild.hypervisor.base import VMSpec
from vmbuild.hypervisor.guest import overlay_argv
from vmbuild.hypervisor.qemu import qemu_argv
from vmbuild.hypervisor.seed import SeedConfig, meta_data, user_data
from vmbuild.remote.keys import generate_ed25519
from vmbuild.stages.convert import convert_argv, output_name


def spec(accel: Accel) -> VMSpec:
    w = Path("/w")
    return VMSpec(
        name="vmbuild-abc123-builder", disk=w / "builder.qcow2", seed=w / "seed.iso",
        memory_mib=2048, cpus=2, accel=accel, ssh_port=40022,
        console_log=w / "console.log", workdir=w,
    )  # fmt: skip


def test_qemu_argv_tcg_is_exact() -> None:
    assert qemu_argv(spec(tcg("test"))) == [
        "qemu-system-x86_64", "-name", "vmbuild-abc123-builder",
        "-machine", "pc", "-accel", "tcg,thread=multi", "-cpu", "qemu64", "-smp", "2",
        "-m", "2048", "-nodefaults", "-display", "none",
        "-drive",
        "file=/w/builder.qcow2,format=qcow2,if=virtio,id=disk0,discard=unmap,detect-zeroes=unmap",
        "-drive", "file=/w/seed.iso,format=raw,if=virtio,readonly=on",
        "-netdev", "user,id=net0,hostfwd=tcp:127.0.0.1:40022-:22",
        "-device", "virtio-net-pci,netdev=net0",
        "-device", "virtio-rng-pci", "-device", "vmgenid",
        "-chardev", "file,id=serial0,path=/w/console.log", "-serial", "chardev:serial0",
        "-qmp", f"unix:{tempfile.gettempdir()}/vmbuild-abc123-builder.qmp,server=on,wait=off",
    ]  # fmt: skip


def test_a_restored_vm_waits_for_its_state() -> None:
    argv = qemu_argv(replace(spec(tcg("test")), restore_from=Path("/c/vmstate.zst")))
    assert argv[-2:] == ["-incoming", "defer"]
    assert "/c/vmstate.zst" not in " ".join(argv)  # it comes over QMP, not the command line


def test_a_state_signature_ignores_names_paths_and_ports(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(qemu, "qemu_version", lambda _binary: "QEMU emulator version 7.2.22")
    one = spec(tcg("test"))
    other = replace(
        one, name="vmbuild-def456-builder", disk=Path("/x/builder-2.qcow2"),
        seed=Path("/x/seed.iso"), ssh_port=50022, console_log=Path("/x/c.log"),
        workdir=Path("/x"), restore_from=Path("/c/vmstate.zst"),
    )  # fmt: skip
    assert qemu.state_signature(one) == qemu.state_signature(other)
    for changed in (replace(one, memory_mib=4096), replace(one, cpus=1),
                    replace(one, accel=Accel("kvm", "probed", 1.0)), replace(one, seed=None),
                    replace(one, firmware="uefi", uefi_vars=Path("/w/v.fd"))):  # fmt: skip
        assert qemu.state_signature(changed) != qemu.state_signature(one)
    before = qemu.state_signature(one)
    monkeypatch.setattr(qemu, "qemu_version", lambda _binary: "QEMU emulator version 8.2.2")
    assert qemu.state_signature(one) != before


def test_a_state_signature_covers_the_firmware_and_a_kvm_hosts_cpu(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """What the argv only names: a SeaBIOS update at the same path, another host
    CPU behind `-cpu host`."""
    monkeypatch.setattr(qemu, "qemu_version", lambda _binary: "QEMU emulator version 7.2.22")
    old, new = tmp_path / "old-bios.bin", tmp_path / "new-bios.bin"
    old.write_bytes(b"seabios 1.16")
    new.write_bytes(b"seabios 1.17")
    one = spec(tcg("test"))
    monkeypatch.setattr(qemu, "SEABIOS", old)
    before = qemu.state_signature(one)
    monkeypatch.setattr(qemu, "SEABIOS", new)
    assert qemu.state_signature(one) != before
    kvm = replace(one, accel=Accel("kvm", "probed", 1.0))
    monkeypatch.setattr(qemu, "_host_cpu", lambda: "AMD EPYC 7R13; flags: avx2")
    on_amd = qemu.state_signature(kvm)
    monkeypatch.setattr(qemu, "_host_cpu", lambda: "Intel Xeon 8375C; flags: avx512f")
    assert qemu.state_signature(kvm) != on_amd


def test_qemu_argv_kvm_uses_host_cpu() -> None:
    argv = qemu_argv(spec(Accel("kvm", "probed", 1.0)))
    assert argv[3:11] == ["-machine", "pc", "-accel", "kvm", "-cpu", "host", "-smp", "2"]


def test_ssh_forward_only_on_loopback() -> None:
    argv = qemu_argv(spec(tcg("t")))
    netdev = argv[argv.index("-netdev") + 1]
    assert "hostfwd=tcp:127.0.0.1:" in netdev
    assert "0.0.0.0" not in " ".join(argv)


def test_timeouts_scale_with_accelerator() -> None:
    assert tcg("x").timeout(45) == 450
    assert Accel("kvm", "x", 1.0).timeout(45) == 45


def test_overlay_argv_never_writes_the_base() -> None:
    assert overlay_argv(Path("/c/base.qcow2"), "qcow2", Path("/w/o.qcow2"), 4 << 30) == [
        "create", "-q", "-f", "qcow2", "-b", "/c/base.qcow2", "-F", "qcow2", "/w/o.qcow2",
        str(4 << 30),
    ]  # fmt: skip


def test_convert_argv_per_format() -> None:
    src, dst = Path("/a/final.qcow2"), Path("/b/out")
    assert convert_argv(src, "qcow2", dst, "vmdk") == [
        "convert", "-p", "-f", "qcow2", "-O", "vmdk", "-o", "subformat=streamOptimized", "/a/final.qcow2", "/b/out",
    ]  # fmt: skip
    assert convert_argv(src, "qcow2", dst, "vhd")[5:8] == [
        "vpc",
        "-o",
        "subformat=dynamic,force_size=on",
    ]
    assert convert_argv(src, "qcow2", dst, "raw") == [
        "convert",
        "-p",
        "-f",
        "qcow2",
        "-O",
        "raw",
        "/a/final.qcow2",
        "/b/out",
    ]
    assert [output_name(f) for f in ("qcow2", "raw", "vmdk", "vhd")] == [
        "disk.qcow2",
        "disk.raw",
        "disk.vmdk",
        "disk.vhd",
    ]


def test_seed_pins_generated_host_key_and_user() -> None:
    client, host = generate_ed25519("client"), generate_ed25519("host")
    cfg = SeedConfig("i-1", "vm1", "vmbuild-builder", client, host)
    text = user_data(cfg)
    assert text.startswith("#cloud-config\n")
    doc = yaml.safe_load(text)
    assert doc["users"][0]["name"] == "vmbuild-builder"
    assert doc["users"][0]["ssh_authorized_keys"] == [client.public_openssh]
    assert doc["ssh_keys"]["ed25519_public"] == host.public_openssh
    assert doc["ssh_keys"]["ed25519_private"].startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    # With ssh_keys given cloud-init generates no other (unpinned, slow) key;
    # an empty ssh_genkeytypes is a schema error it would warn about.
    assert "ssh_genkeytypes" not in doc
    # Any ssh_pwauth value makes cloud-init restart sshd mid-login.
    assert "ssh_pwauth" not in doc
    assert "write_files" not in doc  # no package cache asked for
    assert "cloud_config_modules" not in doc  # a full first boot unless asked
    assert yaml.safe_load(meta_data(cfg)) == {"instance-id": "i-1", "local-hostname": "vm1"}


def test_key_fingerprint_format() -> None:
    key = generate_ed25519("x")
    assert key.public_openssh.startswith("ssh-ed25519 ")
    assert key.fingerprint.startswith("SHA256:") and len(key.fingerprint) == 50


def test_pinned_base_survives_the_cache_replacing_it(tmp_path: Path) -> None:
    from vmbuild.hypervisor.guest import pin_base

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "disk.qcow2").write_bytes(b"old base")
    pinned = pin_base(cache / "disk.qcow2", tmp_path / "builder-base.qcow2")
    # The cache installs a rebuilt base by rename: a new inode under the old name.
    (cache / "new.qcow2").write_bytes(b"new base")
    (cache / "new.qcow2").replace(cache / "disk.qcow2")
    assert pinned.read_bytes() == b"old base"


def test_seed_points_apt_at_the_host_package_cache() -> None:
    client, host = generate_ed25519("client"), generate_ed25519("host")
    cfg = SeedConfig("i-1", "vm1", "u", client, host, apt_proxy="http://10.0.2.2:31000")
    doc = yaml.safe_load(user_data(cfg))
    assert doc["write_files"] == [
        {
            "path": "/etc/apt/apt.conf.d/00vmbuild-build",
            "permissions": "0644",
            "content": "// Written by vmbuild for the build only; removed when the image is "
            'generalized.\nAcquire::http::Proxy "http://10.0.2.2:31000";\n',
        }
    ]


def test_offline_rebuild_guest_reaches_only_the_bundle_mirror() -> None:
    # restrict=on: nothing leaves the user network except the SSH forward in and the
    # one guest forward to the bundle's mirror on the host's loopback.
    argv = qemu_argv(replace(spec(tcg("t")), offline_mirror_port=41234))
    assert argv[argv.index("-netdev") + 1] == (
        "user,id=net0,hostfwd=tcp:127.0.0.1:40022-:22,restrict=on,"
        "guestfwd=tcp:10.0.2.100:80-tcp:127.0.0.1:41234"
    )
    client, host = generate_ed25519("client"), generate_ed25519("host")
    cfg = SeedConfig(
        "i-1", "vm1", "u", client, host, apt_proxy="http://10.0.2.100:80", apt_offline=True
    )
    content = yaml.safe_load(user_data(cfg))["write_files"][0]["content"]
    # One queue, no pipelining: QEMU carries every guest connection over one stream.
    assert content.splitlines()[1:] == [
        'Acquire::http::Proxy "http://10.0.2.100:80";',
        'Acquire::Queue-Mode "access";',
        'Acquire::http::Pipeline-Depth "0";',
        'Acquire::PDiffs "false";',
        'Acquire::Languages "none";',
    ]


def test_a_builder_seed_skips_apt_translations_and_a_plain_one_writes_no_apt_file() -> None:
    client, host = generate_ed25519("client"), generate_ed25519("host")
    builder = SeedConfig("i-1", "vm1", "u", client, host, builder_apt=True)
    (written,) = yaml.safe_load(user_data(builder))["write_files"]
    assert written["content"].splitlines()[1:] == ['Acquire::Languages "none";']
    both = SeedConfig(
        "i-1", "vm1", "u", client, host, apt_proxy="http://10.0.2.2:1", builder_apt=True
    )
    (written,) = yaml.safe_load(user_data(both))["write_files"]
    assert written["content"].splitlines()[1:] == [
        'Acquire::http::Proxy "http://10.0.2.2:1";',
        'Acquire::Languages "none";',
    ]
    assert "write_files" not in yaml.safe_load(
        user_data(SeedConfig("i-1", "vm1", "u", client, host))
    )


def test_minimal_seed_runs_only_the_init_stage() -> None:
    client, host = generate_ed25519("client"), generate_ed25519("host")
    cfg = SeedConfig("i-1", "vm1", "u", client, host, minimal_cloud_init=True)
    doc = yaml.safe_load(user_data(cfg))
    assert doc["cloud_config_modules"] == [] and doc["cloud_final_modules"] == []
    assert doc["users"][0]["ssh_authorized_keys"] == [client.public_openssh]


def ec2_spec() -> VMSpec:

    from vmbuild.hypervisor.base import Ec2Boot

    boot = Ec2Boot(
        imds_port=41000, mac="0e:01:02:03:04:05", uuid="ec2a1b2c-0000-4000-8000-000000000001",
        instance_id="i-0123456789abcdef0", instance_type="t3.micro",
    )  # fmt: skip
    return replace(spec(tcg("test")), seed=None, ec2=boot)


def test_ec2_boot_argv_has_no_seed_and_ec2_network_and_smbios() -> None:
    argv = qemu_argv(ec2_spec())
    assert "file=/w/seed.iso,format=raw,if=virtio,readonly=on" not in argv
    assert [a for a in argv if a.startswith("file=")] == [
        "file=/w/builder.qcow2,format=qcow2,if=virtio,id=disk0,discard=unmap,detect-zeroes=unmap"
    ]
    at = argv.index("-netdev")
    assert argv[at : at + 4] == [
        "-netdev",
        "user,id=net0,hostfwd=tcp:127.0.0.1:40022-:22,net=169.254.0.0/16,host=169.254.0.2,"
        "dns=169.254.169.253,dhcpstart=169.254.0.15,ipv6=off,"
        "guestfwd=tcp:169.254.169.254:80-tcp:127.0.0.1:41000",
        "-device", "virtio-net-pci,netdev=net0,mac=0e:01:02:03:04:05",
    ]  # fmt: skip
    smbios = [argv[i + 1] for i, a in enumerate(argv) if a == "-smbios"]
    assert smbios == [
        "type=1,manufacturer=Amazon EC2,product=t3.micro,"
        "serial=ec2a1b2c-0000-4000-8000-000000000001,uuid=ec2a1b2c-0000-4000-8000-000000000001",
        "type=3,manufacturer=Amazon EC2,asset=i-0123456789abcdef0",
    ]


def test_nocloud_boot_has_no_smbios_and_the_default_network() -> None:
    argv = qemu_argv(spec(tcg("test")))
    assert "-smbios" not in argv and "guestfwd" not in " ".join(argv)


def test_ec2_user_data_makes_the_user_the_default_one_without_a_key() -> None:
    cfg = SeedConfig(
        instance_id="i-1", hostname="h", user="vmbuild-test", client_key=generate_ed25519("c"),
        host_key=generate_ed25519("h"), key_from_metadata=True,
    )  # fmt: skip
    doc = yaml.safe_load(user_data(cfg))
    assert "users" not in doc
    assert doc["system_info"] == {
        "default_user": {
            "name": "vmbuild-test", "gecos": "vmbuild", "sudo": "ALL=(ALL) NOPASSWD:ALL",
            "shell": "/bin/bash", "lock_passwd": True,
        }
    }  # fmt: skip
    assert cfg.client_key.public_openssh not in user_data(cfg)
    assert doc["ssh_keys"]["ed25519_public"] == cfg.host_key.public_openssh
