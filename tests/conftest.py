"""Shared test configuration."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _private_component_library(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """Every test gets an empty local component library, never the user's."""
    library = tmp_path_factory.mktemp("component-library")
    monkeypatch.setenv("VMBUILD_COMPONENT_LIBRARY", str(library))
    yield library


# Each test session gets its own vmbuild state dir (the run registry and the
# failed-run logs): a test's CLI run never reaps, nor is reaped by, runs of
# the user or of another session on the same host. Set at import, before any
# module reads it; removed when the session's process exits.
os.environ["VMBUILD_STATE_DIR"] = _STATE = tempfile.mkdtemp(prefix="vmbuild-test-state-")
atexit.register(shutil.rmtree, _STATE, ignore_errors=True)


# Parallel runs (`make test` runs pytest-xdist with `--dist loadgroup`). Tests
# that share a session resource whose state they change run in one worker, in
# file order: the booted guest (later component tests harden it, reboot it,
# install docker) and the host's libvirtd (its tests count the domains and the
# QEMUs it runs). Every other test is its own unit of work. Keyed on the session
# fixtures themselves, which every user's fixture closure contains.
_GROUPS = {"guest_vm": "shared-guest", "libvirtd": "libvirtd"}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups into the node ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        groups = {_GROUPS[name] for name in getattr(item, "fixturenames", ()) if name in _GROUPS}
        if len(groups) > 1:
            raise pytest.UsageError(f"{item.nodeid} uses both {sorted(groups)}: one worker each")
        for group in groups:
            item.add_marker(pytest.mark.xdist_group(group))
    if hasattr(config, "workerinput"):  # an xdist worker: its order is the queue's
        # Longest first: VM tests take minutes each, unit tests milliseconds, so
        # the fast ones fill the workers' tails instead of a VM test starting last.
        items.sort(key=_expected_length)


_UNGROUPED = pytest.StashKey[str]()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Groups reach xdist's scheduler as a suffix of the node id: where it is
    missing, the grouped tests would run side by side, so each one fails instead."""
    if not getattr(session.config.option, "loadgroup", False):  # set in xdist's workers
        return
    for item in session.items:
        mark = item.get_closest_marker("xdist_group")
        if mark is not None and not item.nodeid.endswith(f"@{mark.args[0]}"):
            item.stash[_UNGROUPED] = (
                f"its xdist_group {mark.args[0]!r} did not reach the scheduler "
                "(pytest-xdist#1386: loadgroup and pytest >= 9.2); install pytest < 9.2"
            )


def pytest_runtest_setup(item: pytest.Item) -> None:
    if _UNGROUPED in item.stash:
        pytest.fail(item.stash[_UNGROUPED], pytrace=False)


def _expected_length(item: pytest.Item) -> int:
    if item.get_closest_marker("vm") is not None:
        return 0
    return 2 if item.nodeid.startswith("tests/unit/") else 1
