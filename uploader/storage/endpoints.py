"""Named S3 endpoints: where an upload goes, with which provider profile and credentials.

The default endpoint (``default``) is built from ``UPLOADER_S3_ENDPOINT_URL``, ``UPLOADER_S3_REGION``
and ``UPLOADER_S3_PROFILE`` (with ``UPLOADER_S3_ADDRESSING_STYLE`` / ``UPLOADER_PART_CHECKSUM``,
when set, taking precedence over the profile). More are configured with ``UPLOADER_ENDPOINTS``,
JSON: ``{"name": {"profile": "r2", "endpoint_url": "https://...", "region": "auto",
"aws_profile": "r2-writer"}}``. ``aws_profile`` names a profile of the workers' shared AWS
configuration (``~/.aws/credentials``): credentials stay on the workers, a request only names
the endpoint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, field_validator

from uploader.errors import InvalidRequest
from uploader.storage.profiles import Profile, ProfileName, profile

if TYPE_CHECKING:
    from uploader.config import Settings

#: The name of the endpoint built from the ``UPLOADER_S3_*`` settings.
DEFAULT_ENDPOINT = "default"
#: What an endpoint's name is made of (it is stored in the checkpoint and shown in status).
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class EndpointSpec(BaseModel):
    """One entry of ``UPLOADER_ENDPOINTS``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    profile: ProfileName
    endpoint_url: str | None = None
    region: str = "us-east-1"
    aws_profile: str | None = None

    @field_validator("endpoint_url", "aws_profile", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value


@dataclass(frozen=True)
class Endpoint:
    """A resolved endpoint: what the S3 adapter is built from."""

    name: str
    profile: Profile
    endpoint_url: str | None
    region: str
    aws_profile: str | None = None


def validate_endpoint_names(names: list[str]) -> None:
    """``ValueError`` for a name that is not :data:`NAME_RE` or is the reserved default."""
    for name in names:
        if not NAME_RE.fullmatch(name):
            raise ValueError(f"endpoint name {name[:70]!r} must be 1-64 letters, digits, '.', '_' or '-'")
        if name == DEFAULT_ENDPOINT:
            raise ValueError(f"endpoint name {DEFAULT_ENDPOINT!r} is the one built from UPLOADER_S3_*; choose another name")


def default_endpoint(settings: Settings) -> Endpoint:
    chosen = profile(settings.s3_profile)
    explicit = settings.model_fields_set
    chosen = chosen.with_overrides(
        addressing=settings.s3_addressing_style if "s3_addressing_style" in explicit else None,
        part_checksum=settings.part_checksum if "part_checksum" in explicit else None,
    )
    return Endpoint(DEFAULT_ENDPOINT, chosen, settings.s3_endpoint_url, settings.s3_region)


def resolve(settings: Settings, name: str | None) -> Endpoint:
    """The endpoint called ``name`` (``None`` or ``""``: the default). :class:`InvalidRequest`
    naming the configured ones when there is no such endpoint."""
    if not name or name == DEFAULT_ENDPOINT:
        return default_endpoint(settings)
    spec = settings.endpoints.get(name)
    if spec is None:
        known = ", ".join([DEFAULT_ENDPOINT, *sorted(settings.endpoints)])
        raise InvalidRequest(f"unknown endpoint {name[:70]!r}: the workers have {known} (UPLOADER_ENDPOINTS)")
    return Endpoint(name, profile(spec.profile), spec.endpoint_url, spec.region, spec.aws_profile)
