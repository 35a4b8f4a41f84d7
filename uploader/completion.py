"""Completing an upload exactly once, verifying the stored object, and failing cleanly.

The chord callback is only a trigger: :func:`complete_upload` trusts the checkpoint, not the
chord's results. It wins the one atomic transition to ``completing`` (or finds parts missing and
asks for them to be dispatched again), calls CompleteMultipartUpload with the recorded ETags,
and checks the object against the multipart ETag those ETags imply.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from uploader import metrics
from uploader.checkpoint import UploadRecord
from uploader.checksums import (
    ChecksumAlgorithm,
    ChecksumType,
    ObjectChecksum,
    check_oss_crc64ecma,
    expected_object_checksum,
    multipart_etag,
)
from uploader.context import UploaderContext
from uploader.errors import PermanentStoreError, UploaderError
from uploader.model import NO_RECORD, BeginCompletion, CompletionVerdict, UploadState, answer_text, inactive_state, parse_answer
from uploader.model import UploadedPart as UploadedPartLike
from uploader.planner import PartPlan
from uploader.storage.adapter import OSS_CRC64_HEADER, reported_crc64ecma
from uploader.storage.errors import error_code
from uploader.storage.osscallback import OssCallback, answer_fields

log = logging.getLogger(__name__)

_MULTIPART_ETAG = re.compile(r'^"[0-9a-f]{32}-\d+"$')


@dataclass(frozen=True)
class CompletionOutcome:
    """``completed``; ``wait`` (the missing parts are in flight on live workers: try again
    later, in case one dies); or a no-op verdict: ``queued`` (the missing ``parts`` are not
    being sent yet: the last of them recorded completes the upload), ``stale``, ``busy``,
    ``done``, ``fenced``, ``inactive`` with the upload's ``state`` (see
    :class:`~uploader.model.CompletionVerdict`)."""

    verdict: CompletionVerdict
    parts: tuple[int, ...] = ()
    generation: int = 0
    #: The state that made the completion a no-op (INACTIVE only; ``missing``: no record).
    state: str = ""

    @property
    def text(self) -> str:
        """The outcome as the task returns it (``inactive:<state>`` for INACTIVE)."""
        return answer_text(self.verdict, self.state)

    @classmethod
    def refused(cls, verdict: BeginCompletion, state: str = "") -> CompletionOutcome:
        """The no-op for a ``begin_completion`` answer other than ``go`` or ``missing``."""
        return cls(CompletionVerdict(verdict.value), state=state)


def complete_upload(ctx: UploaderContext, upload_id: str, generation: int, token: str) -> CompletionOutcome:
    """Complete ``upload_id`` if every part is recorded.

    ``generation`` is the dispatch this trigger belongs to (older triggers are no-ops);
    ``token`` identifies this completer (the task id: stable across its retries).
    Transient store errors propagate for the caller to retry under the same token.
    """
    store = ctx.checkpoint
    record = store.get(upload_id)
    if record is None:
        return CompletionOutcome(CompletionVerdict.INACTIVE, state=NO_RECORD)
    if generation < record.generation:
        return CompletionOutcome(CompletionVerdict.STALE)
    verdict, state = parse_answer(
        store.begin_completion(upload_id, token, ctx.settings.completion_lease_seconds), BeginCompletion
    )
    if verdict is BeginCompletion.MISSING:
        unleased, leased = store.missing_parts(upload_id, record.part_count)
        if leased:
            return CompletionOutcome(CompletionVerdict.WAIT, tuple(leased), generation)
        # Parts neither recorded nor being sent are in the queue (a trigger can fire early: a
        # redelivered part counts twice towards its chord), or were lost with a message. Never
        # dispatch them again from here: every duplicate of this message (or a replayed one)
        # would queue every such part once more. The last part recorded triggers completion;
        # the reconciler resends the parts of dead holders and resumes a stalled upload.
        log.info("upload %s: completion triggered with %d parts not yet sent; the last one completes it",
                 upload_id, len(unleased))
        return CompletionOutcome(CompletionVerdict.QUEUED, tuple(unleased), generation)
    if verdict is not BeginCompletion.GO:
        return CompletionOutcome.refused(verdict, state)
    record = store.get(upload_id)
    assert record is not None
    parts = store.parts(upload_id)
    absent = [n for n in range(1, record.part_count + 1) if n not in parts]
    if absent:  # the counter says done but the parts hash disagrees: never complete early
        mark_failed(ctx, upload_id, f"checkpoint inconsistent: parts {absent[:10]} not recorded", generation)
        raise UploaderError(f"upload {upload_id}: checkpoint inconsistent, parts {absent[:10]} not recorded")
    ordered = [(n, parts[n]) for n in range(1, record.part_count + 1)]
    expected_etag = multipart_etag(p.etag for _, p in ordered)
    objects = ctx.objects_for(record.endpoint)
    algorithm = objects.algorithm(record.checksum_algorithm)
    expected_checksum = _expected_checksum(record, algorithm, _with_lengths(record, ordered))
    full_object = expected_checksum.value if expected_checksum and expected_checksum.type is ChecksumType.FULL_OBJECT else None
    response: dict[str, Any] = {}
    oss_callback = OssCallback.from_record(record.oss_callback, record.oss_callback_vars)
    began = time.perf_counter()
    try:
        response = objects.complete_multipart_upload(
            record.bucket, record.key, record.mpu_id, ordered, algorithm, full_object_checksum=full_object,
            options=record.options, oss_callback=oss_callback,
        )
    except UploaderError as exc:
        code = error_code(exc)
        if isinstance(exc, PermanentStoreError) and code == "NoSuchUpload" and expected_etag and (
            object_etag(ctx, record) == expected_etag
        ):
            log.info("upload %s: already completed by an earlier attempt", upload_id)
        elif isinstance(exc, PermanentStoreError) and code in PRECONDITION_FAILED and record.options.no_overwrite:
            raise refuse_overwrite(ctx, record, generation) from None
        elif full_object and code in _CHECKSUM_REFUSALS:
            # The server computed another whole-object checksum than the recorded parts make:
            # sending the same Complete again cannot help (BadDigest is otherwise transient).
            reason = f"verification failed: the server refused the whole-object {algorithm} checksum {full_object} ({exc})"
            mark_failed(ctx, upload_id, reason, generation)
            raise UploaderError(f"upload {upload_id}: {reason}") from None
        elif isinstance(exc, PermanentStoreError):
            mark_failed(ctx, upload_id, str(exc), generation)
            raise
        else:
            raise
    head = objects.head_object(record.bucket, record.key, record.options, checksum=expected_checksum is not None)
    problems = []
    if head["ContentLength"] != record.size:
        problems.append(f"stored size {head['ContentLength']} != source size {record.size}")
    stored_etag = head.get("ETag", "")
    # Only where the provider's profile says a multipart ETag is the MD5 of the part MD5s: on
    # S3 Express, GCS or OSS an ETag that merely looks like one proves nothing.
    if expected_etag and ctx.objects_for(record.endpoint).profile.etag_is_md5() and _MULTIPART_ETAG.match(stored_etag):
        verified = "size+multipart-etag"
        if stored_etag != expected_etag:
            problems.append(f"stored ETag {stored_etag} != {expected_etag} computed from the recorded parts")
    else:
        verified = "size"  # e.g. SSE-KMS objects, whose ETag is not derived from MD5s
    checksum_fields: dict[str, str] = {}
    if expected_checksum is not None:
        problem, matched = check_reported_checksum(expected_checksum, head, _with_lengths(record, ordered))
        if problem:
            problems.append(problem)
        shown = matched or expected_checksum
        if matched is None:  # then only a FULL_OBJECT Complete had the server check it
            log.info("upload %s: the server reports no %s checksum for the object", upload_id, algorithm)
        checksum_fields = {"checksum": shown.value, "checksum_type": shown.type.value}
    if objects.profile.reports_crc64ecma:
        problem, crc64 = check_crc64ecma(record, ordered, (response, head))
        if problem:
            problems.append(problem)
        elif crc64:
            verified += "+crc64ecma"
            checksum_fields["crc64ecma"] = crc64
    if problems:
        reason = "verification failed: " + "; ".join(problems)
        mark_failed(ctx, upload_id, reason, generation)
        raise UploaderError(f"upload {upload_id}: {reason}")
    outcome = store.mark_completed(
        upload_id, token, ctx.settings.retention_seconds,
        {
            "final_etag": stored_etag, "verified": verified, **checksum_fields, **answer_fields(oss_callback, response),
            **result_fields(record, response, head.get("StorageClass", ""), objects.profile.storage_classes),
        },
    )
    if outcome == "ok":
        metrics.completion_took(time.perf_counter() - began)
        log.info("upload %s: completed (%s, %s)", upload_id, stored_etag, verified)
        return CompletionOutcome(CompletionVerdict.COMPLETED)
    # The lease lapsed while we worked: another completer took it over ("fenced"), or the
    # upload left "completing" (the answer is its state).
    log.warning("upload %s: not marked completed here: %s", upload_id, outcome)
    if outcome == "fenced":
        return CompletionOutcome(CompletionVerdict.FENCED)
    if outcome == UploadState.COMPLETED:
        return CompletionOutcome(CompletionVerdict.DONE)
    return CompletionOutcome(CompletionVerdict.INACTIVE, state=outcome)


#: The error codes of a conditional write that found the key taken (412; some servers name it).
PRECONDITION_FAILED = frozenset({"PreconditionFailed", "412"})


def refuse_overwrite(ctx: UploaderContext, record: UploadRecord, generation: int) -> PermanentStoreError:
    """A ``no_overwrite`` upload found its key taken: fail it with that reason and abort its
    multipart upload (its parts can never become this object), whatever ``abort_on_failure``.
    Returns the error to raise (code ``PreconditionFailed``), which says so."""
    reason = (
        f"s3://{record.bucket}/{record.key} exists already and the upload asked for no_overwrite: "
        "the existing object was kept"
    )
    mark_failed(ctx, record.upload_id, reason, generation)
    if record.mpu_id and not record.abort_on_failure:  # mark_failed aborted it otherwise
        ctx.objects_for(record.endpoint).abort_multipart_upload(record.bucket, record.key, record.mpu_id, record.options)
    error = PermanentStoreError(reason)
    error.code = "PreconditionFailed"
    return error


def result_fields(
    record: UploadRecord, response: dict[str, Any], storage_class: str = "", mapping: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The record fields of :class:`~uploader.model.UploadResult` beyond the ETag, from the
    response that stored the object: its VersionId (versioned buckets only), and its storage
    class (HeadObject's when read, which AWS leaves out for STANDARD; else what was asked),
    under the name a request uses: ``mapping`` is the profile's (request name -> the server's:
    OSS says ``IA`` for ``STANDARD_IA``)."""
    asked = record.options.storage_class
    if storage_class and mapping:
        storage_class = next((name for name, server in mapping.items() if server == storage_class), storage_class)
    return {
        "version_id": response.get("VersionId") or "",
        "storage_class": storage_class or (asked.value if asked else "STANDARD"),
    }


#: Error codes with which a server refuses a FULL_OBJECT checksum on Complete (SeaweedFS says
#: BadDigest, AWS InvalidRequest / BadDigest): the combined part checksums do not describe the
#: stored parts.
_CHECKSUM_REFUSALS = frozenset({"BadDigest", "InvalidRequest", "InvalidDigest", "InvalidPart"})


def _expected_checksum(
    record: UploadRecord, algorithm: ChecksumAlgorithm, parts: list[tuple[str, int]]
) -> ObjectChecksum | None:
    """The whole-object checksum the recorded parts (``(checksum, length)``) make, of the
    record's type; None for an upload without one (MD5, or a record from before checksums were
    chosen per upload)."""
    if not record.checksum_type:
        return None
    return expected_object_checksum(algorithm, ChecksumType(record.checksum_type), parts)


def _with_lengths(record: UploadRecord, ordered: list[tuple[int, UploadedPartLike]]) -> list[tuple[str, int]]:
    plan = PartPlan(record.size, record.part_size, record.part_count)
    return [(part.checksum, plan.part_range(n)[1]) for n, part in ordered]


def check_crc64ecma(
    record: UploadRecord, ordered: list[tuple[int, UploadedPartLike]], responses: tuple[dict[str, Any], ...]
) -> tuple[str, str]:
    """Compare the object's ``x-oss-hash-crc64ecma`` in each of ``responses`` (Complete's and
    HeadObject's) with the combined CRC-64/ECMA of the recorded parts. Returns ``(problem or "",
    the verified value or "")``: nothing is checked when a part has no recorded value (one
    adopted from ListParts, or sent before the profile reported it) or the server reports none
    (OSS leaves it out when a part had none)."""
    if any(not part.crc64ecma for _, part in ordered):
        log.info("upload %s: not every part has a CRC-64/ECMA; the object's is not checked", record.upload_id)
        return "", ""
    plan = PartPlan(record.size, record.part_size, record.part_count)
    parts = [(part.crc64ecma, plan.part_range(n)[1]) for n, part in ordered]
    checked = ""
    for response in responses:
        reported = reported_crc64ecma(response)
        if reported is None:
            continue
        if not reported.isdigit():
            return f"the object's {OSS_CRC64_HEADER} {reported[:24]!r} is not a CRC-64 (decimal)", ""
        verdict = check_oss_crc64ecma(reported, parts)
        if not verdict.ok:
            return verdict.reason, ""
        checked = str(verdict.expected)
    return "", checked


def check_reported_checksum(
    expected: ObjectChecksum, head: dict[str, Any], parts: list[tuple[str, int]]
) -> tuple[str, ObjectChecksum | None]:
    """Compare the checksum the server reports (HeadObject with ``ChecksumMode=ENABLED``) with
    what the parts (``(base64 checksum, length)`` in order) make. Returns ``(problem or "", the
    checksum verified)``. A server that reports none passes with None (not every S3
    implementation stores checksums); one that reports the other kind (composite where
    FULL_OBJECT was asked, or the reverse) is compared with that kind's value; a composite
    value is accepted without its ``-N`` suffix (moto omits it)."""
    reported = head.get(expected.algorithm.request_field)
    if not reported:
        return "", None
    kinds = [expected.type] + [k for k in ChecksumType if k is not expected.type]
    for kind in kinds:
        if kind is ChecksumType.FULL_OBJECT and not expected.algorithm.combinable:
            continue
        candidate = expected if kind is expected.type else expected_object_checksum(expected.algorithm, kind, parts)
        if reported in (candidate.value, candidate.value.split("-")[0]):
            return "", candidate
    return (
        f"stored {expected.algorithm.value} checksum {reported} != {expected.value} "
        f"({expected.type.value}) computed from the recorded parts"
    ), None


def mark_failed(
    ctx: UploaderContext, upload_id: str, reason: str, generation: int = 0, *, transient: bool = False
) -> bool:
    """Mark the upload ``failed`` with ``reason``; abort its multipart upload too if the request
    asked for that. Uploaded parts are otherwise kept for ``resume``. Returns whether the state
    changed (terminal uploads, and failures reported by a dispatch older than the current
    ``generation``, are left alone).

    A ``transient`` failure (retries spent during an outage) is resumed later by the reconciler,
    up to ``auto_resume_limit`` times; its multipart upload is kept even with ``abort_on_failure``
    until no automatic resume remains."""
    store = ctx.checkpoint
    settings = ctx.settings
    previous = store.mark_failed(
        upload_id,
        reason,
        generation,
        auto_resumes=settings.auto_resume_limit if transient else 0,
        backoff=settings.auto_resume_backoff,
    )
    if inactive_state(previous) is not None:
        return False
    record = store.get(upload_id)
    if record is not None and record.abort_on_failure and record.mpu_id and not record.retry_pending:
        ctx.objects_for(record.endpoint).abort_multipart_upload(record.bucket, record.key, record.mpu_id, record.options)
    return True


def completed_on_server(ctx: UploaderContext, record: UploadRecord) -> bool:
    """Whether the object at the upload's key is the one its recorded parts make (its ETag is
    their multipart ETag): CompleteMultipartUpload took effect, whatever the checkpoint says."""
    if record.mode != "multipart":
        return False
    parts = ctx.checkpoint.parts(record.upload_id)
    if any(n not in parts for n in range(1, record.part_count + 1)):
        return False
    expected = multipart_etag(parts[n].etag for n in range(1, record.part_count + 1))
    return expected is not None and object_etag(ctx, record) == expected


def object_etag(ctx: UploaderContext, record: UploadRecord) -> str | None:
    try:
        return ctx.objects_for(record.endpoint).head_object(record.bucket, record.key, record.options).get("ETag")
    except UploaderError:
        return None
