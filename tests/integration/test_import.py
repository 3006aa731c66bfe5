"""`vmbuild import` as a user runs it: CloudFormation, Terraform and CLI JSON
definitions written from AWS's documented shapes become files that `vmbuild
validate` accepts unchanged, and the report lists what was dropped and why."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.cli import REPO, isolated_env, vmbuild

DATA = REPO / "tests" / "data" / "imports"


@pytest.mark.parametrize(
    ("sources", "extra", "files", "dropped"),
    [
        (
            ["cloudformation-pipeline.yaml"],
            ["--region", "us-east-1"],
            ["components/hello-world.yaml", "distribution.yaml", "pipeline.yaml", "recipe.yaml"],
            "Resources.Infrastructure: subnet_id -> the builder VM uses QEMU user networking",
        ),
        (
            ["main.tf"],
            [],
            [
                "components/app-config.yaml",
                "components/from-file.yaml",
                "pipeline.yaml",
                "recipe.yaml",
            ],
            "aws_imagebuilder_infrastructure_configuration.app: instance_profile_name -> "
            "the builder VM needs no IAM role",
        ),
        (
            ["create-image-recipe.json", "create-distribution-configuration.json"],
            ["--base", "debian-12"],
            ["distribution.yaml", "recipe.yaml"],
            "create-image-recipe.json (create-image-recipe): client_token -> ",
        ),
    ],
    ids=["cloudformation", "terraform", "cli-json"],
)
def test_imported_files_validate_unchanged(
    tmp_path: Path, sources: list[str], extra: list[str], files: list[str], dropped: str
) -> None:
    env = isolated_env(tmp_path)
    out = tmp_path / "out"
    proc = vmbuild(env, "import", *(str(DATA / s) for s in sources), "--output", str(out), *extra)
    assert proc.returncode == 0, proc.stderr
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.yaml"))
    assert written == files
    report = (out / "import-report.txt").read_text()
    assert "dropped:\n" in report and dropped in report, report
    check = vmbuild(env, "validate", *(str(out / f) for f in files))
    assert check.returncode == 0, check.stdout + check.stderr


def test_an_unmapped_parent_image_asks_for_a_base(tmp_path: Path) -> None:
    proc = vmbuild(
        isolated_env(tmp_path), "import", str(DATA / "create-image-recipe.json"),
        "--output", str(tmp_path / "out"),
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[0] == (
        "error: parent image arn:aws:imagebuilder:us-west-2:aws:image/amazon-linux-2023-x86/x.x.x: "
        "Amazon Linux KVM images have versioned file names only"
    )
    assert not (tmp_path / "out").exists()
