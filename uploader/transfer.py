"""Moving bytes: one part of a multipart upload, or a whole small object in one PUT.

Both are idempotent under duplicate delivery: a part already in the checkpoint is not sent
again, and a part sent to an older attempt's multipart upload is fenced out when recorded.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from uploader.checkpoint.store import PartJob, PartTimeLimit, UploadRecord
from uploader.checksums import md5_b64_to_etag
from uploader.context import UploaderContext
from uploader.errors import PermanentStoreError, SourceChanged, SourceError, UploaderError
from uploader.objectstore import RangeBody
from uploader.planner import MiB
from uploader.sources import Fingerprint, SourceRange, open_source
from uploader.completion import mark_failed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PartOutcome:
    """``recorded``, ``last`` (recorded, and every part now is: complete the upload),
    ``duplicate``, ``already-recorded``, ``stale``, ``fenced``, or ``inactive:<state>``."""

    outcome: str
    bytes_sent: int = 0


def upload_part(ctx: UploaderContext, upload_id: str, part_number: int, generation: int, owner: str) -> PartOutcome:
    """Send part ``part_number`` of ``upload_id`` unless it is recorded, the upload is no longer
    ``uploading``, or a newer dispatch (``generation``) superseded this one; record what the
    server acknowledged. While sending, the part is leased to ``owner`` (``"<holder>|<task id>"``,
    the holder this worker incarnation or its prefork pool process; its heartbeat keeps the lease
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
    if verdict == "recorded":
        return PartOutcome("already-recorded")
    if verdict in ("stale", "leased"):
        return PartOutcome(verdict)
    if not isinstance(job, PartJob):
        return PartOutcome(f"inactive:{job}")
    try:
        return _send_part(ctx, job, generation)
    except BaseException:
        store.release_part_or_later(upload_id, part_number, owner)  # a retry or resume takes it over
        raise


def _send_part(ctx: UploaderContext, job: PartJob, generation: int) -> PartOutcome:
    store = ctx.checkpoint
    upload_id, part_number = job.upload_id, job.part_number
    budget = ctx.settings.part_buffer_max
    source_range: SourceRange | None = None
    try:
        source = open_source(job.source, ctx.settings.source_roots)
        expected = Fingerprint(size=job.size, mtime_ns=job.mtime_ns)
        if job.length <= budget:
            # One read into the thread's reusable buffer, sent from it without a copy.
            data: memoryview | RangeBody = source.read_range(
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
        if ctx.throttle is not None:
            ctx.throttle.acquire(job.length)
        uploaded = ctx.objects.upload_part(job.bucket, job.key, job.mpu_id, part_number, data)
    except (SourceError, SourceChanged) as exc:  # a streamed part's source changed meanwhile
        fail_permanently(ctx, upload_id, f"part {part_number}: {exc}", generation)
        raise
    except PermanentStoreError as exc:
        current = store.get(upload_id)
        if current is None or current.state != "uploading" or current.mpu_id != job.mpu_id:
            # Cancelled or restarted while we were sending: the server dropped the old upload.
            return PartOutcome(f"inactive:{current.state if current else 'missing'}", job.length)
        fail_permanently(ctx, upload_id, f"part {part_number}: {exc}", generation)
        raise
    finally:
        if source_range is not None:
            source_range.close()
    outcome = store.record_part(upload_id, job.mpu_id, part_number, uploaded, job.length)
    return PartOutcome(outcome, job.length)


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
) -> str:
    """Upload a small source with one PutObject (Content-MD5 verified by the server), check the
    stored ETag, and mark the upload completed. Returns the completion outcome
    (``completed``, ``done``, ``busy``, ``inactive:<state>``).

    ``claimed``: the record, when the caller created it already ``completing`` under ``token``
    (:meth:`~uploader.checkpoint.CheckpointStore.claim_single`); otherwise the completion lease is
    taken here first."""
    store = ctx.checkpoint
    record = claimed
    if record is None:
        record = store.get(upload_id)
        if record is None or generation < record.generation:
            return "stale" if record else "inactive:missing"
        verdict = store.begin_completion(upload_id, token, ctx.settings.completion_lease_seconds)
        if verdict != "go":
            return verdict
    try:
        source = open_source(record.source, ctx.settings.source_roots)
        data = source.read_range(0, record.size, Fingerprint(size=record.size, mtime_ns=record.mtime_ns))
        response = ctx.objects.put_object(
            record.bucket, record.key, data, metadata=record.metadata, content_type=record.content_type
        )
    except (SourceError, SourceChanged, PermanentStoreError) as exc:
        fail_permanently(ctx, upload_id, str(exc), generation)
        raise
    expected = md5_b64_to_etag(response["ContentMD5"])
    problems = []
    etag = response.get("ETag", "")
    verified = "md5"  # the server checked Content-MD5, and its ETag repeats the MD5 it stored
    if etag != expected:
        # Servers that encrypt (SSE-KMS) answer with another ETag: check the stored size instead.
        head = ctx.objects.head_object(record.bucket, record.key)
        etag, verified = head.get("ETag", ""), "size"
        if head["ContentLength"] != record.size:
            problems.append(f"stored size {head['ContentLength']} != source size {record.size}")
    if problems:
        fail_permanently(ctx, upload_id, "verification failed: " + "; ".join(problems), generation)
        raise UploaderError(f"upload {upload_id}: verification failed: " + "; ".join(problems))
    store.mark_completed(
        upload_id,
        token,
        ctx.settings.retention_seconds,
        {"final_etag": etag, "verified": verified, "parts_done": 1, "bytes_done": record.size},
    )
    return "completed"


def fail_permanently(ctx: UploaderContext, upload_id: str, reason: str, generation: int) -> None:
    """Mark the upload failed now (other parts stop at their next check)."""
    log.error("upload %s failed: %s", upload_id, reason)
    mark_failed(ctx, upload_id, reason, generation)
