"""A batch's aggregate status, as a client reads it from the checkpoint Redis."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any

from uploader.checkpoint.batches import BatchState, BatchStore, FailureKind, FileFailure
from uploader.model import TERMINAL_STATES, UploadState

#: Failures ``status`` lists (the counts cover all of them).
MAX_LISTED_FAILURES = 100


class BatchProgress(enum.StrEnum):
    """Where a batch stands as a whole."""

    #: The workers are still listing the directory.
    LISTING = "listing"
    #: Listed; some uploads are still on their way.
    UPLOADING = "uploading"
    #: Every file is uploaded (or skipped as unchanged).
    COMPLETED = "completed"
    #: Every upload ended, and some files failed (``failures`` lists them).
    FAILED = "failed"
    CANCELLED = "cancelled"
    #: The request was refused before anything was created (``error`` says why).
    REFUSED = "refused"


@dataclass(frozen=True)
class BatchStatus:
    batch_id: str
    state: BatchProgress
    source: str = ""
    bucket: str = ""
    prefix: str = ""
    #: Files the batch took: uploads started, files skipped as unchanged, files that never became uploads.
    files_total: int = 0
    files_done: int = 0
    files_failed: int = 0
    files_skipped: int = 0
    files_cancelled: int = 0
    #: Uploads not ended yet (including ones a listing noted but has not started yet).
    files_active: int = 0
    bytes_total: int = 0
    bytes_done: int = 0
    bytes_skipped: int = 0
    error: str = ""
    #: The failed files (at most :data:`MAX_LISTED_FAILURES`), each with its reason.
    failures: tuple[FileFailure, ...] = field(default=())
    created: float = 0.0
    updated: float = 0.0

    @property
    def terminal(self) -> bool:
        return self.state in {BatchProgress.COMPLETED, BatchProgress.FAILED, BatchProgress.CANCELLED, BatchProgress.REFUSED}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: The record fields the aggregate reads of each upload: a 100,000-file batch's status reads
#: these (HMGET), not 100,000 whole records.
_FIELDS = ("state", "size", "bytes_done", "retry_at", "error", "key")


@dataclass(frozen=True)
class _Upload:
    """What the aggregate needs of one upload's record."""

    state: str
    size: int
    bytes_done: int
    retry_at: float
    error: str
    key: str

    @classmethod
    def of(cls, values: list[str | None]) -> _Upload | None:
        state, size, bytes_done, retry_at, error, key = values
        if state is None:
            return None
        return cls(state, int(size or 0), int(bytes_done or 0), float(retry_at or 0), error or "", key or "")

    @property
    def terminal(self) -> bool:
        """As :attr:`UploadRecord.terminal`: ended, and no automatic resume to come."""
        return self.state in TERMINAL_STATES and not (self.state == UploadState.FAILED and self.retry_at > 0)


def batch_status(store: BatchStore, batch_id: str, completed: dict[str, int] | None = None) -> BatchStatus | None:
    """The batch's aggregate status (its record and what it needs of every upload's, read in
    pipelined chunks), a refused request's reason, or ``None`` (not accepted yet, or unknown).

    ``completed``: the uploads a caller polling the same batch saw completed already, by id, with
    their sizes (filled in here): a completed upload never changes again, so it is not read
    again (a waiter polling a large batch reads only what is still moving)."""
    record = store.get(batch_id)
    if record is None:
        refusal = store.refusal(batch_id)
        if refusal is None:
            return None
        return BatchStatus(batch_id, BatchProgress.REFUSED, error=refusal.reason, created=refusal.at, updated=refusal.at)
    counts = {"done": 0, "failed": 0, "cancelled": 0, "active": 0}
    bytes_total = bytes_done = 0
    problems: list[FileFailure] = []
    ids = list(store.upload_ids(batch_id))
    known = completed if completed is not None else {}
    for size in known.values():
        counts["done"] += 1
        bytes_total += size
        bytes_done += size
    moving = [upload_id for upload_id in ids if upload_id not in known]
    for start in range(0, len(moving), store.CHUNK):
        chunk = moving[start : start + store.CHUNK]
        pipe = store.redis.pipeline(transaction=False)
        for upload_id in chunk:
            pipe.hmget(store.checkpoint.record_key(upload_id), _FIELDS)
        for upload_id, values in zip(chunk, pipe.execute(), strict=True):
            upload = _Upload.of(values)
            if upload is None:
                counts["active"] += 1  # noted by the listing, not started yet
                continue
            bytes_total += upload.size
            if upload.state == UploadState.COMPLETED:
                counts["done"] += 1
                bytes_done += upload.size
                known[upload_id] = upload.size
                continue
            bytes_done += upload.bytes_done
            if not upload.terminal:
                counts["active"] += 1
            elif upload.state == UploadState.CANCELLED:
                counts["cancelled"] += 1
            else:
                counts["failed"] += 1
                problems.append(FileFailure(upload.key.removeprefix(record.prefix), upload.error, FailureKind.UPLOAD, upload_id))
    noted = store.failures(batch_id)
    problems += noted
    failed = counts["failed"] + len(noted)
    if record.state is BatchState.CANCELLED:
        state = BatchProgress.CANCELLED
    elif record.state is BatchState.LISTING:
        state = BatchProgress.LISTING
    elif counts["active"]:
        state = BatchProgress.UPLOADING
    else:
        state = BatchProgress.FAILED if failed or counts["cancelled"] else BatchProgress.COMPLETED
    return BatchStatus(
        batch_id=batch_id, state=state, source=record.source, bucket=record.bucket, prefix=record.prefix,
        files_total=len(ids) + len(noted) + record.files_skipped, files_done=counts["done"], files_failed=failed,
        files_skipped=record.files_skipped, files_cancelled=counts["cancelled"], files_active=counts["active"],
        bytes_total=bytes_total, bytes_done=bytes_done, bytes_skipped=record.bytes_skipped,
        failures=tuple(problems[:MAX_LISTED_FAILURES]), created=record.created, updated=record.updated,
    )
