"""Image Builder parent images → a vmbuild base.

The table maps what recipes name (an Image Builder image ARN such as
`arn:aws:imagebuilder:us-east-1:aws:image/ubuntu-server-22-lts-x86/x.x.x`, or
an `ssm:` parameter such as `ssm:/aws/service/canonical/ubuntu/server/22.04/...`)
to the vendor's cloud image and its checksum file. Debian 12 is vmbuild's own
offline base. An AMI id, or an image the table does not know, needs `--base`.
"""

from __future__ import annotations

import re
from typing import Any

from vmbuild.errors import VmbuildError

_DEBIAN = "https://cloud.debian.org/images/cloud"
_UBUNTU = "https://cloud-images.ubuntu.com"
_ROCKY = "https://dl.rockylinux.org/pub/rocky"
_ALMA = "https://repo.almalinux.org/almalinux"

# (pattern on the ARN's image name or the ssm path, base)
TABLE: list[tuple[str, Any]] = [
    (r"debian[-/]?(release/)?12|debian-12", "debian-12"),
    (r"debian[-/]?(release/)?11|debian-11", {
        "url": f"{_DEBIAN}/bullseye/latest/debian-11-genericcloud-amd64.qcow2",
        "checksum_url": f"{_DEBIAN}/bullseye/latest/SHA512SUMS"}),
    (r"ubuntu-server-24-lts|ubuntu/server/24\.04", {
        "url": f"{_UBUNTU}/noble/current/noble-server-cloudimg-amd64.img",
        "checksum_url": f"{_UBUNTU}/noble/current/SHA256SUMS"}),
    (r"ubuntu-server-22-lts|ubuntu/server/22\.04", {
        "url": f"{_UBUNTU}/jammy/current/jammy-server-cloudimg-amd64.img",
        "checksum_url": f"{_UBUNTU}/jammy/current/SHA256SUMS"}),
    (r"ubuntu-server-20-lts|ubuntu/server/20\.04", {
        "url": f"{_UBUNTU}/focal/current/focal-server-cloudimg-amd64.img",
        "checksum_url": f"{_UBUNTU}/focal/current/SHA256SUMS"}),
    (r"red-hat-enterprise-linux-9|rocky-linux-9|rhel/9|rocky/9", {
        "url": f"{_ROCKY}/9/images/x86_64/Rocky-9-GenericCloud-Base.latest.x86_64.qcow2",
        "checksum_url": f"{_ROCKY}/9/images/x86_64/CHECKSUM"}),
    (r"alma-?linux-9|almalinux/9", {
        "url": f"{_ALMA}/9/cloud/x86_64/images/AlmaLinux-9-GenericCloud-latest.x86_64.qcow2",
        "checksum_url": f"{_ALMA}/9/cloud/x86_64/images/CHECKSUM"}),
]  # fmt: skip
# Amazon Linux publishes its KVM images only under versioned file names
# (cdn.amazonlinux.com/al2023/os-images/<version>/kvm/), so no fixed URL fits.
_AMAZON = re.compile(r"amazon-linux|amzn|al2023|ami-amazon-linux")


def parent_base(parent: str) -> Any:
    """The vmbuild `base:` for an Image Builder parent image; raises VmbuildError
    (asking for --base) when there is no vendor image to map it to."""
    text = parent.strip().lower()
    for pattern, base in TABLE:
        if re.search(pattern, text):
            return base
    if _AMAZON.search(text):
        why = "Amazon Linux KVM images have versioned file names only"
        hint = (
            "download one from https://cdn.amazonlinux.com/al2023/os-images/latest/kvm/ and "
            "give --base ./al2023.qcow2 (or --base debian-12)"
        )
    elif text.startswith("ami-"):
        why, hint = "an AMI id names no vendor image", "give --base debian-12, a file or a URL"
    else:
        why, hint = "no entry in the parent image table", "give --base debian-12, a file or a URL"
    raise VmbuildError(f"parent image {parent}: {why}", hint=hint)
