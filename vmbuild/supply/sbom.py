"""SPDX 2.3 and CycloneDX 1.6 JSON SBOMs of a build, from its package list.

Written with the formats' maintained libraries (spdx-tools, cyclonedx-python-lib), each
package with a purl (`pkg:deb/debian/openssl@3.0.15-1~deb12u1?arch=amd64&distro=debian-12`),
and the image itself as the root: the SPDX document DESCRIBES it and it CONTAINS every
package; in CycloneDX it is `metadata.component` and depends on every package.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from packageurl import PackageURL

from vmbuild import __version__
from vmbuild.errors import VmbuildError
from vmbuild.manifest import Package
from vmbuild.run import write_atomic
from vmbuild.supply import CYCLONEDX, SPDX

# Debian releases by the base ids vmbuild knows (the purl `distro` qualifier).
DEBIAN_CODENAMES = {"debian-11": "bullseye", "debian-12": "bookworm", "debian-13": "trixie"}
SOURCE_PROPERTY = "vmbuild:deb:source"  # "SOURCE SOURCE_VERSION" of a binary package
# A fixed namespace so the same build always gets the same document ids.
_NAMESPACE = uuid.UUID("8f6f3c8e-2f55-4f0e-9d1e-6f7c2b1a9e55")


def package_url(pkg: Package, distro: str | None) -> str:
    """The package URL of an installed Debian package (pkg:deb/debian/NAME@VERSION?...)."""
    qualifiers = {"arch": pkg.arch}
    if distro:
        qualifiers["distro"] = distro
    return str(
        PackageURL(
            type="deb",
            namespace="debian",
            name=pkg.name,
            version=pkg.version,
            qualifiers=qualifiers,
        ).to_string()
    )


def packages_of(manifest: Mapping[str, Any]) -> list[Package]:
    return [
        Package(
            str(p["name"]),
            str(p["version"]),
            str(p.get("arch", "")),
            str(p.get("source") or ""),
            str(p.get("source_version") or ""),
        )
        for p in manifest.get("packages") or []
    ]


def distro_of(manifest: Mapping[str, Any]) -> str | None:
    # A container's parent is a rootfs tarball: rootfs-debian-12-<hash>.
    base_id = str((manifest.get("base") or {}).get("id", "")).removeprefix("rootfs-")
    # A built base's id carries its cache key: debian-12-<hash>.
    for distro in DEBIAN_CODENAMES:
        if base_id == distro or base_id.startswith(f"{distro}-"):
            return distro
    return None


def _created(manifest: Mapping[str, Any]) -> datetime:
    try:
        return datetime.fromisoformat(str(manifest.get("created")).replace("Z", "+00:00"))
    except ValueError:
        return datetime.now(UTC)


def is_container(manifest: Mapping[str, Any]) -> bool:
    return manifest.get("kind") == "container"


def _what(manifest: Mapping[str, Any]) -> str:
    return "container image" if is_container(manifest) else "VM image"


def image_purl(manifest: Mapping[str, Any]) -> str | None:
    """A container image's package URL (pkg:oci/NAME@sha256:...): its identity by digest."""
    digest = str((manifest.get("oci") or {}).get("digest", ""))
    if not is_container(manifest) or not digest:
        return None
    return str(PackageURL(type="oci", name=str(manifest.get("name", "")).lower(),
                          version=digest).to_string())  # fmt: skip


def _spdx_id(text: str) -> str:
    return "SPDXRef-" + re.sub(r"[^A-Za-z0-9.-]", "-", text)


def spdx_document(manifest: Mapping[str, Any]) -> Any:
    """The SPDX 2.3 document (spdx-tools model), validated by spdx-tools before it is used."""
    from spdx_tools.spdx.model import (
        Actor,
        ActorType,
        CreationInfo,
        Document,
        ExternalPackageRef,
        ExternalPackageRefCategory,
        PackagePurpose,
        Relationship,
        RelationshipType,
        SpdxNoAssertion,
    )
    from spdx_tools.spdx.model import (
        Package as SpdxPackage,
    )
    from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

    name, version, build = (str(manifest.get(k, "")) for k in ("name", "version", "build"))
    distro = distro_of(manifest)
    doc_uuid = uuid.uuid5(_NAMESPACE, f"spdx/{name}/{version}/{build}")
    info = CreationInfo(
        spdx_version="SPDX-2.3",
        spdx_id="SPDXRef-DOCUMENT",
        name=f"{name}-{version}",
        document_namespace=f"urn:uuid:{doc_uuid}",
        creators=[Actor(ActorType.TOOL, f"vmbuild-{__version__}")],
        created=_created(manifest).astimezone(UTC).replace(tzinfo=None, microsecond=0),
        data_license="CC0-1.0",
    )
    image_id = _spdx_id(f"image-{name}")
    purl = image_purl(manifest)
    image = SpdxPackage(
        spdx_id=image_id,
        name=name,
        version=version,
        download_location=SpdxNoAssertion(),
        files_analyzed=False,
        primary_package_purpose=PackagePurpose.CONTAINER
        if is_container(manifest)
        else PackagePurpose.OPERATING_SYSTEM,
        comment=f"{_what(manifest)} built by vmbuild (build {build})",
        external_references=[
            ExternalPackageRef(ExternalPackageRefCategory.PACKAGE_MANAGER, "purl", purl)
        ]
        if purl
        else [],
    )
    packages = [image]
    relationships = [
        Relationship("SPDXRef-DOCUMENT", RelationshipType.DESCRIBES, image_id),
    ]
    seen: set[str] = {image_id}
    for pkg in packages_of(manifest):
        spdx_id = _spdx_id(f"deb-{pkg.name}-{pkg.arch}")
        if spdx_id in seen:  # multiarch duplicates keep distinct ids
            spdx_id = _spdx_id(f"deb-{pkg.name}-{pkg.arch}-{pkg.version}")
        seen.add(spdx_id)
        packages.append(
            SpdxPackage(
                spdx_id=spdx_id,
                name=pkg.name,
                version=pkg.version,
                download_location=SpdxNoAssertion(),
                supplier=SpdxNoAssertion(),
                files_analyzed=False,
                license_concluded=SpdxNoAssertion(),
                license_declared=SpdxNoAssertion(),
                copyright_text=SpdxNoAssertion(),
                source_info=f"built from source package {pkg.source} {pkg.source_version}"
                if pkg.source
                else None,
                external_references=[
                    ExternalPackageRef(
                        ExternalPackageRefCategory.PACKAGE_MANAGER, "purl", package_url(pkg, distro)
                    )
                ],
                primary_package_purpose=PackagePurpose.LIBRARY,
            )
        )
        relationships.append(Relationship(image_id, RelationshipType.CONTAINS, spdx_id))
    document = Document(creation_info=info, packages=packages, relationships=relationships)
    problems = validate_full_spdx_document(document)
    if problems:
        raise VmbuildError(f"SPDX document is invalid: {problems[0].validation_message}")
    return document


def spdx_json(manifest: Mapping[str, Any]) -> str:
    """The SPDX 2.3 JSON text."""
    import io

    from spdx_tools.spdx.writer.json.json_writer import write_document_to_stream

    stream = io.StringIO()
    # Validated in spdx_document(); the writer's own pass would only repeat it.
    write_document_to_stream(spdx_document(manifest), stream, validate=False)
    return stream.getvalue()


def cyclonedx_json(manifest: Mapping[str, Any]) -> str:
    """The CycloneDX 1.6 JSON text."""
    from cyclonedx.model import Property
    from cyclonedx.model.bom import Bom
    from cyclonedx.model.component import Component, ComponentType
    from cyclonedx.output.json import JsonV1Dot6

    name, version, build = (str(manifest.get(k, "")) for k in ("name", "version", "build"))
    distro = distro_of(manifest)
    bom = Bom(serial_number=uuid.uuid5(_NAMESPACE, f"cdx/{name}/{version}/{build}"))
    bom.metadata.timestamp = _created(manifest)
    root_purl = image_purl(manifest)
    root = Component(
        name=name,
        version=version,
        type=ComponentType.CONTAINER if is_container(manifest) else ComponentType.OPERATING_SYSTEM,
        bom_ref=f"image:{name}@{version}",
        purl=PackageURL.from_string(root_purl) if root_purl else None,
        description=f"{_what(manifest)} built by vmbuild (build {build})",
    )
    bom.metadata.component = root
    components = []
    for pkg in packages_of(manifest):
        purl = PackageURL.from_string(package_url(pkg, distro))
        # The security tracker is keyed by source package: keep it with the binary.
        props = (
            [Property(name=SOURCE_PROPERTY, value=f"{pkg.source} {pkg.source_version}".strip())]
            if pkg.source
            else []
        )
        components.append(
            Component(
                name=pkg.name,
                version=pkg.version,
                type=ComponentType.LIBRARY,
                purl=purl,
                bom_ref=str(purl),
                properties=props,
            )
        )
    bom.components.update(components)
    bom.register_dependency(root, components)
    return str(JsonV1Dot6(bom).output_as_string(indent=2))


def write_sboms(build_dir: Path, manifest: Mapping[str, Any]) -> list[Path]:
    """Both SBOMs beside the manifest; returns their paths."""
    spdx, cdx = build_dir / SPDX, build_dir / CYCLONEDX
    write_atomic(spdx, spdx_json(manifest))
    write_atomic(cdx, cyclonedx_json(manifest))
    return [spdx, cdx]


def sbom_packages(build_dir: Path) -> dict[str, Package]:
    """name:arch -> Package read back from the CycloneDX SBOM (or SPDX when that is missing)."""
    cdx, spdx = build_dir / CYCLONEDX, build_dir / SPDX
    found: dict[str, Package] = {}
    entries: Sequence[tuple[str, str]]  # (purl, "source version" or "")
    if cdx.is_file():
        data = _load(cdx)
        entries = [
            (str(c["purl"]), _cdx_source(c)) for c in data.get("components", []) if c.get("purl")
        ]
    elif spdx.is_file():
        data = _load(spdx)
        entries = [
            (str(ref["referenceLocator"]), "")
            for p in data.get("packages", [])
            for ref in p.get("externalRefs", [])
            if ref.get("referenceType") == "purl"
        ]
    else:
        raise VmbuildError(f"{build_dir}: no SBOM ({CYCLONEDX} or {SPDX})")
    for text, source in entries:
        try:
            purl = PackageURL.from_string(text)
        except ValueError as exc:
            raise VmbuildError(f"{build_dir}: invalid purl {text!r} in the SBOM ({exc})") from None
        if purl.type != "deb" or not purl.version:
            continue
        arch = str((purl.qualifiers or {}).get("arch", ""))
        src_name, _, src_version = source.partition(" ")
        found[f"{purl.name}:{arch}"] = Package(purl.name, purl.version, arch, src_name, src_version)
    return found


def _cdx_source(component: Mapping[str, Any]) -> str:
    for prop in component.get("properties") or []:
        if prop.get("name") == SOURCE_PROPERTY:
            return str(prop.get("value", ""))
    return ""


def _load(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise VmbuildError(f"{path}: unreadable SBOM ({exc})") from None
    return data
