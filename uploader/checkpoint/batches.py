"""Directory batches in the checkpoint Redis, next to the uploads they start.

A batch is three keys under the uploads' prefix:

- ``<prefix>:batch:<id>``: a hash, the request (directory, bucket, key prefix, filters, the
  options every upload gets), the listing's position (``page``, ``cursor``: the relative path,
  as a JSON list of components, after which the next page starts), its state (``listing`` ->
  ``listed``, or ``cancelled``) and the counters of what the listing skipped.
- ``<prefix>:batch:<id>:uploads``: a sorted set of the batch's upload ids, scored by the order
  the listing met their files in. Added *before* each upload is started, so a worker that dies
  mid-page leaves no upload the batch does not know (an id without a record yet is pending).
- ``<prefix>:batch:<id>:failures``: a hash, one field per file that never became an upload
  (the listing refused it, or its start was refused): ``{"reason", "kind", "upload_id"}``.

The listing advances one page at a time with a compare-and-set on ``page``
(``lua/advance_batch.lua``), so a page delivered twice is listed twice but counted and continued
once. No key holds a TTL while the listing runs; once it ends (or the batch is cancelled) the
keys expire after the retention period, as a settled upload's record does.
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

from uploader.checkpoint.store import MAX_ERROR_CHARS, CheckpointStore, Refusal


class BatchState(enum.StrEnum):
    """A batch record's ``state``: the listing's, not its uploads' (see ``BatchStatus.state``)."""

    LISTING = "listing"
    LISTED = "listed"
    CANCELLED = "cancelled"


class FailureKind(enum.StrEnum):
    """Why a file of a batch never became an upload."""

    #: The listing refused it (a symbolic link to a directory, a FIFO, a denied place...).
    LISTING = "listing"
    #: Its upload's start was refused (unreadable, outside the roots, invalid key...): resume tries again.
    START = "start"
    #: Its upload failed (only in a status: the upload's record says so; resume resumes it).
    UPLOAD = "upload"


@dataclass(frozen=True)
class FileFailure:
    """A file of a batch that failed: its path relative to the directory, why, how, and its
    upload id (none for a file the listing refused)."""

    path: str
    reason: str
    kind: FailureKind
    upload_id: str = ""


@dataclass(frozen=True)
class BatchRecord:
    batch_id: str
    state: BatchState
    #: The directory as the request named it (an absolute path).
    source: str
    bucket: str
    prefix: str
    #: The request as it was validated (uploader.batch.BatchRequest), to rebuild it.
    request: dict[str, Any]
    owner: str
    page: int
    cursor: tuple[str, ...] | None
    files_skipped: int
    bytes_skipped: int
    created: float
    updated: float

    @classmethod
    def from_hash(cls, batch_id: str, raw: dict[str, str]) -> BatchRecord:
        cursor = raw.get("cursor")
        return cls(
            batch_id=batch_id,
            state=BatchState(raw.get("state", BatchState.LISTING)),
            source=raw.get("source", ""),
            bucket=raw.get("bucket", ""),
            prefix=raw.get("prefix", ""),
            request=json.loads(raw.get("request") or "{}"),
            owner=raw.get("owner", ""),
            page=int(raw.get("page") or 0),
            cursor=tuple(json.loads(cursor)) if cursor else None,
            files_skipped=int(raw.get("files_skipped") or 0),
            bytes_skipped=int(raw.get("bytes_skipped") or 0),
            created=float(raw.get("created") or 0),
            updated=float(raw.get("updated") or 0),
        )


def encode_cursor(cursor: tuple[str, ...] | None) -> str:
    """A cursor as stored: JSON with ``\\u`` escapes, so that names that are not UTF-8 (read by
    Python as lone surrogates) survive the round trip through Redis."""
    return "" if cursor is None else json.dumps(list(cursor), ensure_ascii=True)


class BatchStore:
    """Reads and transitions of batches; built on a :class:`CheckpointStore` (same Redis, same prefix)."""

    #: Upload ids read from the uploads set per round trip.
    CHUNK = 1000

    def __init__(self, checkpoint: CheckpointStore) -> None:
        self.checkpoint = checkpoint
        self.redis = checkpoint.redis
        self.prefix = checkpoint.prefix

    def batch_key(self, batch_id: str) -> str:
        return f"{self.prefix}:batch:{batch_id}"

    def uploads_key(self, batch_id: str) -> str:
        return f"{self.batch_key(batch_id)}:uploads"

    def failures_key(self, batch_id: str) -> str:
        return f"{self.batch_key(batch_id)}:failures"

    def refusal_key(self, batch_id: str) -> str:
        return f"{self.batch_key(batch_id)}:refused"

    def refuse(self, batch_id: str, reason: str, keep_seconds: int, kind: str) -> bool:
        """Note why a batch was refused before anything was created (as for an upload: kept
        ``keep_seconds``, nothing noted if the batch exists)."""
        return bool(self.checkpoint._run(
            "refuse_upload", [self.batch_key(batch_id), self.refusal_key(batch_id)],
            [reason[:MAX_ERROR_CHARS], time.time(), keep_seconds, kind],
        ))

    def refusal(self, batch_id: str) -> Refusal | None:
        return self.checkpoint.refusal_at(self.refusal_key(batch_id))

    def _keys(self, batch_id: str) -> list[str]:
        return [self.batch_key(batch_id), self.uploads_key(batch_id), self.failures_key(batch_id)]

    def create(self, batch_id: str, fields: dict[str, Any]) -> bool:
        """Create the batch record (state ``listing``, page 0); False if it exists already (a
        duplicate ``start_batch``: the first one's listing goes on)."""
        now = time.time()
        key = self.batch_key(batch_id)
        values = {**fields, "state": BatchState.LISTING.value, "page": 0, "cursor": "", "created": now, "updated": now}
        # HSETNX on "state" claims the id; the rest is written only by the claimer.
        if not self.redis.hsetnx(key, "state", BatchState.LISTING.value):
            return False
        self.redis.hset(key, mapping={k: v if isinstance(v, str | int | float) else json.dumps(v) for k, v in values.items()})
        return True

    def get(self, batch_id: str) -> BatchRecord | None:
        raw = cast("dict[str, str]", self.redis.hgetall(self.batch_key(batch_id)))
        return BatchRecord.from_hash(batch_id, raw) if raw.get("source") else None

    def add_uploads(self, batch_id: str, first: int, upload_ids: list[str]) -> None:
        """Note the page's upload ids (scored from ``first``, the listing's order) before they start."""
        if upload_ids:
            self.redis.zadd(self.uploads_key(batch_id), {u: first + i for i, u in enumerate(upload_ids)}, nx=True)

    def note_failures(self, batch_id: str, failures: list[FileFailure]) -> None:
        """Note files that never became uploads (and forget their upload ids in the set)."""
        if not failures:
            return
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.failures_key(batch_id), mapping={
            f.path: json.dumps({"reason": f.reason[:MAX_ERROR_CHARS], "kind": f.kind.value, "upload_id": f.upload_id})
            for f in failures
        })
        dropped = [f.upload_id for f in failures if f.upload_id]
        if dropped:
            pipe.zrem(self.uploads_key(batch_id), *dropped)
        pipe.execute()

    def forget_failures(self, batch_id: str, paths: list[str]) -> None:
        if paths:
            self.redis.hdel(self.failures_key(batch_id), *paths)

    def failures(self, batch_id: str) -> list[FileFailure]:
        raw = cast("dict[str, str]", self.redis.hgetall(self.failures_key(batch_id)))
        out = []
        for path, value in sorted(raw.items()):
            data = json.loads(value)
            out.append(FileFailure(path, data["reason"], FailureKind(data["kind"]), data.get("upload_id", "")))
        return out

    def page_upload_ids(self, batch_id: str, first: int, count: int) -> list[str]:
        """The upload ids noted with scores ``first`` .. ``first + count - 1`` (one page's: see
        :meth:`add_uploads`)."""
        return cast("list[str]", self.redis.zrangebyscore(self.uploads_key(batch_id), first, first + count - 1))

    def upload_ids(self, batch_id: str) -> Iterator[str]:
        """The batch's upload ids in listing order, read :attr:`CHUNK` at a time."""
        start = 0
        while True:
            chunk = cast("list[str]", self.redis.zrangebyscore(self.uploads_key(batch_id), "-inf", "+inf", start=start, num=self.CHUNK))
            yield from chunk
            if len(chunk) < self.CHUNK:
                return
            start += len(chunk)

    def advance(
        self, batch_id: str, page: int, cursor: tuple[str, ...] | None, *, done: bool, skipped: int, bytes_skipped: int,
        retention: int,
    ) -> str:
        """Move the listing past ``page`` (see ``lua/advance_batch.lua``): ``"ok"``, ``"stale"``,
        ``"cancelled"`` or ``"missing"``."""
        return cast("str", self.checkpoint._run(
            "advance_batch", self._keys(batch_id),
            [page, encode_cursor(cursor), "1" if done else "0", skipped, bytes_skipped, time.time(), retention],
        ))

    def cancel(self, batch_id: str, retention: int) -> str:
        """``"cancelled"``, ``"already"`` or ``"missing"`` (see ``lua/cancel_batch.lua``)."""
        return cast("str", self.checkpoint._run("cancel_batch", self._keys(batch_id), [time.time(), retention]))
