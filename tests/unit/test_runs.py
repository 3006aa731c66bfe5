"""The run registry: a live run is registered under a held lock; a dead one
(its lock free) is reaped: paths removed, failure recorded with its log tail."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from vmbuild import runs


def dead_run(state: Path, tmp_path: Path, log_lines: int = 60) -> tuple[Path, Path]:
    """A registry entry as a SIGKILLed vmbuild leaves it (lock file, no holder)."""
    staging = tmp_path / "store" / "x" / "1" / ".staging-abc"
    staging.mkdir(parents=True)
    (staging / "build.log").write_text("".join(f"l{i}\n" for i in range(log_lines)))
    entry = state / "runs" / "4242-99"
    entry.mkdir(parents=True)
    (entry / "lock").write_text("")
    info = {
        "pid": 4242, "start": 99, "argv": ["vmbuild", "build", "r.yaml"], "started": 1.0,
        # A pid that cannot exist (above pid_max): never killed, whatever it was.
        "children": [{"pid": 2**22 + 7, "start": 5}],
        "paths": [str(staging)], "log": str(staging / "build.log"),
    }  # fmt: skip
    (entry / "run.json").write_text(json.dumps(info))
    return entry, staging


def test_registration_is_visible_and_removed(tmp_path: Path) -> None:
    with runs.registered(["vmbuild", "images", "list"], state=tmp_path) as run:
        assert runs.current() is run
        (entry,) = (tmp_path / "runs").iterdir()
        assert entry.name == f"{os.getpid()}-{runs.proc_start_time(os.getpid())}"
        runs.own(tmp_path / "some-dir")
        info = json.loads((entry / "run.json").read_text())
        assert info["paths"] == [str(tmp_path / "some-dir")]
        runs.disown(tmp_path / "some-dir")
        assert json.loads((entry / "run.json").read_text())["paths"] == []
        # The live run (this process) holds its lock: it is not reaped.
        assert runs.reap(tmp_path) == []
        assert entry.exists()
    assert runs.current() is None
    assert list((tmp_path / "runs").iterdir()) == []


def test_a_dead_run_is_reaped_and_recorded(tmp_path: Path) -> None:
    state = tmp_path / "state"
    entry, staging = dead_run(state, tmp_path)
    (reaped,) = runs.reap(state)
    assert not entry.exists()
    assert not staging.exists()
    assert not (tmp_path / "store" / "x").exists()  # empty name/version dirs go too
    assert reaped.killed == []
    assert reaped.removed == [str(staging)]
    record = json.loads((state / "failed-runs" / "4242-99.json").read_text())
    assert record["status"] == "failed"
    assert record["log_tail"].splitlines() == [f"l{i}" for i in range(20, 60)]
    assert Path(record["log"]).read_text().startswith("l0\n")
    assert oct((state / "failed-runs" / "4242-99.json").stat().st_mode & 0o777) == "0o600"
    assert reaped.summary().startswith(
        "an earlier vmbuild run (vmbuild build r.yaml; 4242-99) died without cleaning up: "
        "removed 1 leftover path(s); recorded as failed in "
    )


def test_old_failed_runs_are_pruned(tmp_path: Path) -> None:
    old = tmp_path / "failed-runs" / "1-1.json"
    old.parent.mkdir()
    old.write_text("{}")
    young = tmp_path / "failed-runs" / "2-2.json"
    young.write_text("{}")
    long_ago = 1_000_000_000
    os.utime(old, (long_ago, long_ago))
    (tmp_path / "runs").mkdir()
    runs.reap(tmp_path)
    assert not old.exists() and young.exists()


def test_registrations_overlap_in_one_entry_closed_by_the_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A library caller's blocks (nested, or in two threads) share one entry;
    it goes when the last block ends, not the first."""
    monkeypatch.setenv("VMBUILD_STATE_DIR", str(tmp_path / "state"))
    registry = tmp_path / "state" / "runs"
    first, second = tmp_path / "staging-1", tmp_path / "staging-2"
    outer = runs.owning(first)
    outer.__enter__()
    (entry,) = registry.iterdir()
    with runs.owning(second):
        assert json.loads((entry / "run.json").read_text())["paths"] == [str(first), str(second)]
        outer.__exit__(None, None, None)
        assert list(registry.iterdir()) == [entry]  # the inner block still runs
        info = json.loads((entry / "run.json").read_text())
        assert info["paths"] == [str(second)]
        assert info["argv"] == sys.argv
    assert list(registry.iterdir()) == []
    assert runs.current() is None
