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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from uploader import auth, locality
from uploader.checkpoint import UploadRecord
from uploader.checksums import ChecksumAlgorithm, ChecksumType
from uploader.completion import completed_on_server, mark_failed
from uploader.context import UploaderContext
from uploader.errors import (
    InvalidRequest,
    NotAuthorized,
    NoWorkerOnHost,
    PermanentStoreError,
    SourceChanged,
    SourceError,
    UploadConflict,
    UploaderError,
    UploadNotFound,
)
from uploader.limits import limit_fields
from uploader.model import ACTIVE_STATES, NO_RECORD, DispatchKind, ListedPart, ObjectOptions, UploadedPart, UploadState
from uploader.planner import PartPlan, plan_parts
from uploader.request import UploadRequest, parse_request, valid_upload_id
from uploader.sources import Fingerprint, S3ObjectSource
from uploader.storage.errors import error_code

log = logging.getLogger(__name__)

#: Seconds the dispatch lock is held at most (it is released as soon as dispatching is done).
DISPATCH_LOCK_SECONDS = 120


@dataclass(frozen=True)
class Dispatch:
    """What to send for an upload: part tasks followed by completion (``parts``), part tasks
    alone (``resend``: parts taken back from a dead or hung holder; the last part recorded
    triggers completion), the single PUT, only the completion, or nothing."""

    upload_id: str
    kind: DispatchKind
    parts: tuple[int, ...] = field(default=())
    #: Messages of older generations are skipped: whatever they carried was dispatched again.
    generation: int = 0
    reason: str = ""
    #: A single PUT whose completion lease the coordinator took already (with the record it
    #: created, "completing"): the PUT is sent under this token without reading the record again.
    lease: str = ""
    record: UploadRecord | None = field(default=None, compare=False, repr=False)
    #: A forwarded resume (``forward``): the host whose workers run it, and whether it restarts.
    host: str = ""
    restart: bool = False


Dispatcher = Callable[[Dispatch], None]

#: The errors that refuse a request before anything is created (noted for ``status``).
REFUSALS = (SourceError, InvalidRequest, PermanentStoreError, UploadConflict)


@dataclass(frozen=True)
class Started:
    """One request of a ``start_many`` message: its upload id, and ``error``, why it was
    refused or could not start ("" if it started)."""

    upload_id: str
    error: str = ""
    #: The class name of the error (``SourceError``, ``UploadConflict``...), for the client to raise.
    kind: str = ""

    @classmethod
    def refused(cls, upload_id: str, exc: UploaderError) -> Started:
        return cls(upload_id, str(exc), type(exc).__name__)

    def to_dict(self) -> dict[str, str]:
        return {"upload_id": self.upload_id, "error": self.error, "kind": self.kind}


#: A ``put_objects`` task sends at most this many small uploads, and at most this many bytes
#: (whichever comes first; a single larger upload is a group of its own). Small enough that a
#: list of a few hundred files spreads over a worker's slots; large enough that Celery's cost
#: per message (publish, events, ack) is paid per group, not per file.
PUT_GROUP_FILES = 32
PUT_GROUP_BYTES = 16 * 1024 * 1024
#: A start_many message's requests are checked, claimed and dispatched this many at a time.
START_CHUNK = 4 * PUT_GROUP_FILES


@dataclass(frozen=True)
class PutGroup:
    """Small uploads sent by one ``put_objects`` task: ``(upload_id, generation)`` pairs."""

    uploads: tuple[tuple[str, int], ...]
    #: The host whose workers alone can read these uploads' files ("" : any worker's).
    host: str = ""


def put_groups(uploads: Sequence[tuple[str, int]], generation: int = 1, host: str = "") -> list[PutGroup]:
    """``(upload_id, size)`` pairs cut, in order, into groups of at most :data:`PUT_GROUP_FILES`
    uploads and :data:`PUT_GROUP_BYTES` bytes, every upload at ``generation``, all of ``host``
    (host-local uploads: uploader/locality.py)."""
    groups: list[PutGroup] = []
    current: list[tuple[str, int]] = []
    size = 0
    for upload_id, length in uploads:
        if current and (len(current) >= PUT_GROUP_FILES or size + length > PUT_GROUP_BYTES):
            groups.append(PutGroup(tuple(current), host))
            current, size = [], 0
        current.append((upload_id, generation))
        size += length
    if current:
        groups.append(PutGroup(tuple(current), host))
    return groups


class Coordinator:
    def __init__(self, ctx: UploaderContext) -> None:
        self.ctx = ctx
        self.store = ctx.checkpoint
        self.settings = ctx.settings

    # -- start ---------------------------------------------------------------------------------
    def start_message(
        self, kwargs: dict[str, Any], dispatch: Dispatcher, forward: Callable[[UploadRequest], None] | None = None
    ) -> str:
        """Handle an ``uploader.start_upload`` message (from any client, in any language): validate
        it and :meth:`start` it. Returns the upload id. A refusal (invalid request, missing
        source or bucket, conflicting upload id) raises the error for the sender and, when the
        message names a usable upload id, notes the reason under it for ``status``.

        A host-local request for another host is handed to ``forward`` (which sends it to that
        host's queue), provided a worker of that host is alive (else :class:`NoWorkerOnHost`)."""
        request = self._parsed(kwargs)
        assert request.upload_id is not None, "parse_request fills in the upload id"
        if forward is not None and self.on_other_host(request.local_host):
            try:
                locality.require_worker(self.store, request.local_host)
            except NoWorkerOnHost as refusal:
                self._refuse(request.upload_id, refusal)
                raise
            forward(request)
            return request.upload_id
        self.start(request, dispatch)
        return request.upload_id

    def _parsed(self, kwargs: dict[str, Any]) -> UploadRequest:
        """The request in a start message; an invalid one is refused (noted under its upload id,
        if it names a usable one) with :class:`InvalidRequest`."""
        try:
            return parse_request(kwargs)
        except InvalidRequest as exc:
            upload_id = kwargs.get("upload_id") if isinstance(kwargs, dict) else None
            if isinstance(upload_id, str) and valid_upload_id(upload_id):
                self._refuse(upload_id, exc)
            raise

    def start_many(
        self, requests: Sequence[dict[str, Any]], dispatch: Dispatcher, send_groups: Callable[[list[PutGroup]], None]
    ) -> list[Started]:
        """Handle an ``uploader.start_many`` message: validate and start each request (the kwargs
        of a ``start_upload`` message, with an ``upload_id``) as :meth:`start_message` would, and
        return one :class:`Started` per request, in order. A refused request is refused alone
        (noted under its upload id for ``status``, its reason and error class in its entry); the
        others go on.

        Small sources (below the multipart threshold) are what this is for: the list is taken
        :data:`START_CHUNK` requests at a time; each chunk's records are created ``uploading`` in
        one pipelined round trip and handed at once to ``send_groups`` as :class:`PutGroup` s of
        at most :data:`PUT_GROUP_FILES` uploads and :data:`PUT_GROUP_BYTES` bytes, each group
        one ``put_objects`` task (so the first files are sent while later ones are checked). A
        larger source is started on its own, as by :meth:`start` (``dispatch``). A request whose
        upload id exists already (a redelivered message) continues that upload as a duplicate
        start does.

        :class:`~uploader.errors.TransientStoreError` (S3 unreachable while checking a bucket)
        is raised for the caller to retry the whole message: what earlier chunks started is
        then found started, as for any duplicate start."""
        started: list[Started] = []
        for first in range(0, len(requests), START_CHUNK):
            started += self._start_chunk(requests[first : first + START_CHUNK], dispatch, send_groups)
        return started

    def _start_chunk(
        self, requests: Sequence[dict[str, Any]], dispatch: Dispatcher, send_groups: Callable[[list[PutGroup]], None]
    ) -> list[Started]:
        started: list[Started | None] = [None] * len(requests)
        admitted: list[tuple[int, UploadRequest, dict[str, Any], str]] = []
        for index, kwargs in enumerate(requests):
            upload_id = kwargs.get("upload_id") if isinstance(kwargs, dict) else None
            try:
                request = self._parsed(kwargs)
                fields, mode = self._admit(request)
            except REFUSALS as exc:
                started[index] = Started.refused(upload_id if isinstance(upload_id, str) else "", exc)
                continue
            admitted.append((index, request, fields, mode))
        singles = [(i, r, f) for i, r, f, mode in admitted if mode == "single"]
        claimed = self.store.claim_queued([(str(r.upload_id), f) for _, r, f in singles]) if singles else []
        fresh: dict[str, list[tuple[str, int]]] = {}  # by host ("": shared sources)
        for (index, request, fields), created in zip(singles, claimed, strict=True):
            if created:
                fresh.setdefault(request.local_host, []).append((str(request.upload_id), int(fields["size"])))
                started[index] = Started(str(request.upload_id))
            else:
                started[index] = self._start_one(request, self._start_existing, request, fields, dispatch)
        for host, uploads in fresh.items():
            send_groups(put_groups(uploads, host=host))
            log.info("started %d small uploads at once, dispatched in groups", len(uploads))
        for index, request, fields, mode in admitted:
            if mode != "single":
                started[index] = self._start_one(request, self._start_admitted, request, fields, mode, dispatch)
        return [s for s in started if s is not None]

    @staticmethod
    def _start_one(request: UploadRequest, start: Callable[..., Dispatch], *args: Any) -> Started:
        """One upload of a start_many message started on its own (``start(*args)``): its error is its entry's."""
        try:
            start(*args)
        except UploaderError as exc:
            log.warning("upload %s: not started: %s", request.upload_id, exc)
            return Started.refused(str(request.upload_id), exc)
        return Started(str(request.upload_id))

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
        fields, mode = self._admit(request)
        return self._start_admitted(request, fields, mode, dispatch)

    def _start_admitted(self, request: UploadRequest, fields: dict[str, Any], mode: str, dispatch: Dispatcher) -> Dispatch:
        """:meth:`start`, once :meth:`_admit` has accepted the request."""
        upload_id = request.upload_id
        assert upload_id is not None, "parse_request fills in the upload id"
        if mode == "single":
            # Nothing to create on the server, so no dispatch lock: the record is born
            # "completing" under this coordinator's completion lease, which fences the PUT (a
            # duplicate request finds the record and does nothing). A fresh claim is generation 1.
            token = str(uuid.uuid4())
            created, claimed = self.store.claim_single(upload_id, fields, token, self.settings.completion_lease_seconds)
            if created:
                assert isinstance(claimed, UploadRecord)
                single = Dispatch(upload_id, DispatchKind.SINGLE, generation=1, lease=token, record=claimed)
                dispatch(single)
                log.info("upload %s: dispatched single", upload_id)
                return single
        else:
            created, _ = self.store.claim(upload_id, fields)
        if not created:
            return self._start_existing(request, fields, dispatch)
        return self._create_locked(upload_id, dispatch)

    def _start_existing(self, request: UploadRequest, fields: dict[str, Any], dispatch: Dispatcher) -> Dispatch:
        """A start whose upload id has a record already: a duplicate of the same request (a
        redelivered message, a client's retry) continues that upload; another request's id is
        refused (:class:`UploadConflict`)."""
        upload_id = request.upload_id
        assert upload_id is not None, "parse_request fills in the upload id"
        existing = self._get(upload_id)
        if existing.owner != fields["owner"]:
            # Another submitter's upload (or one with no capability): a start must not
            # resume or take over what it cannot prove it owns.
            raise UploadConflict(
                f"upload id {upload_id!r} is already used by another submission; choose another upload id"
            )
        if (existing.source, existing.bucket, existing.key) != (request.source, request.bucket, request.key):
            raise UploadConflict(
                f"upload id {upload_id!r} is already used for {existing.source} -> "
                f"s3://{existing.bucket}/{existing.key}; choose another upload id"
            )
        if existing.state in {UploadState.UPLOADING, UploadState.COMPLETING} and (
            time.time() - existing.updated < self.settings.stall_seconds
        ):
            # A duplicate of a request that is making progress: its parts are on their way.
            return Dispatch(upload_id, DispatchKind.NOTHING, reason=f"already {existing.state}")
        if existing.state != UploadState.CREATING:
            return self.resume(upload_id, dispatch)
        # Still "creating": our own retry after a transient error (CreateMultipartUpload
        # during an S3 outage), or a duplicate racing the first creator. Whoever holds the
        # dispatch lock creates; the others find the state moved on.
        return self._create_locked(upload_id, dispatch)

    def _create_locked(self, upload_id: str, dispatch: Dispatcher) -> Dispatch:
        with self._dispatch_lock(upload_id) as locked:
            if not locked:
                return Dispatch(upload_id, DispatchKind.NOTHING, reason="another coordinator is creating it")
            record = self._get(upload_id)
            if record.state != UploadState.CREATING:
                return Dispatch(upload_id, DispatchKind.NOTHING, reason=f"already {record.state}")
            return self._create_and_dispatch(record, dispatch)

    def _admit(self, request: UploadRequest) -> tuple[dict[str, Any], str]:
        """Check everything a start checks before it creates anything (options, endpoint,
        provider, source, bucket, a free key for ``no_overwrite``) and return the record's fields
        and the upload's mode (``single`` or ``multipart``). A refusal is noted under the upload
        id, for ``status``, and raised."""
        upload_id = request.upload_id
        assert upload_id is not None, "parse_request fills in the upload id"
        try:
            if self.on_other_host(request.local_host):
                raise InvalidRequest(
                    f"the source is on host {request.local_host}, and this worker is on {self.settings.host_name}: "
                    f"send the request to the queue {locality.host_queue_name(request.local_host)}"
                )
            options = self._options(request)
            objects = self.ctx.objects_for(request.endpoint)  # an unknown endpoint: InvalidRequest
            refusal = objects.profile.refusal(request.provider_options(), endpoint=request.endpoint or None)
            if refusal is not None:
                raise InvalidRequest(refusal)
            source = self.ctx.source(request.source, request.source_endpoint or "", request.source_credentials or "")
            fingerprint = source.fingerprint()
            copied = isinstance(source, S3ObjectSource) and source.copies_to(objects)
            if copied and request.oss_callback:
                raise InvalidRequest(f"oss_callback does not apply to {request.source}: it is copied on the server")
            if copied and request.checksum_algorithm not in (None, ChecksumAlgorithm.MD5.value):
                raise InvalidRequest(
                    f"checksum_algorithm {request.checksum_algorithm} does not apply to {request.source}: it is copied "
                    "on the server, not sent, and verified by its size and the ETags the server reports; leave it out"
                )
            plan, mode = self._plan(fingerprint.size, request.part_size, request.endpoint)
            self.check_bucket(request.bucket, request.endpoint)
            if options.no_overwrite and self.store.get(upload_id) is None:
                self._check_key_free(request.bucket, request.key, options, request.endpoint)
        except REFUSALS as exc:
            self._refuse(upload_id, exc)
            raise
        return {
            "source": request.source,
            "bucket": request.bucket,
            "key": request.key,
            "options": options.to_json(),
            "abort_on_failure": request.abort_on_failure,
            "requested_part_size": request.part_size or 0,
            "owner": self._owner_seal(request),
            "endpoint": request.endpoint or "",
            "source_endpoint": request.source_endpoint or "",
            **request.notify_fields(),
            **request.oss_callback_fields(),
            **limit_fields(request),
            "priority": request.priority,
            "host": request.local_host,
            "source_credentials": request.source_credentials or "",
            **self._checksum_fields(ChecksumAlgorithm.MD5.value if copied else request.checksum_algorithm, request.endpoint),
            **self._plan_fields(plan, mode, fingerprint),
        }, mode

    def _create_and_dispatch(self, record: UploadRecord, dispatch: Dispatcher) -> Dispatch:
        upload_id = record.upload_id
        if record.mode == "single":
            return self._attach_single(upload_id, record.generation, dispatch)
        try:
            adopted = self._find_our_multipart_upload(record)
            mpu_id = adopted[0] if adopted else self.ctx.objects_for(record.endpoint).create_multipart_upload(
                record.bucket, record.key, options=record.options, **self._checksum_create_args(record),
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
            self.ctx.objects_for(record.endpoint).abort_multipart_upload(record.bucket, record.key, mpu_id, record.options)
            plan = Dispatch(upload_id, DispatchKind.NOTHING, reason=outcome)
        else:
            plan = Dispatch(upload_id, DispatchKind.PARTS, tuple(range(1, record.part_count + 1)), record.generation)
        if plan.kind is not DispatchKind.NOTHING:
            dispatch(plan)
        log.info("upload %s: dispatched %s (%d parts)", upload_id, plan.kind, len(plan.parts))
        return plan

    def _attach_single(self, upload_id: str, generation: int, dispatch: Dispatcher) -> Dispatch:
        outcome = self.store.attach_multipart(upload_id, "")
        plan = (
            Dispatch(upload_id, DispatchKind.SINGLE, generation=generation)
            if outcome == "ok"
            else Dispatch(upload_id, DispatchKind.NOTHING, reason=outcome)
        )
        if plan.kind is not DispatchKind.NOTHING:
            dispatch(plan)
        log.info("upload %s: dispatched %s", upload_id, plan.kind)
        return plan

    def _find_our_multipart_upload(self, record: UploadRecord) -> tuple[str, list[tuple[int, UploadedPart, int]]] | None:
        """A multipart upload already on the server for this key whose every part holds exactly
        the source's bytes for its part number: this upload's own, whose checkpoint was lost
        (or whose coordinator died before recording it). Adopting it rebuilds the checkpoint
        from ListParts instead of sending everything again. A candidate with any part that does
        not match the source is never adopted (it is someone else's, or another version's)."""
        objects = self.ctx.objects_for(record.endpoint)
        candidates = objects.list_multipart_uploads(record.bucket, record.key)
        if not candidates:
            return None
        from uploader.checksums import CRC64ECMA, Algorithm, crc64ecma_text, md5_b64_to_etag
        from uploader.transfer import part_buffer, stream_chunk_size

        plan = PartPlan(record.size, record.part_size, record.part_count)
        source = self.ctx.source(record.source, record.source_endpoint, record.source_credentials)
        expected = Fingerprint.from_record(record.size, record.mtime_ns, record.file_id)
        # Parts are checksummed in chunks through this thread's part buffer, within the
        # worker's own memory budget whatever the part size (the upload's sender chose it).
        buffer = part_buffer(stream_chunk_size(self.settings.part_buffer_max))
        for mpu_id, initiated in sorted(candidates, key=lambda c: -c[1]):
            listed = list(objects.list_parts(record.bucket, record.key, mpu_id, record.options))
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
                # OSS: the part's CRC-64/ECMA too, in the same pass, for completion to check the
                # object's x-oss-hash-crc64ecma against.
                crc64: tuple[Algorithm, ...] = (CRC64ECMA,) if objects.profile.reports_crc64ecma else ()
                with source.open_range(offset, length, expected) as source_range:
                    md5_b64, checksum, *more = source_range.checksums(
                        ("md5", objects.algorithm(record.checksum_algorithm), *crc64), buffer
                    )
                md5 = md5_b64_to_etag(md5_b64).strip('"')
                copy = next((c for c in copies if c.size == length and c.etag.strip('"') == md5), None)
                if copy is None:
                    mismatch = True
                    break
                crc64_text = crc64ecma_text(more[0]) if more else ""
                matched[number] = (number, UploadedPart(copy.etag, checksum, crc64_text), length)
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
                return Dispatch(upload_id, DispatchKind.NOTHING, reason="another dispatcher is busy with this upload")
            record = self._get(upload_id)
            if record.state == UploadState.COMPLETED:
                return Dispatch(upload_id, DispatchKind.NOTHING, reason="already completed")
            if record.state == UploadState.CANCELLED:
                raise UploadConflict(f"upload {upload_id} was cancelled; submit it again under a new upload id")
            if self.on_other_host(record.host):
                # Its source is on another host's disk: only the workers there may look at it.
                return self._forward(record, dispatch, restart=restart)
            if record.state == UploadState.CREATING:
                if time.time() - record.created < self.settings.completion_lease_seconds:
                    return Dispatch(upload_id, DispatchKind.NOTHING, reason="being created")
                return self._create_and_dispatch(record, dispatch)  # its creator died mid-way
            fingerprint = self.ctx.source(record.source, record.source_endpoint, record.source_credentials).fingerprint()
            why = Fingerprint.from_record(record.size, record.mtime_ns, record.file_id).difference(fingerprint)
            if why:
                if not restart:
                    message = (
                        f"source {record.source} changed since upload {upload_id} began "
                        f"({why}); nothing was uploaded from the new "
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
            # The recorded parts are read *before* the server's are listed: a live worker may record
            # a part meanwhile (e.g. one still sending a message of the previous dispatch), and
            # ListParts, answered before that part landed, does not show it. Judged against a
            # later read of the checkpoint, such a part looked "missing on the server", was
            # forgotten and sent again. A part recorded before the listing began is on the server
            # by then (it is recorded only once the server acknowledged it).
            recorded = self.store.parts(upload_id)
            try:
                listed = list(
                    self.ctx.objects_for(record.endpoint).list_parts(record.bucket, record.key, record.mpu_id, record.options)
                )
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
            lost = [n for n, part in recorded.items() if (n, part.etag) not in held]
            if lost:
                log.warning("upload %s: %d recorded parts missing on the server: %s", upload_id, len(lost), lost[:20])
                self.store.forget_parts(upload_id, record.mpu_id, lost)
            return self._reopen_and_dispatch(record, dispatch)

    def on_other_host(self, host: str) -> bool:
        """Whether a host-local upload of ``host`` must be handled by another host's workers."""
        return bool(host) and host != self.settings.host_name

    def _forward(self, record: UploadRecord, dispatch: Dispatcher, *, restart: bool) -> Dispatch:
        """Send the resume of a host-local upload to its host's workers, or raise
        :class:`NoWorkerOnHost` if none is alive (noted for ``status`` while the upload waits;
        a failed upload keeps its own reason, and its automatic resumes)."""
        try:
            locality.require_worker(self.store, record.host)
        except NoWorkerOnHost as exc:
            if record.state in ACTIVE_STATES:
                self.store.note_error(record.upload_id, str(exc))
            raise
        plan = Dispatch(record.upload_id, DispatchKind.FORWARD, reason=f"to host {record.host}", host=record.host, restart=restart)
        dispatch(plan)
        log.info("upload %s: resume forwarded to the workers of host %s", record.upload_id, record.host)
        return plan

    def _reopen_and_dispatch(self, record: UploadRecord, dispatch: Dispatcher) -> Dispatch:
        upload_id = record.upload_id
        generation = self.store.reopen(upload_id, record.mpu_id)
        if not isinstance(generation, int):
            return Dispatch(upload_id, DispatchKind.NOTHING, reason=generation)
        if record.mode == "single":
            plan = Dispatch(upload_id, DispatchKind.SINGLE, generation=generation)
        else:
            # Parts a live worker is sending are left to it; the completion picks up any whose
            # worker dies before recording them.
            unleased, leased = self.store.missing_parts(upload_id, record.part_count)
            if unleased:
                plan = Dispatch(upload_id, DispatchKind.PARTS, tuple(unleased), generation)
            else:
                plan = Dispatch(upload_id, DispatchKind.COMPLETE, generation=generation, reason=f"{len(leased)} parts in flight")
        dispatch(plan)
        log.info("upload %s: resumed, dispatched %s (%d parts)", upload_id, plan.kind, len(plan.parts))
        return plan

    def _restart(self, record: UploadRecord, fingerprint: Fingerprint, dispatch: Dispatcher, *, why: str) -> Dispatch:
        upload_id = record.upload_id
        plan, mode = self._plan(fingerprint.size, record.requested_part_size or None, record.endpoint)
        new_mpu = ""
        if mode == "multipart":
            new_mpu = self.ctx.objects_for(record.endpoint).create_multipart_upload(
                record.bucket, record.key, options=record.options, **self._checksum_create_args(record),
            )
        generation = self.store.restart(upload_id, record.mpu_id, new_mpu, self._plan_fields(plan, mode, fingerprint))
        if not isinstance(generation, int):
            if new_mpu:
                self.ctx.objects_for(record.endpoint).abort_multipart_upload(record.bucket, record.key, new_mpu, record.options)
            raise UploadConflict(f"upload {upload_id} could not restart: it is {generation}")
        # Only now that the checkpoint refers to the new one: a refused restart (a completer
        # holding its lease) must not lose the multipart upload it is completing.
        if record.mpu_id:
            try:
                self.ctx.objects_for(record.endpoint).abort_multipart_upload(
                    record.bucket, record.key, record.mpu_id, record.options
                )
            except UploaderError as exc:
                log.warning(
                    "upload %s: could not abort the replaced multipart upload %s of s3://%s/%s: %s",
                    upload_id, record.mpu_id, record.bucket, record.key, exc,
                )
        log.warning("upload %s: restarted (%s)", upload_id, why)
        result = (
            Dispatch(upload_id, DispatchKind.SINGLE, generation=generation)
            if mode == "single"
            else Dispatch(upload_id, DispatchKind.PARTS, tuple(range(1, plan.count + 1)), generation)
        )
        dispatch(result)
        return result

    # -- authority ----------------------------------------------------------------------------
    def authorize(self, upload_id: str, action: str, *, token: str | None, operator: bool) -> auth.Authority:
        """Who may ``action`` (cancel or resume) ``upload_id``: its owner (``token`` opens the
        seal the record keeps), an ``operator`` (the message's proof made with the fleet key,
        already verified), or anyone where capabilities are not required. Raises
        :class:`NotAuthorized` otherwise (and :class:`UploadNotFound` for no upload)."""
        if operator:
            return auth.Authority.OPERATOR
        if not self.settings.require_capability:
            return auth.Authority.OPEN
        record = self._get(upload_id)
        return authority_over(self.settings, record.owner, f"upload {upload_id}", action, token=token, operator=operator)

    def _options(self, request: UploadRequest) -> ObjectOptions:
        """The request's object options as the record keeps them: checked against what only the
        workers know (the SSE-C keyring), with the content type guessed from the key or the
        source's name when the request gave none."""
        options = request.options
        try:
            options.check_keyring(set(self.settings.sse_c_keyring))
        except ValueError as exc:
            raise InvalidRequest(f"invalid upload request: {exc}") from None
        if request.callback_url and self.settings.callback_secret is None:
            # An unsigned webhook could not be told from a forged one: refuse before anything exists.
            raise InvalidRequest(
                "invalid upload request: callback_url needs UPLOADER_CALLBACK_SECRET on the workers (it signs the POST)"
            )
        return options.with_guessed_content_type(request.key, request.source)

    def _owner_seal(self, request: UploadRequest) -> str:
        return self.owner_seal_of(request.capability)

    def owner_seal_of(self, capability: str | None) -> str:
        """What a record keeps of a submitter's capability digest (``""``: none, or no fleet key)."""
        key = self.settings.fleet_key_bytes
        if capability is None or key is None:
            return ""
        return auth.owner_seal(key, capability)

    # -- cancel --------------------------------------------------------------------------------
    def cancel(self, upload_id: str) -> str:
        """Mark the upload cancelled (parts finishing later cannot resurrect it) and abort its
        multipart upload. Idempotent. Returns ``"cancelled"`` or ``"already"``."""
        outcome = self.store.cancel(upload_id, self.settings.retention_seconds)
        if outcome == NO_RECORD:
            raise UploadNotFound(f"no upload {upload_id!r} (never submitted, refused, or expired)")
        if outcome in {UploadState.COMPLETED, UploadState.COMPLETING}:
            raise UploadConflict(f"upload {upload_id} is {outcome}; it is too late to cancel it")
        record = self._get(upload_id)
        if record.mpu_id:
            self.ctx.objects_for(record.endpoint).abort_multipart_upload(record.bucket, record.key, record.mpu_id, record.options)
        return outcome

    # -- helpers -------------------------------------------------------------------------------
    def _get(self, upload_id: str) -> UploadRecord:
        record = self.store.get(upload_id)
        if record is None:
            raise UploadNotFound(f"no upload {upload_id!r} (never submitted, refused, or expired)")
        return record

    def _plan(self, size: int, part_size: int | None, endpoint: str | None) -> tuple[PartPlan, str]:
        rules = self.ctx.objects_for(endpoint).profile.parts
        plan = plan_parts(size, part_size or None, default_part_size=self.settings.default_part_size, rules=rules)
        mode = "single" if size < self.settings.multipart_threshold else "multipart"
        if mode == "single":
            plan = PartPlan(size=size, part_size=max(size, 1), count=1)
        return plan, mode

    def _checksum_fields(self, requested: str | None, endpoint: str | None) -> dict[str, str]:
        """The record's checksum algorithm (the request's, else the workers' default) and the
        whole-object checksum type its multipart upload is created with: FULL_OBJECT for a CRC
        where the server supports it (``UPLOADER_FULL_OBJECT_CHECKSUM``), else COMPOSITE; none
        for MD5 (the multipart ETag covers it)."""
        objects = self.ctx.objects_for(endpoint)
        algorithm = objects.algorithm(requested)
        if algorithm is ChecksumAlgorithm.MD5:
            kind = ""
        elif algorithm.combinable and self.settings.full_object_checksum and objects.profile.full_object_checksum:
            kind = ChecksumType.FULL_OBJECT.value
        else:
            kind = ChecksumType.COMPOSITE.value
        return {"checksum_algorithm": algorithm.value, "checksum_type": kind}

    def _checksum_create_args(self, record: UploadRecord) -> dict[str, Any]:
        algorithm = self.ctx.objects_for(record.endpoint).algorithm(record.checksum_algorithm)
        kind = ChecksumType(record.checksum_type) if record.checksum_type else None
        return {"checksum_algorithm": algorithm, "checksum_type": kind}

    @staticmethod
    def _plan_fields(plan: PartPlan, mode: str, fingerprint: Fingerprint) -> dict[str, object]:
        return {
            **fingerprint.to_record(),
            "part_size": plan.part_size,
            "part_count": plan.count,
            "mode": mode,
        }

    def check_bucket(self, bucket: str, endpoint: str | None) -> None:
        """Refuse (:class:`PermanentStoreError` NoSuchBucket) a bucket the endpoint does not
        have, before anything is created; a bucket seen lately is not asked about again, and one
        the credentials may not list is left for the upload itself to find out about."""
        objects = self.ctx.objects_for(endpoint)
        seen_key = (objects.endpoint.endpoint_url, objects.endpoint.name, bucket)
        seen = _buckets_seen.get(seen_key)
        if seen is not None and time.monotonic() - seen < BUCKET_CHECK_SECONDS:
            return  # a round trip per small upload costs as much as the upload itself
        try:
            objects.head_bucket(bucket)
            _buckets_seen[seen_key] = time.monotonic()
        except PermanentStoreError as exc:
            # Policies that allow PutObject but not ListBucket answer 403 here: let the upload
            # itself find out. A missing bucket is refused now, before anything is created.
            if error_code(exc) == "NoSuchBucket":
                raise

    def _check_key_free(self, bucket: str, key: str, options: ObjectOptions, endpoint: str | None) -> None:
        """A ``no_overwrite`` request for a key that is taken is refused before anything is sent
        (the conditional write on PutObject/Complete still guards against an object that
        appears meanwhile). Only a record-less start checks: a duplicate of a start that
        already stored the object must not be refused by its own object."""
        try:
            self.ctx.objects_for(endpoint).head_object(bucket, key, options)
        except UploaderError:
            return  # 404: free; anything else: let the conditional write decide
        raise UploadConflict(
            f"s3://{bucket}/{key} exists already and the request asked for no_overwrite: nothing was uploaded"
        )

    def _dispatch_lock(self, upload_id: str) -> _Lock:
        return _Lock(self, upload_id)


def authority_over(
    settings: Any, owner: str, what: str, action: str, *, token: str | None, operator: bool
) -> auth.Authority:
    """Who may ``action`` (cancel or resume) ``what`` (an upload, a batch) whose record keeps the
    seal ``owner``: its owner (``token`` opens the seal), an ``operator`` (the message's proof
    made with the fleet key, already verified), or anyone where capabilities are not required.
    Raises :class:`NotAuthorized` otherwise."""
    if operator:
        return auth.Authority.OPERATOR
    if not settings.require_capability:
        return auth.Authority.OPEN
    key = settings.fleet_key_bytes
    if key is not None and owner and auth.token_opens(key, token, owner):
        return auth.Authority.OWNER
    if token is None:
        why = "it carries no capability token"
    elif not owner:
        why = f"the {what.split()[0]} was submitted without a capability, so only operators may"
    else:
        why = f"its capability token is not this {what.split()[0]}'s"
    log.warning("%s: %s refused: %s", what, action, why)
    raise NotAuthorized(
        f"not allowed to {action} {what}: {why}. {action.capitalize()} needs the token "
        "`uploader submit` kept for it, or an operator's UPLOADER_FLEET_KEY"
    )


#: Seconds a bucket seen to exist is not checked again (a deleted bucket then fails the upload
#: at its first request, with the same clear NoSuchBucket reason).
BUCKET_CHECK_SECONDS = 60
_buckets_seen: dict[tuple[str | None, str, str], float] = {}


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

