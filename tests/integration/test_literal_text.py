"""Text with brackets (image-ref hints, console tails, names) is printed literally by the CLI:
never parsed as rich markup, so it neither crashes the error handler nor loses `[name]`."""

from __future__ import annotations

from pathlib import Path

from tests.support.cli import BUILD_A, isolated_env, stored_build, vmbuild


def test_hint_with_ref_syntax_is_printed_as_is(tmp_path: Path) -> None:
    proc = vmbuild(isolated_env(tmp_path), "images", "show", "a//b")
    assert proc.returncode == 1
    assert (
        proc.stderr == "error: invalid image reference 'a//b'\nhint: use NAME[/VERSION[/BUILD]]\n"
    )


def test_closing_tags_and_lowercase_names_in_messages(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    proc = vmbuild(env, "images", "show", "x[/y]")
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[0] == f"error: no image 'x[/y]' in {tmp_path / 'store'}"
    recipe = tmp_path / "[bold]dir[/]recipe[/red].yaml"
    recipe.parent.mkdir(parents=True)
    recipe.write_text("name: x\nversion: 1.0.0\nbase: debian-12\ncomponents:\n  - name: '[name]'\n")
    proc = vmbuild(env, "build", str(recipe))
    assert proc.returncode == 1
    assert proc.stderr.startswith(
        f"error: {recipe}: components[0].name: no built-in component '[name]' (built-ins: "
    ), proc.stderr
    assert "Traceback" not in proc.stderr and "MarkupError" not in proc.stderr


def test_tables_print_bracketed_names_literally(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    name = "img[bold]x[name]"
    stored_build(tmp_path / "store", name, "1.0.0", BUILD_A, created="[/x]")
    proc = vmbuild(env, "images", "list")
    assert proc.returncode == 0, proc.stderr
    assert f"{name}/1.0.0/{BUILD_A}" in proc.stdout
    assert "[/x]" in proc.stdout
    show = vmbuild(env, "images", "show", f"{name}/1.0.0")
    assert show.returncode == 0, show.stderr
    assert f"image:    {name}/1.0.0/{BUILD_A}\n" in show.stdout
