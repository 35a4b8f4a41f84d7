"""The ``uploader.start_upload`` message contract, validated.

Both the client (before sending) and the coordinator (on receipt, since any Celery client in any
language may send the message) validate with :func:`parse_request`, so a bad request is refused
with the same words wherever it is caught, and before anything is created.
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from uploader.errors import InvalidRequest
from uploader.planner import validate_part_size

_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_UPLOAD_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: S3 limits user metadata (names and values, UTF-8) to 2 KiB in all.
MAX_METADATA_BYTES = 2048
MAX_KEY_BYTES = 1024
#: The longest source (a path: PATH_MAX) and content type accepted; every string a request
#: stores in the checkpoint has a cap (see the README's "Limits").
MAX_SOURCE_BYTES = 4096
MAX_CONTENT_TYPE_CHARS = 256
#: An HTTP header name's characters (RFC 9110 "token"): what a metadata name must be made of.
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: What a header value may hold: printable ASCII and spaces (no CR, LF, NUL or other control
#: characters, which would forge or break headers; botocore sends headers as Latin-1, and S3
#: answers non-ASCII metadata with a signature error).
_HEADER_VALUE_RE = re.compile(r"[\x20-\x7e]*")


class UploadRequest(BaseModel):
    """The kwargs of ``uploader.start_upload``. Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    source: str
    bucket: str
    key: str
    upload_id: str | None = None
    part_size: int | None = None
    metadata: dict[str, str] | None = None
    content_type: str | None = None
    #: Abort the multipart upload (dropping uploaded parts) when the upload fails, instead of
    #: keeping them for ``resume``.
    abort_on_failure: bool = False

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        if not value or "\x00" in value:
            raise ValueError("source must be a non-empty path without NUL bytes")
        if len(value.encode("utf-8", "surrogatepass")) > MAX_SOURCE_BYTES:
            raise ValueError(f"source is longer than {MAX_SOURCE_BYTES} bytes")
        return value

    @field_validator("content_type")
    @classmethod
    def _content_type(cls, value: str | None) -> str | None:
        if value is not None:
            if len(value) > MAX_CONTENT_TYPE_CHARS:
                raise ValueError(f"content type is {len(value)} characters; at most {MAX_CONTENT_TYPE_CHARS}")
            if not _HEADER_VALUE_RE.fullmatch(value):
                raise ValueError("content type must be printable ASCII (no control characters such as CR or LF)")
        return value

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, value: str) -> str:
        validate_bucket_name(value)
        return value

    @field_validator("key")
    @classmethod
    def _key(cls, value: str) -> str:
        if not value:
            raise ValueError("key must not be empty")
        if len(value.encode("utf-8")) > MAX_KEY_BYTES:
            raise ValueError(f"key is {len(value.encode('utf-8'))} bytes; S3 keys are at most {MAX_KEY_BYTES} bytes")
        return value

    @field_validator("upload_id")
    @classmethod
    def _upload_id(cls, value: str | None) -> str | None:
        if value is not None and not _UPLOAD_ID_RE.fullmatch(value):
            raise ValueError("upload_id must be 1-128 characters of letters, digits, '.', '_' or '-'")
        return value

    @field_validator("part_size")
    @classmethod
    def _part_size(cls, value: int | None) -> int | None:
        if value is not None:
            validate_part_size(value)
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value:
            total = sum(len(k.encode()) + len(v.encode()) for k, v in value.items())
            if total > MAX_METADATA_BYTES:
                raise ValueError(f"metadata is {total} bytes; S3 allows {MAX_METADATA_BYTES} bytes of user metadata")
            for name, item in value.items():
                if not _TOKEN_RE.fullmatch(name):
                    raise ValueError(
                        f"metadata name {name!r} must be an HTTP token: letters, digits and !#$%&'*+-.^_`|~"
                    )
                if not _HEADER_VALUE_RE.fullmatch(item):
                    raise ValueError(
                        f"metadata value of {name!r} must be printable ASCII (no control characters such as CR or LF)"
                    )
        return value


def validate_bucket_name(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` follows S3's bucket naming rules."""
    if not _BUCKET_RE.fullmatch(name) or ".." in name:
        raise ValueError(
            f"invalid bucket name {name!r}: use 3-63 lowercase letters, digits, '.' or '-', "
            "starting and ending with a letter or digit"
        )
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        return
    raise ValueError(f"invalid bucket name {name!r}: it must not look like an IP address")


def parse_request(kwargs: dict[str, Any]) -> UploadRequest:
    """Validate ``kwargs`` into an :class:`UploadRequest`, filling in a fresh ``upload_id`` when
    the caller chose none. Raises :class:`InvalidRequest` naming every problem."""
    try:
        request = UploadRequest.model_validate(kwargs)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False, include_input=False):
            field = ".".join(str(p) for p in error["loc"]) or "request"
            if error["type"] == "extra_forbidden":
                problems.append(f"unknown option {field!r}")
            else:
                message = error["msg"].removeprefix("Value error, ")
                problems.append(f"{field}: {message}")
        raise InvalidRequest("invalid upload request: " + "; ".join(problems)) from None
    if request.upload_id is None:
        request = request.model_copy(update={"upload_id": new_upload_id()})
    return request


def valid_upload_id(value: str) -> bool:
    """Whether ``value`` has the shape of an upload id (safe as part of a Redis key)."""
    return bool(_UPLOAD_ID_RE.fullmatch(value))


def new_upload_id() -> str:
    """A fresh, unguessable upload id."""
    return uuid.uuid4().hex
