"""Test the converted image in a fresh VM: the components' test phases, then the
recipe's testinfra files (pytest, JUnit XML kept with the artifact: junit.xml for
testinfra, components-junit.xml with one testcase per component test phase).

`run_image_tests` is the stage; the rest are its pure parts (unit-tested)."""

from __future__ import annotations

import dataclasses
import logging
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmbuild import toe
from vmbuild.digest import sha256_file
from vmbuild.errors import CommandError, StepFailed, TestsFailed
from vmbuild.hypervisor.arch import UNAME, Arch
from vmbuild.hypervisor.firmware import Firmware
from vmbuild.hypervisor.guest import (
    CLOUD_INIT,
    Guest,
    GuestRequest,
    booted_guest,
    copy_console,
    wait_cloud_init,
)
from vmbuild.hypervisor.imds import Ec2Settings
from vmbuild.progress import Reporter
from vmbuild.remote.ssh import SSHSession
from vmbuild.run import run
from vmbuild.secrets import mask
from vmbuild.stages import components
from vmbuild.stages.key import StageKey, stage_key
from vmbuild.toe.junit import write_component_junit

log = logging.getLogger("vmbuild.test_vm")

COMPONENTS_JUNIT = "components-junit.xml"  # beside testinfra's junit.xml
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
    # COMPONENTS_JUNIT's path in the artifact (logs/...), when a test phase ran.
    components_junit: str | None = None
    # Each firmware the image booted under and what the guest said of it.
    boots: tuple[dict[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "boots": list(self.boots),
            "testinfra": {
                "tests": self.tests,
                "failures": self.failures,
                "errors": self.errors,
                "skipped": self.skipped,
                "junit": self.junit,
            },
            "components": list(self.component_tests),
            "components_junit": self.components_junit,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TestSummary:
        ti = data.get("testinfra") or {}
        return cls(
            str(data["status"]), int(ti.get("tests", 0)), int(ti.get("failures", 0)),
            int(ti.get("errors", 0)), int(ti.get("skipped", 0)), ti.get("junit"),
            tuple(data.get("components") or ()), data.get("components_junit"),
            tuple(data.get("boots") or ()),
        )  # fmt: skip


def pytest_argv(
    tests: Sequence[Path], guest_url: str, key: Path, junit: Path, python: str = sys.executable
) -> list[str]:
    """pytest runs in the tests' own directory (their conftest and relative
    imports): every path it is given is made absolute, as the store (and with it
    the work dir) may be named relative to vmbuild's own working directory."""
    return [
        python, "-m", "pytest", "-p", "vmbuild.testing.pinned_hostkey",
        "-p", "no:cacheprovider", "-o", "addopts=", "-q", "-rfE",
        f"--hosts={guest_url}", f"--ssh-identity-file={key.absolute()}",
        f"--junitxml={junit.absolute()}", *[str(t.absolute()) for t in tests],
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
    known_hosts = (guest.spec.workdir / "test-known_hosts").absolute()
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


def run_testinfra_chroot(
    ssh: SSHSession,
    root: str,
    tests: Sequence[Path],
    outdir: Path,
    *,
    timeout: float,
    on_line: Callable[[str], None] | None = None,
) -> tuple[int, int, int, int, Path]:
    """Run a container recipe's testinfra files against the image root `root` mounted in
    the builder `ssh` reaches (vmbuild.testing.chroot_ssh); counts and the JUnit path."""
    from vmbuild.testing.chroot_ssh import NAME, ROOT_ENV

    junit = outdir / "junit.xml"
    outdir.mkdir(parents=True, exist_ok=True)
    argv = pytest_argv(
        tests, f"{NAME}://{ssh.user}@{ssh.host}:{ssh.port}?sudo=true", ssh.key_path, junit
    )
    argv[3:3] = ["-p", "vmbuild.testing.chroot_ssh"]
    env = {ROOT_ENV: root}
    with tempfile.TemporaryDirectory(prefix="vmbuild-testinfra-") as tmp:
        if ssh.host_key:  # pinned as for a test VM
            known_hosts = Path(tmp) / "known_hosts"
            known_hosts.write_text(f"[{ssh.host}]:{ssh.port} {ssh.host_key}\n")
            env["VMBUILD_KNOWN_HOSTS"] = str(known_hosts)
        result = run(argv, timeout=timeout, env=env, cwd=tests[0].parent, check=False,
                     on_line=on_line)  # fmt: skip
    (outdir / "testinfra.log").write_text(result.stdout)
    if not junit.exists():
        raise CommandError(result.args, result.returncode, result.stdout[-3000:])
    return (*parse_junit(junit), junit)


def summarize(
    counts: tuple[int, int, int, int] | None,
    junit_name: str | None,
    component_tests: Sequence[dict[str, Any]],
    components_junit: str | None = None,
) -> TestSummary:
    tests, failures, errors, skipped = counts or (0, 0, 0, 0)
    comp_failed = [c for c in component_tests if c.get("status") == "Failed"]
    status = "failed" if failures or errors or comp_failed else "passed"
    return TestSummary(
        status, tests, failures, errors, skipped, junit_name, tuple(component_tests),
        components_junit,
    )  # fmt: skip


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


@dataclass(frozen=True)
class TestInputs:
    """What the test stage runs against the converted image."""

    __test__ = False  # not a pytest class

    documents: Sequence[toe.Document]  # their `test` phases
    testinfra: Sequence[Path]  # the recipe's testinfra files
    env: Mapping[str, str]  # VMBUILD_* facts the testinfra files may read
    working_directory: str | None = None  # where the test steps run in the guest
    ec2: Ec2Settings | None = None  # booted as on EC2 (IMDS, no seed), or None: NoCloud
    # The firmware the image is booted under, the tests running under the first.
    boots: Sequence[Firmware] = ("bios",)

    def key(self, image: StageKey) -> StageKey:
        # The boot mode decides whether the image boots at all (an image without
        # the Ec2 datasource passes NoCloud and fails ec2): part of the key.
        boot = {"boot": "ec2", **dataclasses.asdict(self.ec2)} if self.ec2 else {"boot": "nocloud"}
        return stage_key(
            "test", image=image.digest, **boot,
            documents=[(d.sha256, dict(d.parameters)) for d in self.documents],
            testinfra=[sha256_file(p) for p in self.testinfra],
            # The builder's key and machine-id differ every run and are only
            # checked to be gone: they do not change what the tests find.
            env={k: v for k, v in self.env.items() if not k.startswith("VMBUILD_BUILDER_")},
            boots=list(self.boots),
        )  # fmt: skip


# What the guest sees of its firmware: /sys/firmware/efi exists only when the
# kernel was started by UEFI; mokutil asks the firmware's SecureBoot variable.
# Without mokutil the variable is read directly (4 attribute bytes, then 0/1).
# The CPU architecture the guest runs (`uname -m`) comes first, on its own line.
FIRMWARE_PROBE = (
    'echo "machine $(uname -m)"; '
    "if [ -d /sys/firmware/efi ]; then echo uefi; else echo bios; fi; "
    "if command -v mokutil >/dev/null; then mokutil --sb-state 2>&1 || true; "
    "else v=/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d0-aa0d-00a0c904f4e5; "
    "[ -r $v ] && echo \"SecureBoot $(od -An -tu1 -j4 -N1 $v | tr -d ' ')\"; fi"
)
MACHINE_PREFIX = "machine "


def guest_machine(probe_output: str) -> str | None:
    """What `uname -m` said in the guest, from the probe's output."""
    for line in probe_output.splitlines():
        if line.startswith(MACHINE_PREFIX):
            return line.removeprefix(MACHINE_PREFIX).strip() or None
    return None


def firmware_problem(firmware: Firmware, probe_output: str, arch: Arch | None = None) -> str | None:
    """Why the guest did not boot the way `firmware` means, or (given `arch`) is
    not running that architecture (None: all as expected)."""
    if arch is not None and (machine := guest_machine(probe_output)) != UNAME[arch]:
        return f"the guest runs {machine or 'an unknown machine'}, not {UNAME[arch]}"
    lines = [ln for ln in probe_output.strip().splitlines() if not ln.startswith(MACHINE_PREFIX)]
    booted = lines[0].strip() if lines else ""
    want = "bios" if firmware == "bios" else "uefi"
    if booted != want:
        return f"the image booted under {booted or 'unknown firmware'}, not {want}"
    if firmware == "uefi-secure":
        said = " ".join(lines[1:])
        if "SecureBoot enabled" not in said and "SecureBoot 1" not in said:
            return f"Secure Boot is not enforced in the guest: {said.strip() or 'no answer'}"
    return None


def check_firmware(guest: Guest, firmware: Firmware) -> dict[str, Any]:
    """Ask the guest how it booted and on what CPU; raise TestsFailed if not as
    `firmware` and the VM's architecture mean."""
    result = guest.ssh.run(FIRMWARE_PROBE, timeout=guest.spec.accel.timeout(10))
    if (problem := firmware_problem(firmware, result.stdout, guest.spec.arch)) is not None:
        raise TestsFailed(
            f"boot mode test ({firmware}) failed: {problem}",
            hint="see the test VM's console log in the run log",
        )
    return {
        "firmware": firmware,
        "machine": guest_machine(result.stdout),
        "guest": " ".join(
            word
            for ln in result.stdout.splitlines()
            if not ln.startswith(MACHINE_PREFIX)
            for word in ln.split()
        ),
    }


def run_image_tests(
    req: GuestRequest,
    inputs: TestInputs,
    logs: Path,
    reporter: Reporter,
) -> TestSummary:
    """Boot a fresh VM on the image, run the component tests, then testinfra.

    The tests run under the first of `inputs.boots`; the image is then
    booted once more under each other one (uefi-preferred: UEFI, then legacy
    BIOS) and checked to come up that way: a boot is what those modes differ in.
    Raises TestsFailed when anything failed; the JUnit XML and the logs stay in `logs`.
    """
    counts = None
    component_tests: list[dict[str, Any]] = []
    junit_name = components_junit = None
    results: list[toe.DocumentResult] = []
    boots: list[dict[str, Any]] = []
    first, *others = inputs.boots
    req = dataclasses.replace(req, firmware=first)
    with booted_guest(req, on_status=reporter.status) as guest:
        boots.append(check_firmware(guest, first))
        try:
            applied = components.apply(
                inputs.documents, guest.ssh, phases=["test"], results_dir=logs / "components",
                on_output=reporter.output, working_directory=inputs.working_directory,
                on_result=results.append,
            )  # fmt: skip
            component_tests = [{"name": a.name, "status": a.status} for a in applied]
        except StepFailed as exc:
            raise TestsFailed(f"image tests failed: {exc}") from None
        finally:
            copy_console(guest.spec, logs)
            if results:  # the failed one too: CI shows which component's test failed
                written = write_component_junit(results, logs / COMPONENTS_JUNIT, mask=mask)
                components_junit = str(written.relative_to(logs.parent))
        if inputs.testinfra:
            *nums, junit = run_testinfra(
                guest, inputs.testinfra, logs, env=inputs.env, on_line=reporter.output
            )
            counts = (nums[0], nums[1], nums[2], nums[3])
            junit_name = str(junit.relative_to(logs.parent))
        # The image's first boot must have finished cleanly too; checked last,
        # so cloud-init's config and final stages ran while the tests did.
        wait_cloud_init(guest.ssh, req.accel.timeout(CLOUD_INIT), guest.machine)
    summary = summarize(counts, junit_name, component_tests, components_junit)
    raise_if_failed(summary, "see testinfra.log and junit.xml in the run log")
    for fw in others:
        again = dataclasses.replace(req, firmware=fw, role=f"test-{fw}")
        with booted_guest(again, on_status=reporter.status) as guest:
            try:
                boots.append(check_firmware(guest, fw))
            finally:
                copy_console(guest.spec, logs)
    return dataclasses.replace(summary, boots=tuple(boots))
