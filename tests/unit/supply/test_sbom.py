"""Both SBOMs: written by their libraries, read back and validated by them."""

from __future__ import annotations

import json
from pathlib import Path

from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
from spdx_tools.spdx.parser.parse_anything import parse_file
from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

from tests.support.supply import fake_artifact
from vmbuild.supply import CYCLONEDX, SPDX
from vmbuild.supply.sbom import sbom_packages
from vmbuild.supply.signing import KeyPaths

OPENSSL_PURL = "pkg:deb/debian/openssl@3.0.11-1~deb12u2?arch=amd64&distro=debian-12"


def test_cyclonedx_1_6_validates_against_its_json_schema(local_key: KeyPaths, store: Path) -> None:
    text = (fake_artifact(store) / CYCLONEDX).read_text()
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(text) is None
    bom = json.loads(text)
    assert (bom["bomFormat"], bom["specVersion"]) == ("CycloneDX", "1.6")
    root = bom["metadata"]["component"]
    assert (root["type"], root["name"], root["version"]) == (
        "operating-system", "example-nginx", "1.0.0"
    )  # fmt: skip
    purls = sorted(c["purl"] for c in bom["components"])
    assert OPENSSL_PURL in purls
    assert "pkg:deb/debian/libc6@2.36-9%2Bdeb12u9?arch=amd64&distro=debian-12" in purls
    assert len(purls) == 4
    deps = {d["ref"]: d.get("dependsOn", []) for d in bom["dependencies"]}
    assert sorted(deps[root["bom-ref"]]) == purls
    openssl = next(c for c in bom["components"] if c["name"] == "openssl")
    assert openssl["properties"] == [
        {"name": "vmbuild:deb:source", "value": "openssl 3.0.11-1~deb12u2"}
    ]


def test_a_broken_cyclonedx_document_fails_the_schema(local_key: KeyPaths, store: Path) -> None:
    bom = json.loads((fake_artifact(store) / CYCLONEDX).read_text())
    bom["components"][0]["type"] = "vm-image"  # not a CycloneDX component type
    errors = JsonStrictValidator(SchemaVersion.V1_6).validate_str(json.dumps(bom))
    assert errors is not None and "vm-image" in str(errors)


def test_spdx_2_3_parses_and_validates_with_spdx_tools(local_key: KeyPaths, store: Path) -> None:
    path = fake_artifact(store) / SPDX
    document = parse_file(str(path))
    assert validate_full_spdx_document(document, "SPDX-2.3") == []
    data = json.loads(path.read_text())
    assert data["spdxVersion"] == "SPDX-2.3"
    image = next(p for p in data["packages"] if p["SPDXID"] == "SPDXRef-image-example-nginx")
    assert image["primaryPackagePurpose"] == "OPERATING_SYSTEM"
    rels = {(r["spdxElementId"], r["relationshipType"], r["relatedSpdxElement"])
            for r in data["relationships"]}  # fmt: skip
    assert ("SPDXRef-DOCUMENT", "DESCRIBES", "SPDXRef-image-example-nginx") in rels
    contained = {r[2] for r in rels if r[1] == "CONTAINS"}
    assert len(contained) == 4
    openssl = next(p for p in data["packages"] if p["name"] == "openssl")
    assert openssl["externalRefs"] == [
        {"referenceCategory": "PACKAGE_MANAGER", "referenceLocator": OPENSSL_PURL,
         "referenceType": "purl"}
    ]  # fmt: skip


def test_an_spdx_document_missing_a_required_field_is_rejected(
    local_key: KeyPaths, store: Path, tmp_path: Path
) -> None:
    data = json.loads((fake_artifact(store) / SPDX).read_text())
    data["packages"][1]["SPDXID"] = "not an spdx id"
    broken = tmp_path / "broken.spdx.json"
    broken.write_text(json.dumps(data))
    problems = validate_full_spdx_document(parse_file(str(broken)), "SPDX-2.3")
    assert any("not an spdx id" in p.validation_message for p in problems)


def test_packages_read_back_from_the_sbom(local_key: KeyPaths, store: Path) -> None:
    packages = sbom_packages(fake_artifact(store))
    assert sorted(packages) == ["libc6:amd64", "libssl3:amd64", "nginx:amd64", "openssl:amd64"]
    assert packages["libssl3:amd64"].source == "openssl"
    assert packages["libc6:amd64"].version == "2.36-9+deb12u9"
    assert packages["libc6:amd64"].source_version == "2.36-9+deb12u9"
