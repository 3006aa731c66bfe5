#!/bin/sh
# mmdebstrap hooks for vmbuild's offline Debian base image, run on the host:
#   sh debian-customize.sh essential|customize ROOTFS
# VMBUILD_ROOT_UUID is the UUID the ext4 filesystem will get (mke2fs -U), so
# fstab can name it before it exists. The hash of this file is part of the
# base cache key: editing it invalidates cached bases.
set -eu
phase="$1"
root="$2"
uuid="${VMBUILD_ROOT_UUID:?VMBUILD_ROOT_UUID is not set}"

if [ "$phase" = essential ]; then
    echo "UUID=$uuid / ext4 rw,errors=remount-ro 0 1" > "$root/etc/fstab"
    # mkinitramfs probes the root device for its type, which does not exist
    # yet: without this the initramfs has no fsck.ext4.
    mkdir -p "$root/etc/initramfs-tools/conf.d"
    echo FSTYPE=ext4 > "$root/etc/initramfs-tools/conf.d/vmbuild-fstype"
    exit 0
fi

# mmdebstrap copies the build host's name; cloud-init sets the instance's.
echo localhost > "$root/etc/hostname"

# Per-instance identity is created on first boot, never shipped.
rm -f "$root"/etc/ssh/ssh_host_*
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"

# No ifupdown in the image: networkd does DHCP. cloud-init writes its own
# 10-cloud-init-*.network files, which sort first; this only catches NICs
# it did not configure (or an image booted without cloud-init).
mkdir -p "$root/etc/systemd/network"
cat > "$root/etc/systemd/network/90-vmbuild-dhcp.network" <<'NETWORK'
[Match]
Name=en* eth*

[Network]
DHCP=yes
NETWORK
chroot "$root" systemctl enable systemd-networkd.service systemd-resolved.service

# Host keys normally come from cloud-init, which runs before ssh. When it is
# disabled (no datasource found) sshd would fail for want of a key: make one
# ed25519 key then (not `ssh-keygen -A`: RSA costs ~9 s under TCG). The list
# is reset because the unit's own `sshd -t` fails without any key.
mkdir -p "$root/etc/systemd/system/ssh.service.d"
cat > "$root/etc/systemd/system/ssh.service.d/vmbuild-hostkey.conf" <<'DROPIN'
[Service]
ExecStartPre=
ExecStartPre=/bin/sh -c 'ls /etc/ssh/ssh_host_*_key >/dev/null 2>&1 || exec ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key'
ExecStartPre=/usr/sbin/sshd -t
DROPIN

cat > "$root/etc/cloud/cloud.cfg.d/90_vmbuild.cfg" <<'CLOUDCFG'
# Written by vmbuild (base image stage).
# One image for local QEMU (NoCloud seed ISO) and EC2; keep this on one line,
# ds-identify does not read multi-line lists.
datasource_list: [ NoCloud, Ec2, None ]
# The default en_US.UTF-8 is not generated here, so update-locale would fail
# and cloud-init would report an error.
locale: C.UTF-8
# RSA-3072 host key generation takes ~9 s under TCG; ed25519/ecdsa are instant.
ssh_genkeytypes: [ ed25519, ecdsa ]
CLOUDCFG

# The build runs with INITRD=No, so the kernel's postinst skipped the
# initramfs and the later trigger found none to update: build it once, here,
# instead of twice (~7 s). Then point /initrd.img at it, which the kernel
# postinst could not do without one; grub.cfg boots /vmlinuz + /initrd.img.
unset INITRD  # linux-update-symlinks would skip /initrd.img too
for version in $(chroot "$root" linux-version list); do
    chroot "$root" update-initramfs -c -k "$version"
    chroot "$root" linux-update-symlinks install "$version" "/boot/vmlinuz-$version"
done
