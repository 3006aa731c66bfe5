"""A checkpoint's key covers every document a component runs through
ExecuteDocument, resolved as the step resolves it: a file beside the parent, a
library component named by ARN, the built-in standing for an AWS-managed one.
An S3 child cannot be known before it runs: its parent is never resumed."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmbuild.stages.key import stage_key
from vmbuild.stages.resume import chain, document_digest
from vmbuild.toe import library as library_mod
from vmbuild.toe.document import load_document
from vmbuild.toe.library import add_to_library

PARENT = """\
name: parent
schemaVersion: 1.0
phases:
  - name: build
    steps:
      - name: Child
        action: ExecuteDocument
        inputs:
          document: {target}
"""

CHILD = """\
name: child
schemaVersion: 1.0
phases:
  - name: build
    steps:
      - name: Say
        action: ExecuteBash
        inputs:
          commands: ["echo {word}"]
"""

ARN = "arn:aws:imagebuilder:us-east-1:123456789012:component/child/1.0.0"


def digest_of(parent: Path) -> str:
    return document_digest(load_document(parent, {}))


@pytest.fixture
def library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "library"
    monkeypatch.setenv("VMBUILD_COMPONENT_LIBRARY", str(root))
    return root


def test_a_library_child_named_by_arn_is_in_the_key(tmp_path: Path, library: Path) -> None:
    source = tmp_path / "child.yaml"
    source.write_text(CHILD.format(word="one"))
    stored = add_to_library(source, "child", "1.0.0", library)
    parent = tmp_path / "parent.yaml"
    parent.write_text(PARENT.format(target=ARN))
    one = digest_of(parent)
    assert digest_of(parent) == one
    # The library's file edited in place (same name and version): another key.
    stored.write_text(CHILD.format(word="two"))
    assert digest_of(parent) != one


def test_an_aws_managed_arn_is_keyed_on_its_built_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The built-ins as another vmbuild release ships them.
    builtins = tmp_path / "builtins"
    builtins.mkdir()
    monkeypatch.setattr(library_mod, "components_dir", lambda: builtins)
    (builtins / "update-linux.yaml").write_text(CHILD.format(word="one"))
    parent = tmp_path / "parent.yaml"
    parent.write_text(
        PARENT.format(target="arn:aws:imagebuilder:us-east-1:aws:component/update-linux/1.0.2")
    )
    one = digest_of(parent)
    (builtins / "update-linux.yaml").write_text(CHILD.format(word="two"))
    assert digest_of(parent) != one


def test_a_relative_child_is_in_the_key(tmp_path: Path) -> None:
    parent = tmp_path / "parent.yaml"
    parent.write_text(PARENT.format(target="child.yaml"))
    (tmp_path / "child.yaml").write_text(CHILD.format(word="one"))
    one = digest_of(parent)
    (tmp_path / "child.yaml").write_text(CHILD.format(word="two"))
    assert digest_of(parent) != one


def test_an_s3_child_is_never_resumed(tmp_path: Path) -> None:
    parent = tmp_path / "parent.yaml"
    parent.write_text(PARENT.format(target="s3://bucket/child.yaml"))
    assert digest_of(parent) != digest_of(parent)


def test_each_components_key_covers_the_working_directory(tmp_path: Path) -> None:
    doc = tmp_path / "child.yaml"
    doc.write_text(CHILD.format(word="one"))
    root = stage_key("checkpoint-root", base="b")
    docs = [load_document(doc, {})]
    assert chain(root, docs, "/tmp") == chain(root, docs, "/tmp")
    assert chain(root, docs, "/tmp") != chain(root, docs, "/var/build")
