"""Generalize the builder's disk so every instance booted from it is new.

Runs in the builder VM, then powers it off from the same SSH session: once
the host keys are gone no new login would work. `verify()` then reads the
converted disk offline to prove the result instead of assuming it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from shlex import quote

from vmbuild.cache import aptproxy
from vmbuild.diskfs.rootfs import FilesystemView, exists, read_file, read_tree
from vmbuild.errors import GuestStopped, VmbuildError
from vmbuild.hypervisor.arch import SERIAL_CONSOLE, Arch
from vmbuild.hypervisor.base import Machine, read_tail
from vmbuild.hypervisor.guest import CLOUD_INIT, POWEROFF, Guest, wait_cloud_init
from vmbuild.stages.key import StageKey, stage_key

log = logging.getLogger("vmbuild.generalize")

OutputSink = Callable[[str], None]


FROZEN_MARKER = "vmbuild-generalize: filesystems frozen"


# Sets $session to the PID of the first sshd above the shell running it (named
# sshd-session since OpenSSH 9.8: the listener above it stays sshd), or to
# 1 (0 where the walk ends at a process without a parent): none found.
# Read from /proc/PID/stat ("PID (comm) S PPID ...") with shell builtins: a
# `ps` and a `cat` per level cost ~0.3 s under TCG, 2.2 s for a build's 7 levels.
FIND_SESSION = """\
session=$$
while [ "$session" -gt 1 ]; do
  stat=
  read -r stat 2>/dev/null </proc/"$session"/stat || true
  comm=${stat#*(}
  case "${comm%)*}" in sshd | sshd-session) break ;; esac
  set -- ${stat##*) }
  session=${2:-1}
done
"""


def generalize_script(builder_user: str, arch: Arch = "x86_64") -> str:
    """The guest-side script (pure: unit-tested). The marker goes to `arch`'s serial
    port (the console log the host reads): ttyS0 on a PC, ttyAMA0 on arm64's virt."""
    user = quote(builder_user)
    serial = f"/dev/{SERIAL_CONSOLE[arch]}"
    return f"""\
set -eu
export DEBIAN_FRONTEND=noninteractive
# Files holding secrets are overwritten before they are unlinked: cloud-init's
# copies of the seed (user-data carries the guest's host private key), the
# host keys, the builder's authorized key. The host zeroes the free space of
# ext file systems afterwards as well; this also covers any other file system.
# (cloud-init clean deletes all of /var/lib/cloud anyway.)
find /var/lib/cloud -xdev -type f -exec shred -n 1 -z -u -- {{}} + 2>/dev/null || true
# cloud-init runs again on first boot as a new instance. It runs beside the
# steps below (its Python start-up alone is ~6 s under TCG, the longest step
# here); they touch nothing it removes, and the logs are emptied only once it
# is done.
cloud-init clean --logs --seed &
clean=$!
for f in /etc/ssh/ssh_host_* /home/{user}/.ssh/authorized_keys /root/.ssh/authorized_keys; do
  if [ -f "$f" ] && [ ! -L "$f" ]; then shred -n 1 -z -u -- "$f" || rm -f -- "$f"; fi
done
# Empty, not absent: systemd then treats the next boot as a first boot and
# generates a fresh machine-id (an absent file would break read-only roots).
truncate -s 0 /etc/machine-id
if [ -f /var/lib/dbus/machine-id ] && [ ! -L /var/lib/dbus/machine-id ]; then
  rm -f /var/lib/dbus/machine-id
fi
rm -f /var/lib/systemd/random-seed
rm -f /etc/ssh/ssh_host_*
# cloud-init renders network config matching this VM's MAC; the next instance
# gets its own, and the base's fallback DHCP covers the first NIC meanwhile.
rm -f /etc/systemd/network/10-cloud-init-*.network /etc/netplan/50-cloud-init.yaml
# The build's apt settings (package cache, no translations) are not the image's.
rm -f {quote(aptproxy.GUEST_CONF)}
if command -v apt-get >/dev/null; then
  apt-get clean
  rm -rf /var/lib/apt/lists/*
  mkdir -p /var/lib/apt/lists/partial
fi
if command -v dnf >/dev/null; then dnf clean all || true; fi
wait "$clean"
rm -rf /var/log/journal/*
find /var/log -type f \\( -name '*.gz' -o -name '*.[0-9]' -o -name '*.old' \\) -delete
find /var/log -type f -exec truncate -s 0 {{}} +
rm -rf /var/tmp/* /root/.bash_history /root/.ssh/authorized_keys
# The builder's user goes last, from outside this SSH session (which runs as
# that user): a transient unit kills its processes, deletes it, trims the
# disk so the image stays small, and stops the VM. It waits for this
# session's sshd alone (the first above this script): a builder resumed from
# a checkpoint still holds the saved build's sessions, whose host side is
# gone, and waiting for every sshd of the user sat out the whole bound
# (~100 s under TCG).
{FIND_SESSION}cat > /run/vmbuild-finish.sh <<'FINISH'
set -u
session=${{1:-1}}
# The host closes its SSH session as soon as this script returns: wait for
# that (bounded) instead of a fixed sleep, then kill whatever is left.
for _ in $(seq 300); do
  if [ "$session" -gt 1 ]; then
    kill -0 "$session" 2>/dev/null || break
  else
    pgrep -u {user} -x sshd >/dev/null || break
  fi
  sleep 0.1
done
pkill -KILL -u {user} || true
userdel --force --remove {user} || true
rm -f /etc/sudoers.d/90-cloud-init-users
find /tmp -mindepth 1 -delete || true
fstrim -av || true
sync
# Freezing a filesystem flushes it and checkpoints its journal: the disk is
# then clean and final as it stands, and the host stops the VM on the marker
# instead of waiting for a whole poweroff. Root last: it holds the others.
frozen=1
for mnt in $(findmnt -rn -o TARGET -t ext2,ext3,ext4,xfs | sort -r); do
  fsfreeze -f "$mnt" || frozen=0
done
if [ "$frozen" = 1 ]; then
  echo '{FROZEN_MARKER}' > {serial}
else
  systemctl poweroff
fi
FINISH
systemd-run --no-block --unit=vmbuild-finish --collect bash /run/vmbuild-finish.sh "$session"
echo "generalize: finishing and powering off"
"""


def key(disk: StageKey, builder_user: str, arch: Arch = "x86_64") -> StageKey:
    """The generalized disk: the disk before it and the script that ran."""
    return stage_key("generalize", disk=disk.digest, script=generalize_script(builder_user, arch))


def generalize(guest: Guest, on_output: OutputSink | None = None) -> None:
    """Generalize and stop the VM; escalate (QMP powerdown, then kill) if it hangs."""
    # The builder's cloud-init (init stage only) is long done; `cloud-init
    # clean` must not race it, and a failed one fails the build here.
    wait_cloud_init(guest.ssh, guest.spec.accel.timeout(CLOUD_INIT), guest.machine)
    try:
        result = guest.ssh.run(
            generalize_script(guest.user, guest.spec.arch),
            timeout=guest.spec.accel.timeout(120),
            on_output=(lambda _s, line: on_output(line)) if on_output else None,
        )
    except GuestStopped as exc:
        # The finishing unit stops the guest once this session is gone; on a
        # loaded host that can beat the exit status home. The offline verify
        # proves (or refutes) the result either way.
        if exc.cause != "guest powered off":
            raise
        log.warning("the builder powered off before generalize reported back")
        guest.ssh.close()
        return
    if result.exit_code != 0:
        tail = (result.stderr or result.stdout)[-2000:]
        raise VmbuildError(f"generalize failed (exit {result.exit_code}):\n{tail}")
    guest.ssh.close()
    timeout = guest.spec.accel.timeout(POWEROFF * 4)
    if wait_for_console(guest.machine, FROZEN_MARKER, timeout):
        # Every filesystem is frozen (flushed, journal checkpointed): the disk
        # is final, and nothing the guest would do next matters.
        guest.machine.kill()
    elif guest.machine.is_running():
        log.warning("the builder did not finish within %.0fs; forcing it", timeout)
        guest.machine.shutdown(timeout=guest.spec.accel.timeout(POWEROFF))


def wait_for_console(machine: Machine, marker: str, timeout: float) -> bool:
    """True once `marker` shows on the serial console; False if the VM stopped
    first (the poweroff fallback) or the time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker in read_tail(machine.spec.console_log, 20):
            return True
        if not machine.is_running():
            return marker in read_tail(machine.spec.console_log, 20)
        time.sleep(0.1)
    return False


@dataclass(frozen=True)
class Finding:
    path: str
    problem: str


def verify(fs: FilesystemView, builder_user: str, builder_pubkey: str) -> list[Finding]:
    """Read the generalized root filesystem offline; return what is left behind."""
    found: list[Finding] = []

    def text(path: str) -> str:
        data = read_file(fs, path)
        return "" if data is None else data.decode("utf-8", "replace")

    machine_id = read_file(fs, "/etc/machine-id")
    if machine_id is None:
        found.append(Finding("/etc/machine-id", "missing (should exist and be empty)"))
    elif machine_id.strip():
        found.append(Finding("/etc/machine-id", "not empty"))
    keys = [n for n in (fs.listdir("/etc/ssh") or {}) if n.startswith("ssh_host_")]
    if keys:
        found.append(Finding("/etc/ssh", f"host keys left: {', '.join(sorted(keys))}"))
    if any(line.split(":", 1)[0] == builder_user for line in text("/etc/passwd").splitlines()):
        found.append(Finding("/etc/passwd", f"builder user {builder_user!r} still exists"))
    if exists(fs, f"/home/{builder_user}"):
        found.append(Finding(f"/home/{builder_user}", "builder home directory left"))
    key_blob = builder_pubkey.split()[1]
    homes = [f"/home/{h}" for h in (fs.listdir("/home") or {})] + ["/root"]
    for home in homes:
        if key_blob in text(f"{home}/.ssh/authorized_keys"):
            found.append(Finding(f"{home}/.ssh/authorized_keys", "builder key left"))
    if exists(fs, "/var/lib/cloud/instance"):
        found.append(Finding("/var/lib/cloud/instance", "cloud-init state not cleaned"))
    if exists(fs, aptproxy.GUEST_CONF):
        found.append(Finding(aptproxy.GUEST_CONF, "the build's apt settings left"))
    # The host package cache as the builder reached it, wherever a component may
    # have written it (apt's own configuration, sources rewritten to go through
    # it, the environment): an instance cannot reach it, so apt would fail there.
    cache_url = f"//{aptproxy.GUEST_GATEWAY}:"
    read = read_tree(fs, "/etc/apt")
    read["/etc/environment"] = read_file(fs, "/etc/environment") or b""
    for path, data in sorted(read.items()):
        if path != aptproxy.GUEST_CONF and cache_url.encode() in data:
            found.append(Finding(path, f"the build's package cache (http:{cache_url}...) left"))
    lists = [n for n in (fs.listdir("/var/lib/apt/lists") or {}) if n.endswith("_Packages")]
    if lists:
        found.append(Finding("/var/lib/apt/lists", f"{len(lists)} package lists left"))
    return found
