"""Supply chain: signed in-toto/SLSA provenance, SPDX and CycloneDX SBOMs, verification,
air-gapped bundles, the offline CVE scan and image diffs.

File names inside a build dir, shared by every module here.
"""

from __future__ import annotations

PROVENANCE = "provenance.intoto.jsonl"  # one DSSE envelope (in-toto Statement, SLSA v1)
SPDX = "sbom.spdx.json"
CYCLONEDX = "sbom.cdx.json"
