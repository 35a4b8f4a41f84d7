"""Domain types of an upload that later rooms build on: its states and the outcomes of its
tasks (enums), the upload record, the object's options, the parts and the result.

No I/O here, no boto3, no Redis. :class:`UploadRecord` is one upload as the checkpoint holds it
(:meth:`UploadRecord.from_hash` reads the Redis hash the checkpoint's scripts write;
``uploader/checkpoint`` does the I/O). :class:`ObjectOptions` is what a request asks of the stored
object (headers, metadata, ACL, storage class, tags, encryption, conditional write, object lock),
validated once, carried as one value (one JSON field of the checkpoint record) and turned into
S3 parameters by the storage adapter, which filters them per call (``uploader/storage/arguments.py``).
:class:`UploadResult` is what a completed upload reports.

Adding an option: a field here (with its validation), and its S3 parameter in the adapter's
mapping and per-call filters. Nothing else threads it through.
"""

from __future__ import annotations

import enum
import json
import mimetypes
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from uploader.checksums import ChecksumAlgorithm

#: S3 limits user metadata (names and values, UTF-8) to 2 KiB in all.
MAX_METADATA_BYTES = 2048
#: The longest content type (and other standard header value) accepted: every string a request
#: stores in the checkpoint has a cap (see the README's "Limits").
MAX_HEADER_VALUE_CHARS = 256
MAX_CONTENT_TYPE_CHARS = MAX_HEADER_VALUE_CHARS
#: S3's object tag limits.
MAX_TAGS = 10
MAX_TAG_KEY_CHARS = 128
MAX_TAG_VALUE_CHARS = 256
#: The longest name of an SSE-C key in the workers' keyring, KMS key id, or account id accepted.
MAX_NAME_CHARS = 256
#: An HTTP header name's characters (RFC 9110 "token"): what a metadata name must be made of.
TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: What a header value may hold: printable ASCII and spaces (no CR, LF, NUL or other control
#: characters, which would forge or break headers; botocore sends headers as Latin-1, and S3
#: answers non-ASCII metadata with a signature error).
HEADER_VALUE_RE = re.compile(r"[\x20-\x7e]*")
#: What S3 accepts in a tag key or value: Unicode letters, digits, spaces and + - = . _ : / @.
_TAG_TEXT_RE = re.compile(r"[\w +\-=.:/@]*")
#: The name of an SSE-C key in the keyring (see Settings.sse_c_keys).
_KEY_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ACCOUNT_ID_RE = re.compile(r"[0-9]{12}")
_EXCERPT = 64


def _shown(value: str) -> str:
    return repr(value[:_EXCERPT]) + ("..." if len(value) > _EXCERPT else "")


class CannedACL(enum.StrEnum):
    """S3's canned ACLs for an object."""

    PRIVATE = "private"
    PUBLIC_READ = "public-read"
    PUBLIC_READ_WRITE = "public-read-write"
    AUTHENTICATED_READ = "authenticated-read"
    AWS_EXEC_READ = "aws-exec-read"
    BUCKET_OWNER_READ = "bucket-owner-read"
    BUCKET_OWNER_FULL_CONTROL = "bucket-owner-full-control"


class StorageClass(enum.StrEnum):
    """The storage classes a request may name: S3's (the header values), and Google Cloud
    Storage's own (its XML API takes them in the same header). Which ones a server accepts, and
    under which name, is its profile's (``uploader/storage/profiles.py``): the others are
    refused at submit."""

    STANDARD = "STANDARD"
    REDUCED_REDUNDANCY = "REDUCED_REDUNDANCY"
    STANDARD_IA = "STANDARD_IA"
    ONEZONE_IA = "ONEZONE_IA"
    INTELLIGENT_TIERING = "INTELLIGENT_TIERING"
    GLACIER = "GLACIER"
    DEEP_ARCHIVE = "DEEP_ARCHIVE"
    OUTPOSTS = "OUTPOSTS"
    GLACIER_IR = "GLACIER_IR"
    SNOW = "SNOW"
    EXPRESS_ONEZONE = "EXPRESS_ONEZONE"
    NEARLINE = "NEARLINE"
    COLDLINE = "COLDLINE"
    ARCHIVE = "ARCHIVE"


class ServerSideEncryption(enum.StrEnum):
    """Server-side encryption with keys the server manages (SSE-C is ``sse_customer_key``)."""

    AES256 = "AES256"
    KMS = "aws:kms"
    KMS_DSSE = "aws:kms:dsse"


class ObjectLockMode(enum.StrEnum):
    GOVERNANCE = "GOVERNANCE"
    COMPLIANCE = "COMPLIANCE"


class LegalHold(enum.StrEnum):
    ON = "ON"
    OFF = "OFF"


class RequestPayer(enum.StrEnum):
    REQUESTER = "requester"


def _aware_iso(value: Any, what: str) -> Any:
    """An ISO 8601 date-time (a string, or a ``datetime`` from the Python API) as a UTC string:
    the record and the message carry text."""
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)  # 3.11 reads "Z"
        except ValueError:
            raise ValueError(f"{what} must be an ISO 8601 date-time such as 2030-01-31T00:00:00Z, not {_shown(value)}") from None
    else:
        return value  # pydantic names the wrong type
    if moment.tzinfo is None:
        raise ValueError(f"{what} must say its time zone (end it with Z for UTC)")
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _enum() -> Any:
    """An optional enum field that takes its member's text: messages are JSON, and strict mode
    would refuse the text."""
    return Field(None, strict=False)


class ObjectOptions(BaseModel):
    """What a request asks of the stored object, validated: every field is optional, and an
    option left unset is not sent (the server's default applies).

    ``sse_customer_key`` is the *name* of a key in the workers' keyring
    (``UPLOADER_SSE_C_KEYS``), never a key: the key stays on the workers. Whether the name is in
    the keyring is checked by the coordinator (:meth:`check_keyring`), which has the keyring."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    content_type: str | None = None
    cache_control: str | None = None
    content_disposition: str | None = None
    content_encoding: str | None = None
    content_language: str | None = None
    #: When the object may no longer be cached (the ``Expires`` header): ISO 8601, UTC.
    expires: str | None = None
    metadata: dict[str, str] | None = None
    acl: CannedACL | None = _enum()
    storage_class: StorageClass | None = _enum()
    tags: dict[str, str] | None = None
    sse: ServerSideEncryption | None = _enum()
    sse_kms_key_id: str | None = None
    bucket_key_enabled: bool | None = None
    sse_customer_key: str | None = None
    #: Refuse to replace an existing object (``If-None-Match: *`` on PutObject and
    #: CompleteMultipartUpload): the upload ends failed if the key is taken.
    no_overwrite: bool = False
    object_lock_mode: ObjectLockMode | None = _enum()
    #: ISO 8601, UTC.
    object_lock_retain_until: str | None = None
    object_lock_legal_hold: LegalHold | None = _enum()
    expected_bucket_owner: str | None = None
    request_payer: RequestPayer | None = _enum()
    #: The per-part checksum (CRC32, CRC32C, CRC64NVME, SHA1, SHA256, or MD5 for Content-MD5;
    #: any case), combined into the whole object's: see uploader/checksums.py. None: the
    #: endpoint's default (its profile's, or ``UPLOADER_PART_CHECKSUM``); the record keeps the
    #: algorithm resolved at start in a field of its own.
    checksum_algorithm: str | None = None

    #: The fields sent as standard headers, whose values must be printable ASCII.
    HEADER_FIELDS: ClassVar[tuple[str, ...]] = (
        "content_type", "cache_control", "content_disposition", "content_encoding", "content_language",
    )

    @field_validator("checksum_algorithm")
    @classmethod
    def _checksum_algorithm(cls, value: str | None) -> str | None:
        return None if value is None else ChecksumAlgorithm.parse(value).value

    @field_validator("expires", "object_lock_retain_until", mode="before")
    @classmethod
    def _date_time(cls, value: Any, info: Any) -> Any:
        return _aware_iso(value, info.field_name)

    @field_validator(*HEADER_FIELDS)
    @classmethod
    def _header_value(cls, value: str | None, info: Any) -> str | None:
        if value is not None:
            what = info.field_name.replace("_", " ")
            if len(value) > MAX_HEADER_VALUE_CHARS:
                raise ValueError(f"{what} is {len(value)} characters; at most {MAX_HEADER_VALUE_CHARS}")
            if not HEADER_VALUE_RE.fullmatch(value):
                raise ValueError(f"{what} must be printable ASCII (no control characters such as CR or LF)")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value:
            total = sum(len(k.encode("utf-8", "surrogatepass")) + len(v.encode("utf-8", "surrogatepass")) for k, v in value.items())
            if total > MAX_METADATA_BYTES:
                raise ValueError(f"metadata is {total} bytes; S3 allows {MAX_METADATA_BYTES} bytes of user metadata")
            for name, item in value.items():
                if not TOKEN_RE.fullmatch(name):
                    raise ValueError(
                        f"metadata name {_shown(name)} must be an HTTP token: letters, digits and !#$%&'*+-.^_`|~"
                    )
                if not HEADER_VALUE_RE.fullmatch(item):
                    raise ValueError(
                        f"metadata value of {_shown(name)} must be printable ASCII (no control characters such as CR or LF)"
                    )
        return value

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value:
            if len(value) > MAX_TAGS:
                raise ValueError(f"{len(value)} tags; S3 allows at most {MAX_TAGS} on an object")
            for key, item in value.items():
                if not 1 <= len(key) <= MAX_TAG_KEY_CHARS:
                    raise ValueError(f"tag key {_shown(key)} must be 1-{MAX_TAG_KEY_CHARS} characters")
                if len(item) > MAX_TAG_VALUE_CHARS:
                    raise ValueError(f"tag {_shown(key)}: its value is {len(item)} characters; at most {MAX_TAG_VALUE_CHARS}")
                for text in (key, item):
                    if not _TAG_TEXT_RE.fullmatch(text):
                        raise ValueError(
                            f"tag {_shown(key)}: {_shown(text)} may hold only letters, digits, spaces and + - = . _ : / @"
                        )
        return value

    @field_validator("sse_customer_key")
    @classmethod
    def _key_name(cls, value: str | None) -> str | None:
        if value is not None and not _KEY_NAME_RE.fullmatch(value):
            raise ValueError(
                "sse_customer_key must be the name of a key in the workers' keyring (UPLOADER_SSE_C_KEYS): "
                "1-64 letters, digits, '.', '_' or '-' (never the key itself)"
            )
        return value

    @field_validator("sse_kms_key_id")
    @classmethod
    def _kms_key(cls, value: str | None) -> str | None:
        if value is not None and (not value or len(value) > MAX_NAME_CHARS or not HEADER_VALUE_RE.fullmatch(value)):
            raise ValueError(f"sse_kms_key_id must be 1-{MAX_NAME_CHARS} printable ASCII characters (a key id, ARN or alias)")
        return value

    @field_validator("expected_bucket_owner")
    @classmethod
    def _account(cls, value: str | None) -> str | None:
        if value is not None and not _ACCOUNT_ID_RE.fullmatch(value):
            raise ValueError("expected_bucket_owner must be an AWS account id: 12 digits")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ObjectOptions:
        if self.sse_kms_key_id is not None and self.sse not in {ServerSideEncryption.KMS, ServerSideEncryption.KMS_DSSE}:
            raise ValueError('sse_kms_key_id needs sse="aws:kms" (or "aws:kms:dsse")')
        if self.bucket_key_enabled is not None and self.sse not in {ServerSideEncryption.KMS, ServerSideEncryption.KMS_DSSE}:
            raise ValueError('bucket_key_enabled applies to SSE-KMS only: it needs sse="aws:kms"')
        if self.sse_customer_key is not None and self.sse is not None:
            raise ValueError("sse and sse_customer_key are two kinds of encryption: choose one")
        if (self.object_lock_mode is None) != (self.object_lock_retain_until is None):
            raise ValueError("object_lock_mode and object_lock_retain_until go together: give both or neither")
        return self

    # -- use ------------------------------------------------------------------------------------
    def with_guessed_content_type(self, *names: str) -> ObjectOptions:
        """These options, with ``content_type`` guessed (``mimetypes``) from the first of
        ``names`` (the key, then the source) that has a known extension, when none was given."""
        if self.content_type is not None:
            return self
        for name in names:
            guessed, _ = mimetypes.guess_type(name.rsplit("/", 1)[-1], strict=False)
            if guessed and HEADER_VALUE_RE.fullmatch(guessed):
                return self.model_copy(update={"content_type": guessed})
        return self

    def check_keyring(self, names: frozenset[str] | set[str]) -> None:
        """Raise ``ValueError`` unless the SSE-C key named (if any) is in the keyring ``names``."""
        if self.sse_customer_key is not None and self.sse_customer_key not in names:
            raise ValueError(
                f"sse_customer_key {self.sse_customer_key!r} is not a key in the workers' keyring "
                f"(UPLOADER_SSE_C_KEYS names: {', '.join(sorted(names)) or 'none'})"
            )

    def to_json(self) -> str:
        """The options as the record keeps them (unset ones left out)."""
        return self.model_dump_json(exclude_defaults=True)

    def to_kwargs(self) -> dict[str, Any]:
        """The options as top-level kwargs of the start message (JSON types; unset ones left out)."""
        return self.model_dump(mode="json", exclude_defaults=True)

    @classmethod
    def from_record(cls, raw: dict[str, str]) -> ObjectOptions:
        """The options of a record hash: its ``options`` field, or, for records written before
        it, the ``metadata`` and ``content_type`` fields they had."""
        if raw.get("options"):
            return cls.model_validate_json(raw["options"])
        legacy: dict[str, Any] = {}
        metadata = json.loads(raw.get("metadata") or "{}")
        if metadata:
            legacy["metadata"] = metadata
        if raw.get("content_type"):
            legacy["content_type"] = raw["content_type"]
        return cls.model_validate(legacy)


#: The option names a request may carry at its top level.
OPTION_NAMES = frozenset(ObjectOptions.model_fields)


#: Callback variables (a webhook's ``callback_vars``, OSS's ``oss_callback_vars``): how many, and
#: how long each value may be.
MAX_CALLBACK_VARS = 32
MAX_CALLBACK_VAR_CHARS = 1024
_CONTROL_CHAR_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def check_callback_vars(value: dict[str, str], *, what: str, name_re: re.Pattern[str], name_rule: str) -> dict[str, str]:
    """``value`` if it holds at most :data:`MAX_CALLBACK_VARS` variables whose names match
    ``name_re`` (described by ``name_rule``) and whose values are printable text of at most
    :data:`MAX_CALLBACK_VAR_CHARS`; ``ValueError`` naming ``what`` otherwise."""
    if len(value) > MAX_CALLBACK_VARS:
        raise ValueError(f"{what} has {len(value)} entries; at most {MAX_CALLBACK_VARS}")
    for name, text in value.items():
        if not name_re.fullmatch(name):
            raise ValueError(f"{what} name {name[:64]!r} must be {name_rule}")
        if len(text) > MAX_CALLBACK_VAR_CHARS or _CONTROL_CHAR_RE.search(text):
            raise ValueError(f"{what}[{name!r}] must be at most {MAX_CALLBACK_VAR_CHARS} printable characters")
    return value


@dataclass(frozen=True)
class UploadResult:
    """What a completed upload stored: the object's ETag, its VersionId (on a versioned bucket;
    "" otherwise), size, storage class, and the whole-object checksum with its type (filled by
    the checksum path where the server reports one; "" otherwise)."""

    etag: str
    size: int
    storage_class: str
    version_id: str = ""
    checksum: str = ""
    checksum_type: str = ""
    #: Alibaba OSS (the ``oss`` profile): the object's CRC-64/ECMA, decimal, as reported and
    #: verified against the combined CRC-64/ECMA of the parts sent; "" elsewhere.
    crc64ecma: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of(cls, upload: UploadSummary) -> UploadResult | None:
        """The result an upload record or status reports: ``None`` unless it completed. AWS
        leaves the storage class out for STANDARD."""
        if upload.state != UploadState.COMPLETED:
            return None
        return cls(
            etag=upload.final_etag, size=upload.size, storage_class=upload.storage_class or "STANDARD",
            version_id=upload.version_id, checksum=upload.checksum, checksum_type=upload.checksum_type,
            crc64ecma=upload.crc64ecma,
        )


@dataclass(frozen=True)
class UploadedPart:
    """What the server acknowledged for one part; ``crc64ecma``: the CRC-64/ECMA (decimal text)
    of the bytes sent, kept where the profile reports it (OSS) to check the object's, else ""."""

    etag: str
    checksum: str
    crc64ecma: str = ""


@dataclass(frozen=True)
class ListedPart:
    part_number: int
    etag: str
    size: int


# -- states and outcomes ------------------------------------------------------------------------
# The words the checkpoint's Lua scripts and the tasks answer with, said once. They are StrEnums:
# each member *is* its string (the same text in Redis, in a task's JSON result, in an f-string
# and in ``status --json``), so a member compares equal to the text a script returns.


class UploadState(enum.StrEnum):
    """An upload record's ``state`` (the diagram is at the top of ``uploader/checkpoint/store.py``)."""

    CREATING = "creating"
    UPLOADING = "uploading"
    COMPLETING = "completing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: States a record leaves only by a person's resume (failed) or not at all.
TERMINAL_STATES = frozenset({UploadState.COMPLETED, UploadState.FAILED, UploadState.CANCELLED})
#: States in which workers are (or should be) moving the upload along.
ACTIVE_STATES = frozenset({UploadState.CREATING, UploadState.UPLOADING, UploadState.COMPLETING})
#: What the scripts say instead of a state when there is no record (``inactive:missing``).
NO_RECORD = "missing"

#: The prefix of an answer that names the state which made a transition a no-op.
INACTIVE_PREFIX = "inactive:"


def inactive(state: str) -> str:
    """The ``inactive:<state>`` answer for ``state`` (an :class:`UploadState` or ``missing``)."""
    return f"{INACTIVE_PREFIX}{state}"


def inactive_state(answer: str) -> str | None:
    """The state named by an ``inactive:<state>`` answer; None for any other answer."""
    return answer[len(INACTIVE_PREFIX):] if answer.startswith(INACTIVE_PREFIX) else None


class PartStart(enum.StrEnum):
    """What ``begin_part`` answers for a part task (``lua/begin_part.lua``)."""

    #: Leased to the caller: send the part.
    SEND = "send"
    #: In the checkpoint already.
    RECORDED = "recorded"
    #: A newer dispatch superseded the message (or, from the store, its part number is not in the plan).
    STALE = "stale"
    #: Another task on a live worker is sending it.
    LEASED = "leased"
    #: The script's answer for a part number outside the plan (the store reports it as STALE).
    UNPLANNED = "unplanned"
    #: The upload's ``max_concurrency`` parts are being sent already: wait and come back (nothing
    #: leased or counted as sent).
    LIMITED = "limited"
    #: The upload is not uploading (the state comes with it).
    INACTIVE = "inactive"


class PartVerdict(enum.StrEnum):
    """How a part task ended (its result), from ``begin_part`` and ``record_part``."""

    #: Sent and recorded.
    RECORDED = "recorded"
    #: Sent and recorded, and now every part is: complete the upload.
    LAST = "last"
    #: Sent, but another task recorded it first (the first record wins).
    DUPLICATE = "duplicate"
    #: Not sent: in the checkpoint already.
    ALREADY_RECORDED = "already-recorded"
    #: Not sent, or not recorded: a newer dispatch superseded the message, or the part number is outside the plan.
    STALE = "stale"
    #: Not sent: another task on a live worker is sending it.
    LEASED = "leased"
    #: Not sent yet: the upload's ``max_concurrency`` parts are being sent; the task comes back
    #: later (re-queued without using one of its retries).
    LIMITED = "limited"
    #: Sent to a multipart upload that is no longer the upload's: not recorded.
    FENCED = "fenced"
    #: The upload is not uploading (or completing): ``inactive:<state>``.
    INACTIVE = "inactive"


class BeginCompletion(enum.StrEnum):
    """What ``begin_completion`` answers (``lua/begin_completion.lua``)."""

    #: The caller holds the completion lease: complete (or PUT) once.
    GO = "go"
    #: Parts are not all recorded.
    MISSING = "missing"
    #: Another completer holds the lease.
    BUSY = "busy"
    #: Completed already.
    DONE = "done"
    #: Neither uploading nor completing: ``inactive:<state>``.
    INACTIVE = "inactive"


class CompletionVerdict(enum.StrEnum):
    """How a completion (the chord body, ``put_object``) ended: its task result."""

    COMPLETED = "completed"
    #: The missing parts are in flight on live workers: try again later, in case one dies.
    WAIT = "wait"
    #: The missing parts are not being sent yet: the last of them recorded completes the upload.
    QUEUED = "queued"
    #: A newer dispatch superseded this trigger.
    STALE = "stale"
    #: Another completer holds the lease.
    BUSY = "busy"
    #: Completed already.
    DONE = "done"
    #: Another completer took the lease over while this one worked (the record says which).
    FENCED = "fenced"
    #: The upload is not uploading or completing: ``inactive:<state>``.
    INACTIVE = "inactive"


_Verdict = TypeVar("_Verdict", PartVerdict, BeginCompletion, CompletionVerdict)


def parse_answer(answer: str, kind: type[_Verdict]) -> tuple[_Verdict, str]:
    """A script's answer as ``(verdict, state)``: ``inactive:<state>`` is ``(kind.INACTIVE,
    state)``, any other answer ``(kind(answer), "")`` (ValueError for a word ``kind`` lacks)."""
    state = inactive_state(answer)
    if state is not None:
        return kind("inactive"), state
    return kind(answer), ""


def answer_text(verdict: enum.StrEnum, state: str = "") -> str:
    """The text of a verdict as tasks return it: its value, or ``inactive:<state>``."""
    return inactive(state) if verdict == "inactive" else str(verdict)


class DispatchKind(enum.StrEnum):
    """What the coordinator decided to send for an upload (``uploader.coordinator.Dispatch``)."""

    #: Part tasks followed by completion (a chord).
    PARTS = "parts"
    #: Part tasks alone: parts taken back from a dead or hung holder (the last one recorded completes).
    RESEND = "resend"
    #: The single PUT of a small source.
    SINGLE = "single"
    #: Only the completion.
    COMPLETE = "complete"
    #: The resume itself, sent to the workers of the upload's host: a host-local upload's source
    #: is read there only (uploader/locality.py).
    FORWARD = "forward"
    NOTHING = "nothing"


@dataclass(frozen=True, kw_only=True)
class UploadSummary:
    """What an upload is and how far it got: the fields the checkpoint's :class:`UploadRecord`
    holds and the client's ``UploadStatus`` shows (both are one of these). A field declared here
    is in ``Uploader.status``, ``status --json`` and ``list --json`` with nothing else to change
    (the CLI's table picks what it shows); what only the workers need (the plan's internals, the
    notifications' settings) is declared on the record. The defaults are what a refused
    request, which has no record, shows."""

    upload_id: str
    state: str
    source: str = ""
    bucket: str = ""
    key: str = ""
    size: int = 0
    bytes_done: int = 0
    parts_done: int = 0
    part_count: int = 0
    part_size: int = 0
    error: str = ""
    final_etag: str = ""
    verified: str = ""
    created: float = 0.0
    updated: float = 0.0
    finished: float | None = None
    bytes_sent: int = 0
    #: A failed upload the reconciler will resume by itself at this time (a transient failure,
    #: such as an S3 outage longer than the part retries); None when nothing more will happen.
    retry_at: float | None = None
    auto_resumes: int = 0
    #: The per-part checksum (uploader.checksums.ChecksumAlgorithm; "" in records from before
    #: it was chosen per upload: the workers' UPLOADER_PART_CHECKSUM then).
    checksum_algorithm: str = ""
    #: FULL_OBJECT (verified by the server against the combined part CRCs) or COMPOSITE
    #: (compared with what the server reports; uploader.checksums.ChecksumType) as the upload
    #: was created with; "" for MD5 and single PUTs without a whole-object checksum.
    checksum_type: str = ""
    #: The whole object's checksum (base64; ``-N`` suffixed when composite), once completed.
    checksum: str = ""
    #: What a completed upload stored (see :class:`~uploader.model.UploadResult`): "" before.
    version_id: str = ""
    storage_class: str = ""
    #: The object's CRC-64/ECMA (decimal) as Alibaba OSS reported and completion verified it;
    #: "" where the profile reports none.
    crc64ecma: str = ""
    #: What the callback server answered Alibaba OSS's own callback (``oss_callback``), as OSS
    #: passed it on in its answer to Complete or the single PUT (cut to 2000 characters; "" if
    #: none was asked for, or the server answered nothing).
    oss_callback_answer: str = ""
    #: At most this many parts sent at once across the fleet (the request's ``max_concurrency``;
    #: 0: no cap). ``begin_part`` enforces it.
    max_concurrency: int = 0
    #: Bytes per second for all of this upload's parts together (``max_bandwidth``; 0: no limit).
    max_bandwidth: int = 0
    #: The request's ``priority`` (0-9, 9 most urgent; ``None``: none asked): the upload's part
    #: messages are sent with it (see uploader/priority.py).
    priority: int | None = None
    #: The host whose workers alone read the source (a host-local upload: uploader/locality.py);
    #: "" when every worker can.
    host: str = ""

    @property
    def result(self) -> UploadResult | None:
        """What the completed upload stored (ETag, VersionId, size, storage class, whole-object
        checksum); ``None`` unless ``completed``."""
        return UploadResult.of(self)

    @property
    def retry_pending(self) -> bool:
        """Failed for a transient reason; the reconciler resumes it at ``retry_at``."""
        return self.state == UploadState.FAILED and self.retry_at is not None

    @property
    def terminal(self) -> bool:
        """Finished for good: completed, cancelled, or failed with no automatic resume to come."""
        return self.state in TERMINAL_STATES and not self.retry_pending


@dataclass(frozen=True, kw_only=True)
class UploadRecord(UploadSummary):
    """One upload as the checkpoint holds it (the fields ``status`` shows are
    :class:`UploadSummary`'s)."""

    state: UploadState
    mtime_ns: int
    #: The source's identity when fingerprinted (uploader.sources.FileId encoded; "" in records
    #: from before it was recorded).
    file_id: str
    mode: str
    mpu_id: str
    #: What the request asked of the object (one JSON field, ``options``; records from before it
    #: have ``metadata`` and ``content_type`` fields, read into it).
    options: ObjectOptions
    abort_on_failure: bool
    parts_sent: int
    complete_calls: int
    attempt: int
    requested_part_size: int
    generation: int
    #: The seal of the submitter's capability (uploader/auth.py ``owner_seal``); "" if the
    #: request carried none (then only operators may cancel or resume it).
    owner: str = ""
    #: The named endpoint (``UPLOADER_ENDPOINTS``) the upload goes to; "" for the default one.
    endpoint: str = ""
    #: When one of the upload's limits last held a part back (unix seconds; 0: never): a part
    #: task found the upload at its ``max_concurrency`` and went back to wait, or a part being
    #: sent drew from its ``max_bandwidth`` bucket. Such parts are alive: the reconciler does not
    #: count the upload as stalled while they are held back.
    throttled: float = 0.0
    #: The notifications the request asked for (see uploader/notify/): where to POST the result,
    #: the request's own variables sent with it, the Celery tasks to send by name on completion
    #: and on failure or cancellation, and their queue ("" / {} when not asked for).
    callback_url: str = ""
    callback_vars: dict[str, str] = field(default_factory=dict)
    on_complete: str = ""
    on_failure: str = ""
    callback_queue: str = ""
    #: The webhook body template and its content type (uploader/notify/template.py; "": the JSON result).
    callback_body: str = ""
    callback_body_type: str = ""
    #: Alibaba OSS's own callback (the request's ``oss_callback`` as JSON text and its
    #: ``oss_callback_vars``; "" / {} when not asked for); OSS's answer is the summary's
    #: ``oss_callback_answer``.
    oss_callback: str = ""
    oss_callback_vars: dict[str, str] = field(default_factory=dict)
    #: The outbox events the latest terminal transition wrote (uploader/checkpoint/outbox.py).
    notified: tuple[str, ...] = ()
    #: The name of the workers' credentials for an HTTP(S) source (the request's
    #: ``source_credentials``; "" for none). The name only: the secret stays with the workers.
    source_credentials: str = ""
    #: The named endpoint an S3 source (``s3://bucket/key``) is read from; "" for the default one.
    source_endpoint: str = ""

    @property
    def wants_notification(self) -> bool:
        return bool(self.callback_url or self.on_complete or self.on_failure)

    @property
    def metadata(self) -> dict[str, str]:
        return self.options.metadata or {}

    @property
    def content_type(self) -> str | None:
        return self.options.content_type

    @classmethod
    def from_hash(cls, upload_id: str, raw: dict[str, str]) -> UploadRecord:
        def num(name: str, kind: type = int, default: Any = 0) -> Any:
            value = raw.get(name)
            return kind(value) if value not in (None, "") else default

        return cls(
            upload_id=upload_id,
            # Every script that writes a record writes its state (none recreates a missing one).
            state=UploadState(raw["state"]),
            source=raw.get("source", ""),
            bucket=raw.get("bucket", ""),
            key=raw.get("key", ""),
            size=num("size"),
            mtime_ns=num("mtime_ns"),
            file_id=raw.get("file_id", ""),
            part_size=num("part_size"),
            part_count=num("part_count"),
            mode=raw.get("mode", "multipart"),
            mpu_id=raw.get("mpu_id", ""),
            options=ObjectOptions.from_record(raw),
            abort_on_failure=raw.get("abort_on_failure") == "1",
            created=num("created", float, 0.0),
            updated=num("updated", float, 0.0),
            finished=num("finished", float, None),
            parts_done=num("parts_done"),
            bytes_done=num("bytes_done"),
            parts_sent=num("parts_sent"),
            bytes_sent=num("bytes_sent"),
            complete_calls=num("complete_calls"),
            error=raw.get("error", ""),
            final_etag=raw.get("final_etag", ""),
            verified=raw.get("verified", ""),
            attempt=num("attempt"),
            requested_part_size=num("requested_part_size"),
            generation=num("generation"),
            retry_at=num("retry_at", float, 0.0) or None,
            auto_resumes=num("auto_resumes"),
            owner=raw.get("owner", ""),
            endpoint=raw.get("endpoint", ""),
            checksum_algorithm=raw.get("checksum_algorithm", ""),
            checksum_type=raw.get("checksum_type", ""),
            checksum=raw.get("checksum", ""),
            version_id=raw.get("version_id", ""),
            storage_class=raw.get("storage_class", ""),
            crc64ecma=raw.get("crc64ecma", ""),
            callback_url=raw.get("callback_url", ""),
            callback_vars=_json_dict(raw.get("callback_vars", "")),
            on_complete=raw.get("on_complete", ""),
            on_failure=raw.get("on_failure", ""),
            callback_queue=raw.get("callback_queue", ""),
            callback_body=raw.get("callback_body", ""),
            callback_body_type=raw.get("callback_body_type", ""),
            notified=tuple(raw.get("notified", "").split()),
            oss_callback=raw.get("oss_callback", ""),
            oss_callback_vars=_json_dict(raw.get("oss_callback_vars", "")),
            oss_callback_answer=raw.get("oss_callback_answer", ""),
            max_concurrency=num("max_concurrency"),
            max_bandwidth=num("max_bandwidth"),
            throttled=num("throttled", float, 0.0),
            priority=num("priority", int, None),
            host=raw.get("host", ""),
            source_credentials=raw.get("source_credentials", ""),
            source_endpoint=raw.get("source_endpoint", ""),
        )


def _json_dict(text: str) -> dict[str, str]:
    """A JSON object of strings as stored in a record field ({} for "")."""
    value = json.loads(text) if text else {}
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}
