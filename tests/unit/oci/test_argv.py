"""The exact umoci and skopeo command lines (pure; the integration tests run them)."""

from __future__ import annotations

from pathlib import Path

from vmbuild.config import parent_ref
from vmbuild.errors import CommandError
from vmbuild.oci import layout, parent, registry

L = Path("/s/oci")


def test_umoci_argv() -> None:
    assert layout.add_layer_argv(L, "work", Path("/w/01.tar"), "vmbuild component a") == [
        "umoci", "raw", "add-layer", "--image", "/s/oci:work",
        "--history.created_by", "vmbuild component a", "/w/01.tar",
    ]  # fmt: skip
    assert layout.config_argv(L, "work", {"a": "1", "b": "x=y"}, cmd=["/bin/bash"], workdir="/tmp") == [
        "umoci", "config", "--image", "/s/oci:work", "--no-history",
        "--config.label", "a=1", "--config.label", "b=x=y",
        "--config.cmd=/bin/bash", "--config.workingdir", "/tmp",
    ]  # fmt: skip
    assert layout.docker_archive_argv(L, "1.0", Path("/s/image.tar"), "web:1.0") == [
        "skopeo", "copy", "--quiet", "oci:/s/oci:1.0", "docker-archive:/s/image.tar:web:1.0",
    ]  # fmt: skip


def test_skopeo_push_preserves_digests_and_says_when_tls_is_off() -> None:
    ref = "docker://127.0.0.1:5000/web:1.0"
    assert registry.push_argv(L, "1.0", ref, tls_verify=False) == [
        "skopeo", "copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false",
        "oci:/s/oci:1.0", ref,
    ]  # fmt: skip
    assert registry.push_argv(L, "1.0", ref, tls_verify=True)[3:5] == [
        "--preserve-digests",
        "oci:/s/oci:1.0",
    ]
    assert registry.inspect_argv(ref, tls_verify=True) == [
        "skopeo", "inspect", "--format", "{{.Digest}}", ref,
    ]  # fmt: skip


def test_skopeo_message_is_its_fatal_line() -> None:
    tail = (
        'time="2026-11-30T22:55:44Z" level=fatal msg="Error parsing image name '
        '\\"docker://127.0.0.1:5055/t/x:nope\\": reading manifest nope in 127.0.0.1:5055/t/x: '
        'manifest unknown: manifest unknown"'
    )
    assert registry.skopeo_message(CommandError(["skopeo"], 1, tail)) == (
        'Error parsing image name "docker://127.0.0.1:5055/t/x:nope": reading manifest nope '
        "in 127.0.0.1:5055/t/x: manifest unknown: manifest unknown"
    )
    assert registry.skopeo_message(CommandError(["skopeo"], 1, "one\ntwo\n")) == "two"


def test_a_registry_parent_is_copied_by_the_digest_it_resolved_to() -> None:
    d = "sha256:" + "a" * 64
    old = "sha256:" + "b" * 64
    cases = {
        "amazonlinux:latest": f"docker://amazonlinux@{d}",
        "docker://127.0.0.1:5000/base/two:1": f"docker://127.0.0.1:5000/base/two@{d}",
        "127.0.0.1:5000/base/two": f"docker://127.0.0.1:5000/base/two@{d}",
        f"ecr.example:443/web:1@{old}": f"docker://ecr.example:443/web@{d}",
    }
    got = {}
    for text in cases:
        source = parent_ref.parse(text, Path("/r"), ("debian-12",))
        got[text] = parent.copy_argv(source, d, L, tls_verify=False)[-3:]
    assert got == {k: ["--src-tls-verify=false", v, "oci:/s/oci:parent"] for k, v in cases.items()}
    # A local source cannot move between inspect and copy: copied as named.
    local = parent_ref.ParentSource(
        "docker-archive", "docker-archive:/x.tar", "docker-archive:/x.tar"
    )
    assert parent.copy_argv(local, d, L, tls_verify=False)[-2:] == [
        "docker-archive:/x.tar", "oci:/s/oci:parent"
    ]  # fmt: skip
