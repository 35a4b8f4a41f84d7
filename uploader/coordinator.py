"""Starting, resuming and cancelling uploads: the coordinator's logic, callable without a broker.

The coordinator never waits on part uploads. It decides *what* to dispatch and hands a
:class:`Dispatch` to the ``dispatch`` callable it was given (the Celery tasks pass one that sends a
chord; tests may pass their own). It holds a per-upload dispatch lock while doing so, so that
duplicate ``start_upload`` messages and concurrent ``resume`` calls dispatch the parts once.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from uploader.checkpoint import UploadRecord
from uploader.completion import completed_on_server, mark_failed
from uploader.context import UploaderContext
from uploader.errors import (
    InvalidRequest,
    PermanentStoreError,
    SourceError,
    SourceChanged,
    UploadConflict,
    UploaderError,
    UploadNotFound,
)
from uploader.objectstore import ListedPart, UploadedPart, error_code
from uploader.planner import PartPlan, plan_parts
from uploader.request import UploadRequest, parse_request, valid_upload_id
from uploader.sources import Fingerprint, open_source

log = logging.getLogger(__name__)

#: Seconds the dispatch lock is held at most (it is released as soon as dispatching is done).
DISPATCH_LOCK_SECONDS = 120


@dataclass(frozen=True)
class Dispatch:
    """What to send for an upload: part tasks followed by completion (``parts``), part tasks
    alone (``resend``: parts taken back from a dead or hung holder; the last part recorded
    triggers completion), the single PUT, only the completion, or nothing."""

    upload_id: str
    kind: Literal["parts", "resend", "single", "complete", "nothing"]
    parts: tuple[int, ...] = field(default=())
    #: Messages of older generations are skipped: whatever they carried was dispatched again.
    generation: int = 0
    reason: str = ""
    #: A single PUT whose completion lease the coordinator took already (with the record it
    #: created, "completing"): the PUT is sent under this token without reading the record again.
    lease: str = ""
    record: UploadRecord | None = field(default=None, compare=False, repr=False)


Dispatcher = Callable[[Dispatch], None]


class Coordinator:
    def __init__(self, ctx: UploaderContext) -> None:
        self.ctx = ctx
        self.store = ctx.checkpoint
        self.objects = ctx.objects
        self.settings = ctx.settings

    # -- start ---------------------------------------------------------------------------------
    def start_message(self, kwargs: dict[str, Any], dispatch: Dispatcher) -> str:
        """Handle an ``uploader.start_upload`` message (from any client, in any language): validate
        it and :meth:`start` it. Returns the upload id. A refusal (invalid request, missing
        source or bucket, conflicting upload id) raises the error for the sender and, when the
        message names a usable upload id, notes the reason under it for ``status``."""
        try:
            request = parse_request(kwargs)
        except InvalidRequest as exc:
            upload_id = kwargs.get("upload_id") if isinstance(kwargs, dict) else None
            if isinstance(upload_id, str) and valid_upload_id(upload_id):
                self._refuse(upload_id, exc)
            raise
        assert request.upload_id is not None, "parse_request fills in the upload id"
        self.start(request, dispatch)
        return request.upload_id

    def _refuse(self, upload_id: str, exc: UploaderError) -> None:
        reason = f"refused: {exc}"
        log.warning("upload %s %s", upload_id, reason)
        self.store.refuse(upload_id, reason, self.settings.refusal_retention_seconds, type(exc).__name__)

    def note_abandoned_start(self, upload_id: str, exc: UploaderError, reason: str) -> None:
        """A start that gave up (its retries spent) before it created anything: note why under
        the upload id, as a refusal (nothing exists to resume; submitting it again starts it)."""
        if valid_upload_id(upload_id):
            self.store.refuse(
                upload_id, f"not started: {reason}", self.settings.refusal_retention_seconds, type(exc).__name__
            )

    def start(self, request: UploadRequest, dispatch: Dispatcher) -> Dispatch:
        """Validate the source, plan, create the multipart upload and dispatch every part.

        Raises :class:`~uploader.errors.SourceError`, :class:`~uploader.errors.InvalidRequest` or
        :class:`~uploader.errors.PermanentStoreError` before anything is left behind. A request
        whose ``upload_id`` exists already continues that upload (it is a resume), provided it
        names the same source and destination.
        """
        upload_id = request.upload_id
        assert upload_id is not None, "parse_request fills in the upload id"
        try:
            source = open_source(request.source, self.settings.source_roots)
            fingerprint = source.fingerprint()
            plan, mode = self._plan(fingerprint.size, request.part_size)
            self._check_bucket(request.bucket)
        except (SourceError, InvalidRequest, PermanentStoreError) as exc:
            self._refuse(upload_id, exc)
            raise
        fields = {
            "source": request.source,
            "bucket": request.bucket,
            "key": request.key,
            "metadata": request.metadata or {},
            "content_type": request.content_type,
            "abort_on_failure": request.abort_on_failure,
            "requested_part_size": request.part_size or 0,
            **self._plan_fields(plan, mode, fingerprint),
        }
        if mode == "single":
            # Nothing to create on the server, so no dispatch lock: the record is born
            # "completing" under this coordinator's completion lease, which fences the PUT (a
            # duplicate request finds the record and does nothing). A fresh claim is generation 1.
            token = str(uuid.uuid4())
            created, claimed = self.store.claim_single(upload_id, fields, token, self.settings.completion_lease_seconds)
            if created:
                assert isinstance(claimed, UploadRecord)
                single = Dispatch(upload_id, "single", generation=1, lease=token, record=claimed)
                dispatch(single)
                log.info("upload %s: dispatched single", upload_id)
                return single
        else:
            created, _ = self.store.claim(upload_id, fields)
        if not created:
            existing = self._get(upload_id)
            if (existing.source, existing.bucket, existing.key) != (request.source, request.bucket, request.key):
                raise UploadConflict(
                    f"upload id {upload_id!r} is already used for {existing.source} -> "
                    f"s3://{existing.bucket}/{existing.key}; choose another upload id"
                )
            if existing.state in {"uploading", "completing"} and (
                time.time() - existing.updated < self.settings.stall_seconds
            ):
                # A duplicate of a request that is making progress: its parts are on their way.
                return Dispatch(upload_id, "nothing", reason=f"already {existing.state}")
            if existing.state != "creating":
                return self.resume(upload_id, dispatch)
            # Still "creating": our own retry after a transient error (CreateMultipartUpload
            # during an S3 outage), or a duplicate racing the first creator. Whoever holds the
            # dispatch lock creates; the others find the state moved on.
        with self._dispatch_lock(upload_id) as locked:
            if not locked:
                return Dispatch(upload_id, "nothing", reason="another coordinator is creating it")
            record = self._get(upload_id)
            if record.state != "creating":
                return Dispatch(upload_id, "nothing", reason=f"already {record.state}")
            return self._create_and_dispatch(record, dispatch)

    def _create_and_dispatch(self, record: UploadRecord, dispatch: Dispatcher) -> Dispatch:
        upload_id = record.upload_id
        if record.mode == "single":
            return self._attach_single(upload_id, record.generation, dispatch)
        try:
            adopted = self._find_our_multipart_upload(record)
            mpu_id = adopted[0] if adopted else self.objects.create_multipart_upload(
                record.bucket, record.key, metadata=record.metadata, content_type=record.content_type
            )
        except (PermanentStoreError, SourceError, SourceChanged) as exc:
            # Nothing was created on the server: the upload ends failed, with the reason, in
            # seconds (resume starts it again once the cause is fixed).
            mark_failed(self.ctx, upload_id, f"starting the upload failed: {exc}")
            raise
        outcome = self.store.attach_multipart(upload_id, mpu_id)
        if outcome == "ok" and adopted:
            for number, part, size in adopted[1]:
                self.store.record_part(upload_id, mpu_id, number, part, size)
            log.warning("upload %s: rebuilt its checkpoint from %d parts already on the server", upload_id, len(adopted[1]))
            return self._reopen_and_dispatch(self._get(upload_id), dispatch)
        if outcome != "ok":
            # Cancelled (or taken over) while we created it: ours is an orphan, remove it.
            self.objects.abort_multipart_upload(record.bucket, record.key, mpu_id)
            plan = Dispatch(upload_id, "nothing", reason=outcome)
        else:
            plan = Dispatch(upload_id, "parts", tuple(range(1, record.part_count + 1)), record.generation)
        if plan.kind != "nothing":
            dispatch(plan)
        log.info("upload %s: dispatched %s (%d parts)", upload_id, plan.kind, len(plan.parts))
        return plan

    def _attach_single(self, upload_id: str, generation: int, dispatch: Dispatcher) -> Dispatch:
        outcome = self.store.attach_multipart(upload_id, "")
        plan = (
            Dispatch(upload_id, "single", generation=generation)
            if outcome == "ok"
            else Dispatch(upload_id, "nothing", reason=outcome)
        )
        if plan.kind != "nothing":
            dispatch(plan)
        log.info("upload %s: dispatched %s", upload_id, plan.kind)
        return plan

    def _find_our_multipart_upload(self, record: UploadRecord) -> tuple[str, list[tuple[int, UploadedPart, int]]] | None:
        """A multipart upload already on the server for this key whose every part holds exactly
        the source's bytes for its part number: this upload's own, whose checkpoint was lost
        (or whose coordinator died before recording it). Adopting it rebuilds the checkpoint
        from ListParts instead of sending everything again. A candidate with any part that does
        not match the source is never adopted (it is someone else's, or another version's)."""
        candidates = self.objects.list_multipart_uploads(record.bucket, record.key)
        if not candidates:
            return None
        from uploader.checksums import md5_b64_to_etag
        from uploader.transfer import part_buffer, stream_chunk_size

        plan = PartPlan(record.size, record.part_size, record.part_count)
        source = open_source(record.source, self.settings.source_roots)
        expected = Fingerprint(size=record.size, mtime_ns=record.mtime_ns)
        # Parts are checksummed in chunks through this thread's part buffer, within the
        # worker's own memory budget whatever the part size (the upload's sender chose it).
        buffer = part_buffer(stream_chunk_size(self.settings.part_buffer_max))
        for mpu_id, initiated in sorted(candidates, key=lambda c: -c[1]):
            listed = list(self.objects.list_parts(record.bucket, record.key, mpu_id))
            if not listed:
                # An empty upload is ours only if it was started after our record was claimed.
                if initiated >= record.created - 5:
                    return mpu_id, []
                continue
            by_number: dict[int, list[ListedPart]] = {}
            for part in listed:  # some servers list a re-uploaded part number twice
                by_number.setdefault(part.part_number, []).append(part)
            matched: dict[int, tuple[int, UploadedPart, int]] = {}
            mismatch = False
            for number, copies in sorted(by_number.items()):
                if number > plan.count:
                    mismatch = True
                    break
                offset, length = plan.part_range(number)
                if not any(c.size == length for c in copies):
                    mismatch = True
                    break
                with source.open_range(offset, length, expected) as source_range:
                    md5_b64, checksum = source_range.checksums(("md5", self.objects.checksum), buffer)
                md5 = md5_b64_to_etag(md5_b64).strip('"')
                copy = next((c for c in copies if c.size == length and c.etag.strip('"') == md5), None)
                if copy is None:
                    mismatch = True
                    break
                matched[number] = (number, UploadedPart(copy.etag, checksum), length)
            if not mismatch and matched:
                return mpu_id, sorted(matched.values(), key=lambda m: m[0])
        return None

    # -- resume --------------------------------------------------------------------------------
    def resume(self, upload_id: str, dispatch: Dispatcher, *, restart: bool = False) -> Dispatch:
        """Continue ``upload_id`` from its checkpoint: re-check the source fingerprint and the
        server's multipart upload (ListParts is the truth), then dispatch only missing parts.

        Raises :class:`SourceChanged` if the source differs from when the upload began, unless
        ``restart`` is true: then the old multipart upload is aborted and the upload begins again.
        A multipart upload the server no longer knows (expired, purged) is replaced cleanly.
        """
        with self._dispatch_lock(upload_id) as locked:
            if not locked:
                return Dispatch(upload_id, "nothing", reason="another dispatcher is busy with this upload")
            record = self._get(upload_id)
            if record.state == "completed":
                return Dispatch(upload_id, "nothing", reason="already completed")
            if record.state == "cancelled":
                raise UploadConflict(f"upload {upload_id} was cancelled; submit it again under a new upload id")
            if record.state == "creating":
                if time.time() - record.created < self.settings.completion_lease_seconds:
                    return Dispatch(upload_id, "nothing", reason="being created")
                return self._create_and_dispatch(record, dispatch)  # its creator died mid-way
            fingerprint = open_source(record.source, self.settings.source_roots).fingerprint()
            if fingerprint != Fingerprint(size=record.size, mtime_ns=record.mtime_ns):
                if not restart:
                    message = (
                        f"source {record.source} changed since upload {upload_id} began "
                        f"(size {record.size} -> {fingerprint.size}, mtime changed: "
                        f"{record.mtime_ns != fingerprint.mtime_ns}); nothing was uploaded from the new "
                        f"version. Resume with restart (CLI: uploader resume {upload_id} --restart) to abort "
                        "the old multipart upload and upload the file again"
                    )
                    self.store.note_error(upload_id, message)
                    raise SourceChanged(message)
                return self._restart(record, fingerprint, dispatch, why="source changed")
            if record.mode == "single":
                return self._reopen_and_dispatch(record, dispatch)
            if not record.mpu_id:  # it failed before its multipart upload was created
                return self._restart(record, fingerprint, dispatch, why="no multipart upload was created yet")
            try:
                listed = list(self.objects.list_parts(record.bucket, record.key, record.mpu_id))
            except PermanentStoreError as exc:
                if error_code(exc) != "NoSuchUpload":
                    raise
                if completed_on_server(self.ctx, record):
                    # A completer died after CompleteMultipartUpload took effect: only the
                    # bookkeeping is left, which the completion does (it accepts NoSuchUpload
                    # when the stored object is the one the recorded parts make).
                    return self._reopen_and_dispatch(record, dispatch)
                return self._restart(record, fingerprint, dispatch, why="multipart upload gone from the server")
            if restart:
                return self._restart(record, fingerprint, dispatch, why="restart requested")
            # A recorded part the server does not hold (with that ETag) must be sent again.
            held = {(p.part_number, p.etag) for p in listed}
            lost = [n for n, part in self.store.parts(upload_id).items() if (n, part.etag) not in held]
            if lost:
                log.warning("upload %s: %d recorded parts missing on the server: %s", upload_id, len(lost), lost[:20])
                self.store.forget_parts(upload_id, record.mpu_id, lost)
            return self._reopen_and_dispatch(record, dispatch)

    def _reopen_and_dispatch(self, record: UploadRecord, dispatch: Dispatcher) -> Dispatch:
        upload_id = record.upload_id
        generation = self.store.reopen(upload_id, record.mpu_id)
        if not isinstance(generation, int):
            return Dispatch(upload_id, "nothing", reason=generation)
        if record.mode == "single":
            plan = Dispatch(upload_id, "single", generation=generation)
        else:
            # Parts a live worker is sending are left to it; the completion picks up any whose
            # worker dies before recording them.
            unleased, leased = self.store.missing_parts(upload_id, record.part_count)
            if unleased:
                plan = Dispatch(upload_id, "parts", tuple(unleased), generation)
            else:
                plan = Dispatch(upload_id, "complete", generation=generation, reason=f"{len(leased)} parts in flight")
        dispatch(plan)
        log.info("upload %s: resumed, dispatched %s (%d parts)", upload_id, plan.kind, len(plan.parts))
        return plan

    def _restart(self, record: UploadRecord, fingerprint: Fingerprint, dispatch: Dispatcher, *, why: str) -> Dispatch:
        upload_id = record.upload_id
        plan, mode = self._plan(fingerprint.size, record.requested_part_size or None)
        new_mpu = ""
        if mode == "multipart":
            new_mpu = self.objects.create_multipart_upload(
                record.bucket, record.key, metadata=record.metadata, content_type=record.content_type
            )
        generation = self.store.restart(upload_id, record.mpu_id, new_mpu, self._plan_fields(plan, mode, fingerprint))
        if not isinstance(generation, int):
            if new_mpu:
                self.objects.abort_multipart_upload(record.bucket, record.key, new_mpu)
            raise UploadConflict(f"upload {upload_id} could not restart: it is {generation}")
        # Only now that the checkpoint refers to the new one: a refused restart (a completer
        # holding its lease) must not lose the multipart upload it is completing.
        if record.mpu_id:
            try:
                self.objects.abort_multipart_upload(record.bucket, record.key, record.mpu_id)
            except UploaderError as exc:
                log.warning(
                    "upload %s: could not abort the replaced multipart upload %s of s3://%s/%s: %s",
                    upload_id, record.mpu_id, record.bucket, record.key, exc,
                )
        log.warning("upload %s: restarted (%s)", upload_id, why)
        result = (
            Dispatch(upload_id, "single", generation=generation)
            if mode == "single"
            else Dispatch(upload_id, "parts", tuple(range(1, plan.count + 1)), generation)
        )
        dispatch(result)
        return result

    # -- cancel --------------------------------------------------------------------------------
    def cancel(self, upload_id: str) -> str:
        """Mark the upload cancelled (parts finishing later cannot resurrect it) and abort its
        multipart upload. Idempotent. Returns ``"cancelled"`` or ``"already"``."""
        outcome = self.store.cancel(upload_id, self.settings.retention_seconds)
        if outcome == "missing":
            raise UploadNotFound(f"no upload {upload_id!r} (never submitted, refused, or expired)")
        if outcome in {"completed", "completing"}:
            raise UploadConflict(f"upload {upload_id} is {outcome}; it is too late to cancel it")
        record = self._get(upload_id)
        if record.mpu_id:
            self.objects.abort_multipart_upload(record.bucket, record.key, record.mpu_id)
        return outcome

    # -- helpers -------------------------------------------------------------------------------
    def _get(self, upload_id: str) -> UploadRecord:
        record = self.store.get(upload_id)
        if record is None:
            raise UploadNotFound(f"no upload {upload_id!r} (never submitted, refused, or expired)")
        return record

    def _plan(self, size: int, part_size: int | None) -> tuple[PartPlan, str]:
        plan = plan_parts(size, part_size or None, default_part_size=self.settings.default_part_size)
        mode = "single" if size < self.settings.multipart_threshold else "multipart"
        if mode == "single":
            plan = PartPlan(size=size, part_size=max(size, 1), count=1)
        return plan, mode

    @staticmethod
    def _plan_fields(plan: PartPlan, mode: str, fingerprint: Fingerprint) -> dict[str, object]:
        return {
            "size": fingerprint.size,
            "mtime_ns": fingerprint.mtime_ns,
            "part_size": plan.part_size,
            "part_count": plan.count,
            "mode": mode,
        }

    def _check_bucket(self, bucket: str) -> None:
        seen = _buckets_seen.get((self.settings.s3_endpoint_url, bucket))
        if seen is not None and time.monotonic() - seen < BUCKET_CHECK_SECONDS:
            return  # a round trip per small upload costs as much as the upload itself
        try:
            self.objects.head_bucket(bucket)
            _buckets_seen[(self.settings.s3_endpoint_url, bucket)] = time.monotonic()
        except PermanentStoreError as exc:
            # Policies that allow PutObject but not ListBucket answer 403 here: let the upload
            # itself find out. A missing bucket is refused now, before anything is created.
            if error_code(exc) == "NoSuchBucket":
                raise

    def _dispatch_lock(self, upload_id: str) -> _Lock:
        return _Lock(self, upload_id)


#: Seconds a bucket seen to exist is not checked again (a deleted bucket then fails the upload
#: at its first request, with the same clear NoSuchBucket reason).
BUCKET_CHECK_SECONDS = 60
_buckets_seen: dict[tuple[str | None, str], float] = {}


class _Lock:
    def __init__(self, coordinator: Coordinator, upload_id: str) -> None:
        self.store = coordinator.store
        self.upload_id = upload_id
        self.token = uuid.uuid4().hex
        self.held = False

    def __enter__(self) -> bool:
        self.held = self.store.try_lock(self.upload_id, "dispatch", self.token, DISPATCH_LOCK_SECONDS)
        return self.held

    def __exit__(self, *exc: object) -> None:
        if self.held:
            self.store.unlock(self.upload_id, "dispatch", self.token)

