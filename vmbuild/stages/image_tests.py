"""Test the converted image in a fresh VM: the components' test phases, then the
recipe's testinfra files (pytest, JUnit XML kept with the artifact)."""

from __future__ import annotations

import logging
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmbuild.errors import CommandError, TestsFailed
from vmbuild.hypervisor.guest import Guest
from vmbuild.run import run

log = logging.getLogger("vmbuild.test_vm")

TESTINFRA_TIMEOUT = 120.0  # KVM seconds, scaled for TCG


@dataclass(frozen=True)
class TestSummary:
    __test__ = False  # not a pytest class

    status: str  # passed | failed | skipped
    tests: int = 0
    failures: int = 0
    errors: int = 0
    skipped: int = 0
    junit: str | None = None  # file name in the artifact
    component_tests: tuple[dict[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "testinfra": {
                "tests": self.tests,
                "failures": self.failures,
                "errors": self.errors,
                "skipped": self.skipped,
                "junit": self.junit,
            },
            "components": list(self.component_tests),
        }


def pytest_argv(
    tests: Sequence[Path], guest_url: str, key: Path, junit: Path, python: str = sys.executable
) -> list[str]:
    return [
        python, "-m", "pytest", "-p", "vmbuild.testing.pinned_hostkey",
        "-p", "no:cacheprovider", "-o", "addopts=", "-q", "-rfE",
        f"--hosts={guest_url}", f"--ssh-identity-file={key}",
        f"--junitxml={junit}", *[str(t) for t in tests],
    ]  # fmt: skip


def parse_junit(path: Path) -> tuple[int, int, int, int]:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    totals = [0, 0, 0, 0]
    for s in suites:
        for i, key in enumerate(("tests", "failures", "errors", "skipped")):
            totals[i] += int(s.get(key, "0"))
    return totals[0], totals[1], totals[2], totals[3]


def run_testinfra(
    guest: Guest,
    tests: Sequence[Path],
    outdir: Path,
    *,
    env: Mapping[str, str],
    on_line: Callable[[str], None] | None = None,
) -> tuple[int, int, int, int, Path]:
    """Run the testinfra files against the guest; returns counts and the JUnit path."""
    junit = outdir / "junit.xml"
    known_hosts = guest.spec.workdir / "test-known_hosts"
    known_hosts.write_text(guest.known_hosts_line + "\n")
    try:
        result = run(
            pytest_argv(tests, guest.ssh.url, guest.client_key_path, junit),
            timeout=guest.spec.accel.timeout(TESTINFRA_TIMEOUT),
            env={**env, "VMBUILD_KNOWN_HOSTS": str(known_hosts)},
            cwd=tests[0].parent,
            check=False,
            on_line=on_line,
        )
    finally:
        known_hosts.unlink(missing_ok=True)
    (outdir / "testinfra.log").write_text(result.stdout)
    if not junit.exists():
        raise CommandError(result.args, result.returncode, result.stdout[-3000:])
    counts = parse_junit(junit)
    return (*counts, junit)


def summarize(
    counts: tuple[int, int, int, int] | None,
    junit_name: str | None,
    component_tests: Sequence[dict[str, Any]],
) -> TestSummary:
    tests, failures, errors, skipped = counts or (0, 0, 0, 0)
    comp_failed = [c for c in component_tests if c.get("status") == "Failed"]
    status = "failed" if failures or errors or comp_failed else "passed"
    return TestSummary(status, tests, failures, errors, skipped, junit_name, tuple(component_tests))


def raise_if_failed(summary: TestSummary, log_hint: str) -> None:
    if summary.status != "failed":
        return
    parts = []
    if summary.failures or summary.errors:
        parts.append(
            f"{summary.failures + summary.errors} of {summary.tests} testinfra tests failed"
        )
    failed = [c["name"] for c in summary.component_tests if c.get("status") == "Failed"]
    if failed:
        parts.append(f"component test phase failed: {', '.join(failed)}")
    raise TestsFailed("image tests failed: " + "; ".join(parts), hint=log_hint)
