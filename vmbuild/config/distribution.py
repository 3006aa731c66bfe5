"""Distribution settings: where and how an artifact becomes AMIs (EC2 Image Builder vocabulary).

The YAML lives either inline in a recipe (`distribution:`) or in its own file (the same keys at
top level, or under `distribution:`). Everything is validated here, before any disk or VM exists,
and errors name the file and the field: `recipe.yaml: distribution.regions[1].kms_key_id: ...`.

```yaml
import:
  method: ebs-direct            # ebs-direct | import-snapshot | import-image
  upload_blocks: used           # ebs-direct: used (file systems' blocks, zero or not) | all
  incremental: true             # ebs-direct: only what changed since the previous version
  s3_bucket: my-bucket          # import-snapshot / import-image only
image:
  boot_mode: legacy-bios
regions:
  - region: us-east-1           # the first region is where the image is uploaded
    name: "{{ name }}-{{ version }}-{{ build_date }}"
    kms_key_id: alias/images
    launch_permission: {user_ids: ["123456789012"]}
    ssm_parameter_configurations: [{parameter_name: /images/example/latest}]
  - region: eu-west-1           # the others receive a CopyImage of it
```
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from vmbuild.config.loader import FieldError, config_error
from vmbuild.errors import ConfigError

TEMPLATE_VARIABLES = ("name", "version", "build", "build_date")
# Image Builder's own names for them, accepted as they are written in AWS's
# distribution settings (`{{ imagebuilder:buildDate }}`, `{{ imagebuilder:buildVersion }}`).
IMAGE_BUILDER_VARIABLES = {
    "imagebuilder:buildDate": "build_date",
    "imagebuilder:buildVersion": "build",
}
DEFAULT_AMI_NAME = "{{ name }}-{{ version }}-{{ build }}"
_TEMPLATE = re.compile(r"\{\{\s*([A-Za-z_:]+)\s*\}\}")
# EC2's rule for AMI names (RegisterImage/CopyImage): 3-128 of these characters.
AMI_NAME_CHARS = re.compile(r"^[A-Za-z0-9()\[\] ./\-'@_]+$")
AMI_NAME_MAX = 128
_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")
_KEY_ID = r"(?:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|mrk-[0-9a-f]{32})"
_KMS_ARN = re.compile(
    r"^arn:aws[a-z-]*:kms:(?P<region>[a-z0-9-]+):\d{12}:(?:key/" + _KEY_ID + r"|alias/[\w/-]+)$"
)
_KMS_SHORT = re.compile(r"^(?:" + _KEY_ID + r"|alias/[\w/-]+)$")
_ORG_ARN = re.compile(r"^arn:aws[a-z-]*:organizations::\d{12}:organization/o-[a-z0-9]{10,32}$")
_OU_ARN = re.compile(
    r"^arn:aws[a-z-]*:organizations::\d{12}:ou/o-[a-z0-9]{10,32}/ou-[0-9a-z]{4,32}-[a-z0-9]{8,32}$"
)
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_SSM_NAME = re.compile(r"^/?[A-Za-z0-9_.\-/]{1,1011}$")
_TAG_KEY = re.compile(r"^(?!aws:)[\w .:/=+\-@]{1,128}$")


def _account_id(value: object) -> object:
    # YAML reads an unquoted 12-digit id as an int; accept it, but an int that lost leading
    # zeros would silently name another account, so insist on 12 digits.
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str) and not re.fullmatch(r"\d{12}", value):
        raise ValueError("expected a 12-digit AWS account id (quote it in YAML)")
    return value


AccountId = Annotated[str, BeforeValidator(_account_id)]
Text = Annotated[str, StringConstraints(min_length=1, max_length=1024)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class LaunchPermission(_Model):
    """Who may launch the AMIs: accounts, `all` (public), organizations, organizational units."""

    user_ids: list[AccountId] = Field(default_factory=list)
    user_groups: list[Literal["all"]] = Field(default_factory=list)
    organization_arns: list[str] = Field(default_factory=list)
    organizational_unit_arns: list[str] = Field(default_factory=list)

    @field_validator("organization_arns")
    @classmethod
    def _orgs(cls, values: list[str]) -> list[str]:
        for value in values:
            if not _ORG_ARN.match(value):
                raise ValueError(f"not an organization ARN: {value!r}")
        return values

    @field_validator("organizational_unit_arns")
    @classmethod
    def _ous(cls, values: list[str]) -> list[str]:
        for value in values:
            if not _OU_ARN.match(value):
                raise ValueError(f"not an organizational unit ARN: {value!r}")
        return values

    @property
    def empty(self) -> bool:
        """True when the AMI stays private to the owning account."""
        return not (
            self.user_ids
            or self.user_groups
            or self.organization_arns
            or self.organizational_unit_arns
        )


class SsmParameter(_Model):
    """An SSM parameter set to the new AMI id (`aws:ec2:image` lets EC2 resolve it at launch)."""

    parameter_name: str
    data_type: Literal["aws:ec2:image", "text"] = "aws:ec2:image"

    @field_validator("parameter_name")
    @classmethod
    def _name(cls, value: str) -> str:
        bare = value.lstrip("/").lower()
        if not _SSM_NAME.match(value) or bare.startswith(("aws", "ssm")):
            raise ValueError(
                "expected a parameter name like /images/example/latest "
                "(letters, digits, _ . - /; not starting with aws or ssm)"
            )
        return value


class RegionDistribution(_Model):
    """One target region: Image Builder's `distributions[]` entry, flattened."""

    region: str
    name: str = DEFAULT_AMI_NAME
    description: Text | None = None
    ami_tags: dict[str, Annotated[str, StringConstraints(max_length=256)]] = Field(
        default_factory=dict
    )
    kms_key_id: str | None = None
    encrypted: bool | None = None
    launch_permission: LaunchPermission = Field(default_factory=LaunchPermission)
    ssm_parameter_configurations: list[SsmParameter] = Field(default_factory=list)

    @field_validator("region")
    @classmethod
    def _region(cls, value: str) -> str:
        if not _REGION.match(value):
            raise ValueError(f"not an AWS region name: {value!r} (e.g. us-east-1)")
        return value

    @field_validator("name", "description")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        if value is not None:
            check_template(value)
        return value

    @field_validator("ami_tags")
    @classmethod
    def _tags(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not _TAG_KEY.match(key):
                raise ValueError(f"invalid tag key {key!r} (1-128 characters, not aws:...)")
            if key.startswith("vmbuild:"):
                raise ValueError(f"tag key {key!r}: the vmbuild: prefix is reserved")
        if len(value) > 40:
            raise ValueError("at most 40 tags (EC2 allows 50, vmbuild adds its own)")
        return value

    @field_validator("kms_key_id")
    @classmethod
    def _kms(cls, value: str | None) -> str | None:
        if value is not None and not (_KMS_ARN.match(value) or _KMS_SHORT.match(value)):
            raise ValueError(
                f"expected a KMS key id, alias/NAME, or a key or alias ARN, got {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _coherent(self) -> RegionDistribution:
        if self.kms_key_id:
            match = _KMS_ARN.match(self.kms_key_id)
            if match and match["region"] != self.region:
                raise FieldError(
                    "kms_key_id",
                    f"key is in {match['region']} but the AMI goes to {self.region}; "
                    "KMS keys are regional: use a key of that region",
                )
            if self.encrypted is False:
                raise FieldError("encrypted", "false contradicts kms_key_id")
        if self.is_encrypted and "all" in self.launch_permission.user_groups:
            raise FieldError(
                "launch_permission.user_groups",
                "AWS cannot make an encrypted AMI public; drop `all` or encryption",
            )
        return self

    @property
    def is_encrypted(self) -> bool:
        """Encryption is implied by a KMS key; `encrypted: true` alone uses the aws/ebs key."""
        return bool(self.encrypted) or self.kms_key_id is not None


class ImageSettings(_Model):
    """How the AMI is registered (RegisterImage / ImportImage parameters)."""

    # None: the image's own (its manifest's boot_mode, from the recipe).
    boot_mode: Literal["legacy-bios", "uefi", "uefi-preferred"] | None = None
    # None: the image's own (its manifest's architecture, from the recipe's arch).
    architecture: Literal["x86_64", "arm64"] | None = None
    ena_support: bool = True
    root_device_name: Annotated[str, StringConstraints(pattern=r"^/dev/[a-z0-9]+$")] = "/dev/xvda"
    volume_size: Annotated[int, Field(ge=1, le=65536)] | None = None
    volume_type: Literal["gp3", "gp2", "io1", "io2", "standard"] = "gp3"
    imds_support: Literal["v2.0"] | None = None
    # RegisterImage's UefiData: the Secure Boot store the image was tested under
    # (publish/uefi_data.py). None: sent when the image was tested with Secure Boot.
    uefi_data: bool | None = None

    @model_validator(mode="after")
    def _uefi_data_needs_uefi(self) -> ImageSettings:
        if self.uefi_data and self.boot_mode == "legacy-bios":
            raise FieldError("uefi_data", "a UEFI variable store needs boot_mode uefi")
        if self.architecture == "arm64" and self.boot_mode == "legacy-bios":
            raise FieldError("boot_mode", "arm64 AMIs boot UEFI only (Graviton); use uefi")
        return self

    def for_image(
        self, boot_mode: str | None, secure_boot: bool = False, architecture: str | None = None
    ) -> ImageSettings:
        """These settings with what the image says filled in: the config's boot mode
        and architecture, else the image's (as its recipe declared and its tests
        proved), else legacy-bios and x86_64; uefi_data when the image was tested
        with Secure Boot."""
        update: dict[str, object] = {}
        if self.boot_mode is None:
            update["boot_mode"] = boot_mode or "legacy-bios"
        if self.architecture is None:
            update["architecture"] = architecture or "x86_64"
        if self.uefi_data is None:
            update["uefi_data"] = secure_boot and (self.boot_mode or boot_mode) != "legacy-bios"
        return self.model_copy(update=update) if update else self

    @property
    def mode(self) -> str:
        return self.boot_mode or "legacy-bios"

    @property
    def arch(self) -> str:
        return self.architecture or "x86_64"


class ImportSettings(_Model):
    """The upload: method, and for the S3-based ones the bucket, prefix, role and license."""

    method: Literal["ebs-direct", "import-snapshot", "import-image"] = "ebs-direct"
    s3_bucket: str | None = None
    s3_prefix: str = "vmbuild/"
    role_name: Annotated[str, StringConstraints(pattern=r"^[\w+=,.@-]{1,64}$")] = "vmimport"
    license_type: Literal["BYOL", "AWS"] = "BYOL"
    format: Literal["vmdk", "vhd", "raw"] = "vmdk"
    timeout: Annotated[float, Field(gt=0)] = 7200.0
    workers: Annotated[int, Field(ge=1, le=64)] = 16
    # ebs-direct: `used` sends every block a file system uses (zero or not) and the data
    # outside them; `all` sends every block of the disk (coldsnap's default).
    upload_blocks: Literal["used", "all"] = "used"
    # ebs-direct: build on the previous version's snapshot (ParentSnapshotId) when one exists.
    incremental: bool = True

    @field_validator("s3_bucket")
    @classmethod
    def _bucket(cls, value: str | None) -> str | None:
        if value is not None and not _BUCKET.match(value):
            raise ValueError(f"not an S3 bucket name: {value!r}")
        return value

    @model_validator(mode="after")
    def _bucket_needed(self) -> ImportSettings:
        if self.method != "ebs-direct" and not self.s3_bucket:
            raise FieldError("s3_bucket", f"required by method {self.method} (the upload target)")
        return self


class WaitSettings(_Model):
    """Polling of long operations (import tasks, AMIs becoming available)."""

    poll_interval: Annotated[float, Field(gt=0)] = 15.0
    timeout: Annotated[float, Field(gt=0)] = 7200.0


class DistributionConfig(_Model):
    """A validated distribution section. `regions[0]` is where the upload happens."""

    profile: str | None = None
    lint: bool = True
    image: ImageSettings = Field(default_factory=ImageSettings)
    import_: ImportSettings = Field(default_factory=ImportSettings, alias="import")
    wait: WaitSettings = Field(default_factory=WaitSettings)
    regions: Annotated[list[RegionDistribution], Field(min_length=1)]

    @model_validator(mode="after")
    def _unique_regions(self) -> DistributionConfig:
        seen: set[str] = set()
        for index, entry in enumerate(self.regions):
            if entry.region in seen:
                raise FieldError(f"regions[{index}].region", f"{entry.region} is listed twice")
            seen.add(entry.region)
        if self.image.uefi_data and self.import_.method == "import-image":
            raise FieldError(
                "image.uefi_data",
                "VM Import (import.method import-image) cannot carry a UEFI variable store; "
                "use ebs-direct or import-snapshot",
            )
        return self

    @property
    def source(self) -> RegionDistribution:
        """The region the image is uploaded to; the others copy from it."""
        return self.regions[0]


def check_template(template: str) -> None:
    """Raise ValueError when `template` uses a variable vmbuild does not provide."""
    for match in _TEMPLATE.finditer(template):
        if match[1] not in TEMPLATE_VARIABLES and match[1] not in IMAGE_BUILDER_VARIABLES:
            known = ", ".join("{{ " + v + " }}" for v in TEMPLATE_VARIABLES)
            raise ValueError(f"unknown variable {{{{ {match[1]} }}}} (known: {known})")


def render_template(template: str, variables: Mapping[str, str]) -> str:
    """Substitute `{{ name }}`-style variables (validated at load time)."""
    return _TEMPLATE.sub(lambda m: variables[IMAGE_BUILDER_VARIABLES.get(m[1], m[1])], template)


def ami_name_problem(name: str) -> str | None:
    """Why EC2 would reject `name` as an AMI name, or None."""
    if not 3 <= len(name) <= AMI_NAME_MAX:
        return f"AMI names are 3-{AMI_NAME_MAX} characters, {name!r} has {len(name)}"
    if not AMI_NAME_CHARS.match(name):
        bad = sorted({c for c in name if not AMI_NAME_CHARS.match(c)})
        return f"AMI name {name!r} contains {''.join(bad)!r}; allowed: letters, digits, ()[] ./-'@_"
    return None


def load_distribution(
    data: object, file: str, field_prefix: str = "distribution"
) -> DistributionConfig:
    """Validate a distribution section; raise ConfigError naming `file` and the field path.

    `field_prefix` is where the section sits in `file` ("distribution" inline in a recipe,
    "" for a file of its own). A file of its own may also wrap the keys in `distribution:`.
    """
    if not field_prefix and isinstance(data, dict) and set(data) == {"distribution"}:
        data, field_prefix = data["distribution"], "distribution"
    if not isinstance(data, dict):
        raise ConfigError(file, field_prefix or None, "expected a mapping of distribution settings")
    try:
        return DistributionConfig.model_validate(data)
    except ValidationError as exc:
        raise config_error(
            exc, file, field_prefix, model=DistributionConfig, rewrite=_wording
        ) from None


def _wording(error: Any, loc: list[int | str]) -> str | None:
    """Distribution's own wording: the accepted values, and what a region list needs."""
    if error["type"] == "too_short" and loc == ["regions"]:
        return "at least one region is required"
    if error["type"] == "literal_error":
        return f"got {error['input']!r}; expected {error['ctx']['expected']}"
    return None
