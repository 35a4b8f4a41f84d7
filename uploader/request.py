"""The ``uploader.start_upload`` message contract, validated.

Both the client (before sending) and the coordinator (on receipt, since any Celery client in any
language may send the message) validate with :func:`parse_request`, so a bad request is refused
with the same words wherever it is caught, and before anything is created.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from uploader import auth, locality
from uploader.config import CREDENTIAL_NAME_RE
from uploader.errors import InvalidRequest
from uploader.ids import EXCERPT, UPLOAD_ID_RE, check_upload_id, new_upload_id, shown, valid_upload_id
from uploader.logsafe import escape_controls
from uploader.model import OPTION_NAMES, ObjectOptions
from uploader.notify import targets, template
from uploader.planner import validate_part_size
from uploader.priority import HIGHEST as PRIORITY_HIGHEST
from uploader.priority import LOWEST as PRIORITY_LOWEST
from uploader.storage import osscallback
from uploader.storage.endpoints import NAME_RE as _ENDPOINT_NAME_RE

_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
MAX_KEY_BYTES = 1024
#: The largest ``max_concurrency`` (S3's part count limit: no upload has more parts than this).
MAX_CONCURRENCY = 10_000
#: The smallest ``max_bandwidth`` (bytes/s): below it a part would outlast its time limit.
MIN_BANDWIDTH = 1024
#: The longest source (a path: PATH_MAX) accepted; every string a request stores in the
#: checkpoint has a cap (see the README's "Limits"; the options' caps are in uploader/model.py).
MAX_SOURCE_BYTES = 4096
#: What a key or a source must not contain: control characters (C0, DEL, C1: they would break
#: lines and drive terminals wherever the value is shown: status, list, Flower) and unpaired
#: surrogates (not Unicode text: JSON can carry them, UTF-8, Redis and S3 cannot).
_UNSAFE_CHAR_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
#: Problems named in one refusal.
MAX_PROBLEMS = 5
_shown = shown
__all__ = ["EXCERPT", "check_upload_id", "new_upload_id", "valid_upload_id"]  # (re-exported from uploader.ids)


def _unsafe_character_problem(what: str, value: str) -> str | None:
    found = _UNSAFE_CHAR_RE.search(value)
    if found is None:
        return None
    char = found.group()
    kind = "an unpaired surrogate" if "\ud800" <= char <= "\udfff" else "a control character"
    return f"{what} contains {kind} ({repr(char)[1:-1]} at character {found.start()}); it must be printable Unicode text"


class UploadRequest(ObjectOptions):
    """The kwargs of ``uploader.start_upload``: where from and to, how, and (inherited, at the
    top level of the message) the :class:`~uploader.model.ObjectOptions` of the object.
    Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    source: str
    bucket: str
    key: str
    upload_id: str | None = None
    part_size: int | None = None
    #: Abort the multipart upload (dropping uploaded parts) when the upload fails, instead of
    #: keeping them for ``resume``.
    abort_on_failure: bool = False
    #: The SHA-256 (64 lower-case hex digits) of a random token the submitter keeps: ``cancel``
    #: and ``resume`` of this upload then need that token (or an operator). See uploader/auth.py.
    capability: str | None = None
    #: The named endpoint (``UPLOADER_ENDPOINTS``) to upload to; ``None``: the default one.
    #: A name the workers do not have is refused by the coordinator, before anything is created.
    endpoint: str | None = None
    #: Notifications (see uploader/notify/ and the README's "Notifications"): a URL the result
    #: is POSTed to, signed, with the request's own ``callback_vars``; Celery tasks sent by name
    #: with the result as kwargs when the upload completes (``on_complete``) or fails for good or
    #: is cancelled (``on_failure``), to ``callback_queue`` (default: Celery's ``celery``).
    callback_url: str | None = None
    callback_vars: dict[str, str] | None = None
    on_complete: str | None = None
    on_failure: str | None = None
    callback_queue: str | None = None
    #: A body template for the webhook POST instead of the JSON result, like OSS's
    #: ``callbackBody`` (``${bucket}``, ``${object}``, ``${etag}``, ``${size}``, ``${mimeType}``,
    #: ``${x:name}``...: uploader/notify/template.py), sent as ``callback_body_type``
    #: (``application/x-www-form-urlencoded``, the default as on OSS, or ``application/json``).
    callback_body: str | None = None
    callback_body_type: str | None = None

    @field_validator("callback_body")
    @classmethod
    def _callback_body(cls, value: str | None) -> str | None:
        return None if value is None else template.check_template(value)

    @field_validator("callback_body_type")
    @classmethod
    def _callback_body_type(cls, value: str | None) -> str | None:
        if value is not None and value not in {t.value for t in template.BodyType}:
            raise ValueError(f"callback_body_type must be one of: {', '.join(t.value for t in template.BodyType)}")
        return value

    @field_validator("callback_url")
    @classmethod
    def _callback_url(cls, value: str | None) -> str | None:
        return None if value is None else targets.check_url(value)

    @field_validator("callback_vars")
    @classmethod
    def _callback_vars(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return None if value is None else targets.check_vars(value)

    @field_validator("on_complete", "on_failure")
    @classmethod
    def _callback_task(cls, value: str | None, info: Any) -> str | None:
        return None if value is None else targets.check_task(info.field_name, value)

    @field_validator("callback_queue")
    @classmethod
    def _callback_queue(cls, value: str | None) -> str | None:
        return None if value is None else targets.check_queue(value)

    @model_validator(mode="after")
    def _callback_options_need_a_callback(self) -> UploadRequest:
        if self.callback_queue is not None and not (self.on_complete or self.on_failure):
            raise ValueError("callback_queue needs on_complete or on_failure (the tasks it is for)")
        if self.callback_vars and not (self.callback_url or self.on_complete or self.on_failure):
            raise ValueError("callback_vars needs callback_url, on_complete or on_failure (what they are sent with)")
        if (self.callback_body is not None or self.callback_body_type is not None) and not self.callback_url:
            raise ValueError("callback_body and callback_body_type need callback_url (the POST they shape)")
        if self.callback_body_type is not None and self.callback_body is None:
            raise ValueError("callback_body_type needs callback_body")
        missing = [n for n in template.variables_used(self.callback_body or "") if n not in (self.callback_vars or {})]
        if missing:
            raise ValueError(f"callback_body uses ${{x:{missing[0][:64]}}}, which callback_vars does not give")
        return self

    def notify_fields(self) -> dict[str, Any]:
        """The record fields of the notifications asked for (the outbox reads them: see
        ``append_outbox`` in uploader/checkpoint/lua/_shared.lua)."""
        return {
            "callback_url": self.callback_url or "",
            "callback_vars": self.callback_vars or {},
            "on_complete": self.on_complete or "",
            "on_failure": self.on_failure or "",
            "callback_queue": self.callback_queue or "",
            "callback_body": self.callback_body or "",
            "callback_body_type": (self.callback_body_type or template.BodyType.FORM.value) if self.callback_body else "",
        }
    #: Alibaba OSS's own upload callback (the ``oss`` profile only; refused under any other):
    #: the callback JSON as OSS defines it (an object, or its text, with a ``callbackUrl``) and
    #: its ``x:`` variables, sent as ``x-oss-callback`` / ``x-oss-callback-var`` on Complete or
    #: the single PUT. See uploader/storage/osscallback.py.
    oss_callback: dict[str, Any] | None = None
    oss_callback_vars: dict[str, str] | None = None

    @field_validator("oss_callback", mode="before")
    @classmethod
    def _oss_callback(cls, value: Any) -> Any:
        return None if value is None else osscallback.check_callback(value)

    @field_validator("oss_callback_vars")
    @classmethod
    def _oss_callback_vars(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return None if value is None else osscallback.check_vars(value)

    @model_validator(mode="after")
    def _oss_callback_vars_need_a_callback(self) -> UploadRequest:
        if self.oss_callback_vars and not self.oss_callback:
            raise ValueError("oss_callback_vars needs oss_callback (what they are sent with)")
        return self

    def oss_callback_fields(self) -> dict[str, Any]:
        """The record fields of the OSS callback asked for ("" / {} when not asked for)."""
        return {
            "oss_callback": osscallback.encode(self.oss_callback).decode() if self.oss_callback else "",
            "oss_callback_vars": self.oss_callback_vars or {},
        }

    def provider_options(self) -> dict[str, Any]:
        """What a provider profile may refuse (``Profile.refusal``): the object options and the
        provider-specific request options."""
        return {**self.object_options(), "oss_callback": self.oss_callback, "oss_callback_vars": self.oss_callback_vars}

    #: At most this many parts of this upload are being sent at any moment, across the whole
    #: fleet (OSS's ``taskNum``); the others wait their turn. ``None``: no cap beyond the workers'.
    max_concurrency: int | None = Field(None, ge=1, le=MAX_CONCURRENCY)
    #: Bytes per second this upload's parts may take together, across the whole fleet (a token
    #: bucket in Redis: see uploader/limits/). ``None``: no limit beyond each worker's own.
    max_bandwidth: int | None = Field(None, ge=MIN_BANDWIDTH)
    #: How urgent this upload's messages are, 0-9, 9 the most (RabbitMQ's scale; translated for
    #: Redis: see uploader/priority.py). ``None``: sent without a priority, the broker's default.
    priority: int | None = Field(None, ge=PRIORITY_LOWEST, le=PRIORITY_HIGHEST)
    #: An HTTP(S) source's credentials, by name: a header or basic auth the workers hold in
    #: ``UPLOADER_SOURCE_CREDENTIALS`` (the secret never travels in a message). A name the
    #: workers do not have is refused by the coordinator, before anything is created.
    source_credentials: str | None = None

    @field_validator("source_credentials")
    @classmethod
    def _source_credentials(cls, value: str | None) -> str | None:
        if value is not None and not CREDENTIAL_NAME_RE.fullmatch(value):
            raise ValueError(f"source_credentials {_shown(value)} must be 1-64 letters, digits, '.', '_' or '-'")
        return value

    #: The named endpoint (``UPLOADER_ENDPOINTS``) an S3 source (``s3://bucket/key``) is read
    #: from; ``None``: the default one. Only for S3 sources (see uploader/sources/s3.py).
    source_endpoint: str | None = None

    @model_validator(mode="after")
    def _source_endpoint_needs_an_s3_source(self) -> UploadRequest:
        if self.source_endpoint is not None and not self.source.startswith("s3://"):
            raise ValueError("source_endpoint is for S3 sources (s3://bucket/key) only")
        if self.source.startswith("s3://"):
            bucket, _, key = self.source.removeprefix("s3://").partition("/")
            if not key:
                raise ValueError("an S3 source must be s3://bucket/key")
            validate_bucket_name(bucket)
        return self

    #: ``"host"``: the source is a file on one machine's own disk, ``host`` (uploader/locality.py):
    #: only the workers there read it, each of its parts still sent by any of them. ``"shared"``
    #: or ``None``: every worker can read the source.
    locality: Literal["shared", "host"] | None = None
    host: str | None = None

    @field_validator("host")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        return None if value is None else locality.check_host(value)

    @model_validator(mode="after")
    def _host_local_needs_a_host(self) -> UploadRequest:
        if self.locality == locality.Locality.HOST.value:
            if self.host is None:
                raise ValueError(
                    "locality 'host' needs host: the name of the machine the file is on (its workers' UPLOADER_HOST_NAME)"
                )
            if "://" in self.source:
                raise ValueError("locality 'host' is for files on a host's disk, not for URLs or S3 objects")
        elif self.host is not None:
            raise ValueError("host is for host-local uploads only: give locality 'host' with it")
        return self

    @property
    def local_host(self) -> str:
        """The host whose workers alone may read the source ("" if any worker may)."""
        return self.host or ""

    @field_validator("endpoint", "source_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and not _ENDPOINT_NAME_RE.fullmatch(value):
            raise ValueError(f"endpoint {_shown(value)} must be 1-64 letters, digits, '.', '_' or '-'")
        return value

    def object_options(self) -> dict[str, Any]:
        """What this request asks of the object, by name, as JSON values (what a
        provider profile may refuse: see ``Profile.refusal``); options not asked for are ``None``."""
        return self.options.model_dump(mode="json")

    @field_validator("capability")
    @classmethod
    def _capability(cls, value: str | None) -> str | None:
        if value is not None and not auth.valid_digest(value):
            raise ValueError("capability must be the SHA-256 of a token, as 64 lower-case hex digits")
        return value

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        if not value or "\x00" in value:
            raise ValueError("source must be a non-empty path without NUL bytes")
        if len(value.encode("utf-8", "surrogatepass")) > MAX_SOURCE_BYTES:
            raise ValueError(f"source is longer than {MAX_SOURCE_BYTES} bytes")
        problem = _unsafe_character_problem("source", value)
        if problem is not None:
            raise ValueError(problem)
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
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > MAX_KEY_BYTES:
            raise ValueError(f"key is {size} bytes; S3 keys are at most {MAX_KEY_BYTES} bytes")
        problem = _unsafe_character_problem("key", value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("upload_id")
    @classmethod
    def _upload_id(cls, value: str | None) -> str | None:
        if value is not None and not UPLOAD_ID_RE.fullmatch(value):
            raise ValueError("upload_id must be 1-128 characters of letters, digits, '.', '_' or '-'")
        return value

    @field_validator("part_size")
    @classmethod
    def _part_size(cls, value: int | None) -> int | None:
        if value is not None:
            validate_part_size(value)
        return value

    @property
    def options(self) -> ObjectOptions:
        """The object options of this request, as one value."""
        return ObjectOptions.model_validate({name: getattr(self, name) for name in OPTION_NAMES})

    def to_message(self) -> dict[str, Any]:
        """The kwargs of the ``uploader.start_upload`` message (JSON types; unset ones left out)."""
        return self.model_dump(mode="json", exclude_none=True)


def validate_bucket_name(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` follows S3's bucket naming rules."""
    if not _BUCKET_RE.fullmatch(name) or ".." in name:
        raise ValueError(
            f"invalid bucket name {_shown(name)}: use 3-63 lowercase letters, digits, '.' or '-', "
            "starting and ending with a letter or digit"
        )
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        return
    raise ValueError(f"invalid bucket name {_shown(name)}: it must not look like an IP address")


def parse_request(kwargs: dict[str, Any]) -> UploadRequest:
    """Validate ``kwargs`` into an :class:`UploadRequest`, filling in a fresh ``upload_id`` when
    the caller chose none. Raises :class:`InvalidRequest` naming the problems (the first
    :data:`MAX_PROBLEMS`, hostile values quoted short and escaped: the reason is logged, stored
    for ``status`` and shown on terminals)."""
    # Unknown names are picked out before pydantic, which cannot name a field it cannot read as
    # text ("request: Input should be a valid string") and would quote a huge name whole.
    known = {name: value for name, value in kwargs.items() if name in UploadRequest.model_fields}
    problems = []
    request = None
    try:
        request = UploadRequest.model_validate(known)
    except ValidationError as exc:
        problems = validation_problems(exc)
    problems += [f"unknown option {_shown(name)}" for name in kwargs if name not in UploadRequest.model_fields]
    if problems or request is None:
        more = f"; and {len(problems) - MAX_PROBLEMS} more" if len(problems) > MAX_PROBLEMS else ""
        raise InvalidRequest("invalid upload request: " + "; ".join(problems[:MAX_PROBLEMS]) + more) from None
    if request.upload_id is None:
        request = request.model_copy(update={"upload_id": new_upload_id()})
    return request


def validation_problems(exc: ValidationError) -> list[str]:
    """pydantic's errors as problems ``field: message`` (field names quoted short and escaped)."""
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        field = ".".join(escape_controls(str(p)[:EXCERPT]) for p in error["loc"])
        problems.append(f"{field or 'request'}: {error['msg'].removeprefix('Value error, ')}")
    return problems


