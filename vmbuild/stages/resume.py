"""What a build checkpoint is keyed on, beyond the stage keys themselves.

The disk after component N depends on: the base image (digest and disk size),
the VM settings a component can observe (memory, CPUs), the checkpoint format
version, the package index state of the configured Debian mirror (its Release
digests: a new security update must never be silently missed), and for each
component so far its document tree (ExecuteDocument children included), its
parameters and the phases run, in order.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from vmbuild import runs, toe
from vmbuild.cache import checkpoints
from vmbuild.debian import index, sources
from vmbuild.digest import sha256_file
from vmbuild.errors import GuestStopped, VmbuildError, VMError
from vmbuild.hypervisor.guest import (
    CLOUD_INIT,
    Guest,
    GuestRequest,
    Restore,
    RestoreFailed,
    booted_guest,
    state_signature,
    wait_cloud_init,
)
from vmbuild.hypervisor.vmstate import StateNotSaved
from vmbuild.remote.keys import KeyPair
from vmbuild.run import which
from vmbuild.stages.key import StageKey, stage_key
from vmbuild.toe.library import find_component

log = logging.getLogger("vmbuild.resume")

MAX_CHILD_DEPTH = 4  # AWSTOE nests ExecuteDocument 3 levels deep at most
BUILD_PHASES = ("build", "validate")


def document_digest(doc: toe.Document) -> str:
    """sha256 over the document and every document it runs through ExecuteDocument."""
    h = hashlib.sha256(doc.sha256.encode())
    _children(doc.path, h, 0)
    return h.hexdigest()


def _children(path: Path, h: Any, depth: int) -> None:
    if depth >= MAX_CHILD_DEPTH:
        return
    try:
        raw = yaml.safe_load(path.read_bytes())
    except (OSError, yaml.YAMLError):
        return
    for phase in (raw or {}).get("phases") or [] if isinstance(raw, dict) else []:
        for step in (phase or {}).get("steps") or [] if isinstance(phase, dict) else []:
            if not isinstance(step, dict) or step.get("action") != "ExecuteDocument":
                continue
            inputs = step.get("inputs")
            target = str(inputs.get("document", "")) if isinstance(inputs, dict) else ""
            if "{{" in target or not target:
                # Chosen at run time: every document beside the parent counts.
                for sibling in sorted(path.parent.rglob("*.y*ml")):
                    h.update(f"{sibling}:".encode() + _file_digest(sibling).encode())
                continue
            if target.startswith("s3://"):
                # An S3 object can change under the same URI, and planning a build
                # does not fetch it: no kept layer can stand for it, so this
                # document is keyed anew each build (never resumed).
                h.update(f"{target}:{secrets.token_hex(16)}".encode())
                continue
            if target.startswith("arn:"):
                # Resolved as the step will resolve it: the library's file, or the
                # built-in that stands for an AWS-managed component.
                try:
                    child = find_component(target, path.parent)
                except VmbuildError:
                    h.update(f"{target}:missing".encode())
                    continue
            else:
                child = Path(target) if Path(target).is_absolute() else path.parent / target
            h.update(f"{target}:".encode() + _file_digest(child).encode())
            _children(child, h, depth + 1)


def _file_digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return "missing"


def mirror_state(mirror: str | None, release: str | None) -> dict[str, str]:
    """The configured mirror's Release digests per suite (what `apt-get update`
    in the guest would see). Unreachable mirrors are recorded as such.

    `release` None: a base from a URL or a file, whose package sources are the
    image's own and unknown here. Its checkpoints then hold for the UTC day they
    were made (UNKNOWN_MIRROR_NOTE): a package published since is picked up by
    the next day's build at the latest, instead of going unseen until the
    checkpoint ages out."""
    if release is None:
        return {"unknown sources, valid through": datetime.now(UTC).date().isoformat()}
    try:
        mirrors = sources.mirrors_for(mirror, release)
    except VmbuildError as exc:
        return {"error": str(exc)}
    state = {}
    for line in sources.apt_source_lines(mirrors, release):
        _, uri, suite, _component = line.split()[:4]
        try:
            state[f"{uri} {suite}"] = index.fetch_release(uri, suite).sha256
        except VmbuildError as exc:
            log.warning("mirror state unknown for %s %s: %s", uri, suite, exc)
            state[f"{uri} {suite}"] = "unreachable"
    return state


UNKNOWN_MIRROR_NOTE = (
    "checkpoints: this base's package sources are its own, so a newer package index "
    "cannot be detected: its checkpoints are reused only on the UTC day they were made "
    "(--no-cache builds afresh)"
)


def root_key(base: StageKey, req: GuestRequest, *, mirror: dict[str, str]) -> StageKey:
    """The disk before the first component: the base plus everything a component
    sees of the builder `req` starts (memory, CPUs, firmware, and the accelerator,
    which decides the CPU model: `-cpu host` under KVM), whatever runs it (a
    build or a scratch VM: both key it here, on the request they boot)."""
    return stage_key(
        "checkpoint-root", base=base.digest, memory=req.memory_mib << 20, cpus=req.cpus,
        firmware=req.firmware, accelerator=req.accel.kind, version=checkpoints.VERSION,
        mirror=mirror,
    )  # fmt: skip


def boot_key(root: StageKey, *, user: str, firmware: str, signature: str) -> StageKey:
    """The builder just booted, before any component: its running state is what
    every build on this base and these VM settings starts from, whatever its
    components. Its disk is the first boot's (cloud-init's users and keys), which
    `root` and the builder's user and firmware decide; its state loads only into
    the machine of its `signature` (another QEMU, KVM or TCG keeps its own)."""
    return stage_key(
        "checkpoint-boot", disk=root.digest, user=user, firmware=firmware, signature=signature
    )


def builder_boot_key(root: StageKey, req: GuestRequest) -> StageKey | None:
    """boot_key for the builder `req` starts; None where no running state is kept."""
    signature = state_signature(req)
    if signature is None:
        return None
    return boot_key(root, user=req.user, firmware=req.firmware, signature=signature)


def chain(
    root: StageKey, docs: Sequence[toe.Document], working_directory: str | None = None
) -> list[StageKey]:
    """The key of the disk after each document's build (+validate) phases, run
    in `working_directory` (the recipe's: where AWSTOE's steps start)."""
    out = []
    disk = root
    for doc in docs:
        disk = stage_key(
            "component", disk=disk.digest, document=document_digest(doc),
            parameters=dict(doc.parameters), phases=[p for p in BUILD_PHASES if p in doc.phases],
            working_directory=working_directory,
        )  # fmt: skip
        out.append(disk)
    return out


STATE_FILE = "vmstate.zst"
KEYS_FILE = "ssh-keys.json"  # 0600: the resumed guest's sshd key and the key it lets in


@dataclass(frozen=True)
class SavedVM:
    """A builder's running state saved with a component's layer."""

    state: Path  # made in the store's scratch_path(); moved into the checkpoint
    signature: str  # qemu.state_signature of the machine that saved it
    client_key: KeyPair
    host_key: KeyPair


class Checkpointing:
    """One build's use of the checkpoint cache: what it resumes from, what it saves.

    A resumed build gets its builder back running, as it was after the newest
    matching component (its RAM state, saved by the direct QEMU backend), or,
    where that cannot be (another QEMU or machine, the libvirt backend, a state
    found damaged), boots a new instance from that component's disk layer
    (cloud-init installs this build's keys, pinned as always). `restored`
    records which happened.

    No component matching, the builder may still come back running as it was
    just after its first boot (`boot`, saved by the first build on this base
    and these VM settings): its components then all run, on that VM, and the
    boot (~45 s under TCG) is skipped. Only a running state is worth keeping
    there: booting its disk layer instead would cost a boot all the same, so
    where the state cannot be loaded the builder boots from the base.
    """

    def __init__(
        self,
        store: checkpoints.CheckpointStore,
        *,
        base_path: Path,
        base_sha256: str,
        base_format: str,
        root: StageKey,
        chain: list[StageKey],
        names: Sequence[str],
        final_key: StageKey | None,
        boot_key: StageKey | None = None,
    ) -> None:
        self.store = store
        self.root = root
        self.boot_key = boot_key
        self.chain = chain
        self.names = list(names)
        self.final_key = final_key
        self.base_link = store.base_link(base_path, base_sha256, base_format)
        self.resumed: list[checkpoints.Checkpoint] = []
        for key in chain:
            found = store.find(key.digest)
            if found is None or found.disk is None:
                break
            self.resumed.append(found)
        self.last = self.resumed[-1] if self.resumed else None
        # The booted builder's checkpoint, when no component matches: the parent
        # of the first component's layer if the builder resumes from it.
        self.boot: checkpoints.Checkpoint | None = None
        # One whose state was dropped (found damaged) is not looked up: find()
        # would count it as used, and it must age out of the cache.
        kept = boot_key is not None and (store.root / boot_key.digest / STATE_FILE).exists()
        if self.last is None and boot_key is not None and store.enabled and kept:
            found = store.find(boot_key.digest)
            if found is not None and found.disk is not None and _has_state(found):
                self.boot = found
        # The final key already covers every component: its checkpoint stands on
        # its own (find() checks its whole backing chain), whether or not the
        # component layers below it were cut or are still cached.
        self.generalized = store.find(final_key.digest) if final_key is not None else None
        self.saved: list[str] = []
        self.restored: str | None = None  # "ram" | "disk" once the builder is up
        self.running_state = True  # keep the running VM with each layer (where the backend can)
        # Another build saved a layer of this key first: this build's next layers
        # are diffs against its own copy, not that one, so it saves no more.
        self.diverged = False
        self.tests_cached = False
        self.outputs_cached = False

    @property
    def usable(self) -> bool:
        return self.store.enabled and self.base_link is not None

    @property
    def resume_from(self) -> checkpoints.Checkpoint | None:
        """The checkpoint the builder resumes from: the last matching component's,
        else the booted builder's."""
        return self.last if self.last is not None else self.boot

    def start_disk(self) -> Path | None:
        """The layer the builder boots from, or None for the base."""
        cp = self.resume_from
        return cp.disk if cp is not None else None

    def saved_vm(self) -> tuple[Restore | None, str]:
        """The running state saved with the checkpoint the build resumes after, or
        None and why not (said to the user when the builder boots instead)."""
        cp = self.resume_from
        if cp is None:
            return None, "nothing to resume"
        if not _has_state(cp):
            return None, "its running state was not saved"
        state = self.store.checked_file(cp, STATE_FILE, "vm")
        if state is None:
            return None, "its saved running state is gone or damaged"
        try:
            keys = json.loads((cp.path / KEYS_FILE).read_text())
            restore = Restore(
                state=state, signature=str(cp.meta["data"]["vm"]["signature"]),
                client_key=KeyPair(keys["client_private"], keys["client_public"]),
                host_key=KeyPair(keys["host_private"], keys["host_public"]),
            )  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError):
            self.drop_saved_vm()  # useless without them, next time as well
            return None, "the SSH keys saved with its running state are unreadable"
        return restore, ""

    def drop_saved_vm(self) -> None:
        """The state could not be resumed here: keep the layer, forget the state.

        The booted builder's layer stays too, though nothing boots it: other
        recipes' component layers may stand on it, and a build may be using
        them right now. It is no longer looked up, so it ages out of the cache
        (`vmbuild cache prune`); until then builds on that base boot."""
        cp = self.resume_from
        if cp is not None:
            (cp.path / STATE_FILE).unlink(missing_ok=True)
            (cp.path / KEYS_FILE).unlink(missing_ok=True)

    def boot_wanted(self) -> bool:
        """Whether to keep the builder just booted: none is kept for this key yet
        (one another QEMU saved, or one whose state was found damaged, stays;
        this build's layers then stand on the base)."""
        return (
            self.usable and self.boot_key is not None and self.last is None
            and not self.store.has(self.boot_key.digest)
        )  # fmt: skip

    def boot_not_resumed(self) -> None:
        """The booted builder's state did not load: the builder boots from the base,
        so the first component's layer will not stand on that checkpoint."""
        self.boot = None

    def save_boot(self, layer: Path, vm: SavedVM) -> checkpoints.Checkpoint | None:
        """Keep the just-booted builder (its first boot's disk layer and running state)."""
        if not self.usable or self.boot_key is None or self.last is not None:
            vm.state.unlink(missing_ok=True)
            return None
        saved = self.store.save(
            self.boot_key.digest, stage="boot", label="booted builder", layer=layer,
            backing=self.base_link, data={"vm": _vm_meta(vm)},
            moved={STATE_FILE: vm.state}, secret={KEYS_FILE: _keys_json(vm)},
        )  # fmt: skip
        vm.state.unlink(missing_ok=True)  # moved in, or the save did not happen
        if saved is not None and not saved.fresh:
            # Another build booted its builder first: this one's disk is another
            # first boot's, so what it saves next would stand on nothing cached.
            self.diverged = True
            return saved
        self.boot = saved
        if saved is not None:
            self.saved.append(saved.label)
        return saved

    def save_component(
        self, index: int, layer: Path, applied: dict[str, Any], vm: SavedVM | None = None
    ) -> checkpoints.Checkpoint | None:
        if not self.usable or self.diverged or (index > 0 and self.last is None):
            if vm is not None:
                vm.state.unlink(missing_ok=True)
            return None
        data: dict[str, Any] = {"applied": applied}
        moved: dict[str, Path] = {}
        secret: dict[str, str] = {}
        if vm is not None:
            data["vm"] = _vm_meta(vm)
            moved[STATE_FILE] = vm.state
            secret[KEYS_FILE] = _keys_json(vm)
        parent = self.resume_from
        saved = self.store.save(
            self.chain[index].digest, stage="component",
            label=f"{index + 1}/{len(self.chain)} {self.names[index]}", layer=layer,
            parent=parent, backing=None if parent else self.base_link,
            data=data, moved=moved, secret=secret,
        )  # fmt: skip
        if vm is not None:
            vm.state.unlink(missing_ok=True)  # moved in, or the save did not happen
        self.last = saved
        if saved is not None and not saved.fresh:
            self.diverged = True
        elif saved is not None:
            self.saved.append(saved.label)
        return saved

    def save_generalized(self, layer: Path, data: dict[str, Any]) -> None:
        # `layer` is backed by the last component layer when one was resumed or
        # saved, else by the booted builder's layer it resumed from, else by the base.
        if not self.usable or self.diverged or self.final_key is None:
            return
        parent = self.resume_from
        saved = self.store.save(
            self.final_key.digest, stage="generalize", label="generalized disk", layer=layer,
            parent=parent, backing=None if parent else self.base_link, data=data,
        )  # fmt: skip
        if saved is not None and saved.fresh:
            self.saved.append(saved.label)

    def to_json(self) -> dict[str, Any]:
        """The manifest's record of what came from the cache."""
        return {
            "resumed": [cp.label for cp in self.resumed],
            "generalized": self.generalized is not None,
            "saved": self.saved,
            "tests": self.tests_cached,
            "outputs": self.outputs_cached,
            "restore": self.restored,
            # The builder came back running as it was booted, before any component.
            "boot": self.restored == "ram" and not self.resumed,
        }


Status = Callable[[str], None]


def no_running_state(arch: str) -> str | None:
    """Why no running VM can be kept with checkpoints here, if none can."""
    if which("zstd") is None:
        return "zstd is not installed: the running VM is not kept"
    if arch != "x86_64":
        # A resumed guest must learn it was cloned (vmgenid, x86 only here) or
        # two builds from one state would share their RNG's output.
        return f"the running VM is kept for x86_64 guests only, not {arch}"
    return None


def cut(
    guest: Guest, layer: Path, new_top: Path, store: checkpoints.CheckpointStore,
    *, keep_state: bool, status: Status,
) -> SavedVM | None:  # fmt: skip
    """Cut `guest`'s disk: `layer`, its top file until now, stays below `new_top`,
    read-only, for the cache to copy; with `keep_state` its running state is saved
    in the same pause. The state, or None when it was not kept (`status` says
    why). The machine must be able to (can_cut); raises VmbuildError or OSError
    when the layer could not be cut."""
    machine = guest.machine
    cut_layer = getattr(machine, "cut_layer", None)
    if cut_layer is None:
        raise VmbuildError(f"the {type(machine).__name__} backend cannot cut disk layers")
    save_running = getattr(machine, "save_running", None)
    signature = getattr(machine, "state_signature", None)
    if not keep_state or save_running is None or signature is None:
        with guest.ssh.frozen():
            cut_layer(layer, new_top)
        return None
    # Flushed and clean just before the pause that takes layer and state
    # together (QemuMachine.save_running says why not frozen).
    with guest.ssh.frozen():
        pass
    state = store.scratch_path(STATE_FILE)
    runs.own(state)  # a SIGKILL mid-save: the next vmbuild command removes it
    vm: SavedVM | None = None
    try:
        save_running(layer, new_top, state)
        vm = SavedVM(state, signature(), guest.client_key, guest.host_key)
    except StateNotSaved as exc:
        status(f"checkpoint: the disk layer only ({exc})")
    finally:
        if vm is None:
            state.unlink(missing_ok=True)
            runs.disown(state)
    return vm


def can_cut(guest: Guest) -> bool:
    """Whether the guest's backend can cut its disk into layers while it runs."""
    return getattr(guest.machine, "cut_layer", None) is not None


def keep(
    status: Status,
    start: float,
    vm: SavedVM | None,
    save: Callable[[], checkpoints.Checkpoint | None],
) -> None:
    """Run `save` (a cut layer and `vm` into the cache), then say what happened.
    The state file is gone afterwards: moved into the checkpoint, or not kept."""
    try:
        saved = save()
    finally:
        if vm is not None:
            vm.state.unlink(missing_ok=True)
            runs.disown(vm.state)
    if saved is not None and saved.fresh:
        status(f"checkpoint saved: {saved.label} ({time.monotonic() - start:.1f}s)")
    elif saved is not None:
        status(
            f"checkpoints: another run saved {saved.label} first; "
            "this one saves no more (its layers are diffs against its own copy)"
        )


def resumed(
    ck: Checkpointing, req: GuestRequest, stack: contextlib.ExitStack, status: Status
) -> tuple[Guest | None, str]:
    """`req`'s VM back running from the state kept with ck.resume_from (its disk
    layer below it), entered into `stack`; or None and why not. A state that
    would fail the same way anywhere is dropped."""
    restore, why = ck.saved_vm()
    disk = ck.start_disk()
    if restore is None or disk is None:
        return None, why
    again = replace(req, base=disk, base_format="qcow2", restore=restore)
    try:
        guest = stack.enter_context(booted_guest(again, on_status=status))
    except RestoreFailed as exc:
        if exc.damaged:
            ck.drop_saved_vm()
        return None, f"not resumable here: {exc}"
    ck.restored = "ram"
    return guest, ""


def keep_booted(ck: Checkpointing, guest: Guest, new_top: Path, *, status: Status) -> bool:
    """Keep `guest` as it just booted (its first boot's layer and running state),
    when none is kept for `ck`'s boot key yet: later builds and scratch VMs on
    this base and VM settings resume it instead of booting. True when its disk
    was cut (it now runs on `new_top`)."""
    if not ck.running_state or not ck.boot_wanted() or not can_cut(guest):
        return False
    start = time.monotonic()
    # Kept once cloud-init is done with it: a resumed guest then never runs
    # cloud-init's last stages (two Python start-ups, ~7 s each under TCG)
    # beside its components, nor makes generalize wait for them.
    try:
        wait_cloud_init(guest.ssh, guest.spec.accel.timeout(CLOUD_INIT), guest.machine)
    except GuestStopped:
        raise
    except VMError as exc:
        # Not a first boot worth keeping; the VM itself may still serve (a
        # build's generalize then waits, and fails, as it would have anyway).
        status(f"checkpoints: the booted builder is not kept ({exc})")
        return False
    layer = guest.spec.disk
    try:
        vm = cut(guest, layer, new_top, ck.store, keep_state=True, status=status)
    except (VmbuildError, OSError) as exc:
        # A checkpoint is an optimisation: the build goes on without them.
        ck.store.disable(f"cannot cut a checkpoint layer ({exc}); building on without them")
        return False
    if vm is None:
        # The disk was cut all the same: the next layers are diffs against this
        # unsaved one, so none of them may be kept (they would stand on the base).
        ck.diverged = True
        status("checkpoints: the booted builder was not kept; this build saves none")
        return True
    keep(status, start, vm, lambda: ck.save_boot(layer, vm))
    return True


def _has_state(cp: checkpoints.Checkpoint) -> bool:
    return isinstance(cp.meta.get("data", {}).get("vm"), dict)


def _vm_meta(vm: SavedVM) -> dict[str, Any]:
    return {"signature": vm.signature, "size": vm.state.stat().st_size,
            "sha256": sha256_file(vm.state)}  # fmt: skip


def _keys_json(vm: SavedVM) -> str:
    return json.dumps({
        "client_private": vm.client_key.private_openssh,
        "client_public": vm.client_key.public_openssh,
        "host_private": vm.host_key.private_openssh,
        "host_public": vm.host_key.public_openssh,
    })  # fmt: skip
