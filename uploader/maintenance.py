"""Periodic upkeep, run by Celery beat: finish stalled uploads, and clean up abandoned ones.

*Reconcile* resumes uploads that have made no progress for ``stall_seconds``: whatever stopped
them (lost broker messages, a chord that never fires, a completer that died) the resume
dispatches exactly the missing parts that no live worker holds.

*The janitor* aborts the multipart uploads of uploads this system started and abandoned (failed
or cancelled longer than ``abandon_seconds`` ago, or stalled that long) and deletes their
checkpoints. It only ever touches multipart upload ids recorded in its own checkpoints, so
multipart uploads started by anyone else are never aborted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

from uploader.checkpoint import UploadRecord
from uploader.context import UploaderContext
from uploader.coordinator import Coordinator, Dispatch, Dispatcher
from uploader.errors import SourceChanged, SourceError, UploaderError
from uploader.completion import mark_failed

log = logging.getLogger(__name__)

ACTIVE_STATES = ("creating", "uploading", "completing")


def iter_records(ctx: UploaderContext) -> Iterator[UploadRecord]:
    """Every upload in the index whose checkpoint still exists, oldest first (expired ones are
    pruned from the index on the way)."""
    store = ctx.checkpoint
    for upload_id in store.redis.zrange(store.index_key, 0, -1):
        record = store.get(upload_id)
        if record is None:
            store.redis.zrem(store.index_key, upload_id)
        else:
            yield record


def stalled(record: UploadRecord, now: float, stall_seconds: int) -> bool:
    return record.state in ACTIVE_STATES and now - max(record.updated, record.created) > stall_seconds


def reconcile(ctx: UploaderContext, dispatch: Dispatcher, *, now: float | None = None) -> list[Dispatch]:
    """Resume every stalled upload, and every transiently failed one whose ``retry_at`` has
    come; an upload whose source changed or vanished is failed with the reason (it needs a
    person: ``resume --restart`` or cancel)."""
    now = time.time() if now is None else now
    settings = ctx.settings
    coordinator = Coordinator(ctx)
    done = []
    for record in iter_records(ctx):
        if record.retry_pending:
            attempt = ctx.checkpoint.claim_auto_resume(
                record.upload_id, settings.auto_resume_limit, settings.auto_resume_backoff, now=now
            )
            if not attempt:
                continue
            log.warning("reconcile: upload %s failed (%s); automatic resume %d", record.upload_id, record.error, attempt)
        elif not stalled(record, now, settings.stall_seconds):
            continue
        try:
            plan = coordinator.resume(record.upload_id, dispatch)
        except (SourceChanged, SourceError) as exc:
            reason = f"upload cannot continue: {exc}"
            if not mark_failed(ctx, record.upload_id, reason):
                ctx.checkpoint.note_error(record.upload_id, reason)  # failed already: stop resuming it
            continue
        except UploaderError as exc:
            log.warning("reconcile: upload %s: %s", record.upload_id, exc)
            continue
        log.warning("reconcile: upload %s stalled in %s; %s", record.upload_id, record.state, plan.kind)
        done.append(plan)
    return done


@dataclass(frozen=True)
class JanitorAction:
    upload_id: str
    state: str
    bucket: str
    key: str
    mpu_id: str
    reason: str


def janitor_plan(ctx: UploaderContext, *, now: float | None = None) -> list[JanitorAction]:
    """What the janitor would do now (``uploader gc --dry-run`` prints this)."""
    now = time.time() if now is None else now
    limit = ctx.settings.abandon_seconds
    actions = []
    for record in iter_records(ctx):
        age = now - (record.finished or record.updated or record.created)
        if record.retry_pending:
            continue  # the reconciler will resume it; it is not abandoned
        if record.state in ("failed", "cancelled") and age > limit:
            reason = f"{record.state} {age / 3600:.1f} h ago"
        elif record.state in ACTIVE_STATES and now - record.updated > limit:
            reason = f"no progress for {age / 3600:.1f} h"
        else:
            continue
        actions.append(JanitorAction(record.upload_id, record.state, record.bucket, record.key, record.mpu_id, reason))
    return actions


def run_janitor(ctx: UploaderContext, *, dry_run: bool = False, now: float | None = None) -> list[JanitorAction]:
    """Abort the multipart uploads of abandoned uploads and delete their checkpoints."""
    actions = janitor_plan(ctx, now=now)
    if dry_run:
        return actions
    store = ctx.checkpoint
    for action in actions:
        if action.state in ACTIVE_STATES:
            mark_failed(ctx, action.upload_id, f"abandoned by the janitor: {action.reason}")
        if action.mpu_id:
            ctx.objects.abort_multipart_upload(action.bucket, action.key, action.mpu_id)
        store.redis.delete(
            store.record_key(action.upload_id), store.parts_key(action.upload_id), store.inflight_key(action.upload_id)
        )
        store.redis.zrem(store.index_key, action.upload_id)
        log.warning("janitor: removed upload %s (%s)", action.upload_id, action.reason)
    return actions
