"""Recovery without an operator: the reconciler and the janitor, run by the workers themselves.

Every worker process runs a :class:`RecoveryLoop`; a leader lease in Redis lets exactly one of
them act at a time across the fleet, and another takes over within seconds of the leader's death
(``UPLOADER_LEADER_LEASE_SECONDS``). So a fleet of plain ``uploader worker`` processes recovers
by itself, in any deployment, and ``status`` shows when recovery last ran.

*Reconcile* (every ``reconcile_interval`` seconds):

- takes back the part leases of uploading uploads whose holder died (a killed or restarted
  worker incarnation) or whose time limit passed (a task hung in a read), and sends those parts
  again: within the heartbeat TTL plus one interval of the death, whatever the node names;
- resumes uploads that made no progress for ``stall_seconds`` (lost broker messages, a chord
  that never fires, a completer that died): the resume dispatches exactly the missing parts no
  live worker holds;
- resumes uploads that failed for a transient reason once their ``retry_at`` has come.

It reads only the uploads in recovery's *attention index* (``<prefix>:active``, kept in step
with the records by the checkpoint's transition scripts): its cost grows with the uploads that
need attention, not with the finished ones kept for the retention period. After each run the
leader deletes the Celery chord keys of the uploads that settled since (:func:`release_settled`),
so that a cancelled or failed upload's chord counters and stashed part results go with it
instead of waiting for their expiry. The first run after an upgrade indexes the records written
before the index existed (:func:`sweep_index`, a walk of every record in batches), and each
janitor run repeats that walk, for records written meanwhile by workers of an older version.

*The janitor* (every ``janitor_interval`` seconds) aborts the multipart uploads of uploads this
system started and abandoned (failed or cancelled longer than ``abandon_seconds`` ago, or stalled
that long) and deletes their checkpoints. It only ever touches multipart upload ids recorded in
its own checkpoints, so multipart uploads started by anyone else are never aborted.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import cast

import redis

from uploader import metrics
from uploader.checkpoint import UploadRecord
from uploader.completion import mark_failed
from uploader.context import UploaderContext
from uploader.coordinator import Coordinator, Dispatch, Dispatcher
from uploader.errors import SourceChanged, SourceError, UploaderError
from uploader.model import ACTIVE_STATES, DispatchKind, ObjectOptions, UploadState

log = logging.getLogger(__name__)

#: The leader role's name (``<prefix>:leader:recovery``).
RECOVERY_ROLE = "recovery"
#: Upload records read per Redis round trip while scanning an index.
SCAN_BATCH = 500
#: Settled uploads whose chords are deleted per round trip (see :func:`release_settled`).
SETTLED_BATCH = 100

#: Deletes the keys of Celery chords (by group id) from the result backend: see ``workers/chords.py``.
ChordForgetter = Callable[[list[str]], None]

_SUMMARY_FIELDS = ("state", "created", "updated", "finished", "retry_at", "throttled")


@dataclass(frozen=True)
class UploadSummary:
    """The few fields of a record that decide whether recovery has anything to do with it."""

    upload_id: str
    state: UploadState
    created: float
    updated: float
    finished: float | None
    retry_at: float | None
    #: When one of the upload's limits last held a part back (0: never; see UploadRecord.throttled).
    throttled: float = 0.0

    @property
    def retry_pending(self) -> bool:
        return self.state == UploadState.FAILED and self.retry_at is not None

    @property
    def needs_attention(self) -> bool:
        """Whether it belongs in the attention index (the rule ``track_attention`` applies)."""
        return self.state in ACTIVE_STATES or self.retry_pending

    def stalled(self, now: float, stall_seconds: float) -> bool:
        return is_stalled(self.state, now, stall_seconds, self.created, self.updated, self.throttled)


def _summaries(ctx: UploaderContext, ids: list[str]) -> list[tuple[str, UploadSummary | None]]:
    """The summaries of these uploads, in one round trip (``None``: the record is gone)."""
    store = ctx.checkpoint
    pipe = store.redis.pipeline(transaction=False)
    for upload_id in ids:
        pipe.hmget(store.record_key(upload_id), _SUMMARY_FIELDS)
    out: list[tuple[str, UploadSummary | None]] = []
    for upload_id, values in zip(ids, pipe.execute(), strict=True):
        state, created, updated, finished, retry_at, throttled = values
        if state is None:
            out.append((upload_id, None))
            continue
        out.append((upload_id, UploadSummary(
            upload_id, UploadState(state), float(created or 0), float(updated or 0),
            float(finished) if finished else None, (float(retry_at) or None) if retry_at else None,
            float(throttled or 0),
        )))
    return out


def scan_uploads(ctx: UploaderContext, *, created_before: float | None = None) -> Iterator[UploadSummary]:
    """Every upload in the index whose checkpoint still exists (only those created before
    ``created_before``, if given), oldest first, read :data:`SCAN_BATCH` at a time in one round
    trip each (expired ones are pruned from the index). This walks the records kept for the
    retention period: for the janitor and :func:`sweep_index`, never for the reconciler."""
    store = ctx.checkpoint
    upper = "+inf" if created_before is None else f"({created_before}"
    start = 0
    while True:
        # Text: the store's client decodes responses (redis-py's types do not follow that).
        ids = cast("list[str]", store.redis.zrangebyscore(store.index_key, "-inf", upper, start=start, num=SCAN_BATCH))
        if not ids:
            return
        gone = []
        for upload_id, summary in _summaries(ctx, ids):
            if summary is None:
                gone.append(upload_id)
            else:
                yield summary
        if gone:
            store.redis.zrem(store.index_key, *gone)
        start += len(ids) - len(gone)
        if len(ids) < SCAN_BATCH:
            return


def scan_active(ctx: UploaderContext) -> Iterator[UploadSummary]:
    """The uploads in recovery's attention index, oldest first: what the reconciler reads. An
    entry whose record no longer needs attention (the record expired, or a worker of an older
    version changed it) is repaired (:meth:`~uploader.checkpoint.CheckpointStore.index_uploads`,
    atomic with the record) and skipped."""
    store = ctx.checkpoint
    ids = store.active_ids()
    for first in range(0, len(ids), SCAN_BATCH):
        settled = []
        for upload_id, summary in _summaries(ctx, ids[first:first + SCAN_BATCH]):
            if summary is None or not summary.needs_attention:
                settled.append(upload_id)
            else:
                yield summary
        if settled:
            store.index_uploads(settled)


def sweep_index(ctx: UploaderContext) -> int:
    """Walk every record (:func:`scan_uploads`) and put those that need attention in the
    attention index: the one-time migration of records written before it existed, and a catch-up
    for records changed by workers of an older version during a rolling upgrade. Returns how
    many uploads need attention."""
    pending: list[str] = []
    count = 0
    for summary in scan_uploads(ctx):
        if summary.needs_attention:
            pending.append(summary.upload_id)
        if len(pending) >= SCAN_BATCH:
            count += ctx.checkpoint.index_uploads(pending)
            pending = []
    return count + ctx.checkpoint.index_uploads(pending)


def iter_records(ctx: UploaderContext) -> Iterator[UploadRecord]:
    """Every upload in the index whose checkpoint still exists, as full records, oldest first."""
    for summary in scan_uploads(ctx):
        record = ctx.checkpoint.get(summary.upload_id)
        if record is not None:
            yield record


def stalled(record: UploadRecord, now: float, stall_seconds: int) -> bool:
    return is_stalled(record.state, now, stall_seconds, record.created, record.updated, record.throttled)


def is_stalled(state: str, now: float, stall_seconds: float, *signs_of_life: float) -> bool:
    """Whether an active upload showed no sign of life for ``stall_seconds``: no part recorded
    (``updated``) since its creation, and no part held back by one of its limits (``throttled``:
    a part waiting for a place under ``max_concurrency`` comes back by itself, one paced by
    ``max_bandwidth`` is being sent; a resume would only send them a second time)."""
    return state in ACTIVE_STATES and now - max(signs_of_life) > stall_seconds


#: Puts back the messages held by dead worker incarnations (those not in the live set, first
#: seen more than the grace seconds ago); returns how many per incarnation (workers/transport.py).
MessageRestorer = Callable[[set[str], float], dict[str, int]]


@dataclass
class ReconcileReport:
    """What one reconcile run did: parts taken back from dead or hung holders and sent again,
    by upload, and the resumes it dispatched."""

    reclaimed: dict[str, tuple[int, ...]] = field(default_factory=dict)
    resumed: list[Dispatch] = field(default_factory=list)
    #: The uploads that needed attention, by state (``failed``: a resume to come), and how many
    #: of them were stalled, as this run found them (for the fleet's metrics).
    states: Counter[str] = field(default_factory=Counter)
    stalled: int = 0

    @property
    def upload_ids(self) -> list[str]:
        return sorted(set(self.reclaimed) | {plan.upload_id for plan in self.resumed})


def reconcile(
    ctx: UploaderContext,
    dispatch: Dispatcher,
    *,
    now: float | None = None,
    keep_going: Callable[[], bool] = lambda: True,
) -> ReconcileReport:
    """Send again the parts dead or hung holders leased, resume every stalled upload and every
    transiently failed one whose ``retry_at`` has come; an upload whose source changed or vanished
    is failed with the reason (it needs a person: ``resume --restart`` or cancel).
    ``keep_going`` is asked before each action (the leader stops when it lost its lease)."""
    now = time.time() if now is None else now
    settings = ctx.settings
    store = ctx.checkpoint
    coordinator = Coordinator(ctx)
    report = ReconcileReport()
    for upload in scan_active(ctx):
        report.states[str(upload.state)] += 1
        if upload.state in ACTIVE_STATES and upload.stalled(now, settings.stall_seconds):
            report.stalled += 1
        if upload.state == UploadState.UPLOADING and not upload.stalled(now, settings.stall_seconds):
            generation, parts = store.reclaim_parts(upload.upload_id, now=now)
            if parts:
                if not keep_going():
                    return report
                log.warning(
                    "reconcile: upload %s: %d part leases held by dead or hung workers; sending parts %s again",
                    upload.upload_id, len(parts), parts[:20],
                )
                dispatch(Dispatch(upload.upload_id, DispatchKind.RESEND, tuple(parts), generation))
                report.reclaimed[upload.upload_id] = tuple(parts)
            continue
        if upload.retry_pending:
            attempt = store.claim_auto_resume(
                upload.upload_id, settings.auto_resume_limit, settings.auto_resume_backoff, now=now
            )
            if not attempt:
                continue
            log.warning("reconcile: upload %s failed earlier; automatic resume %d", upload.upload_id, attempt)
        elif not upload.stalled(now, settings.stall_seconds):
            continue
        if not keep_going():
            return report
        try:
            plan = coordinator.resume(upload.upload_id, dispatch)
        except (SourceChanged, SourceError) as exc:
            reason = f"upload cannot continue: {exc}"
            if not mark_failed(ctx, upload.upload_id, reason):
                store.note_error(upload.upload_id, reason)  # failed already: stop resuming it
            continue
        except UploaderError as exc:
            log.warning("reconcile: upload %s: %s", upload.upload_id, exc)
            continue
        log.warning("reconcile: upload %s stalled in %s; %s", upload.upload_id, upload.state, plan.kind)
        report.resumed.append(plan)
    return report


@dataclass(frozen=True)
class JanitorAction:
    upload_id: str
    state: UploadState
    bucket: str
    key: str
    mpu_id: str
    reason: str
    #: The named endpoint the multipart upload lives on ("" : the default one).
    endpoint: str = ""
    #: The upload's object options (a Requester Pays bucket's abort needs its RequestPayer).
    options: ObjectOptions = field(default_factory=ObjectOptions)

    def to_dict(self) -> dict[str, str]:
        """What the janitor task returns and ``uploader gc`` shows of the action (JSON)."""
        return {
            "upload_id": self.upload_id, "state": self.state, "bucket": self.bucket, "key": self.key,
            "mpu_id": self.mpu_id, "reason": self.reason, "endpoint": self.endpoint,
        }


def janitor_plan(ctx: UploaderContext, *, now: float | None = None) -> list[JanitorAction]:
    """What the janitor would do now (``uploader gc --dry-run`` prints this)."""
    now = time.time() if now is None else now
    limit = ctx.settings.abandon_seconds
    actions = []
    # An upload abandoned for longer than the limit was created before it: older records only.
    for upload in scan_uploads(ctx, created_before=now - limit):
        age = now - (upload.finished or upload.updated or upload.created)
        if upload.retry_pending:
            continue  # the reconciler will resume it; it is not abandoned
        if upload.state in (UploadState.FAILED, UploadState.CANCELLED) and age > limit:
            reason = f"{upload.state} {age / 3600:.1f} h ago"
        elif upload.state in ACTIVE_STATES and now - upload.updated > limit:
            reason = f"no progress for {age / 3600:.1f} h"
        else:
            continue
        record = ctx.checkpoint.get(upload.upload_id)
        if record is not None:
            actions.append(JanitorAction(
                record.upload_id, record.state, record.bucket, record.key, record.mpu_id, reason, record.endpoint, record.options
            ))
    return actions


def run_janitor(
    ctx: UploaderContext, *, dry_run: bool = False, now: float | None = None, forget_chords: ChordForgetter | None = None
) -> list[JanitorAction]:
    """Abort the multipart uploads of abandoned uploads and delete their checkpoints (and, given
    ``forget_chords``, their chords' keys in the result backend: :func:`release_settled`)."""
    actions = janitor_plan(ctx, now=now)
    if dry_run:
        return actions
    store = ctx.checkpoint
    for action in actions:
        if action.state in ACTIVE_STATES:
            mark_failed(ctx, action.upload_id, f"abandoned by the janitor: {action.reason}")
        if action.mpu_id:
            ctx.objects_for(action.endpoint).abort_multipart_upload(action.bucket, action.key, action.mpu_id, action.options)
        store.forget(action.upload_id)
        log.warning("janitor: removed upload %s (%s)", action.upload_id, action.reason)
    if actions and forget_chords is not None:
        try:
            release_settled(ctx, forget_chords)
        except (redis.RedisError, OSError) as exc:  # the recovery leader tries again at its next run
            log.warning("janitor: chord keys of removed uploads not deleted yet: %s", exc)
    return actions


def release_settled(
    ctx: UploaderContext, forget_chords: ChordForgetter, *, keep_going: Callable[[], bool] = lambda: True
) -> int:
    """Delete the chord keys of the uploads that settled (completed, cancelled, failed for good,
    forgotten) since the last call, :data:`SETTLED_BATCH` uploads per round trip; returns how
    many uploads. A chord of a settled upload is never needed again: its upload cannot complete
    through it, and a resume dispatches a chord of its own."""
    store = ctx.checkpoint
    released = 0
    while keep_going():
        batch = store.take_settled(SETTLED_BATCH)
        if not batch:
            break
        forget_chords([group_id for _, group_ids in batch for group_id in group_ids])
        for upload_id, group_ids in batch:
            store.release_chords(upload_id, group_ids)
        released += len(batch)
        if len(batch) < SETTLED_BATCH:
            break
    return released


class RecoveryLoop(threading.Thread):
    """Runs in every worker process: takes (or renews) the fleet's recovery leader lease every
    few seconds, and while it holds the lease runs :func:`reconcile` every ``reconcile_interval``
    and :func:`run_janitor` every ``janitor_interval`` (the times of the last runs are kept in
    Redis, so a new leader keeps the cadence). Errors are logged, never fatal to the worker."""

    def __init__(
        self, ctx: UploaderContext, holder: str, dispatch: Dispatcher, forget_chords: ChordForgetter | None = None,
        restore_messages: MessageRestorer | None = None,
    ) -> None:
        super().__init__(name="uploader-recovery", daemon=True)
        self.ctx = ctx
        self.holder = holder
        self.dispatch = dispatch
        self.forget_chords = forget_chords
        self.restore_messages = restore_messages
        settings = ctx.settings
        self.lease_seconds = settings.leader_lease_seconds
        self.tick_seconds = min(self.lease_seconds / 3, settings.reconcile_interval)
        self.leading = False
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(self.tick_seconds):
            try:
                self.tick()
            except (redis.RedisError, OSError) as exc:  # Redis away: try again at the next tick
                log.warning("recovery: %s", exc)
            except Exception:  # a bug must not end recovery for the whole fleet
                log.exception("recovery: unexpected error")

    def keep_leading(self) -> bool:
        """Take or renew the lease; whether this process leads now."""
        store = self.ctx.checkpoint
        leading = store.claim_leadership(RECOVERY_ROLE, self.holder, self.lease_seconds)
        if leading != self.leading:
            log.info("recovery: %s %s leading", self.holder, "is now" if leading else "stopped")
            self.leading = leading
        return leading

    def tick(self, *, now: float | None = None) -> None:
        """One step: lead or not; if leading, run whatever is due."""
        if not self.keep_leading():
            return
        now = time.time() if now is None else now
        settings = self.ctx.settings
        store = self.ctx.checkpoint
        last = store.recovery()
        if last.indexed_at is None:
            # The first leader since the attention index exists: index the records written before.
            indexed = sweep_index(self.ctx)
            store.note_recovery(indexed_at=now)
            log.info("recovery: attention index built; %d uploads need attention", indexed)
        # A little early rather than a tick late: the ticks do not line up with the interval.
        if last.reconciled_at is None or now - last.reconciled_at >= settings.reconcile_interval - self.tick_seconds / 2:
            if self.restore_messages is not None:
                self._restore_dead_holders_messages()
            report = reconcile(self.ctx, self.dispatch, now=now, keep_going=self.keep_leading)
            reclaimed = sum(len(p) for p in report.reclaimed.values())
            store.note_recovery(
                leader=self.holder, reconciled_at=now, reclaimed=reclaimed, resumed=len(report.resumed),
                states=json.dumps(report.states), stalled=report.stalled,
            )
            metrics.recovery_ran(reclaimed, len(report.resumed))
            if self.forget_chords is not None:
                try:
                    release_settled(self.ctx, self.forget_chords, keep_going=self.keep_leading)
                except (redis.RedisError, OSError) as exc:  # e.g. the result backend away: next run
                    log.warning("recovery: chord keys of settled uploads not deleted yet: %s", exc)
        if last.janitor_at is None:
            # A new deployment: the janitor's first run comes one interval from now (as a
            # scheduler's would), not at the first worker's start.
            store.note_recovery(janitor_at=now)
        elif now - last.janitor_at >= settings.janitor_interval:
            run_janitor(self.ctx, now=now, forget_chords=self.forget_chords)
            sweep_index(self.ctx)
            store.note_recovery(leader=self.holder, janitor_at=now, indexed_at=now)

    def _restore_dead_holders_messages(self) -> None:
        """The messages dead worker incarnations had received but not finished, back on their
        queues now rather than after the broker's visibility timeout (workers/transport.py);
        and the versions those incarnations noted, forgotten."""
        assert self.restore_messages is not None
        # Two heartbeats of grace: a worker that just started may hold messages before its
        # first beat is seen.
        grace = 2 * self.ctx.settings.worker_heartbeat_seconds
        try:
            live = set(self.ctx.checkpoint.live_workers())
            self.ctx.checkpoint.forget_worker_versions(live)
            restored = self.restore_messages(live, grace)
        except Exception as exc:  # noqa: BLE001  (the broker away: the next run tries again)
            log.warning("recovery: messages of dead workers not restored yet: %s", exc)
            return
        for name, count in restored.items():
            log.warning("recovery: %d messages held by dead worker %s put back on their queues", count, name)

    def stop(self) -> None:
        """Stop, and hand the lease on at once (a clean shutdown)."""
        self._stopped.set()
        if self.leading:
            try:
                self.ctx.checkpoint.resign_leadership(RECOVERY_ROLE, self.holder)
            except (redis.RedisError, OSError) as exc:
                log.warning("recovery: could not resign: %s", exc)
