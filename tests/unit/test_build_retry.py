"""--on-error=ask: a component run again by hand turns the build's checkpoints off.

The failed attempt, or the user in a shell, may have changed the builder; no key
covers that, so nothing this build keeps or finds from then on may stand for a
clean build of the same inputs."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from vmbuild import build
from vmbuild.cache.checkpoints import CheckpointStore
from vmbuild.errors import StepFailed


class Builder:
    def ssh_hint(self) -> str:
        return "ssh -p 2222 builder@127.0.0.1"


@pytest.fixture
def answers(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The user's answers, in order; a terminal to ask on."""
    given: list[str] = []
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda _prompt="": given.pop(0))
    yield given
    assert given == [], "not every answer was asked for"


def run_with(store: CheckpointStore, said: list[str]) -> build.Run:
    fake = SimpleNamespace(
        builder=Builder(), ck=SimpleNamespace(store=store),
        reporter=SimpleNamespace(status=said.append),
    )  # fmt: skip
    return fake  # type: ignore[return-value]


def test_a_retry_after_a_shell_turns_checkpoints_off(
    tmp_path: Path, answers: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    said: list[str] = []
    answers.extend(["s", "", "r"])  # a shell, Enter when done, then retry
    with CheckpointStore(tmp_path / "ck", warn=said.append) as store:
        r = run_with(store, said)
        assert build._ask_retry(r, StepFailed("build/Install failed (exit 1)"), "nginx-app")
        assert not store.enabled
        # Nothing saved from here on, nothing found.
        assert store.save("k" * 64, stage="test", label="test result", data={}) is None
        assert store.find("k" * 64) is None
    assert "ssh -p 2222 builder@127.0.0.1" in capsys.readouterr().out
    assert said[-1] == (
        "checkpoints: off for the rest of this build (nginx-app runs again on a builder "
        "its failed attempt or a shell may have changed)"
    )


def test_abort_keeps_the_cache_as_it_is(tmp_path: Path, answers: list[str]) -> None:
    said: list[str] = []
    answers.append("a")
    with CheckpointStore(tmp_path / "ck", warn=said.append) as store:
        assert not build._ask_retry(run_with(store, said), StepFailed("x"), "nginx-app")
        assert store.enabled
    assert said == ["failed: x"]
