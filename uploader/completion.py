"""Completing an upload exactly once, verifying the stored object, and failing cleanly.

The chord callback is only a trigger: :func:`complete_upload` trusts the checkpoint, not the
chord's results. It wins the one atomic transition to ``completing`` (or finds parts missing and
asks for them to be dispatched again), calls CompleteMultipartUpload with the recorded ETags,
and checks the object against the multipart ETag those ETags imply.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from uploader.checkpoint import UploadRecord
from uploader.checksums import multipart_etag
from uploader.context import UploaderContext
from uploader.errors import PermanentStoreError, UploaderError
from uploader.objectstore import error_code

log = logging.getLogger(__name__)

_MULTIPART_ETAG = re.compile(r'^"[0-9a-f]{32}-\d+"$')


@dataclass(frozen=True)
class CompletionOutcome:
    """``completed``; ``redispatch`` (send ``parts`` under ``generation``, then complete);
    ``wait`` (the missing parts are in flight on live workers: try again later); or a no-op
    verdict: ``stale``, ``busy``, ``done``, ``inactive:<state>``."""

    verdict: str
    parts: tuple[int, ...] = ()
    generation: int = 0


def complete_upload(ctx: UploaderContext, upload_id: str, generation: int, token: str) -> CompletionOutcome:
    """Complete ``upload_id`` if every part is recorded.

    ``generation`` is the dispatch this trigger belongs to (older triggers are no-ops);
    ``token`` identifies this completer (the task id: stable across its retries).
    Transient store errors propagate for the caller to retry under the same token.
    """
    store = ctx.checkpoint
    record = store.get(upload_id)
    if record is None:
        return CompletionOutcome("inactive:missing")
    if generation < record.generation:
        return CompletionOutcome("stale")
    verdict = store.begin_completion(upload_id, token, ctx.settings.completion_lease_seconds)
    if verdict == "missing":
        unleased, leased = store.missing_parts(upload_id, record.part_count)
        if not unleased:
            return CompletionOutcome("wait", tuple(leased), generation)
        new_generation = store.next_generation(upload_id, generation)
        if not new_generation:
            return CompletionOutcome("stale")
        log.warning(
            "upload %s: completion triggered with %d parts missing; dispatching them again", upload_id, len(unleased)
        )
        return CompletionOutcome("redispatch", tuple(unleased), new_generation)
    if verdict != "go":
        return CompletionOutcome(verdict)
    record = store.get(upload_id)
    assert record is not None
    parts = store.parts(upload_id)
    absent = [n for n in range(1, record.part_count + 1) if n not in parts]
    if absent:  # the counter says done but the parts hash disagrees: never complete early
        mark_failed(ctx, upload_id, f"checkpoint inconsistent: parts {absent[:10]} not recorded", generation)
        raise UploaderError(f"upload {upload_id}: checkpoint inconsistent, parts {absent[:10]} not recorded")
    ordered = [(n, parts[n]) for n in range(1, record.part_count + 1)]
    expected_etag = multipart_etag(p.etag for _, p in ordered)
    try:
        ctx.objects.complete_multipart_upload(record.bucket, record.key, record.mpu_id, ordered)
    except PermanentStoreError as exc:
        if error_code(exc) == "NoSuchUpload" and object_etag(ctx, record.bucket, record.key) == expected_etag:
            log.info("upload %s: already completed by an earlier attempt", upload_id)
        else:
            mark_failed(ctx, upload_id, str(exc), generation)
            raise
    head = ctx.objects.head_object(record.bucket, record.key)
    problems = []
    if head["ContentLength"] != record.size:
        problems.append(f"stored size {head['ContentLength']} != source size {record.size}")
    stored_etag = head.get("ETag", "")
    if _MULTIPART_ETAG.match(stored_etag):
        verified = "size+multipart-etag"
        if stored_etag != expected_etag:
            problems.append(f"stored ETag {stored_etag} != {expected_etag} computed from the recorded parts")
    else:
        verified = "size"  # e.g. SSE-KMS objects, whose ETag is not derived from MD5s
    if problems:
        reason = "verification failed: " + "; ".join(problems)
        mark_failed(ctx, upload_id, reason, generation)
        raise UploaderError(f"upload {upload_id}: {reason}")
    outcome = store.mark_completed(
        upload_id, token, ctx.settings.retention_seconds, {"final_etag": stored_etag, "verified": verified}
    )
    log.info("upload %s: completed (%s, %s)", upload_id, stored_etag, verified)
    return CompletionOutcome("completed" if outcome == "ok" else outcome)


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
    if previous.startswith("inactive:"):
        return False
    record = store.get(upload_id)
    if record is not None and record.abort_on_failure and record.mpu_id and not record.retry_pending:
        ctx.objects.abort_multipart_upload(record.bucket, record.key, record.mpu_id)
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
    return object_etag(ctx, record.bucket, record.key) == expected


def object_etag(ctx: UploaderContext, bucket: str, key: str) -> str | None:
    try:
        return ctx.objects.head_object(bucket, key).get("ETag")
    except UploaderError:
        return None
