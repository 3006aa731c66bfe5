"""The checkpoint cache with real qcow2 layers (qemu-img, qemu-io): chains,
corruption, half-written saves, races, a full disk, LRU pruning."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmbuild.cache import checkpoints
from vmbuild.cache.checkpoints import CheckpointStore
from vmbuild.digest import sha256_file
from vmbuild.hypervisor import accel
from vmbuild.hypervisor.base import VMSpec, free_port
from vmbuild.hypervisor.qemu import QemuMachine, qmp_path
from vmbuild.hypervisor.qmp import QMPClient
from vmbuild.remote.keys import KeyPair, generate_ed25519
from vmbuild.stages import convert, resume
from vmbuild.stages.key import stage_key


def qemu_img(*args: str | Path) -> str:
    return subprocess.run(
        ["qemu-img", *map(str, args)], check=True, capture_output=True, text=True
    ).stdout


def write(disk: Path, pattern: int, offset: int, length: str = "64k") -> None:
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} {offset} {length}", str(disk)],
        check=True, capture_output=True,
    )  # fmt: skip


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A base and two build layers on it, as a builder leaves them in its work dir."""
    w = tmp_path / "work"
    w.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", w / "base.qcow2", "16M")
    write(w / "base.qcow2", 0x11, 0)
    qemu_img("create", "-q", "-f", "qcow2", "-b", w / "base.qcow2", "-F", "qcow2", w / "l1.qcow2")
    write(w / "l1.qcow2", 0x22, 65536)
    qemu_img("create", "-q", "-f", "qcow2", "-b", w / "l1.qcow2", "-F", "qcow2", w / "l2.qcow2")
    write(w / "l2.qcow2", 0x33, 131072)
    return w


def save_chain(store: CheckpointStore, w: Path) -> tuple[checkpoints.Checkpoint, ...]:
    base = store.base_link(w / "base.qcow2", "b" * 64, "qcow2")
    assert base is not None
    one = store.save("k1" * 32, stage="component", label="1/2 a", layer=w / "l1.qcow2",
                     backing=base, data={"n": 1})  # fmt: skip
    assert one is not None
    two = store.save("k2" * 32, stage="component", label="2/2 b", layer=w / "l2.qcow2",
                     parent=one, data={"n": 2})  # fmt: skip
    assert two is not None
    return one, two


def test_layers_are_kept_as_a_chain_inside_the_cache(tmp_path: Path, work: Path) -> None:
    with CheckpointStore(tmp_path / "ck") as store:
        one, two = save_chain(store, work)
        found = store.find(two.key)
        assert found is not None and found.disk is not None
        assert found.meta["data"] == {"n": 2} and found.meta["parent"] == one.key
        chain = json.loads(qemu_img("info", "--output=json", "--backing-chain", found.disk))
        assert [Path(c["filename"]) for c in chain] == [
            tmp_path / "ck" / two.key / "disk.qcow2",
            tmp_path / "ck" / one.key / "disk.qcow2",
            tmp_path / "ck" / "bases" / f"{'b' * 64}.qcow2",
        ]
        # The same content as the build's own chain, without the work dir.
        for p in work.glob("l*.qcow2"):
            p.rename(p.with_suffix(".moved"))
        (work / "l2.moved").rename(work / "l2.qcow2")
        qemu_img("rebase", "-u", "-b", work / "l1.moved", "-F", "qcow2", work / "l2.qcow2")
        assert (
            subprocess.run(["qemu-img", "compare", work / "l2.qcow2", found.disk]).returncode == 0
        )


def test_a_corrupt_layer_is_ignored_and_removed(tmp_path: Path, work: Path) -> None:
    said: list[str] = []
    with CheckpointStore(tmp_path / "ck", warn=said.append) as store:
        one, two = save_chain(store, work)
        assert one.disk is not None
        with one.disk.open("r+b") as f:
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([last[0] ^ 0xFF]))
        # The layer on top is intact, but what it is built on is not.
        assert store.find(two.key) is None
        assert said == [f"ignoring checkpoint {two.key[:16]} (2/2 b): "
                        "its disk layer does not match its checksum"]  # fmt: skip
        assert store.find(one.key) is None
        assert not (tmp_path / "ck" / one.key).exists()


def test_a_build_reads_each_layer_once_unless_it_changed(
    tmp_path: Path, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with CheckpointStore(tmp_path / "ck") as store:
        one, two = save_chain(store, work)
    read: list[str] = []

    def counted(path: Path) -> str:
        read.append(path.parent.name)
        return sha256_file(path)

    monkeypatch.setattr(checkpoints, "sha256_file", counted)
    said: list[str] = []
    with CheckpointStore(tmp_path / "ck", warn=said.append) as store:
        # A build looks up each component's key in turn; each lookup checks the
        # chain below it, and a layer already checked is not read again.
        assert store.find(one.key) is not None and store.find(two.key) is not None
        assert read == [one.key, two.key]
        # ... unless it changed since (a write moves its mtime).
        assert one.disk is not None
        write(one.disk, 0x55, 65536)
        assert store.find(two.key) is None
        assert read[2:] == [one.key]
        assert said == [f"ignoring checkpoint {two.key[:16]} (2/2 b): "
                        "its disk layer does not match its checksum"]  # fmt: skip


def test_half_written_and_foreign_checkpoints_are_never_used(tmp_path: Path, work: Path) -> None:
    said: list[str] = []
    root = tmp_path / "ck"
    with CheckpointStore(root, warn=said.append) as store:
        # Killed mid-save: only the temp dir exists; nothing under the key.
        (root / ".tmp-killed").mkdir()
        (root / ".tmp-killed" / "disk.qcow2").write_bytes(b"partial")
        assert store.find("k9" * 32) is None and store.entries() == []
        # A key dir whose meta.json is truncated.
        (root / ("k8" * 32)).mkdir()
        (root / ("k8" * 32) / "meta.json").write_text('{"version": 1, "ke')
        assert store.find("k8" * 32) is None
        assert said[0].startswith(f"ignoring checkpoint {'k8' * 8}: unreadable meta.json")
        # A layer cut short after its meta was written (disk full, say).
        one, _ = save_chain(store, work)
        assert one.disk is not None
        os.truncate(one.disk, one.disk.stat().st_size - 512)
        assert store.find(one.key) is None
        assert said[-1].startswith(f"ignoring checkpoint {one.key[:16]} (1/2 a): its disk layer is")


def test_racing_saves_of_one_key_leave_one_intact_checkpoint(tmp_path: Path, work: Path) -> None:
    root = tmp_path / "ck"
    results: list[checkpoints.Checkpoint | None] = []

    def save() -> None:
        with CheckpointStore(root) as store:
            base = store.base_link(work / "base.qcow2", "b" * 64, "qcow2")
            results.append(store.save("k1" * 32, stage="component", label="1 a",
                                      layer=work / "l1.qcow2", backing=base))  # fmt: skip

    threads = [threading.Thread(target=save) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is not None and r.key == "k1" * 32 for r in results)
    assert [r.fresh for r in results if r is not None].count(True) == 1  # one save won
    assert sorted(p.name for p in root.iterdir()) == ["bases", "k1" * 32, "use.lock"]
    with CheckpointStore(root) as store:
        assert store.find("k1" * 32) is not None


def test_a_layer_whose_parent_was_replaced_is_never_used(tmp_path: Path, work: Path) -> None:
    """Same key, other bytes (another build's copy of layer 1): the layer cut
    on the first copy is a diff against content that is gone."""
    said: list[str] = []
    with CheckpointStore(tmp_path / "ck", warn=said.append) as store:
        one, two = save_chain(store, work)
        assert (tmp_path / "ck").stat().st_mode & 0o777 == 0o700
        assert one.path.stat().st_mode & 0o777 == 0o700  # it may hold a VM's RAM
        store.discard(one)
        write(work / "l1.qcow2", 0x55, 0)
        base = store.base_link(work / "base.qcow2", "b" * 64, "qcow2")
        other = store.save(one.key, stage="component", label="1/2 a", layer=work / "l1.qcow2",
                           backing=base)  # fmt: skip
        assert other is not None and other.fresh and other.meta["sha256"] != one.meta["sha256"]
        assert store.find(two.key) is None
        assert said == [f"ignoring checkpoint {two.key[:16]} (2/2 b): "
                        "the layer it is based on was replaced"]  # fmt: skip
        assert store.find(one.key) == other


def test_a_build_that_lost_a_race_saves_no_more_layers(tmp_path: Path, work: Path) -> None:
    chain = [stage_key("component", n=i) for i in range(2)]

    def checkpointing(store: CheckpointStore) -> resume.Checkpointing:
        return resume.Checkpointing(
            store, base_path=work / "base.qcow2", base_sha256="b" * 64, base_format="qcow2",
            root=stage_key("checkpoint-root", n=0), chain=chain, names=["a", "b"],
            final_key=stage_key("final", n=0),
        )  # fmt: skip

    with CheckpointStore(tmp_path / "ck") as store:
        winner, loser = checkpointing(store), checkpointing(store)
        first = winner.save_component(0, work / "l1.qcow2", {})
        assert first is not None and first.fresh and winner.saved == ["1/2 a"]
        found = loser.save_component(0, work / "l1.qcow2", {})
        assert found == first and not found.fresh and loser.diverged and loser.saved == []
        assert loser.save_component(1, work / "l2.qcow2", {}) is None
        loser.save_generalized(work / "l2.qcow2", {})
        assert store.find(chain[1].digest) is None and loser.saved == []
        assert store.find(loser.final_key.digest) is None


def test_prune_removes_what_killed_saves_left(tmp_path: Path, work: Path) -> None:
    root = tmp_path / "ck"
    with CheckpointStore(root) as store:
        save_chain(store, work)
        store.scratch_path(resume.STATE_FILE).write_bytes(b"half a state")
        (root / ".tmp-0123456789ab").mkdir()
    pruned = checkpoints.prune(root, max_size=1 << 40, max_age_days=30)
    assert pruned.removed == [] and pruned.kept == 2
    assert sorted(p.name for p in root.iterdir()) == sorted(
        ["bases", "use.lock", "k1" * 32, "k2" * 32]
    )


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB filesystem: a checkpoint cannot fit on it."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", mnt], check=True)


def test_a_full_disk_turns_checkpoints_off_with_a_warning(tiny_disk: Path, work: Path) -> None:
    write(work / "l1.qcow2", 0x44, 1 << 20, "2M")  # the layer now holds more than 1 MiB
    said: list[str] = []
    with CheckpointStore(tiny_disk / "ck", warn=said.append) as store:
        base = store.base_link(work / "base.qcow2", "b" * 64, "qcow2")
        # The base is a hard link across filesystems: a copy, which fits.
        assert base is not None
        assert store.save("k1" * 32, stage="component", label="1 a", layer=work / "l1.qcow2",
                          backing=base) is None  # fmt: skip
        assert not store.enabled
        assert len(said) == 1 and said[0].startswith("cannot save a checkpoint (")
        assert "No space left on device" in said[0]
        assert said[0].endswith("; building on without checkpoints")
        assert store.find("k1" * 32) is None
    assert sorted(p.name for p in (tiny_disk / "ck").iterdir()) == ["bases", "use.lock"]


def test_prune_by_age_then_least_recently_used(tmp_path: Path, work: Path) -> None:
    root = tmp_path / "ck"
    with CheckpointStore(root) as store:
        one, two = save_chain(store, work)
        lone = store.save("k3" * 32, stage="test", label="test result", data={"x": 1})
        assert lone is not None
    old = 1_000_000_000
    os.utime(root / one.key / "meta.json", (old, old))
    # The first layer was last found long ago, but the one built on it was used
    # since (a rebuild finds only the layer it resumes from): both are in use.
    pruned = checkpoints.prune(root, max_size=1 << 40, max_age_days=30)
    assert pruned.removed == [] and pruned.kept == 3
    # ... also under a size cap: the entry used least is the test result, used
    # after the first layer was found but before the second was.
    earlier = (root / two.key / "meta.json").stat().st_mtime - 100
    os.utime(root / lone.key / "meta.json", (earlier, earlier))
    total = sum(cp.size for cp in (one, two, lone))
    pruned = checkpoints.prune(root, max_size=total - 1, max_age_days=30)
    assert pruned.removed == [lone.key] and pruned.kept == 2
    with CheckpointStore(root) as store:
        lone = store.save("k3" * 32, stage="test", label="test result", data={"x": 1})
        assert lone is not None
    # Both older than 30 days: the first layer goes, and the layer built on it too.
    os.utime(root / two.key / "meta.json", (old, old))
    pruned = checkpoints.prune(root, max_size=1 << 40, max_age_days=30)
    assert pruned.removed == sorted([one.key, two.key]) and pruned.kept == 1
    assert list((root / "bases").iterdir()) == []  # the base no layer is built on
    # A size cap of 0 empties it; a build holding the cache blocks pruning.
    with CheckpointStore(root):
        assert checkpoints.prune(root, max_size=0).busy
    assert checkpoints.prune(root, max_size=0).removed == [lone.key]
    assert sorted(p.name for p in root.iterdir()) == ["bases", "use.lock"]


def test_a_finished_build_prunes_to_the_caps_from_the_environment(
    tmp_path: Path, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "ck"
    with CheckpointStore(root) as store:
        one, two = save_chain(store, work)
    for cp in (one, two):  # used long ago
        os.utime(root / cp.key / "meta.json", (1_000_000_000, 1_000_000_000))
    said: list[str] = []
    monkeypatch.setenv(checkpoints.ENV_MAX_SIZE, "1T")
    with CheckpointStore(root):  # another build still at work: nothing is removed now
        assert checkpoints.prune_after_build(root, said.append) == checkpoints.Pruned(
            [], 0, 0, busy=True
        )
    pruned = checkpoints.prune_after_build(root, said.append)
    assert pruned is not None and pruned.removed == sorted([one.key, two.key])
    assert said == [f"checkpoints: removed 2 least recently used "
                    f"({pruned.freed / (1 << 20):.0f} MiB) to fit the cache's caps"]  # fmt: skip


def test_a_generalized_disk_saved_without_component_layers_is_found(
    tmp_path: Path, work: Path
) -> None:
    """Without per-component layers the generalized disk sits right on the base;
    an identical rebuild must find it (the final key covers every component)."""
    root = stage_key("checkpoint-root", base="b" * 64)
    docs_chain = [stage_key("component", disk=root.digest, n=i) for i in range(2)]
    final = stage_key("checkpoint-generalize", disk=docs_chain[-1].digest)

    def checkpointing(store: CheckpointStore) -> resume.Checkpointing:
        return resume.Checkpointing(
            store, base_path=work / "base.qcow2", base_sha256="b" * 64, base_format="qcow2",
            root=root, chain=docs_chain, names=["a", "b"], final_key=final,
        )  # fmt: skip

    with CheckpointStore(tmp_path / "ck") as store:
        first = checkpointing(store)
        assert (first.generalized, first.resumed) == (None, [])
        first.save_generalized(work / "l1.qcow2", {"ok": True})
        assert first.saved == ["generalized disk"]
        again = checkpointing(store)
        assert again.resumed == []
        assert again.generalized is not None and again.generalized.key == final.digest
        assert again.to_json()["generalized"] is True


def cut_test_vm(tmp_path: Path) -> VMSpec:
    """A VM with no guest for a layer-cut test: its disk (lower.qcow2) holds a
    secret the guest later deletes, 0x5A in its first 64 KiB."""
    lower = tmp_path / "lower.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", lower, "16M")
    write(lower, 0x5A, 0)
    seed = tmp_path / "seed.raw"
    seed.write_bytes(b"\0" * 4096)
    return VMSpec(
        name=f"vmbuild-cut-{os.getpid()}", disk=lower, seed=seed, memory_mib=64, cpus=1,
        accel=accel.tcg("test"), ssh_port=free_port(), console_log=tmp_path / "console.log",
        workdir=tmp_path,
    )  # fmt: skip


def assert_the_discard_hid_the_layer_below(new_top: Path, lower: Path) -> None:
    """After a discard of the first 64 KiB through the drive: the chain is
    new_top over lower, and those bytes read as zeros through it."""
    chain = json.loads(qemu_img("info", "--output=json", "--backing-chain", new_top))
    assert [Path(c["filename"]) for c in chain] == [new_top, lower]
    read = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0 0 64k", str(new_top)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert read.returncode == 0 and "Pattern verification failed" not in read.stdout, read.stdout


def test_a_cut_layer_passes_the_guests_discards_down(tmp_path: Path) -> None:
    """A real QEMU (paused: the disk is attached, no guest is needed): after a
    cut, a discard on the drive writes a zero cluster in the new top, so data in
    the layer below is no longer readable through the chain (what generalize
    deletes must not survive in a lower layer), and the new top node keeps the
    drive's detect-zeroes=unmap."""
    spec = cut_test_vm(tmp_path)
    lower, new_top = spec.disk, tmp_path / "top.qcow2"
    machine = QemuMachine(spec)
    machine.argv.append("-S")  # never start the CPU
    with machine:
        machine.cut_layer(lower, new_top)
        with QMPClient(qmp_path(spec)) as qmp:
            [top] = [n for n in qmp.execute("query-block") if n["device"] == "disk0"]
            assert top["inserted"]["file"] == str(new_top)
            assert top["inserted"]["detect_zeroes"] == "unmap"
            said = qmp.execute(
                "human-monitor-command", **{"command-line": 'qemu-io disk0 "discard 0 64k"'}
            )
        machine.shutdown(0.1)  # paused, so no ACPI poweroff: QMP quit, metadata flushed
    # qemu-io's report goes to QEMU's stdout (no HMP monitor), kept in its log.
    assert said == "" and "discard 65536/65536 bytes at offset 0" in spec.qemu_log.read_text()
    assert_the_discard_hid_the_layer_below(new_top, lower)


def _flattened(tmp_path: Path, name: str) -> convert.Converted:
    """A small real disk flattened as a build does (qcow2 first), into its own dir."""
    out = tmp_path / name
    out.mkdir()
    disk = tmp_path / "builder.qcow2"
    if not disk.exists():
        qemu_img("create", "-q", "-f", "qcow2", disk, "8M")
        write(disk, 0x42, 1 << 20, "256k")
    return convert.flatten_final(disk, ["qcow2", "vmdk", "raw"], out, tmp_path, keep_source=True)


def test_other_formats_of_the_same_qcow2_are_reused_and_checked(tmp_path: Path) -> None:
    """The formats but qcow2 are kept (hard links) by the qcow2's sha256: a second
    build of the same qcow2 gets them back byte for byte; a changed cached file
    is not used, and the format is converted afresh."""
    key = stage_key("convert", disk="d", formats=["qcow2", "vmdk", "raw"])
    with CheckpointStore(tmp_path / "ck") as store:
        first = _flattened(tmp_path, "one")
        cache = convert.OutputCache.of(store, first, key)
        made = convert.convert_rest(first, ["qcow2", "vmdk", "raw"], tmp_path / "one", cache)
        assert not made.reused and [o.format for o in made.outputs] == ["qcow2", "vmdk", "raw"]
        kept = store.find(cache.key)
        assert kept is not None and (kept.path / "disk.vmdk").stat().st_nlink == 2

        second = _flattened(tmp_path, "two")
        assert second.outputs[0].sha256 == first.outputs[0].sha256  # the same qcow2
        again = convert.OutputCache.of(store, second, key)
        assert again.key == cache.key
        reused = convert.convert_rest(second, ["qcow2", "vmdk", "raw"], tmp_path / "two", again)
        assert reused.reused and reused.outputs == made.outputs

        with (kept.path / "disk.vmdk").open("ab") as f:  # the stored file changes under it
            f.write(b"x")
        third = _flattened(tmp_path, "three")
        fresh = convert.convert_rest(third, ["qcow2", "vmdk", "raw"], tmp_path / "three", again)
        assert not fresh.reused
        vmdk = fresh.outputs[1]
        assert vmdk.sha256 == sha256_file(tmp_path / "three" / "disk.vmdk")
        renewed = store.find(cache.key)  # the changed entry was replaced by the fresh files
        assert renewed is not None
        assert sha256_file(renewed.path / "disk.vmdk") == vmdk.sha256
        assert sorted(p.name for p in (tmp_path / "three").iterdir()) == [
            "disk.qcow2", "disk.raw", "disk.vmdk",
        ]  # fmt: skip


def test_outputs_on_another_file_system_are_not_kept(tmp_path: Path) -> None:
    """A hard link cannot cross file systems: nothing is kept, and checkpoints stay on."""
    with (
        tempfile.TemporaryDirectory(dir="/dev/shm") as shm,
        CheckpointStore(tmp_path / "ck") as store,
    ):
        other = Path(shm)
        first = _flattened(other, "one")
        cache = convert.OutputCache.of(store, first, stage_key("convert", disk="d"))
        made = convert.convert_rest(first, ["qcow2", "vmdk", "raw"], other / "one", cache)
        assert not made.reused and len(made.outputs) == 3
        assert store.find(cache.key) is None and store.enabled


def _saved_vm(store: CheckpointStore, work: Path) -> tuple[resume.Checkpointing, KeyPair]:
    """A build's Checkpointing that saved component 1 with a running state."""
    keys = generate_ed25519("client"), generate_ed25519("host")
    root = stage_key("checkpoint-root", n=1)
    chain = [stage_key("component", n=2)]
    ck = resume.Checkpointing(
        store, base_path=work / "base.qcow2", base_sha256="b" * 64, base_format="qcow2",
        root=root, chain=chain, names=["a"], final_key=stage_key("final", n=3),
    )  # fmt: skip
    state = store.scratch_path(resume.STATE_FILE)
    state.write_bytes(b"\x28\xb5\x2f\xfd" + os.urandom(4096))
    saved = ck.save_component(0, work / "l1.qcow2", {}, resume.SavedVM(state, "s" * 64, *keys))
    assert saved is not None and not state.exists()  # moved in, not copied
    again = resume.Checkpointing(
        store, base_path=work / "base.qcow2", base_sha256="b" * 64, base_format="qcow2",
        root=root, chain=chain, names=["a"], final_key=stage_key("final", n=3),
    )  # fmt: skip
    return again, keys[0]


def test_a_saved_vm_comes_back_with_its_keys_and_never_damaged(tmp_path: Path, work: Path) -> None:
    said: list[str] = []
    with CheckpointStore(tmp_path / "ck", warn=said.append) as store:
        ck, client = _saved_vm(store, work)
        assert ck.last is not None
        keys = ck.last.path / resume.KEYS_FILE
        assert keys.stat().st_mode & 0o777 == 0o600
        assert "PRIVATE" not in repr(client)
        assert "PRIVATE" not in (ck.last.path / "meta.json").read_text()
        restore, why = ck.saved_vm()
        assert restore is not None and why == ""
        assert restore.signature == "s" * 64 and restore.client_key == client
        # One byte changed: never loaded; the state goes, the disk layer stays.
        data = bytearray(restore.state.read_bytes())
        data[100] ^= 0xFF
        restore.state.write_bytes(bytes(data))
        assert ck.saved_vm() == (None, "its saved running state is gone or damaged")
        assert said == [f"ignoring the vm of checkpoint {ck.last.key[:16]} (1/1 a): "
                        "it does not match its checksum"]  # fmt: skip
        assert not restore.state.exists() and store.find(ck.last.key) is not None
        assert resume.Checkpointing(
            store, base_path=work / "base.qcow2", base_sha256="b" * 64, base_format="qcow2",
            root=ck.root, chain=ck.chain, names=["a"], final_key=ck.final_key,
        ).resumed == [ck.last]  # fmt: skip
        ck.drop_saved_vm()  # not resumable: the keys it was saved with go too
        assert sorted(p.name for p in ck.last.path.iterdir()) == ["disk.qcow2", "meta.json"]


def test_a_state_not_kept_leaves_nothing_in_the_cache(tiny_disk: Path, work: Path) -> None:
    """A full disk while the state is moved in: no checkpoint, no scratch file."""
    with CheckpointStore(tiny_disk / "ck", warn=lambda _m: None) as store:
        state = store.scratch_path(resume.STATE_FILE)
        state.write_bytes(b"x" * 1024)
        ck = resume.Checkpointing(
            store, base_path=work / "base.qcow2", base_sha256="b" * 64, base_format="qcow2",
            root=stage_key("r", n=1), chain=[stage_key("c", n=1)], names=["a"],
            final_key=stage_key("f", n=1),
        )  # fmt: skip
        keys = generate_ed25519("c"), generate_ed25519("h")
        big = work / "big.qcow2"  # a layer bigger than the little file system
        qemu_img("create", "-q", "-f", "qcow2", big, "64M")
        write(big, 0x44, 0, "8M")
        assert ck.save_component(0, big, {}, resume.SavedVM(state, "s" * 64, *keys)) is None
        assert not store.enabled
        assert sorted(p.name for p in (tiny_disk / "ck").iterdir()) == ["bases", "use.lock"]


def _booting(store: CheckpointStore, work: Path, names: list[str]) -> resume.Checkpointing:
    """A build of `names` on the one base and VM settings (one root, one boot key)."""
    root = stage_key("checkpoint-root", n=1)
    chain, disk = [], root
    for name in names:
        disk = stage_key("component", disk=disk.digest, name=name)
        chain.append(disk)
    return resume.Checkpointing(
        store, base_path=work / "base.qcow2", base_sha256="b" * 64, base_format="qcow2",
        root=root, chain=chain, names=names, final_key=stage_key("final", names=names),
        boot_key=resume.boot_key(root, user="vmbuild", firmware="bios", signature="s" * 64),
    )  # fmt: skip


def _state(store: CheckpointStore) -> resume.SavedVM:
    state = store.scratch_path(resume.STATE_FILE)
    state.write_bytes(b"\x28\xb5\x2f\xfd" + os.urandom(4096))
    return resume.SavedVM(state, "s" * 64, generate_ed25519("client"), generate_ed25519("host"))


def test_another_recipe_resumes_the_booted_builder(tmp_path: Path, work: Path) -> None:
    """The first build keeps the builder as booted (l1: the first boot's writes); a
    build of other components on the same base resumes it, and its first
    component's layer stands on that boot layer, found again whole."""
    with CheckpointStore(tmp_path / "ck") as store:
        first = _booting(store, work, ["a"])
        assert first.boot is None and first.boot_wanted()
        boot = first.save_boot(work / "l1.qcow2", _state(store))
        assert boot is not None and boot.fresh and (boot.stage, boot.label) == (
            "boot", "booted builder"
        )  # fmt: skip
        assert first.saved == ["booted builder"] and not first.boot_wanted()
        assert sorted(p.name for p in boot.path.iterdir()) == [
            "disk.qcow2", "meta.json", "ssh-keys.json", "vmstate.zst"
        ]  # fmt: skip

        other = _booting(store, work, ["b", "c"])
        assert other.resumed == [] and other.boot is not None and other.boot.key == boot.key
        assert other.start_disk() == boot.disk
        restore, why = other.saved_vm()
        assert restore is not None and why == "" and restore.signature == "s" * 64
        other.restored = "ram"
        saved = other.save_component(0, work / "l2.qcow2", {})
        assert saved is not None and saved.meta["parent"] == boot.key
        assert other.to_json()["boot"] is True and other.to_json()["resumed"] == []

        # Its rebuild resumes "b" through the chain b -> boot layer -> base.
        again = _booting(store, work, ["b", "c"])
        assert [cp.key for cp in again.resumed] == [saved.key] and again.boot is None
        assert again.to_json()["boot"] is False
        raw = tmp_path / "b.raw"
        qemu_img("convert", "-O", "raw", again.start_disk() or "", raw)
        data = raw.read_bytes()
        assert (data[0], data[65536], data[131072]) == (0x11, 0x22, 0x33)


def test_a_booted_builder_that_cannot_come_back_is_not_booted_again(
    tmp_path: Path, work: Path
) -> None:
    """Another QEMU's state: kept for it; this build boots from the base and cuts
    no boot layer of its own. A damaged state (or unreadable keys): dropped,
    the layer kept for what stands on it, and no longer looked up (it ages out)."""
    said: list[str] = []
    with CheckpointStore(tmp_path / "ck", warn=said.append) as store:
        first = _booting(store, work, ["a"])
        assert first.save_boot(work / "l1.qcow2", _state(store)) is not None
        key = first.boot_key
        assert key is not None

        foreign = _booting(store, work, ["b"])
        assert foreign.boot is not None
        foreign.boot_not_resumed()  # not resumable here, not damaged
        assert foreign.start_disk() is None and not foreign.boot_wanted()
        saved = foreign.save_component(0, work / "l1.qcow2", {})
        assert saved is not None and saved.meta["parent"] is None and saved.meta["backing"]
        assert (store.root / key.digest / resume.STATE_FILE).exists()

        damaged = _booting(store, work, ["c"])
        assert damaged.boot is not None
        damaged.drop_saved_vm()
        damaged.boot_not_resumed()
        assert sorted(p.name for p in (store.root / key.digest).iterdir()) == [
            "disk.qcow2", "meta.json"
        ]  # fmt: skip
        assert damaged.start_disk() is None and not damaged.boot_wanted()
        used = (store.root / key.digest / "meta.json").stat().st_mtime
        os.utime(store.root / key.digest / "meta.json", (used - 3600, used - 3600))
        later = _booting(store, work, ["d"])
        assert later.boot is None and later.start_disk() is None and not later.boot_wanted()
        # Not counted as used: it ages out.
        assert (store.root / key.digest / "meta.json").stat().st_mtime == used - 3600

    with CheckpointStore(tmp_path / "ck2", warn=said.append) as store:
        first = _booting(store, work, ["a"])
        boot = first.save_boot(work / "l1.qcow2", _state(store))
        assert boot is not None
        (boot.path / resume.KEYS_FILE).write_text("{")
        unreadable = _booting(store, work, ["b"])
        assert unreadable.saved_vm() == (
            None, "the SSH keys saved with its running state are unreadable"
        )  # fmt: skip
        assert not (boot.path / resume.STATE_FILE).exists()
        assert _booting(store, work, ["c"]).boot is None


def test_a_booted_builder_is_keyed_on_the_machine_it_loads_into(tmp_path: Path) -> None:
    """The signature a builder's saved state will carry is known before it starts
    (guest.state_signature: QEMU's real version): equal to the one its running
    machine reports whatever its files and port, and another for other memory,
    another accelerator or firmware; none for libvirt or the ec2 boot mode."""
    from dataclasses import replace

    from vmbuild.hypervisor import guest, imds
    from vmbuild.hypervisor.guest import GuestRequest

    req = GuestRequest(
        run_id="r1", role="builder", base=tmp_path / "base.qcow2", base_format="qcow2",
        disk_size=None, memory_mib=2048, cpus=2, accel=accel.tcg("test"),
        workdir=tmp_path / "w", user="vmbuild-builder",
    )  # fmt: skip
    before = guest.state_signature(req)
    running = guest._spec(
        req, name="vmbuild-r1-builder", disk=tmp_path / "w" / "builder.qcow2",
        seed=tmp_path / "w" / "builder-seed.iso", ssh_port=free_port(),
        console_log=tmp_path / "w" / "builder-console.log", ec2=None, uefi_vars=None,
    )  # fmt: skip
    assert before is not None and before == QemuMachine(running).state_signature()
    other_run = replace(req, run_id="r2", workdir=tmp_path / "other", role="scratch")
    assert guest.state_signature(other_run) == before
    for changed in (
        replace(req, memory_mib=1024),
        replace(req, accel=accel.Accel("kvm", "test", 1.0)),
        replace(req, firmware="uefi"),
    ):
        assert guest.state_signature(changed) not in (None, before)
    assert guest.state_signature(replace(req, backend="libvirt")) is None
    assert guest.state_signature(replace(req, ec2=imds.Ec2Settings())) is None
