"""The workers' side of a batch: start it, list its pages and start their files, cancel, resume."""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uploader import locality
from uploader.batch.request import (
    FINGERPRINT_METADATA,
    MAX_PAGE_SIZE,
    BatchRequest,
    file_upload_id,
    parse_batch_request,
    shown_path,
)
from uploader.checkpoint.batches import BatchRecord, BatchState, BatchStore, FailureKind, FileFailure
from uploader.context import UploaderContext
from uploader.coordinator import Coordinator, Dispatcher, PutGroup, authority_over
from uploader.errors import (
    InvalidRequest,
    NoWorkerOnHost,
    PermanentStoreError,
    SourceError,
    UploadConflict,
    UploaderError,
    UploadNotFound,
)
from uploader.model import UploadState
from uploader.request import check_upload_id, parse_request, valid_upload_id
from uploader.sources.directory import ListedFile, list_page, locate_directory

log = logging.getLogger(__name__)

#: How far the listing runs ahead of the uploads: page ``p`` is listed (and its files started)
#: once at least half of the uploads of page ``p - lag`` are finished, ``lag`` being the pages
#: that hold :data:`AHEAD_FILES` files (one page of 500, the default, or more). So about that
#: many files, and at least a page and a half, wait in the queues: files queued for long would
#: look stalled to the reconciler (``UPLOADER_STALL_SECONDS``) and be sent twice, and a
#: listing far ahead of the uploads buys nothing.
AHEAD_FILES = 512

#: Sends small uploads' ``put_objects`` groups (the workers' ``workers.tasks.send_groups``).
GroupSender = Callable[[list[PutGroup]], None]


class PageVerdict(enum.StrEnum):
    #: Listed, started, and moved on: the next page is to be sent.
    MORE = "more"
    #: Not listed yet: the listing is as far ahead of the uploads as it goes (see
    #: :data:`AHEAD_FILES`); the page is to be asked for again in a moment.
    WAIT = "wait"
    #: The listing ended with this page.
    DONE = "done"
    #: Another delivery of the page moved on already, or the batch is gone or cancelled.
    STALE = "stale"


@dataclass(frozen=True)
class PageOutcome:
    verdict: PageVerdict
    page: int
    started: int = 0
    skipped: int = 0
    failed: int = 0
    #: A host-local batch's host, whose workers list its next page ("" : any worker's).
    host: str = ""


class Batches:
    """The batch protocol on a worker: start, list a page, cancel, resume. ``dispatch`` is the
    coordinator's (the Celery tasks pass the one that sends)."""

    def __init__(self, ctx: UploaderContext) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.store = BatchStore(ctx.checkpoint)
        self.coordinator = Coordinator(ctx)

    def parse(self, kwargs: dict[str, Any]) -> BatchRequest:
        """The ``uploader.start_batch`` request in ``kwargs``; a refusal raises, and is noted
        under the batch id (``status`` says why) when it has one."""
        try:
            return parse_batch_request(kwargs)
        except InvalidRequest as exc:
            batch_id = kwargs.get("batch_id")
            if isinstance(batch_id, str) and valid_upload_id(batch_id):
                self._refuse(batch_id, exc)
            raise

    def must_forward(self, request: BatchRequest) -> bool:
        """Whether a host-local batch must be handled by the workers of its host, not this one's;
        :class:`NoWorkerOnHost` (noted under the batch id) if none of them is alive."""
        host = request.local_host
        if not self.coordinator.on_other_host(host):
            return False
        try:
            locality.require_worker(self.ctx.checkpoint, host)
        except NoWorkerOnHost as refusal:
            assert request.batch_id is not None
            self._refuse(request.batch_id, refusal)
            raise
        return True

    def start(self, request: BatchRequest) -> str:
        """Handle ``uploader.start_batch`` (its request :meth:`parse` d): check the directory
        and the bucket, create the record. Returns the batch id; the caller sends its first page
        (page 0). A refusal raises, and is noted under the batch id."""
        assert request.batch_id is not None
        try:
            locate_directory(request.source, self.settings.source_roots)
            endpoint = request.options.get("endpoint")
            self.coordinator.check_bucket(request.bucket, endpoint)
        except (SourceError, InvalidRequest, PermanentStoreError) as exc:
            self._refuse(request.batch_id, exc)
            raise
        fields = {
            "source": request.source, "bucket": request.bucket, "prefix": request.prefix,
            "request": request.model_dump(mode="json"),
            "owner": self.coordinator.owner_seal_of(request.capability),
        }
        if not self.store.create(request.batch_id, fields):
            existing = self.store.get(request.batch_id)
            if existing is not None and existing.owner != fields["owner"]:
                raise UploadConflict(f"batch id {request.batch_id!r} is already used by another submission")
        return request.batch_id

    def _refuse(self, batch_id: str, exc: UploaderError) -> None:
        log.warning("batch %s refused: %s", batch_id, exc)
        self.store.refuse(batch_id, f"refused: {exc}", self.settings.refusal_retention_seconds, type(exc).__name__)

    def list_page(self, batch_id: str, page: int, dispatch: Dispatcher, send_groups: GroupSender) -> PageOutcome:
        """List page ``page`` of the batch after its cursor, start its files, and move the
        listing on (once, whatever the deliveries of this page); or :attr:`PageVerdict.WAIT`
        while an earlier page's uploads are mostly still on their way (:data:`AHEAD_FILES`)."""
        record = self.store.get(batch_id)
        if record is None or record.state is not BatchState.LISTING or record.page != page:
            return PageOutcome(PageVerdict.STALE, page)
        request = BatchRequest.model_validate(record.request)
        lag = max(1, -(-AHEAD_FILES // request.page_size))
        if page >= lag and self._pending(batch_id, page - lag, request.page_size) > request.page_size // 2:
            return PageOutcome(PageVerdict.WAIT, page)
        try:
            located = locate_directory(request.source, self.settings.source_roots)
            listing = list_page(located, request.source, record.cursor, request.page_size, request.selector)
        except SourceError as exc:
            # The directory went away (or out of the roots) mid-listing: the batch lists no more.
            self.store.note_failures(batch_id, [FileFailure(".", str(exc), FailureKind.LISTING)])
            self.store.advance(
                batch_id, page, record.cursor, done=True, skipped=0, bytes_skipped=0, retention=self.settings.retention_seconds,
            )
            return PageOutcome(PageVerdict.DONE, page, failed=1)
        failures = [FileFailure(shown_path(r.relative), r.reason, FailureKind.LISTING) for r in listing.refused]
        files = listing.files
        skipped: list[ListedFile] = []
        if request.skip_unchanged:
            files, skipped = self._unchanged(request, files)
        first = page * MAX_PAGE_SIZE  # scores in listing order: a page never holds more
        started, refused = start_page(self, record, request, located.path, files, first, dispatch, send_groups)
        self.store.note_failures(batch_id, failures + refused)
        outcome = self.store.advance(
            batch_id, page, listing.cursor if listing.cursor is not None else record.cursor, done=listing.done,
            skipped=len(skipped), bytes_skipped=sum(f.size for f in skipped), retention=self.settings.retention_seconds,
        )
        if outcome == "cancelled":
            # Cancelled while this page was starting its uploads: they go the way of the others.
            self._cancel_uploads(started)
        if outcome != "ok":
            return PageOutcome(PageVerdict.STALE, page)
        verdict = PageVerdict.DONE if listing.done else PageVerdict.MORE
        return PageOutcome(verdict, page, len(started), len(skipped), len(failures) + len(refused), request.local_host)

    def _pending(self, batch_id: str, page: int, page_size: int) -> int:
        """How many uploads of ``page`` are not finished yet."""
        ids = self.store.page_upload_ids(batch_id, page * MAX_PAGE_SIZE, page_size)
        return sum(1 for r in self.ctx.checkpoint.get_many(ids) if r is not None and not r.terminal)

    def _unchanged(self, request: BatchRequest, files: list[ListedFile]) -> tuple[list[ListedFile], list[ListedFile]]:
        """``files`` split into those to upload and those whose object matches already."""
        objects = self.ctx.objects_for(request.options.get("endpoint"))
        # What HeadObject needs of the uploads' options (an SSE-C key, the payer, the owner check).
        options = parse_request(request.upload_request(request.source, "x", "sample", "0-0")).options
        upload: list[ListedFile] = []
        skip: list[ListedFile] = []
        for f in files:
            try:
                head = objects.head_object(request.bucket, request.prefix + f.relative, options)
            except UploaderError:
                upload.append(f)  # absent (or not readable to us): upload it
                continue
            metadata = {k.lower(): v for k, v in (head.get("Metadata") or {}).items()}
            same = head.get("ContentLength") == f.size and metadata.get(FINGERPRINT_METADATA) == fingerprint_of(f)
            (skip if same else upload).append(f)
        return upload, skip

    # -- cancel and resume -----------------------------------------------------------------------
    def authorize(self, batch_id: str, action: str, *, token: str | None, operator: bool) -> None:
        record = self._get(batch_id)
        authority_over(self.settings, record.owner, f"batch {batch_id}", action, token=token, operator=operator)

    def cancel(self, batch_id: str) -> dict[str, Any]:
        """Stop the listing and cancel every upload of the batch not completed yet."""
        self._get(batch_id)
        outcome = self.store.cancel(batch_id, self.settings.retention_seconds)
        cancelled = self._cancel_uploads(self.store.upload_ids(batch_id))
        return {"batch_id": batch_id, "outcome": outcome, "uploads_cancelled": cancelled}

    def _cancel_uploads(self, upload_ids: Iterable[str]) -> int:
        count = 0
        for upload_id in upload_ids:
            try:
                if self.coordinator.cancel(upload_id) == "cancelled":
                    count += 1
            except (UploadConflict, UploadNotFound):
                continue  # completed already, or refused
        return count

    def resume(
        self, batch_id: str, dispatch: Dispatcher, send_groups: GroupSender, send_page: Callable[[str, int, str], None],
    ) -> dict[str, Any]:
        """Resume the batch's failed uploads, start again the files whose start was refused, and
        send its listing's page again (a duplicate of a live page is a no-op). A cancelled batch
        is not resumed (submit the directory again, with ``skip_unchanged``)."""
        record = self._get(batch_id)
        if record.state is BatchState.CANCELLED:
            raise UploadConflict(f"batch {batch_id} was cancelled; submit it again (with --skip-unchanged) instead")
        resumed = 0
        for upload_id in self.store.upload_ids(batch_id):
            upload = self.ctx.checkpoint.get(upload_id)
            if upload is not None and upload.state == UploadState.FAILED:
                try:
                    self.coordinator.resume(upload_id, dispatch)
                    resumed += 1
                except UploaderError as exc:
                    log.warning("batch %s: upload %s not resumed: %s", batch_id, upload_id, exc)
        request = BatchRequest.model_validate(record.request)
        retried = [f for f in self.store.failures(batch_id) if f.kind is FailureKind.START]
        restarted = 0
        if retried:
            located = locate_directory(request.source, self.settings.source_roots)
            again = []
            for failure in retried:
                # Its size and time now (the fingerprint metadata must be the file's as started).
                try:
                    st = (located.path / failure.path).stat()
                except OSError:
                    continue
                again.append(ListedFile(tuple(failure.path.split("/")), st.st_size, st.st_mtime_ns))
            # (A file gone since keeps its failure.)
            self.store.forget_failures(batch_id, [f.relative for f in again])
            started, refused = start_page(self, record, request, located.path, again, 0, dispatch, send_groups)
            self.store.note_failures(batch_id, refused)
            restarted = len(started)
        if record.state is BatchState.LISTING:
            send_page(batch_id, record.page, request.local_host)
        return {"batch_id": batch_id, "uploads_resumed": resumed, "files_restarted": restarted,
                "listing": record.state.value}

    def request_of(self, batch_id: str) -> BatchRequest:
        """The request batch ``batch_id`` was started with (:class:`UploadNotFound` if none)."""
        return BatchRequest.model_validate(self._get(batch_id).request)

    def _get(self, batch_id: str) -> BatchRecord:
        check_upload_id(batch_id)
        record = self.store.get(batch_id)
        if record is None:
            raise UploadNotFound(f"no batch {batch_id!r} (never submitted, refused, or expired)")
        return record


def fingerprint_of(f: ListedFile) -> str:
    return f"{f.size}-{f.mtime_ns}"


def start_page(
    batches: Batches, record: BatchRecord, request: BatchRequest, directory: Path, files: list[ListedFile], first: int,
    dispatch: Dispatcher, send_groups: GroupSender,
) -> tuple[list[str], list[FileFailure]]:
    """Start one upload per file of a page: THE place a batch turns files into uploads, as one
    ``start_many`` on this worker (no message per file: records created a chunk at a time in one
    round trip, small files sent in ``put_objects`` groups through ``send_groups``, larger ones
    dispatched as usual). Returns the upload ids started and the files whose start was refused.

    The ids are noted in the batch first (see :mod:`uploader.checkpoint.batches`)."""
    ids = [file_upload_id(record.batch_id, f.relative) for f in files]
    batches.store.add_uploads(record.batch_id, first, ids)
    requests = [
        request.upload_request(str(directory / f.relative), f.relative, upload_id, fingerprint_of(f))
        for f, upload_id in zip(files, ids, strict=True)
    ]
    started, refused = [], []
    outcomes = batches.coordinator.start_many(requests, dispatch, send_groups)
    for f, upload_id, outcome in zip(files, ids, outcomes, strict=True):
        if outcome.error:
            refused.append(FileFailure(shown_path(f.relative), outcome.error, FailureKind.START, upload_id))
        else:
            started.append(upload_id)
    return started, refused
