"""The pipeline, scheduler and runs verbs, in-process (the real CLI with a fake build);
the process-level tests are in tests/integration/test_scheduler_cli.py."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.pipeline import (
    FakeBuild,
    pkg,
    write_mirror,
    write_pipeline,
    write_recipe,
)
from vmbuild import cli
from vmbuild.cli import pipeline as pipeline_cli
from vmbuild.pipeline.history import History
from vmbuild.pipeline.runner import Services, lock_for

SBOM = [pkg("openssl", "3.0.11-1~deb12u2")]


@pytest.fixture(autouse=True)
def _restore_signals() -> Iterator[None]:
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


class Env:
    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.mirror = tmp_path / "debian"
        uri = write_mirror(self.mirror, "bookworm", SBOM)
        write_recipe(tmp_path / "recipes", "img")
        self.pipeline = write_pipeline(tmp_path / "pipelines", {
            "recipe": "../recipes/img-recipe.yaml",
            "infrastructure": {"mirror": uri, "refresh_base": False},
            "dependencies": {"apt_sources": [f"deb {uri} bookworm main"]},
            "schedule": {"cron": "0 3 * * 1", "timezone": "Europe/Paris"},
            "lifecycle": {"keep_last": 1},
        }, "p")  # fmt: skip
        self.db = tmp_path / "state" / "history.sqlite"
        self.store = tmp_path / "store"
        monkeypatch.setenv("VMBUILD_HISTORY", str(self.db))
        monkeypatch.setenv("VMBUILD_STORE", str(self.store))
        self.build = FakeBuild(packages=SBOM)
        monkeypatch.setattr(pipeline_cli, "_services", lambda: Services(build=self.build))


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    return Env(tmp_path, monkeypatch)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_the_verbs_are_registered() -> None:
    parser = cli.build_parser()
    for argv in (["pipeline", "run", "f"], ["pipeline", "check", "f"], ["pipeline", "export-systemd", "f"],
                 ["pipeline", "export-cron", "f"], ["scheduler"], ["runs", "list"], ["runs", "show", "1"],
                 ["runs", "logs", "1"]):  # fmt: skip
        assert parser.parse_args(argv).handler


def test_run_then_list_show_logs(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "pipeline", "run", str(env.pipeline), "--quiet")
    assert code == 0
    assert out.startswith("run 1 succeeded in ")
    assert "image:  img/1.0.0/" in out and f"log:    {env.db.parent}/logs/p/run-000001.log" in out

    code, out, _ = run(capsys, "runs", "list")
    assert code == 0
    assert "id" in out and "pipeline" in out and "trigger" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("1 "))
    assert "p" in row and "manual" in row and "succeeded" in row and "img/1.0.0/" in row

    code, out, _ = run(capsys, "runs", "list", "--json")
    [data] = json.loads(out)
    assert data["status"] == "succeeded" and data["timings"]["builder"] >= 0

    code, out, _ = run(capsys, "runs", "show", "1")
    assert "status:   succeeded" in out and "stage     builder" in out

    code, out, _ = run(capsys, "runs", "logs", "1", "--tail", "3")
    assert code == 0 and len(out.splitlines()) == 3 and "run 1 succeeded" in out


def test_a_failed_run_exits_1_with_a_hint(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    from vmbuild.errors import VmbuildError

    env.build.error = VmbuildError("the builder VM did not boot")
    code, out, err = run(capsys, "pipeline", "run", str(env.pipeline), "--quiet")
    assert code == 1
    assert "error: run 1 of p failed: the builder VM did not boot" in err
    assert "hint: vmbuild runs logs 1" in err
    code, out, _ = run(capsys, "runs", "show", "1")
    assert "--- log (last lines) ---" in out


def test_a_busy_pipeline_exits_75(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    lock = lock_for(env.db.parent, "p")
    assert lock.acquire()
    try:
        code, out, _ = run(capsys, "pipeline", "run", str(env.pipeline), "--quiet")
    finally:
        lock.release()
    assert code == 75
    assert out.startswith("run 1 skipped: already running")


def test_check_exit_codes(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "pipeline", "check", str(env.pipeline))
    assert code == 0 and "history: no successful run of p recorded yet" in out
    assert run(capsys, "pipeline", "run", str(env.pipeline), "--quiet")[0] == 0

    code, out, _ = run(capsys, "pipeline", "check", str(env.pipeline))
    assert (code, out.strip()) == (1, "p: no dependency changed since run 1")

    write_mirror(env.mirror, "bookworm", [pkg("openssl", "3.0.13-1~deb12u1")])
    code, out, _ = run(capsys, "pipeline", "check", str(env.pipeline))
    assert code == 0
    assert "packages: 1 package newer in the mirror (openssl)" in out
    assert "openssl:amd64 3.0.11-1~deb12u2 → 3.0.13-1~deb12u1" in out

    code, out, _ = run(capsys, "pipeline", "check", str(env.pipeline), "--json")
    data = json.loads(out)
    assert data["changed"] and data["exit_code"] == 0
    assert [c["kind"] for c in data["changes"]] == ["base", "packages"]  # bookworm itself moved

    for f in (env.mirror / "dists").rglob("*"):
        if f.is_file():
            f.unlink()
    code, out, err = run(capsys, "pipeline", "check", str(env.pipeline))
    assert code == 2 and "warning: could not check base:" in err


def test_prune_dry_run(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "pipeline", "run", str(env.pipeline), "--quiet")
    run(capsys, "pipeline", "run", str(env.pipeline), "--quiet")  # pruned the first
    code, out, _ = run(capsys, "pipeline", "prune", str(env.pipeline), "--dry-run")
    assert (code, out.strip()) == (0, "nothing to prune")
    with History(env.db) as h:
        assert len(h.get(2).pruned) == 1


def test_exports(env: Env, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = run(capsys, "pipeline", "export-systemd", str(env.pipeline), "--output-dir", str(tmp_path / "u"))  # fmt: skip
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "u").iterdir()) == ["vmbuild-pipeline-p.service", "vmbuild-pipeline-p.timer"]  # fmt: skip
    assert "systemctl enable --now vmbuild-pipeline-p.timer" in err
    code, out, _ = run(capsys, "pipeline", "export-cron", str(env.pipeline))
    assert (
        code == 0
        and "CRON_TZ=Europe/Paris" in out
        and out.splitlines()[-1].startswith("0 3 * * 1 cd ")
    )


def test_runs_errors(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "runs", "show", "42")
    assert code == 1 and "error: no run 42" in err
    with History(env.db) as h:
        run_id = h.record_skipped("p", None, "schedule", h_now(), "no dependency changed")
    code, _, err = run(capsys, "runs", "logs", str(run_id))
    assert code == 1 and "has no log (skipped: no dependency changed)" in err


def test_scheduler_refuses_a_broken_pipeline(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    write_pipeline(env.pipeline.parent, {"recipe": "../recipes/img-recipe.yaml",
                                         "schedule": {"cron": "0 3 * * *", "timezone": "Nowhere/City"}}, "broken")  # fmt: skip
    code, _, err = run(capsys, "scheduler", "--pipelines", str(env.pipeline.parent))
    assert code == 1
    assert "1 problem in the pipelines of" in err
    assert "broken.yaml: schedule.timezone: unknown time zone 'Nowhere/City'" in err


def h_now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)
