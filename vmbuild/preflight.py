"""What a build needs from the host, declared once: `vmbuild doctor` reports every
requirement with ✓/✗, and a build checks the ones its plan needs before it creates
anything (a missing `debugfs` is found at the start, not at the verify stage after a
full build).

Each requirement says what it is for and what provides it (a Debian package for a
tool, a pip extra for a Python module), so the error is the fix.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from vmbuild.errors import VmbuildError

if TYPE_CHECKING:
    from vmbuild.plan import BuildPlan

# Root's PATH has these; a user's often does not, though the tools there run fine.
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")
# "checkpoints": wanted, never required: without it checkpoints keep disk layers only.
Need = Literal[
    "build", "debian-base", "libvirt", "tests", "aws", "arm64", "arm64-base", "checkpoints"
]


@dataclass(frozen=True)
class Requirement:
    name: str  # an executable, or a Python module
    kind: Literal["tool", "python"]
    purpose: str
    provider: str  # Debian package (tools) or pip requirement (Python modules)
    need: Need  # which builds need it

    def found(self) -> str | None:
        """Where it is (path or module origin), or None."""
        if self.kind == "tool":
            return shutil.which(self.name)
        spec = importlib.util.find_spec(self.name)
        return (spec.origin or self.name) if spec is not None else None

    def problem(self) -> str | None:
        """Why it cannot be used, with the fix; None when it is there."""
        if self.found() is not None:
            return None
        if self.kind == "python":
            return f"Python module {self.name} ({self.purpose}): pip install '{self.provider}'"
        elsewhere = [
            f"{d}/{self.name}" for d in SBIN_DIRS if os.access(f"{d}/{self.name}", os.X_OK)
        ]
        if elsewhere:
            return (
                f"{self.name} ({self.purpose}) is not on PATH but {elsewhere[0]} exists: "
                f"add {os.path.dirname(elsewhere[0])} to PATH"
            )
        return f"{self.name} ({self.purpose}): apt-get install {self.provider}"


REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement(
        "qemu-system-x86_64", "tool", "runs the builder and test VMs", "qemu-system-x86", "build"
    ),
    Requirement("qemu-img", "tool", "overlays, output conversion", "qemu-utils", "build"),
    Requirement("debugfs", "tool", "verifies the generalized image offline", "e2fsprogs", "build"),
    Requirement(
        "zstd", "tool", "keeps the builder's running VM in checkpoints", "zstd", "checkpoints"
    ),
    Requirement(
        "mmdebstrap", "tool", "builds the debian-12 base offline", "mmdebstrap", "debian-base"
    ),
    Requirement("sfdisk", "tool", "partitions the debian-12 base disk", "fdisk", "debian-base"),
    Requirement(
        "mke2fs", "tool", "creates the debian-12 base file system", "e2fsprogs", "debian-base"
    ),
    Requirement(
        "grub-mkimage",
        "tool",
        "installs the debian-12 base's boot loader",
        "grub-common grub-pc-bin",
        "debian-base",
    ),
    Requirement(
        "qemu-system-aarch64", "tool", "runs arm64 builder and test VMs", "qemu-system-arm", "arm64"
    ),
    Requirement(
        "arch-test", "tool", "lets mmdebstrap build a foreign-arch base", "arch-test", "arm64-base"
    ),
    Requirement("libvirt", "python", "the libvirt backend", "vmbuild[libvirt]", "libvirt"),
    Requirement(
        "pytest", "python", "runs testinfra files in the test stage", "vmbuild[test]", "tests"
    ),
    Requirement(
        "testinfra", "python", "testinfra checks in the test stage", "vmbuild[test]", "tests"
    ),
    Requirement("boto3", "python", "distribution to AWS", "vmbuild[aws]", "aws"),
)


def needs(plan: BuildPlan) -> set[Need]:
    """The requirement groups `plan` uses."""
    from vmbuild.hypervisor import arch
    from vmbuild.stages import base_image

    loaded = plan.loaded
    out: set[Need] = {"build"}
    if plan.backend == "libvirt":
        out.add("libvirt")
    spec = loaded.recipe.base
    recipe = loaded.recipe
    if recipe.arch == "arm64":
        out.add("arm64")
    unbuilt = isinstance(spec, str) and loaded.base_path is None
    layout = base_image.layout_for(recipe.boot_mode, recipe.arch)
    if (
        unbuilt
        and base_image.cached_for_recipe(
            spec, None, mirror=plan.mirror, layout=layout, arch=recipe.arch
        )
        is None
    ):
        out.add("debian-base")
        if recipe.arch != arch.host_arch():
            out.add("arm64-base")
    if plan.run_tests and loaded.test_paths:
        out.add("tests")
    if plan.distribute:
        out.add("aws")
    return out


def check_plan(plan: BuildPlan) -> None:
    """Raise one error listing everything `plan` needs and the host lacks."""
    wanted = needs(plan)
    problems = [p for r in REQUIREMENTS if r.need in wanted and (p := r.problem())]
    if problems:
        raise VmbuildError(
            "this build cannot run here: " + "; ".join(problems),
            hint="`vmbuild doctor` checks everything; nothing was created",
        )


def require(name: str) -> None:
    """Raise the fix when the requirement `name` (a tool or module) is missing."""
    req = next(r for r in REQUIREMENTS if r.name == name)
    if problem := req.problem():
        raise VmbuildError(f"missing {problem}", hint=f"needed for {req.purpose}")
