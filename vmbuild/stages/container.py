"""Container builds in the builder VM: components run in the image's root
filesystem under `chroot`, one overlayfs upper directory per layer.

Why the builder VM and chroot (measured, see the closing note of issue 18): the
host has neither a container daemon nor, in general, root, and the AWSTOE steps
need root inside the image (apt, chown, services' users). The builder VM is
already how vmbuild runs components as root without touching the host, it
boots from the cached Debian base, and it has overlayfs and `chroot`:

- each of the parent's layers is unpacked once per builder (and layer digest)
  into a directory that is only ever an overlay's lower layer, its OCI whiteouts
  made overlayfs whiteouts, so the kernel stacks the parent as it stacks the
  components' layers;
- each component runs with the root at an overlay of `lower` and the layers
  before it, writing into its own upper directory: that upper directory *is*
  the component's layer (overlayfs whiteouts and opaque directories become OCI
  `.wh.` entries in the tar, written by a short Python script in the guest);
- `layers: squash` uses one upper directory for all components;
- test phases run on an overlay of every layer with a throwaway upper
  directory: nothing a test writes reaches the image.

`systemd-nspawn` was the alternative: it is not in the base image (another
package to install in every builder) and gives isolation a build step does not
need; `chroot` with /proc, /sys and /dev mounted is what Debian's own image
builders (mmdebstrap hooks, debootstrap) use.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmbuild import toe
from vmbuild.errors import VmbuildError
from vmbuild.remote.base import OutputCallback, Remote, RemoteResult
from vmbuild.remote.ssh import SSHSession
from vmbuild.stages import components

log = logging.getLogger("vmbuild.stages.container")

GUEST_DIR = "/var/lib/vmbuild-oci"
TIMEOUT = 600.0

# Runs in the guest (python3 is there for cloud-init): an overlayfs upper
# directory -> an OCI layer tar. Whiteouts (0:0 character devices) become
# `.wh.NAME`, opaque directories get `.wh..wh..opq`; owners stay numeric (the
# guest's user names are not the image's).
MKLAYER = r"""
import os, stat, sys, tarfile
upper, out = sys.argv[1], sys.argv[2]

def opaque(path):
    try:
        return os.getxattr(path, "trusted.overlay.opaque", follow_symlinks=False) == b"y"
    except OSError:
        return False

def numeric(info):
    info.uname = info.gname = ""
    return info

def marker(tar, name):
    tar.addfile(tarfile.TarInfo(name))

with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
    for dirpath, dirnames, filenames in os.walk(upper):
        rel = os.path.relpath(dirpath, upper)
        prefix = "" if rel == "." else rel + "/"
        if rel != ".":
            tar.add(dirpath, arcname=rel, recursive=False, filter=numeric)
            if opaque(dirpath):
                marker(tar, prefix + ".wh..wh..opq")
        for name in sorted(dirnames):
            if os.path.islink(os.path.join(dirpath, name)):
                filenames.append(name)
        dirnames[:] = sorted(d for d in dirnames if not os.path.islink(os.path.join(dirpath, d)))
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                marker(tar, prefix + ".wh." + name)
            else:
                tar.add(path, arcname=prefix + name, recursive=False, filter=numeric)
"""

# Runs in the guest on one unpacked parent layer, reading the `.wh.*` paths `find -print0`
# gives: OCI whiteouts -> overlayfs whiteouts, honoured when the layer is a lower dir.
# `.wh..wh..opq` marks its directory opaque (lower layers' entries hidden, this layer's
# kept); any other `.wh..wh.*` is aufs metadata older Docker Hub images carry
# (`.wh..wh.plnk/`, `.wh..wh.orph/`, `.wh..wh.aufs`): removed, hiding nothing, as
# containerd and moby do. Then `.wh.NAME` becomes a 0:0 character device NAME, unless
# this layer has NAME itself (a whiteout only hides lower layers' files). Metadata is
# handled first: find lists a metadata directory before its contents, which go with it.
WHITEOUTS = r"""
import os, shutil, stat, sys
paths = [p for p in sys.stdin.buffer.read().split(b"\0") if p]
for path in paths:
    parent, name = os.path.split(path)
    if not os.path.lexists(path):
        continue  # inside a metadata directory removed above
    if name == b".wh..wh..opq":
        os.unlink(path)
        os.setxattr(parent, "trusted.overlay.opaque", b"y", follow_symlinks=False)
    elif name.startswith(b".wh..wh."):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
for path in paths:
    parent, name = os.path.split(path)
    if name.startswith(b".wh..wh.") or not os.path.lexists(path):
        continue  # metadata, or inside a metadata directory removed above
    os.unlink(path)
    if not os.path.lexists(os.path.join(parent, name[4:])):
        os.mknod(os.path.join(parent, name[4:]), stat.S_IFCHR, os.makedev(0, 0))
"""


@dataclass(frozen=True)
class Chroot:
    """A Remote whose commands and files are inside `root` on the guest."""

    remote: Remote
    root: str

    def run(
        self,
        script: str,
        *,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
        env: dict[str, str] | None = None,
    ) -> RemoteResult:
        # The environment the outer shell sets is inherited through chroot.
        wrapped = f"exec chroot {shlex.quote(self.root)} /bin/bash -c {shlex.quote(script)}"
        return self.remote.run(wrapped, timeout=timeout, on_output=on_output, env=env)

    def put(self, data: bytes, path: str, *, mode: int = 0o644) -> None:
        self.remote.put(data, self._path(path), mode=mode)

    def get(self, path: str) -> bytes:
        return self.remote.get(self._path(path))

    def reboot(self) -> None:
        raise VmbuildError("a container build cannot reboot (a Reboot step or exit code 194)")

    def _path(self, path: str) -> str:
        if not path.startswith("/"):
            raise VmbuildError(f"a relative path {path!r} in a chroot")
        return self.root.rstrip("/") + path


def _check(result: RemoteResult, doing: str) -> str:
    if result.exit_code != 0:
        tail = (result.stderr or result.stdout).strip()[-2000:]
        raise VmbuildError(f"{doing} failed in the builder VM (exit {result.exit_code}): {tail}")
    return result.stdout


@dataclass(frozen=True)
class Workspace:
    """The guest directory of one container build, over an unpacked parent."""

    remote: Remote
    path: str
    lowers: tuple[str, ...]  # the parent's layers, topmost first: read-only, shared by builds

    def upper(self, name: str) -> str:
        return f"{self.path}/layers/{name}"

    def run(self, script: str, doing: str, timeout: float = TIMEOUT) -> str:
        return _check(self.remote.run(script, timeout=timeout), doing)


def unpack_layers(remote: Remote, layers: Sequence[tuple[str, Callable[[], bytes]]]) -> list[str]:
    """The parent's layers (digest, bytes), bottom first, each unpacked once per digest
    into its own guest directory; returned topmost first, as overlayfs stacks them.

    Each is unpacked by GNU tar (plain or gzip), then its OCI whiteouts become
    overlayfs ones (WHITEOUTS): the kernel applies them when the directories are
    stacked as lower layers, as containerd's overlay snapshotter does. A builder
    that builds again from a parent with the same layers (a pipeline's next run,
    the suite's shared guest, a parent made on the Debian rootfs) skips their
    upload and unpacking. A layer goes up through one command's stdin: SFTP took
    100 s for the 63 MB rootfs layer under TCG. Only ever an overlay's lower
    directory, so never written."""
    q = shlex.quote
    dirs = []
    for digest, read_layer in layers:
        lower = f"{GUEST_DIR}/parents/{digest.replace(':', '-')}"
        dirs.append(lower)
        if remote.run(f"test -e {q(lower)}/.vmbuild-complete", timeout=60).exit_code == 0:
            continue
        staged = f"{lower}.{uuid.uuid4().hex[:8]}"
        if isinstance(remote, SSHSession):
            remote.put_streamed(read_layer(), f"{staged}.layer")
        else:
            remote.put(read_layer(), f"{staged}.layer", mode=0o600)
        remote.put(WHITEOUTS.encode(), f"{staged}.whiteouts.py", mode=0o600)
        _check(
            remote.run(
                f"set -e; rm -rf {q(lower)}; mkdir -p {q(staged)}\n"
                f"tar -xpf {q(staged)}.layer --numeric-owner -C {q(staged)}\n"
                f"find {q(staged)} -name '.wh.*' -print0 | python3 {q(staged)}.whiteouts.py\n"
                f"rm -f {q(staged)}.layer {q(staged)}.whiteouts.py\n"
                f"touch {q(staged)}/.vmbuild-complete; mv -T {q(staged)} {q(lower)}",
                timeout=TIMEOUT,
            ),
            f"unpacking parent layer {digest}",
        )
    return list(reversed(dirs))


@contextlib.contextmanager
def workspace(remote: Remote, lowers: Sequence[str]) -> Iterator[Workspace]:
    """A fresh guest directory for one build's layers; removed after."""
    ws = Workspace(remote, f"{GUEST_DIR}/builds/{uuid.uuid4().hex[:12]}", tuple(lowers))
    q = shlex.quote
    try:
        remote.put(MKLAYER.encode(), f"{ws.path}/mklayer.py", mode=0o600)
        ws.run("modprobe overlay 2>/dev/null || true", "loading overlayfs")
        yield ws
    finally:
        # Unmounts first: a mount left below the workspace would survive rm -rf.
        with contextlib.suppress(Exception):
            remote.run(
                f"grep -o ' {q(ws.path)}/[^ ]*' /proc/self/mounts | sort -r | "
                f"xargs -r -n1 umount -l; rm -rf --one-file-system {q(ws.path)}",
                timeout=TIMEOUT,
            )


@contextlib.contextmanager
def mounted(ws: Workspace, lowers: Sequence[str], upper: str) -> Iterator[str]:
    """The image root: `upper` over `lowers` (topmost first), with /proc, /sys, /dev."""
    q = shlex.quote
    name = upper.rsplit("/", 1)[1]
    merged, work = f"{ws.path}/merged-{name}", f"{ws.path}/work-{name}"
    options = f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work}"
    ws.run(
        f"set -e; mkdir -p {q(upper)} {q(work)} {q(merged)}\n"
        f"mount -t overlay overlay -o {q(options)} {q(merged)}\n"
        f"mount -t proc proc {q(merged)}/proc\nmount -t sysfs sysfs {q(merged)}/sys\n"
        f"mount --rbind /dev {q(merged)}/dev\nmount --make-rslave {q(merged)}/dev",
        "mounting the image root",
    )
    try:
        yield merged
    finally:
        ws.run(
            f"umount -R {q(merged)} && rm -rf {q(work)} && rmdir {q(merged)}",
            "unmounting the image root",
        )


def layer_names(docs: Sequence[toe.Document], squash: bool) -> list[str]:
    """One upper directory per component, or one for all of them."""
    return ["squashed"] if squash else [f"{i:02d}" for i in range(1, len(docs) + 1)]


@dataclass(frozen=True)
class BuiltLayer:
    name: str
    created_by: str  # the OCI history entry: which components made it
    guest_tar: str


def build(
    ws: Workspace,
    docs: Sequence[toe.Document],
    *,
    squash: bool,
    working_directory: str,
    results_dir: Path,
    on_output: Callable[[str], None] | None = None,
) -> tuple[list[BuiltLayer], list[components.Applied]]:
    """Every component's build and validate phases, each into its layer."""
    names = layer_names(docs, squash)
    groups = [list(docs)] if squash else [[d] for d in docs]
    done: list[str] = []
    applied: list[components.Applied] = []
    layers = []
    for index, (name, group) in enumerate(zip(names, groups, strict=True)):
        upper = ws.upper(name)
        with mounted(ws, [*reversed(done), *ws.lowers], upper) as root:
            first = 0 if squash else index
            applied += components.apply(
                group, Chroot(ws.remote, root), phases=["build", "validate"],
                first_index=first, results_dir=results_dir, on_output=on_output,
                working_directory=working_directory,
            )  # fmt: skip
        tar = f"{ws.path}/{name}.tar"
        ws.run(
            f"python3 {shlex.quote(ws.path)}/mklayer.py {shlex.quote(upper)} {shlex.quote(tar)}",
            f"writing layer {name}",
        )
        done.append(upper)
        by = ", ".join(f"{d.name} ({d.sha256[:12]})" for d in group)
        layers.append(BuiltLayer(name, f"vmbuild component {by}", tar))
    return layers, applied


def test(
    ws: Workspace,
    docs: Sequence[toe.Document],
    layers: Sequence[BuiltLayer],
    *,
    working_directory: str,
    results_dir: Path,
    on_output: Callable[[str], None] | None = None,
    on_result: Callable[[toe.DocumentResult], None] | None = None,
    then: Callable[[str], None] | None = None,
) -> list[components.Applied]:
    """The components' test phases on the built image, then `then(root)` (the testinfra
    files) on the same mounted root; what they write is discarded."""
    lowers = [*(ws.upper(layer.name) for layer in reversed(layers)), *ws.lowers]
    with mounted(ws, lowers, ws.upper("test-scratch")) as root:
        applied = components.apply(
            docs, Chroot(ws.remote, root), phases=["test"], results_dir=results_dir,
            on_output=on_output, working_directory=working_directory, on_result=on_result,
        )  # fmt: skip
        if then is not None:
            then(root)
        return applied
