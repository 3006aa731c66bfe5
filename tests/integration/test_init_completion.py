"""`vmbuild init` scaffolds files that validate as written; `vmbuild completion` scripts
complete real verbs in a real bash."""

from __future__ import annotations

import filecmp
import subprocess
from pathlib import Path

from tests.support.cli import REPO, isolated_env, vmbuild


def test_init_minimal_validates_and_never_overwrites(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    target = tmp_path / "project"
    proc = vmbuild(env, "init", str(target))
    assert proc.returncode == 0, proc.stderr
    files = ["components/motd.yaml", "pipeline.yaml", "recipe.yaml", "tests/test_image.py"]
    assert proc.stdout.splitlines()[:-1] == [str(target / f) for f in files]
    yamls = [str(target / f) for f in files if f.endswith(".yaml")]
    valid = vmbuild(env, "validate", *yamls)
    assert valid.returncode == 0, valid.stderr
    assert sorted(valid.stdout.splitlines()) == sorted([
        f"{target / 'components/motd.yaml'}: valid component",
        f"{target / 'pipeline.yaml'}: valid pipeline", f"{target / 'recipe.yaml'}: valid recipe",
    ])  # fmt: skip
    (target / "recipe.yaml").write_text("mine\n")
    again = vmbuild(env, "init", str(target))
    assert again.returncode == 1
    assert again.stderr.startswith(f"error: {target}: would overwrite components/motd.yaml, ")
    assert (target / "recipe.yaml").read_text() == "mine\n"


def test_init_from_example_is_the_example(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    proc = vmbuild(env, "init", str(tmp_path / "ex"), "--from", "example")
    assert proc.returncode == 0, proc.stderr
    # The packaged copy never drifts from examples/nginx.
    cmp = filecmp.dircmp(REPO / "examples" / "nginx", tmp_path / "ex", ignore=["__pycache__"])
    assert (cmp.left_only, cmp.right_only, cmp.diff_files) == ([], [], [])
    assert filecmp.cmpfiles(
        REPO / "examples/nginx/tests", tmp_path / "ex/tests", ["test_image.py"], shallow=False
    )[0] == ["test_image.py"]
    valid = vmbuild(env, "validate", *(str(p) for p in sorted((tmp_path / "ex").glob("*.yaml"))))
    assert valid.returncode == 0, valid.stderr


def complete(script: str, words: list[str]) -> list[str]:
    line = " ".join(words)
    program = (
        f"{script}\nCOMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _vmbuild; "
        'printf "%s\\n" "${COMPREPLY[@]}"'
    )
    proc = subprocess.run(["bash", "-c", program], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_bash_completion_from_the_parser(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    script = vmbuild(env, "completion", "bash").stdout
    assert complete(script, ["vmbuild", "ima"]) == ["images"]
    assert complete(script, ["vmbuild", "images", "r"]) == ["rm", "run"]
    assert complete(script, ["vmbuild", "images", "rm", "--y"]) == ["--yes"]
    assert complete(script, ["vmbuild", "build", "r.yaml", "--var-"]) == ["--var-file"]
    assert "--skip-tests" in complete(script, ["vmbuild", "--debug", "build", "--s"])
    zsh = vmbuild(env, "completion", "zsh").stdout
    assert zsh.startswith("autoload -U +X bashcompinit && bashcompinit\n")
    fish = vmbuild(env, "completion", "fish").stdout
    assert "complete -c vmbuild -f -n __fish_use_subcommand -a '" in fish
    assert (
        "complete -c vmbuild -n '__fish_seen_subcommand_from images ; and "
        "__fish_seen_subcommand_from rm' -l yes"
    ) in fish
