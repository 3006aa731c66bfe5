"""No orphans after SIGKILL: a registered vmbuild process is killed outright;
its direct child dies with it (PR_SET_PDEATHSIG), and the next vmbuild command
kills the rest of its process group, removes the paths it owned and records
it as failed with its log tail. Real processes, no VM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vmbuild.runs import proc_start_time

REPO = Path(__file__).resolve().parents[2]

# A stand-in for a build: registered like any vmbuild command, owning a
# staging dir, logging to it, and running a command whose child (a
# grandchild of vmbuild) would outlive a plain kill.
VICTIM = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from vmbuild import runs
    from vmbuild.run import run

    staging = Path(sys.argv[1])
    with runs.registered(["vmbuild", "build", "victim"]):
        staging.mkdir(mode=0o700)
        runs.own(staging)
        (staging / "build.log").write_text("".join(f"line {i}\\n" for i in range(100)))
        (staging / "builder-id_ed25519").write_text("PRIVATE KEY")
        runs.note(log=staging / "build.log")
        run(["sh", "-c", "sleep 300 & echo $! > " + sys.argv[2] + "; echo up; wait"],
            on_line=lambda line: print(line, flush=True))
    """
)


def wait_for(predicate, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    state = Path(f"/proc/{pid}/stat")
    try:
        return state.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = dict(os.environ)
    e["VMBUILD_STATE_DIR"] = str(tmp_path / "state")
    e["VMBUILD_STORE"] = str(tmp_path / "store")
    e["VMBUILD_CACHE_DIR"] = str(tmp_path / "cache")
    return e


def test_sigkill_leaves_nothing_after_the_next_command(tmp_path: Path, env: dict[str, str]) -> None:
    staging = tmp_path / "store" / "img" / "1.0.0" / ".staging-x"
    staging.parent.mkdir(parents=True)
    grandchild_file = tmp_path / "grandchild.pid"
    victim = subprocess.Popen(
        [sys.executable, "-c", VICTIM, str(staging), str(grandchild_file)],
        env=env, cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert victim.stdout is not None
    assert victim.stdout.readline() == "up\n"  # the command runs: everything is in place
    grandchild = int(grandchild_file.read_text())
    registry = Path(env["VMBUILD_STATE_DIR"]) / "runs"
    (entry,) = registry.iterdir()
    children = json.loads((entry / "run.json").read_text())["children"]
    (child,) = children
    assert alive(child["pid"]) and alive(grandchild)

    victim.send_signal(signal.SIGKILL)
    victim.wait()
    # The direct child (sh) dies with vmbuild: PR_SET_PDEATHSIG.
    wait_for(lambda: not alive(child["pid"]))
    # Its own child was not told; it is what the next command reaps.
    assert alive(grandchild)
    assert staging.exists()

    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "vmbuild", "images", "list"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: not alive(grandchild), timeout=5)
    print(f"reaped in {time.monotonic() - started:.2f}s")
    assert "an earlier vmbuild run (vmbuild build victim;" in proc.stderr
    assert not staging.exists()
    assert not staging.parent.exists()  # no empty name/version dirs either
    assert list(registry.iterdir()) == []  # only the reaping command was registered, now gone
    (record,) = (Path(env["VMBUILD_STATE_DIR"]) / "failed-runs").iterdir()
    failed = json.loads(record.read_text())
    assert failed["status"] == "failed"
    assert failed["argv"] == ["vmbuild", "build", "victim"]
    assert failed["killed"] == [child["pid"]]  # its group, where the grandchild was
    assert failed["removed"] == [str(staging)]
    assert failed["log_tail"].splitlines()[-1] == "line 99"
    assert len(failed["log_tail"].splitlines()) == 40
    kept = Path(failed["log"])
    assert kept.read_text().endswith("line 99\n")
    assert oct(kept.stat().st_mode & 0o777) == "0o600"


def test_a_live_run_is_never_reaped(tmp_path: Path, env: dict[str, str]) -> None:
    staging = tmp_path / "store" / "img" / "1.0.0" / ".staging-y"
    staging.parent.mkdir(parents=True)
    grandchild_file = tmp_path / "grandchild.pid"
    victim = subprocess.Popen(
        [sys.executable, "-c", VICTIM, str(staging), str(grandchild_file)],
        env=env, cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    group = None
    try:
        assert victim.stdout is not None
        assert victim.stdout.readline() == "up\n"
        (entry,) = (Path(env["VMBUILD_STATE_DIR"]) / "runs").iterdir()
        group = json.loads((entry / "run.json").read_text())["children"][0]["pid"]
        proc = subprocess.run(
            [sys.executable, "-m", "vmbuild", "images", "list"],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert "earlier vmbuild run" not in proc.stderr
        assert staging.exists()
        assert victim.poll() is None
        assert proc_start_time(int(grandchild_file.read_text())) is not None
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait(30)
        if group is not None:
            os.killpg(group, signal.SIGKILL)


# A library caller, not the CLI: a script (or pytest) that opens a build's
# staging dir through the library API and is then SIGKILLed.
LIBRARY_USER = textwrap.dedent(
    """
    import signal
    import sys
    from pathlib import Path
    from vmbuild.stages import store

    with store.staging(Path(sys.argv[1]), "img", "1.0.0", "lib") as stage:
        (stage.path / "builder-id_ed25519").write_text("PRIVATE KEY")
        print(stage.path, flush=True)
        signal.pause()
    """
)


def test_a_sigkilled_library_caller_is_reaped_by_the_next_command(
    tmp_path: Path, env: dict[str, str]
) -> None:
    store = Path(env["VMBUILD_STORE"])
    argv = [sys.executable, "-c", LIBRARY_USER, str(store)]
    user = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert user.stdout is not None
    staging = Path(user.stdout.readline().strip())  # the dir exists and is owned: registered
    assert staging == store / "img" / "1.0.0" / ".staging-lib"
    (entry,) = (Path(env["VMBUILD_STATE_DIR"]) / "runs").iterdir()
    assert entry.name == f"{user.pid}-{proc_start_time(user.pid)}"

    user.send_signal(signal.SIGKILL)
    assert user.wait(30) == -signal.SIGKILL
    assert (staging / "builder-id_ed25519").read_text() == "PRIVATE KEY"  # left behind

    proc = subprocess.run(
        [sys.executable, "-m", "vmbuild", "images", "list"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "an earlier vmbuild run (" in proc.stderr
    assert not staging.exists()
    assert not (store / "img").exists()  # nor the empty name/version dirs
    assert list((Path(env["VMBUILD_STATE_DIR"]) / "runs").iterdir()) == []
    (record,) = (Path(env["VMBUILD_STATE_DIR"]) / "failed-runs").iterdir()
    failed = json.loads(record.read_text())
    assert failed["argv"] == ["-c", str(store)]  # the caller's own sys.argv
    assert failed["pid"] == user.pid
    assert failed["removed"] == [str(staging)]
