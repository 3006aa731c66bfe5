"""The compatibility corpus: documents written as AWS's guide shows them validate
unchanged, and each bad one fails with its one expected error (no VM)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmbuild.toe import validate_file

CORPUS = Path(__file__).resolve().parents[2] / "data" / "toe" / "corpus"
VALID = sorted((CORPUS / "valid").glob("*.yaml"))
INVALID = sorted(
    p for p in (CORPUS / "invalid").glob("*.yaml") if "valid on its own" not in p.read_text()
)


def test_the_corpus_is_there() -> None:
    assert len(VALID) >= 10 and len(INVALID) >= 10


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_guide_documents_validate_unchanged(path: Path) -> None:
    assert validate_file(path) == []


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_bad_documents_fail_with_their_expected_error(path: Path) -> None:
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# expect: ")
    expected = first_line.removeprefix("# expect: ")
    problems = validate_file(path)
    assert problems, f"{path.name} validated"
    assert expected in problems[0], problems
