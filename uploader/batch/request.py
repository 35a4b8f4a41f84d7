"""The ``uploader.start_batch`` request, validated the same way by the client and the workers."""

from __future__ import annotations

import hashlib
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from uploader import auth
from uploader.errors import InvalidRequest
from uploader.request import MAX_PROBLEMS, parse_request, valid_upload_id, validation_problems
from uploader.sources.directory import Selector

#: Files listed (and started) per ``list_batch`` task, unless the request asks otherwise.
DEFAULT_PAGE_SIZE = 500
MAX_PAGE_SIZE = 10_000
#: At most this many include and this many exclude patterns, each at most this long.
MAX_PATTERNS = 100
MAX_PATTERN_CHARS = 1024
#: The user metadata every upload of a batch writes: ``<size>-<mtime ns>`` of the file as listed.
FINGERPRINT_METADATA = "uploader-fingerprint"
#: Request fields a batch sets per file itself.
_PER_FILE = frozenset({"source", "bucket", "key", "upload_id", "capability"})


class BatchRequest(BaseModel):
    """The kwargs of ``uploader.start_batch``. ``options``: the request fields every upload of
    the batch gets (``part_size``, ``endpoint``, ``metadata``, ``content_type``...: everything
    ``uploader.start_upload`` takes except ``source``, ``bucket``, ``key``, ``upload_id`` and
    ``capability``), validated as that request is."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    source: str
    bucket: str
    prefix: str = ""
    batch_id: str | None = None
    include: list[str] = Field(default_factory=list, max_length=MAX_PATTERNS)
    exclude: list[str] = Field(default_factory=list, max_length=MAX_PATTERNS)
    skip_unchanged: bool = False
    page_size: int = Field(DEFAULT_PAGE_SIZE, ge=1, le=MAX_PAGE_SIZE)
    capability: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("include", "exclude")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            if not pattern or len(pattern) > MAX_PATTERN_CHARS:
                raise ValueError(f"patterns must be 1-{MAX_PATTERN_CHARS} characters")
        return value

    @field_validator("batch_id")
    @classmethod
    def _batch_id(cls, value: str | None) -> str | None:
        # Its uploads' ids are "<batch id>.<24 hex digits>": the batch id leaves room for them.
        if value is not None and not (valid_upload_id(value) and len(value) <= 96):
            raise ValueError("batch_id must be 1-96 characters of letters, digits, '.', '_' or '-'")
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        return value if not value or value.endswith("/") else value + "/"

    @field_validator("options")
    @classmethod
    def _options(cls, value: dict[str, Any]) -> dict[str, Any]:
        taken = sorted(set(value) & _PER_FILE)
        if taken:
            raise ValueError(f"options may not set {', '.join(taken)}: the batch sets them for each file")
        return value

    @property
    def local_host(self) -> str:
        """The host whose workers alone read the directory (``options`` with ``locality`` "host":
        uploader/locality.py); "" when every worker can."""
        host = self.options.get("host") if self.options.get("locality") == "host" else None
        return host if isinstance(host, str) else ""

    @property
    def selector(self) -> Selector:
        return Selector(tuple(self.include), tuple(self.exclude))

    def upload_request(self, path: str, relative: str, upload_id: str, fingerprint: str) -> dict[str, Any]:
        """The ``start_upload`` kwargs of one file."""
        metadata = {**(self.options.get("metadata") or {}), FINGERPRINT_METADATA: fingerprint}
        request = {
            **self.options, "metadata": metadata, "source": path, "bucket": self.bucket, "key": self.prefix + relative,
            "upload_id": upload_id,
        }
        if self.capability is not None:
            request["capability"] = self.capability
        return request


def parse_batch_request(kwargs: dict[str, Any]) -> BatchRequest:
    """Validate ``start_batch`` kwargs (the options by a sample file's request too), filling in
    a fresh ``batch_id``. :class:`InvalidRequest` names the problems."""
    try:
        request = BatchRequest.model_validate(kwargs)
    except ValidationError as exc:
        problems = validation_problems(exc)
        raise InvalidRequest("invalid batch request: " + "; ".join(problems[:MAX_PROBLEMS])) from None
    if request.batch_id is None:
        request = request.model_copy(update={"batch_id": new_batch_id()})
    # The request every file's upload will send, for a sample file: the same words as a start's refusal.
    parse_request(request.upload_request(request.source.rstrip("/") + "/x", "x", "sample", "0-0"))
    return request


def new_batch_id() -> str:
    return "b" + hashlib.sha256(auth.Capability.new().token.encode()).hexdigest()[:31]


def file_upload_id(batch_id: str, relative: str) -> str:
    """A file's upload id: the same on every listing of the same batch (a page delivered twice
    starts each upload once), and ``<batch id>.`` first, so an upload names its batch."""
    digest = hashlib.sha256(relative.encode("utf-8", "surrogateescape")).hexdigest()[:24]
    return f"{batch_id}.{digest}"


def shown_path(relative: str) -> str:
    """A relative path as text (names that are not UTF-8 shown with ``\\x`` escapes)."""
    return relative.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
