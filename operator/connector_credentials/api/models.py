"""The ConnectorCredential API: names, the spec model, ARN and duration parsing.

Pure: no kopf, no boto3. The CRD in ``crds/`` mirrors this module; a drift test keeps
the two in agreement.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

GROUP = "connectors.xpander.ai"
VERSION = "v1alpha1"
PLURAL = "connectorcredentials"
SINGULAR = "connectorcredential"
KIND = "ConnectorCredential"
SHORT_NAME = "ccred"
API_VERSION = f"{GROUP}/{VERSION}"

#: Prefix of every annotation, finalizer and label this operator owns.
ANNOTATION_PREFIX = GROUP

DEFAULT_VERSION_STAGE = "AWSCURRENT"
MIN_REFRESH_SECONDS = 5.0
MAX_JSON_KEY_LENGTH = 256

# Patterns shared with the CRD schema (the drift test compares them verbatim).
# The schema only checks the general ARN shape; the operator checks the rest so that a
# wrong ARN gets a status message that says which part is wrong, not a regex dump.
ARN_SCHEMA_PATTERN = r"^arn:[^:]+:[^:]*:[^:]*:[^:]*:.+$"
VERSION_STAGE_PATTERN = r"^[A-Za-z0-9_+=.@-]{1,256}$"
VERSION_ID_PATTERN = r"^[A-Za-z0-9-]{32,64}$"
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
ROLE_ARN_PATTERN = r"^arn:aws[a-z-]*:iam::[0-9]{12}:role/[A-Za-z0-9_+=,.@/-]{1,512}$"
EXTERNAL_ID_PATTERN = r"^[A-Za-z0-9_+=,.@:/-]+$"

_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# Partitions and regions are checked by shape, not against a list: every one botocore knows
# (aws, aws-cn, aws-us-gov, aws-iso-b, aws-eusc's eusc-de-east-1, ...) fits, and a new region
# needs no release of the operator. tests/unit/api/test_models.py holds them to botocore's data
# (the api layer may not import botocore: .importlinter). \Z, not $, here and below: $ lets a
# trailing newline through.
_PARTITION = re.compile(r"\Aaws(-[a-z]+)*\Z")
_REGION = re.compile(r"\A[a-z]{2,}(-[a-z]+)+-[0-9]+\Z")
_ACCOUNT = re.compile(r"\A[0-9]{12}\Z")
_SECRET_NAME = re.compile(r"\A[A-Za-z0-9/_+=.@-]{1,512}\Z")


class InvalidSpecError(ValueError):
    """The resource is malformed in a way the schema let through."""


def parse_duration(text: str) -> float:
    """Parse a Go-style duration (``30s``, ``5m``, ``1h30m``, ``500ms``) into seconds."""
    if not re.fullmatch(DURATION_PATTERN, text):
        raise InvalidSpecError(
            f"{text!r} is not a duration; use a number and a unit (ms, s, m, h), e.g. 30s, 5m, 1h30m"
        )
    return sum(float(num) * _UNIT_SECONDS[unit] for num, unit in _DURATION_PART.findall(text))


def format_duration(seconds: float) -> str:
    """The inverse of :func:`parse_duration` for whole seconds, as people write it."""
    whole = int(seconds)
    if whole != seconds or whole == 0:
        return f"{int(seconds * 1000)}ms"
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return "".join(f"{n}{u}" for n, u in ((hours, "h"), (minutes, "m"), (secs, "s")) if n)


def region_of(arn: str) -> str | None:
    """The region an ARN names (its fourth part), or ``None`` when there is no valid one."""
    parts = arn.split(":", 6)
    return parts[3] if len(parts) > 3 and parts[0] == "arn" and _REGION.match(parts[3]) else None


@dataclass(frozen=True, slots=True)
class SecretArn:
    """A Secrets Manager secret ARN, split into the parts the operator uses."""

    arn: str
    partition: str
    region: str
    account: str
    name: str

    @classmethod
    def parse(cls, arn: str) -> SecretArn:
        parts = arn.split(":", 6)
        if len(parts) >= 3 and parts[0] == "arn" and parts[2] != "secretsmanager":
            raise InvalidSpecError(
                f"secretArn names a {parts[2] or 'blank'!r} resource, not a Secrets Manager secret; "
                "copy the ARN from the secret's page in the Secrets Manager console"
            )
        if len(parts) != 7 or parts[0] != "arn":
            raise InvalidSpecError(
                f"secretArn {arn!r} is not an ARN; expected "
                "arn:<partition>:secretsmanager:<region>:<account-id>:secret:<name>"
            )
        _, partition, service, region, account, resource_type, name = parts
        if not _PARTITION.match(partition):
            raise InvalidSpecError(f"secretArn has an unknown partition {partition!r} (expected aws, aws-cn, ...)")
        if service != "secretsmanager":
            raise InvalidSpecError(
                f"secretArn names a {service or 'blank'!r} resource, not a Secrets Manager secret; "
                "copy the ARN from the secret's page in the Secrets Manager console"
            )
        if not _REGION.match(region):
            raise InvalidSpecError(f"secretArn has no valid region (got {region!r}, e.g. us-east-1)")
        if not _ACCOUNT.match(account):
            raise InvalidSpecError(f"secretArn has no valid 12-digit account ID (got {account!r})")
        if resource_type != "secret":
            raise InvalidSpecError(f"secretArn must name a secret (':secret:<name>'), got {resource_type!r}")
        if not _SECRET_NAME.match(name):
            raise InvalidSpecError(
                "secretArn has an invalid secret name; names use letters, digits and /_+=.@- "
                "and are at most 512 characters"
            )
        return cls(arn=arn, partition=partition, region=region, account=account, name=name)


@dataclass(frozen=True, slots=True)
class AssumedRole:
    """A role named by a credential's spec (``spec.roleArn``, ``spec.externalId``); the external
    id is not secret, but it is kept out of ``repr`` (and so out of logs) all the same."""

    arn: str
    external_id: str | None = None

    def __repr__(self) -> str:
        return f"AssumedRole({self.arn!r}{', external id' if self.external_id else ''})"


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        frozen=True,
        extra="forbid",
    )


class ConnectorCredentialSpec(_Model):
    """The spec of a ConnectorCredential: which secret, which part of it, how often to check."""

    secret_arn: Annotated[str, Field(pattern=ARN_SCHEMA_PATTERN, max_length=2048)]
    json_key: Annotated[str | None, Field(min_length=1, max_length=MAX_JSON_KEY_LENGTH)] = None
    version_stage: Annotated[str | None, Field(pattern=VERSION_STAGE_PATTERN)] = None
    version_id: Annotated[str | None, Field(pattern=VERSION_ID_PATTERN)] = None
    refresh_interval: Annotated[str | None, Field(pattern=DURATION_PATTERN, max_length=32)] = None
    role_arn: Annotated[str | None, Field(pattern=ROLE_ARN_PATTERN, max_length=2048)] = None
    external_id: Annotated[str | None, Field(pattern=EXTERNAL_ID_PATTERN, min_length=2, max_length=1224)] = None

    @field_validator("secret_arn")
    @classmethod
    def _check_arn(cls, value: str) -> str:
        SecretArn.parse(value)
        return value

    @field_validator("refresh_interval")
    @classmethod
    def _check_interval(cls, value: str | None) -> str | None:
        if value is not None and parse_duration(value) < MIN_REFRESH_SECONDS:
            raise InvalidSpecError(f"refreshInterval {value} is below the minimum of 5s")
        return value

    @model_validator(mode="after")
    def _check_exclusive(self) -> ConnectorCredentialSpec:
        if self.version_stage is not None and self.version_id is not None:
            raise InvalidSpecError("versionStage and versionId are mutually exclusive; set one of them")
        if self.external_id is not None and self.role_arn is None:
            raise InvalidSpecError("externalId is only used with roleArn; set roleArn or remove externalId")
        return self

    @property
    def role(self) -> AssumedRole | None:
        """The cross-account role to read as, if the spec names one."""
        return AssumedRole(self.role_arn, self.external_id) if self.role_arn else None

    @property
    def arn(self) -> SecretArn:
        return SecretArn.parse(self.secret_arn)

    @property
    def effective_stage(self) -> str | None:
        """The stage to ask for: none when a version is pinned, else the default stage."""
        if self.version_id is not None:
            return None
        return self.version_stage or DEFAULT_VERSION_STAGE

    def refresh_seconds(self, default: float) -> float:
        return parse_duration(self.refresh_interval) if self.refresh_interval else default


def parse_spec(raw: Any) -> ConnectorCredentialSpec:
    """Validate a raw spec; raise :class:`InvalidSpecError` with a message fit for a status."""
    if not isinstance(raw, dict):
        raise InvalidSpecError("spec is missing or is not an object")
    try:
        return ConnectorCredentialSpec.model_validate(raw)
    except ValidationError as exc:
        raise InvalidSpecError(_describe_validation_error(exc)) from None


def _describe_validation_error(exc: ValidationError) -> str:
    problems: list[str] = []
    for error in exc.errors(include_url=False, include_input=False):
        location = ".".join(str(part) for part in error["loc"]) or "spec"
        ctx = error.get("ctx") or {}
        inner = ctx.get("error")
        if isinstance(inner, InvalidSpecError):
            message = str(inner)
        elif error["type"] == "missing":
            message = f"spec.{location} is required"
        elif error["type"] == "extra_forbidden":
            message = f"spec.{location} is not a known field"
        elif error["type"] == "string_pattern_mismatch":
            message = f"spec.{location} does not match {ctx.get('pattern')}"
        else:
            message = f"spec.{location}: {error['msg']}"
        problems.append(message.removeprefix("Value error, "))
    return "; ".join(problems)
