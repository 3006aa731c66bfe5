"""One pipeline run with a fake build: recorded outcomes, the per-pipeline lock, start
conditions, timeouts, cancellation, distribution and lifecycle."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.support.pipeline import (
    T0,
    FakeBuild,
    FakeClock,
    fake_artifact,
    pkg,
    write_mirror,
    write_pipeline,
    write_recipe,
)  # fmt: skip
from vmbuild.config.pipeline import LoadedPipeline, load_pipeline
from vmbuild.config.recipe import LoadedRecipe
from vmbuild.errors import VmbuildError
from vmbuild.log import Progress
from vmbuild.pipeline import runner
from vmbuild.pipeline.history import History
from vmbuild.pipeline.runner import (
    DistributionOutcome,
    RunContext,
    Services,
    lock_for,
    refresh_debian_base,
    run_pipeline,
)  # fmt: skip
from vmbuild.stages import base_image

SBOM = [pkg("openssl", "3.0.11-1~deb12u2")]


class Env:
    def __init__(self, tmp_path: Path, **pipeline: Any) -> None:
        self.mirror = tmp_path / "mirror" / "debian"
        uri = write_mirror(self.mirror, "bookworm", SBOM)
        write_recipe(tmp_path / "recipes", "img", vm={"cpus": 1, "memory": "1G"})
        body: dict[str, Any] = {
            "recipe": "../recipes/img-recipe.yaml",
            "infrastructure": {"mirror": uri, "refresh_base": False},
            "dependencies": {"apt_sources": [f"deb {uri} bookworm main"]},
        }
        for key, value in pipeline.items():
            body[key] = {**body.get(key, {}), **value} if isinstance(value, dict) else value
        self.path = write_pipeline(tmp_path / "pipelines", body, "p")
        self.state = tmp_path / "state"
        self.store = tmp_path / "store"
        self.history = History(self.state / "history.sqlite")
        self.clock = FakeClock()
        self.build = FakeBuild(packages=SBOM, clock=self.clock)
        self.services = Services(build=self.build, refresh_base=self.no_refresh)
        self.refreshed: list[str] = []

    def no_refresh(self, recipe: LoadedRecipe, mirror: str | None, progress: Progress) -> None:
        self.refreshed.append(recipe.recipe.name)

    def load(self) -> LoadedPipeline:
        return load_pipeline(self.path)

    def ctx(self, **kwargs: Any) -> RunContext:
        return RunContext(self.history, self.store, self.state, clock=self.clock, quiet=True,
                          services=self.services, **kwargs)  # fmt: skip

    def run(self, trigger: str = "manual") -> Any:
        return run_pipeline(self.load(), self.ctx(), trigger)  # type: ignore[arg-type]


def test_a_successful_run_is_recorded(tmp_path: Path) -> None:
    env = Env(tmp_path, infrastructure={"cpus": 2, "memory": "2G", "backend": "qemu",
                                        "accelerator": "tcg", "keep_vm_on_failure": True},
              tests={"enabled": False})  # fmt: skip
    r = env.run()
    assert (r.status, r.trigger, r.error) == ("succeeded", "manual", None)
    assert r.image and r.image.startswith("img/1.0.0/") and Path(r.artifact or "").is_dir()
    assert set(r.timings) >= {"dependencies", "builder"}
    assert r.deps and r.deps["recipe"]["sha256"] and r.deps["base"]["kind"] == "debian"
    log = Path(r.log_path or "")
    assert log.parent == env.state / "logs" / "p" and "pipeline p: run 1, trigger manual" in log.read_text()  # fmt: skip
    [(recipe, opts)] = env.build.calls
    assert (recipe.recipe.vm.cpus, recipe.recipe.vm.memory) == (2, 2 << 30)
    assert (opts.accel, opts.backend, opts.skip_tests, opts.keep_on_failure) == ("tcg", "qemu", True, True)  # fmt: skip
    assert opts.store == env.store and opts.distribute is False
    assert opts.mirror and opts.mirror.startswith("file://")
    assert env.refreshed == []  # refresh_base: false


def test_refresh_base_is_called_when_enabled(tmp_path: Path) -> None:
    env = Env(tmp_path, infrastructure={"refresh_base": True})
    env.run()
    assert env.refreshed == ["img"]


def test_a_failed_build_is_recorded_with_error_hint_and_log_tail(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.build.error = VmbuildError("the builder VM did not boot", hint="see the console log")
    r = env.run()
    assert r.status == "failed" and r.artifact is None
    assert r.error == "the builder VM did not boot\nhint: see the console log"
    assert r.log_tail and "stage builder failed" in r.log_tail
    assert r.timings["builder"] >= 0


def test_an_internal_error_is_recorded_then_raised(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.build.error = RuntimeError("bug")
    with pytest.raises(RuntimeError):
        env.run()
    r = env.history.get(1)
    assert r.status == "failed" and r.error == "internal error: RuntimeError: bug"


def test_cancellation_is_recorded_then_propagates(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.build.error = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        env.run()
    r = env.history.get(1)
    assert r.status == "cancelled" and r.ended is not None
    assert "cancelled" in (r.error or "")


def test_the_pipelines_scan_threshold_fails_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMBUILD_CONFIG_DIR", str(tmp_path / "config"))  # the signing key
    monkeypatch.delenv("VMBUILD_KMS_KEY", raising=False)
    tracker = {
        "openssl": {
            "CVE-2024-0727": {
                "releases": {
                    "bookworm": {
                        "status": "resolved",
                        "fixed_version": "3.0.13-1~deb12u1",
                        "urgency": "medium",
                    }
                }
            }
        }
    }
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "tracker.json").write_text(json.dumps(tracker))  # fmt: skip
    env = Env(tmp_path, scan={"fail_on": "medium", "data": "tracker.json"})
    env.build.attest = True
    r = env.run()
    assert r.status == "failed"
    assert r.error == (
        "CVE scan: 1 finding(s) at or above medium, e.g. CVE-2024-0727 in openssl "
        "3.0.11-1~deb12u2 (medium, fixed in 3.0.13-1~deb12u1)\n"
        "hint: `vmbuild scan REF --json` lists them; update the packages or raise the threshold"
    )
    # Below the threshold the same run passes, with the finding in the manifest.
    env2 = Env(
        tmp_path / "again",
        scan={"fail_on": "high", "data": str(tmp_path / "pipelines" / "tracker.json")},
    )
    env2.build.attest = True
    ok = env2.run()
    assert ok.status == "succeeded", ok.error
    manifest = json.loads((Path(ok.artifact) / "manifest.json").read_text())
    assert manifest["scan"]["fail_on"] == "high"
    assert [(f["cve"], f["package"]) for f in manifest["scan"]["findings"]] == [
        ("CVE-2024-0727", "openssl")
    ]


def test_a_second_trigger_while_running_is_skipped(tmp_path: Path) -> None:
    env = Env(tmp_path)
    held = lock_for(env.state, "p")
    assert held.acquire()  # a run in progress (another process, in real life)
    try:
        first = env.history.start_run("p", None, "schedule", T0)
        r = env.run("manual")
    finally:
        held.release()
    assert r.status == "skipped" and r.trigger == "manual"
    assert r.reason == f"already running (run {first}, pid {os.getpid()}): this trigger is skipped"
    assert env.build.calls == []
    assert env.run().status == "succeeded"  # the lock is free again


def test_a_dead_runs_record_is_closed_by_the_next_run(tmp_path: Path) -> None:
    env = Env(tmp_path)
    dead = env.history.start_run("p", None, "schedule", T0)  # its process was killed
    env.run()
    assert env.history.get(dead).status == "failed"
    assert "died" in (env.history.get(dead).error or "")


def test_if_dependencies_updated(tmp_path: Path) -> None:
    env = Env(tmp_path, schedule={"cron": "0 3 * * *", "start_condition": "if-dependencies-updated"})  # fmt: skip
    first = env.run("schedule")
    assert (first.status, first.trigger) == ("succeeded", "dependency")
    assert first.reason == "no successful run of p recorded yet"

    second = env.run("schedule")
    assert (second.status, second.trigger) == ("skipped", "schedule")
    assert second.reason == f"no dependency changed since run {first.id}"
    assert len(env.build.calls) == 1

    write_mirror(env.mirror, "bookworm", [pkg("openssl", "3.0.13-1~deb12u1")])  # a fix lands
    third = env.run("schedule")
    assert (third.status, third.trigger) == ("succeeded", "dependency")
    assert third.reason and "1 package newer in the mirror (openssl)" in third.reason

    manual = env.run("manual")  # a manual run builds whatever the start condition
    assert manual.status == "succeeded" and len(env.build.calls) == 3


def test_a_failed_dependency_check_is_a_failed_run(tmp_path: Path) -> None:
    env = Env(tmp_path, schedule={"cron": "0 3 * * *", "start_condition": "if-dependencies-updated"})  # fmt: skip
    env.run("schedule")
    (env.mirror / "dists" / "bookworm" / "main" / "binary-amd64" / "Packages.xz").unlink()
    (env.mirror / "dists" / "bookworm" / "Release").unlink()
    r = env.run("schedule")
    assert r.status == "failed" and (r.error or "").startswith("dependency check failed: ")
    assert len(env.build.calls) == 1


def test_always_does_not_check(tmp_path: Path) -> None:
    env = Env(tmp_path, schedule={"cron": "0 3 * * *", "start_condition": "always"})
    checked: list[str] = []
    env.services.check = lambda loaded, history: checked.append("x")  # type: ignore[assignment,func-returns-value,misc]
    assert env.run("schedule").trigger == "schedule"
    assert env.run("schedule").status == "succeeded"
    assert checked == []


def test_the_run_timeout_cancels_the_build(tmp_path: Path) -> None:
    env = Env(tmp_path, infrastructure={"timeout": 0.3})
    env.build.sleep = 10
    r = env.run()
    assert r.status == "failed"
    assert r.error == "the run timed out after 0.3s (during builder); cancelled and cleaned up"
    assert r.timings["builder"] < 5


def test_the_tests_timeout_applies_to_the_test_stage(tmp_path: Path) -> None:
    env = Env(tmp_path, tests={"timeout": 0.3})
    env.build.stage_sleep = {"test": 10}
    r = env.run()
    assert r.status == "failed"
    assert r.error == "stage test timed out after 0.3s (during test); cancelled and cleaned up"


def test_distribution_records_ami_ids(tmp_path: Path) -> None:
    env = Env(tmp_path)
    calls: list[Path] = []

    def distribute(build_dir: Path, config: Any, progress: Progress) -> DistributionOutcome:
        calls.append(build_dir)
        return DistributionOutcome({"us-east-1": "ami-0abc", "eu-west-1": "ami-0def"}, [])

    env.services.distribute = distribute
    loaded = env.load()
    loaded = type(loaded)(**{**loaded.__dict__, "distribution": object()})  # any config
    r = run_pipeline(loaded, env.ctx())
    assert r.status == "succeeded"
    assert r.ami_ids == {"us-east-1": "ami-0abc", "eu-west-1": "ami-0def"}
    assert calls == [Path(r.artifact or "")] and "distribute" in r.timings


def test_a_failed_region_fails_the_run_but_keeps_what_was_made(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.services.distribute = lambda b, c, p: DistributionOutcome({"us-east-1": "ami-1"}, ["eu-west-1: AccessDenied"])  # fmt: skip
    loaded = env.load()
    loaded = type(loaded)(**{**loaded.__dict__, "distribution": object()})
    r = run_pipeline(loaded, env.ctx())
    assert r.status == "failed" and r.error == "distribution failed: eu-west-1: AccessDenied"
    assert r.ami_ids == {"us-east-1": "ami-1"} and r.artifact


def test_lifecycle_prunes_after_success(tmp_path: Path) -> None:
    env = Env(tmp_path, lifecycle={"keep_last": 1})
    old = fake_artifact(env.store, "img", created=T0 - timedelta(days=3), suffix="0000aa")
    env.clock.advance(hours=1)
    r = env.run()
    assert r.status == "succeeded"
    assert [d["image"] for d in r.pruned] == [f"img/1.0.0/{old.name}"]
    assert not old.exists() and Path(r.artifact or "").is_dir()


def test_refresh_debian_base_rebuilds_a_base_the_mirror_moved_past(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mirror = tmp_path / "debian"
    for suite in ("bookworm", "bookworm-updates"):
        write_mirror(mirror, suite, SBOM, date=T0)
    write_mirror(tmp_path / "debian-security", "bookworm-security", SBOM, date=T0)
    base_dir = tmp_path / "bases" / "debian-12-x"
    base_dir.mkdir(parents=True)
    (base_dir / "disk.qcow2").write_bytes(b"")
    meta = {"created": (T0 - timedelta(days=1)).isoformat(), "mirror": mirror.as_uri(),
            "security_mirror": (tmp_path / "debian-security").as_uri()}  # fmt: skip
    (base_dir / "meta.json").write_text(json.dumps(meta))
    calls: list[bool] = []

    def build_debian(release: str, *, mirror: str | None = None, rebuild: bool = False,
                     on_progress: Any = None) -> base_image.BaseImage:  # fmt: skip
        calls.append(rebuild)
        return base_image.BaseImage("debian-12-x", base_dir / "disk.qcow2", "qcow2", "0", "s", 1)

    monkeypatch.setattr(base_image, "build_debian", build_debian)
    write_recipe(tmp_path / "r", "img")
    loaded = load_pipeline(write_pipeline(tmp_path / "r", {"recipe": "img-recipe.yaml"}))
    refresh_debian_base(loaded.recipe, None, Progress(quiet=True))
    assert calls == [False, True]  # the mirror's Release files are newer than the base

    calls.clear()
    meta["created"] = (T0 + timedelta(hours=1)).isoformat()
    (base_dir / "meta.json").write_text(json.dumps(meta))
    refresh_debian_base(loaded.recipe, None, Progress(quiet=True))
    assert calls == [False]  # current: reused


def test_watchdog_is_inert_outside_the_main_thread() -> None:
    import threading

    results: list[bool] = []

    def body() -> None:
        with runner.Watchdog(0.01) as dog:
            results.append(dog.enabled)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert results == [False]
