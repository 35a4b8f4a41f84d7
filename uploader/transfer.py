"""Moving bytes: one part of a multipart upload, or a whole small object in one PUT.

Both are idempotent under duplicate delivery: a part already in the checkpoint is not sent
again, and a part sent to an older attempt's multipart upload is fenced out when recorded.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from uploader import logfields, metrics
from uploader.checkpoint.store import PartJob, PartTimeLimit
from uploader.checksums import ChecksumType, crc64ecma, md5_b64_to_etag
from uploader.completion import PRECONDITION_FAILED, CompletionOutcome, mark_failed, refuse_overwrite, result_fields
from uploader.context import UploaderContext
from uploader.errors import PermanentStoreError, SourceChanged, SourceError, TransientStoreError, UploaderError
from uploader.limits.bucket import CompletionLease, FleetBucket, PartLease, chunk_size
from uploader.model import (
    NO_RECORD,
    BeginCompletion,
    CompletionVerdict,
    PartStart,
    PartVerdict,
    UploadedPart,
    UploadRecord,
    UploadState,
    answer_text,
    parse_answer,
)
from uploader.planner import MiB
from uploader.sources import ByteRange, Fingerprint, S3ObjectSource
from uploader.storage.adapter import OSS_CRC64_HEADER, PROGRESS_STEP, ObjectStore, reported_crc64ecma
from uploader.storage.bodies import RangeBody
from uploader.storage.errors import error_code
from uploader.storage.osscallback import OssCallback, answer_fields

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PartOutcome:
    """How a part task ended (see :class:`~uploader.model.PartVerdict`): ``recorded``, ``last``
    (recorded, and every part now is: complete the upload), ``duplicate``, ``already-recorded``,
    ``stale``, ``leased``, ``limited`` (not sent yet: the upload's concurrency cap is reached; the
    caller sends the task again later), ``fenced``, or ``inactive`` with the upload's ``state``."""

    verdict: PartVerdict
    bytes_sent: int = 0
    #: The state that made the part a no-op (INACTIVE only; ``missing`` when there is no record).
    state: str = ""

    @property
    def text(self) -> str:
        """The outcome as the task returns it (``inactive:<state>`` for INACTIVE)."""
        return answer_text(self.verdict, self.state)

    @classmethod
    def recorded(cls, answer: str, bytes_sent: int) -> PartOutcome:
        """From what ``record_part`` answered."""
        verdict, state = parse_answer(answer, PartVerdict)
        return cls(verdict, bytes_sent, state)


def upload_part(ctx: UploaderContext, upload_id: str, part_number: int, generation: int, owner: str) -> PartOutcome:
    """Send part ``part_number`` of ``upload_id`` unless it is recorded, the upload is no longer
    ``uploading``, or a newer dispatch (``generation``) superseded this one; record what the
    server acknowledged. While sending, the part is leased to ``owner`` (this execution of the
    task: :func:`~uploader.checkpoint.store.part_lease_owner`, the holder this worker incarnation
    or its prefork pool process; its heartbeat keeps the lease
    alive, for at most the part's time limit), so neither a duplicate message nor a resume sends
    it a second time.

    Raises :class:`~uploader.errors.TransientStoreError` for the caller to retry. Permanent
    problems (source changed or unreadable, AccessDenied, NoSuchUpload...) mark the upload
    ``failed`` with the reason and are re-raised.
    """
    store = ctx.checkpoint
    settings = ctx.settings
    time_limit = PartTimeLimit(settings.part_time_base, settings.part_min_throughput)
    verdict, job = store.begin_part(upload_id, part_number, generation, owner, time_limit=time_limit)
    if verdict is PartStart.RECORDED:
        return PartOutcome(PartVerdict.ALREADY_RECORDED)
    if verdict is PartStart.STALE:
        return PartOutcome(PartVerdict.STALE)
    if verdict is PartStart.LEASED:
        return PartOutcome(PartVerdict.LEASED)
    if verdict is PartStart.LIMITED:
        return PartOutcome(PartVerdict.LIMITED)
    if not isinstance(job, PartJob):
        return PartOutcome(PartVerdict.INACTIVE, state=job)
    try:
        with metrics.sending("part", job.length) as sending:
            outcome = _send_part(ctx, job, generation, owner, time_limit, sending)
            if outcome.verdict in (PartVerdict.RECORDED, PartVerdict.LAST):
                sending.recorded()
                logfields.bind(bytes=job.length, event="part_recorded")
            return outcome
    except BaseException:
        store.release_part_or_later(upload_id, part_number, owner)  # a retry or resume takes it over
        raise


def _send_part(
    ctx: UploaderContext, job: PartJob, generation: int, owner: str, time_limit: PartTimeLimit, sending: metrics.Transfer
) -> PartOutcome:
    store = ctx.checkpoint
    upload_id, part_number = job.upload_id, job.part_number
    budget = ctx.settings.part_buffer_max
    source_range: ByteRange | None = None
    objects = ctx.objects_for(job.endpoint)
    try:
        source = ctx.source(job.source, job.source_endpoint, job.source_credentials)
        expected = Fingerprint.from_record(job.size, job.mtime_ns, job.file_id)
        data: bytes | bytearray | memoryview | RangeBody | None = None  # None: copied on the server
        if isinstance(source, S3ObjectSource) and source.copies_to(objects):
            pass  # nothing is read here
        elif job.length <= budget:
            # One read into the thread's reusable buffer, sent from it without a copy.
            data = source.read_range(
                job.offset, job.length, expected, into=part_buffer(job.length)
            )
        else:
            # More than this worker holds for one part (the request chose the part size, the
            # worker its memory): checksummed, then sent, a chunk at a time through the thread's
            # buffer, the file open (once) until the part is sent.
            source_range = source.open_range(job.offset, job.length, expected)
            data = RangeBody(source_range, part_buffer(stream_chunk_size(budget)))
    except (SourceError, SourceChanged) as exc:
        fail_permanently(ctx, upload_id, f"part {part_number}: {exc}", generation)
        raise
    try:
        if data is None:
            assert isinstance(source, S3ObjectSource)
            uploaded = _copy_part(source, objects, job, expected)
        else:
            if ctx.throttle is not None:
                ctx.throttle.acquire(job.length)
            pace = _fleet_bucket(ctx, job, owner, time_limit) if job.max_bandwidth else None
            progress = _sending_progress(ctx, job, time_limit) if job.length > PROGRESS_STEP else None
            try:
                uploaded = objects.upload_part(
                    job.bucket, job.key, job.mpu_id, part_number, data, objects.algorithm(job.checksum_algorithm),
                    job.options, pace=pace, progress=progress,
                )
            finally:
                if progress is not None:
                    store.clear_sending(upload_id, part_number)
    except (SourceError, SourceChanged) as exc:  # a streamed (or copied) part's source changed meanwhile
        fail_permanently(ctx, upload_id, f"part {part_number}: {exc}", generation)
        raise
    except PermanentStoreError as exc:
        current = store.get(upload_id)
        if current is None or current.state != UploadState.UPLOADING or current.mpu_id != job.mpu_id:
            # Cancelled or restarted while we were sending: the server dropped the old upload.
            return PartOutcome(PartVerdict.INACTIVE, job.length, current.state if current else NO_RECORD)
        fail_permanently(ctx, upload_id, f"part {part_number}: {exc}", generation)
        raise
    finally:
        if source_range is not None:
            source_range.close()
    sending.sent()
    return PartOutcome.recorded(store.record_part(upload_id, job.mpu_id, part_number, uploaded, job.length), job.length)


def _sending_progress(ctx: UploaderContext, job: PartJob, time_limit: PartTimeLimit) -> Callable[[int], None]:
    """How a part being sent reports its bytes out (``status`` and the progress bar move within
    a part): noted in the checkpoint, for at most the part's time limit."""
    keep = time_limit.seconds(job.length)

    def report(sent: int) -> None:
        ctx.checkpoint.note_sending(job.upload_id, job.part_number, sent, keep)

    return report


def _copy_part(source: S3ObjectSource, objects: ObjectStore, job: PartJob, expected: Fingerprint) -> UploadedPart:
    """Part ``job`` copied on the server from the pinned version of ``source`` (UploadPartCopy):
    no byte passes through this worker, so neither the worker's nor the upload's bandwidth
    limit applies. What is recorded is what the server reports: the part's ETag (the MD5 of the
    bytes it copied), and no checksum of our own, since we never see the bytes to compute one.
    Such uploads use MD5 (the coordinator refuses another ``checksum_algorithm`` for them), and
    completion verifies the object as for any MD5 upload: its size, and its multipart ETag
    against the one the recorded part ETags make."""
    return source.call(
        lambda: objects.upload_part_copy(
            job.bucket, job.key, job.mpu_id, job.part_number, source.copy_source(expected), job.offset, job.length,
            objects.algorithm(job.checksum_algorithm), job.options,
        ),
        changes_only=True,
    )


def _fleet_bucket(ctx: UploaderContext, job: PartJob, owner: str, time_limit: PartTimeLimit) -> FleetBucket:
    """The upload's own bandwidth limit across the fleet, drawn from as the part's bytes go out;
    each draw keeps the part's lease for a chunk's time limit past its wait (a part slowed by
    the limit is not a hung one)."""
    store = ctx.checkpoint
    lease = PartLease(
        store.record_key(job.upload_id), store.inflight_key(job.upload_id), job.part_number, owner,
        time_limit.seconds(chunk_size(job.max_bandwidth)),
    )
    return FleetBucket(store.redis, store.rate_key(job.upload_id), job.max_bandwidth, lease)


def _single_bucket(ctx: UploaderContext, record: UploadRecord, token: str) -> FleetBucket:
    """The upload's bandwidth limit for its single PUT: the same bucket its parts would draw
    from; each draw keeps the completion lease (``token``) for a lease's length past its wait, so
    a PUT slowed by the limit is neither taken over by another completer nor resumed as stalled."""
    store = ctx.checkpoint
    lease = CompletionLease(store.record_key(record.upload_id), token, ctx.settings.completion_lease_seconds)
    return FleetBucket(store.redis, store.rate_key(record.upload_id), record.max_bandwidth, lease)


#: A part streamed in chunks (one larger than ``part_buffer_max``) is read this much at a time:
#: enough that a GiB costs 128 reads per pass, little enough to leave most of the budget unused.
STREAM_CHUNK = 8 * MiB


def stream_chunk_size(budget: int) -> int:
    """How much of a streamed part a thread holds at once, within its ``budget``."""
    return max(1, min(budget, STREAM_CHUNK))


_buffers = threading.local()


def part_buffer(length: int) -> memoryview:
    """``length`` bytes of this thread's reusable part buffer, as a writable view. Reusing one
    buffer keeps a worker's memory at about part size x threads: fresh multi-MiB buffers per part
    make glibc's per-thread arenas hold on to freed ones, and the process grows well past that.
    A shorter part (an upload's last one, or a chunk of a streamed part) is a slice of the same
    buffer, not a second buffer; a longer one replaces it, so a thread holds one buffer as large
    as the largest part it read whole, which is at most ``part_buffer_max`` (larger parts are
    streamed in chunks of :func:`stream_chunk_size`)."""
    buffer: bytearray | None = getattr(_buffers, "buffer", None)
    if buffer is None or len(buffer) < length:
        _buffers.buffer = None  # free the old one before allocating its replacement
        buffer = _buffers.buffer = bytearray(length)
    return memoryview(buffer)[:length]


def put_single(
    ctx: UploaderContext, upload_id: str, generation: int, token: str, claimed: UploadRecord | None = None
) -> CompletionOutcome:
    """Upload a small source with one PutObject (Content-MD5 verified by the server), check the
    stored ETag, and mark the upload completed. Returns the completion outcome
    (``completed``, ``stale``, ``done``, ``busy``, ``inactive:<state>``).

    ``claimed``: the record, when the caller created it already ``completing`` under ``token``
    (:meth:`~uploader.checkpoint.CheckpointStore.claim_single`); otherwise the completion lease is
    taken here first."""
    store = ctx.checkpoint
    record = claimed
    if record is None:
        record = store.get(upload_id)
        if record is None:
            return CompletionOutcome(CompletionVerdict.INACTIVE, state=NO_RECORD)
        if generation < record.generation:
            return CompletionOutcome(CompletionVerdict.STALE)
        verdict, state = parse_answer(
            store.begin_completion(upload_id, token, ctx.settings.completion_lease_seconds), BeginCompletion
        )
        if verdict is not BeginCompletion.GO:
            return CompletionOutcome.refused(verdict, state)
    with metrics.sending("object", record.size) as sending:
        fields = send_single(ctx, record, generation, token)
        sending.sent()
        if store.mark_completed(upload_id, token, ctx.settings.retention_seconds, fields) == "ok":
            sending.recorded()
    return CompletionOutcome(CompletionVerdict.COMPLETED)


def send_single(ctx: UploaderContext, record: UploadRecord, generation: int, token: str) -> dict[str, Any]:
    """Send a small source's object with one PutObject (Content-MD5 verified by the server) and
    check what the server stored: the fields ``mark_completed`` records. The caller holds the
    upload's completion lease, ``token`` (a paced PUT extends it as it draws: see
    :func:`_single_bucket`); an S3 source on the destination's server is copied there instead. A permanent problem (source changed or unreadable, AccessDenied,
    verification) marks the upload failed and is raised; a transient one is raised alone."""
    upload_id = record.upload_id
    try:
        source = ctx.source(record.source, record.source_endpoint, record.source_credentials)
        fingerprint = Fingerprint.from_record(record.size, record.mtime_ns, record.file_id)
        objects = ctx.objects_for(record.endpoint)
        if isinstance(source, S3ObjectSource) and source.copies_to(objects):
            return _copy_single(ctx, record, source, fingerprint, generation)
        data = source.read_range(0, record.size, fingerprint)
        algorithm = objects.algorithm(record.checksum_algorithm)
        oss_callback = OssCallback.from_record(record.oss_callback, record.oss_callback_vars)
        pace = _single_bucket(ctx, record, token) if record.max_bandwidth else None
        response = objects.put_object(
            record.bucket, record.key, data, options=record.options, algorithm=algorithm, oss_callback=oss_callback,
            pace=pace,
        )
    except PermanentStoreError as exc:
        if error_code(exc) in PRECONDITION_FAILED and record.options.no_overwrite:
            raise refuse_overwrite(ctx, record, generation) from None
        fail_permanently(ctx, upload_id, str(exc), generation)
        raise
    except (SourceError, SourceChanged) as exc:
        fail_permanently(ctx, upload_id, str(exc), generation)
        raise
    expected = md5_b64_to_etag(response["ContentMD5"])
    problems = []
    etag = response.get("ETag", "")
    verified = "md5"  # the server checked Content-MD5, and its ETag repeats the MD5 it stored
    storage_class = ""
    if etag != expected:
        # Servers that encrypt (SSE-KMS, SSE-C) answer with another ETag: check the stored size.
        try:
            head = objects.head_object(record.bucket, record.key, record.options)
        except PermanentStoreError as exc:
            # (A transient error is raised as it is: the PUT is tried again under the same lease.)
            reason = f"verification failed: the server acknowledged the PutObject, then could not show the object ({exc})"
            fail_permanently(ctx, upload_id, reason, generation)
            raise
        etag, verified = head.get("ETag", ""), "size"
        storage_class = head.get("StorageClass", "")
        if head["ContentLength"] != record.size:
            problems.append(f"stored size {head['ContentLength']} != source size {record.size}")
    checksum_fields: dict[str, str] = {}
    if response.get("Checksum") and record.checksum_algorithm:
        # The server verified the header on receipt; a value it reports back must be the same.
        reported = response.get(algorithm.request_field)
        if reported and reported != response["Checksum"]:
            problems.append(f"stored {algorithm} checksum {reported} != {response['Checksum']} sent")
        checksum_fields = {"checksum": response["Checksum"], "checksum_type": ChecksumType.FULL_OBJECT.value}
    reported_crc64 = reported_crc64ecma(response) if objects.profile.reports_crc64ecma else None
    if reported_crc64 is not None:  # OSS: its CRC-64/ECMA of what it stored
        sent_crc64 = str(crc64ecma(data))
        if reported_crc64 != sent_crc64:
            problems.append(f"the object's {OSS_CRC64_HEADER} {reported_crc64[:24]} != {sent_crc64}, the CRC-64/ECMA sent")
        else:
            verified += "+crc64ecma"
            checksum_fields["crc64ecma"] = sent_crc64
    if problems:
        fail_permanently(ctx, upload_id, "verification failed: " + "; ".join(problems), generation)
        raise UploaderError(f"upload {upload_id}: verification failed: " + "; ".join(problems))
    return {
        "final_etag": etag, "verified": verified, "parts_done": 1, "bytes_done": record.size, **checksum_fields,
        **answer_fields(oss_callback, response),
        **result_fields(record, response, storage_class, objects.profile.storage_classes),
    }


@dataclass
class GroupOutcome:
    """How each upload of a ``put_objects`` group ended: ``completed``; ``failed`` (the upload is
    marked failed, with the reason given here); ``retrying`` (a transient error: handed to the
    ``retry`` callback with its lease token); ``skipped`` (nothing to do: its no-op verdict,
    ``stale``, ``busy``, ``done``, ``inactive:<state>``)."""

    completed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    retrying: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


#: ``retry(upload_id, generation, token, error)``: send this upload's PUT again later, under
#: ``token``, the completion lease it holds (the task layer sends it as a ``put_object`` task).
SingleRetry = Callable[[str, int, str, TransientStoreError], None]


def put_many(ctx: UploaderContext, uploads: list[tuple[str, int]], retry: SingleRetry) -> GroupOutcome:
    """Send a group of small sources, each as :func:`put_single` would (``(upload_id,
    generation)`` pairs): each its own completion lease, PutObject, verification and record, so
    that a failing upload fails alone. The checkpoint is read, leased and marked completed in
    one pipelined round trip each for the whole group, not per upload.

    An upload whose message is stale, or that is no longer there to send (completed, leased by
    another sender, cancelled), is skipped; one with a transient error goes to ``retry``."""
    store = ctx.checkpoint
    outcome = GroupOutcome()
    ready: list[tuple[str, int, UploadRecord, str]] = []
    for (upload_id, generation), record in zip(uploads, store.get_many([u for u, _ in uploads]), strict=True):
        if record is None:
            outcome.skipped[upload_id] = answer_text(CompletionVerdict.INACTIVE, NO_RECORD)
        elif generation < record.generation:  # read before the lease: never take one from a newer dispatch
            outcome.skipped[upload_id] = CompletionVerdict.STALE.value
        else:
            ready.append((upload_id, generation, record, uuid.uuid4().hex))
    answers = store.begin_completions([(u, token) for u, _, _, token in ready], ctx.settings.completion_lease_seconds)
    sent: list[tuple[str, str, dict[str, Any]]] = []
    transfers: list[metrics.Transfer] = []
    for (upload_id, generation, record, token), answer in zip(ready, answers, strict=True):
        verdict, state = parse_answer(answer, BeginCompletion)
        if verdict is not BeginCompletion.GO:
            outcome.skipped[upload_id] = CompletionOutcome.refused(verdict, state).text
            continue
        try:
            with metrics.sending("object", record.size) as sending:
                sent.append((upload_id, token, send_single(ctx, record, generation, token)))
                sending.sent()
                transfers.append(sending)
        except TransientStoreError as exc:
            retry(upload_id, generation, token, exc)
            outcome.retrying.append(upload_id)
        except UploaderError as exc:  # recorded as the upload's failure (or refusal) already
            outcome.failed[upload_id] = str(exc)
    marked = store.mark_many_completed(sent, ctx.settings.retention_seconds)
    for (upload_id, _, _), answer, sending in zip(sent, marked, transfers, strict=True):
        if answer == "ok":
            sending.recorded()
            outcome.completed.append(upload_id)
        else:  # cancelled meanwhile, or its lease lapsed and another sender took it over
            outcome.skipped[upload_id] = answer
    return outcome


def _copy_single(
    ctx: UploaderContext, record: UploadRecord, source: S3ObjectSource, expected: Fingerprint, generation: int
) -> dict[str, Any]:
    """A small S3 source on the destination's server, copied there with one CopyObject pinned
    to its version (``CopySourceIfMatch``: the bytes are that version's), then verified by the
    stored size; ``verified`` also says ``etag`` where the copy's ETag is the source's (an
    unencrypted copy of an object stored in one PUT: an encrypted or multipart source has
    another ETag than its copy, which proves nothing either way)."""
    objects = ctx.objects_for(record.endpoint)
    pinned = source.copy_source(expected)
    # Its refusals fail the upload in put_single's handlers (a changed source, a taken key...).
    response = source.call(
        lambda: objects.copy_object(record.bucket, record.key, pinned, options=record.options), changes_only=True
    )
    head = objects.head_object(record.bucket, record.key, record.options)
    etag = response.get("ETag") or head.get("ETag", "")
    problems = []
    if head["ContentLength"] != record.size:
        problems.append(f"stored size {head['ContentLength']} != source size {record.size}")
    verified = "size+etag" if etag.strip('"') == pinned.etag.strip('"') else "size"
    if problems:
        fail_permanently(ctx, record.upload_id, "verification failed: " + "; ".join(problems), generation)
        raise UploaderError(f"upload {record.upload_id}: verification failed: " + "; ".join(problems))
    return {
        "final_etag": etag, "verified": verified, "parts_done": 1, "bytes_done": record.size,
        **result_fields(record, response, head.get("StorageClass", ""), objects.profile.storage_classes),
    }


def fail_permanently(ctx: UploaderContext, upload_id: str, reason: str, generation: int) -> None:
    """Mark the upload failed now (other parts stop at their next check)."""
    log.error("upload %s failed: %s", upload_id, reason)
    mark_failed(ctx, upload_id, reason, generation)
