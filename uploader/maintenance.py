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

*The janitor* (every ``janitor_interval`` seconds) aborts the multipart uploads of uploads this
system started and abandoned (failed or cancelled longer than ``abandon_seconds`` ago, or stalled
that long) and deletes their checkpoints. It only ever touches multipart upload ids recorded in
its own checkpoints, so multipart uploads started by anyone else are never aborted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import redis

from uploader.checkpoint import UploadRecord
from uploader.context import UploaderContext
from uploader.coordinator import Coordinator, Dispatch, Dispatcher
from uploader.errors import SourceChanged, SourceError, UploaderError
from uploader.completion import mark_failed

log = logging.getLogger(__name__)

ACTIVE_STATES = ("creating", "uploading", "completing")
#: The leader role's name (``<prefix>:leader:recovery``).
RECOVERY_ROLE = "recovery"
#: Upload records read per Redis round trip while scanning the index.
SCAN_BATCH = 500

_SUMMARY_FIELDS = ("state", "created", "updated", "finished", "retry_at")


@dataclass(frozen=True)
class UploadSummary:
    """The few fields of a record that decide whether recovery has anything to do with it."""

    upload_id: str
    state: str
    created: float
    updated: float
    finished: float | None
    retry_at: float | None

    @property
    def retry_pending(self) -> bool:
        return self.state == "failed" and self.retry_at is not None

    def stalled(self, now: float, stall_seconds: float) -> bool:
        return self.state in ACTIVE_STATES and now - max(self.updated, self.created) > stall_seconds


def scan_uploads(ctx: UploaderContext) -> Iterator[UploadSummary]:
    """Every upload in the index whose checkpoint still exists, oldest first, read
    :data:`SCAN_BATCH` at a time in one round trip each (expired ones are pruned from the index)."""
    store = ctx.checkpoint
    start = 0
    while True:
        ids = store.redis.zrange(store.index_key, start, start + SCAN_BATCH - 1)
        if not ids:
            return
        pipe = store.redis.pipeline(transaction=False)
        for upload_id in ids:
            pipe.hmget(store.record_key(upload_id), _SUMMARY_FIELDS)
        gone = []
        for upload_id, values in zip(ids, pipe.execute()):
            state, created, updated, finished, retry_at = values
            if state is None:
                gone.append(upload_id)
                continue
            yield UploadSummary(
                upload_id, state, float(created or 0), float(updated or 0),
                float(finished) if finished else None, (float(retry_at) or None) if retry_at else None,
            )
        if gone:
            store.redis.zrem(store.index_key, *gone)
        start += len(ids) - len(gone)
        if len(ids) < SCAN_BATCH:
            return


def iter_records(ctx: UploaderContext) -> Iterator[UploadRecord]:
    """Every upload in the index whose checkpoint still exists, as full records, oldest first."""
    for summary in scan_uploads(ctx):
        record = ctx.checkpoint.get(summary.upload_id)
        if record is not None:
            yield record


def stalled(record: UploadRecord, now: float, stall_seconds: int) -> bool:
    return record.state in ACTIVE_STATES and now - max(record.updated, record.created) > stall_seconds


@dataclass
class ReconcileReport:
    """What one reconcile run did: parts taken back from dead or hung holders and sent again,
    by upload, and the resumes it dispatched."""

    reclaimed: dict[str, tuple[int, ...]] = field(default_factory=dict)
    resumed: list[Dispatch] = field(default_factory=list)

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
    for upload in scan_uploads(ctx):
        if upload.state == "uploading" and not upload.stalled(now, settings.stall_seconds):
            generation, parts = store.reclaim_parts(upload.upload_id, now=now)
            if parts:
                if not keep_going():
                    return report
                log.warning(
                    "reconcile: upload %s: %d part leases held by dead or hung workers; sending parts %s again",
                    upload.upload_id, len(parts), parts[:20],
                )
                dispatch(Dispatch(upload.upload_id, "resend", tuple(parts), generation))
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
    for upload in scan_uploads(ctx):
        age = now - (upload.finished or upload.updated or upload.created)
        if upload.retry_pending:
            continue  # the reconciler will resume it; it is not abandoned
        if upload.state in ("failed", "cancelled") and age > limit:
            reason = f"{upload.state} {age / 3600:.1f} h ago"
        elif upload.state in ACTIVE_STATES and now - upload.updated > limit:
            reason = f"no progress for {age / 3600:.1f} h"
        else:
            continue
        record = ctx.checkpoint.get(upload.upload_id)
        if record is not None:
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


class RecoveryLoop(threading.Thread):
    """Runs in every worker process: takes (or renews) the fleet's recovery leader lease every
    few seconds, and while it holds the lease runs :func:`reconcile` every ``reconcile_interval``
    and :func:`run_janitor` every ``janitor_interval`` (the times of the last runs are kept in
    Redis, so a new leader keeps the cadence). Errors are logged, never fatal to the worker."""

    def __init__(self, ctx: UploaderContext, holder: str, dispatch: Dispatcher) -> None:
        super().__init__(name="uploader-recovery", daemon=True)
        self.ctx = ctx
        self.holder = holder
        self.dispatch = dispatch
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
        # A little early rather than a tick late: the ticks do not line up with the interval.
        if last.reconciled_at is None or now - last.reconciled_at >= settings.reconcile_interval - self.tick_seconds / 2:
            report = reconcile(self.ctx, self.dispatch, now=now, keep_going=self.keep_leading)
            store.note_recovery(
                leader=self.holder,
                reconciled_at=now,
                reclaimed=sum(len(p) for p in report.reclaimed.values()),
                resumed=len(report.resumed),
            )
        if last.janitor_at is None:
            # A new deployment: the janitor's first run comes one interval from now (as a
            # scheduler's would), not at the first worker's start.
            store.note_recovery(janitor_at=now)
        elif now - last.janitor_at >= settings.janitor_interval:
            run_janitor(self.ctx, now=now)
            store.note_recovery(leader=self.holder, janitor_at=now)

    def stop(self) -> None:
        """Stop, and hand the lease on at once (a clean shutdown)."""
        self._stopped.set()
        if self.leading:
            try:
                self.ctx.checkpoint.resign_leadership(RECOVERY_ROLE, self.holder)
            except (redis.RedisError, OSError) as exc:
                log.warning("recovery: could not resign: %s", exc)
