"""Thin Celery tasks: each turns a message (ids and numbers) into one library call.

The logic lives in :mod:`uploader.coordinator`, :mod:`uploader.transfer` and
:mod:`uploader.completion`, which run without a broker.
"""

from __future__ import annotations

from typing import Any

from celery.utils import uuid
from celery.utils.log import get_task_logger
from celery.utils.time import get_exponential_backoff_interval

from uploader import completion, contract, maintenance, transfer
from uploader.context import default_context
from uploader.coordinator import Coordinator, Dispatch
from uploader.errors import TransientStoreError, UploaderError
from workers import fanout
from workers.app import app, lease_holder

log = get_task_logger(__name__)


def dispatch(plan: Dispatch) -> None:
    """Send what the coordinator decided. Part messages carry the upload id and part number only;
    the plan itself is in the checkpoint."""
    upload_id, generation = plan.upload_id, plan.generation
    if plan.kind == "parts":
        # chord(upload_part x parts, complete_upload), sent in batches on Redis: see workers/fanout.py.
        body = complete_upload.si(upload_id=upload_id, generation=generation).on_error(
            upload_failed.s(upload_id=upload_id, generation=generation)
        )
        fanout.send_chord(
            app, upload_part,
            ({"upload_id": upload_id, "part_number": n, "generation": generation} for n in plan.parts),
            body,
        )
    elif plan.kind == "resend":
        # Parts taken back from a dead or hung holder: no chord (the last part recorded
        # triggers completion, and the dispatch whose chord these parts belonged to still has one).
        for n in plan.parts:
            upload_part.apply_async(kwargs={"upload_id": upload_id, "part_number": n, "generation": generation})
    elif plan.kind == "single":
        _put_here_or_enqueue(plan)
    elif plan.kind == "complete":
        complete_upload.si(upload_id=upload_id, generation=generation).apply_async()


def _put_here_or_enqueue(plan: Dispatch) -> None:
    """A small source is sent by the task that decided it (the coordinator), not by another task:
    a second message, with its events and result, cost more than the PUT of a small object, and
    the queue hop was most of a small upload's latency. On a transient error the PUT continues
    as a ``put_object`` task (with its own retries), under the same completion lease token."""
    token = plan.lease or uuid()
    try:
        transfer.put_single(default_context(), plan.upload_id, plan.generation, token=token, claimed=plan.record)
    except TransientStoreError as exc:
        log.warning("upload %s: PutObject: %s; retrying as a task", plan.upload_id, exc)
        put_object.si(upload_id=plan.upload_id, generation=plan.generation).apply_async(task_id=token, countdown=1)


def _retry_or_fail(task: Any, exc: TransientStoreError, upload_id: str, what: str, generation: int = 0) -> None:
    """Retry ``task`` with exponential backoff and full jitter, or fail the upload once the
    configured retries are spent. (The tasks set Celery's own ``max_retries=None``: with its
    default of 3, Celery would raise past this limit without failing the upload.)"""
    settings = default_context().settings
    retries = task.request.retries
    if retries >= settings.part_max_retries:
        reason = f"{what} failed after {retries + 1} attempts: {exc}"
        if not completion.mark_failed(default_context(), upload_id, reason, generation, transient=True):
            # Nothing to mark: a start that gave up before it created the record (S3 unreachable
            # while checking the bucket). Say why under the upload id, as for a refusal.
            Coordinator(default_context()).note_abandoned_start(upload_id, exc, reason)
        raise exc
    countdown = get_exponential_backoff_interval(
        factor=1, retries=retries, maximum=settings.retry_backoff_max, full_jitter=True
    )
    log.warning("upload %s: %s: %s; retry %d in %ds", upload_id, what, exc, retries + 1, countdown)
    raise task.retry(exc=exc, countdown=countdown)


#: ``throws`` of every task: an error of ours (a refusal, a failure already recorded in the
#: checkpoint with its reason) is the task's answer, logged as one line without a traceback;
#: anything else is a bug and keeps its traceback.
EXPECTED = (UploaderError,)


@app.task(name=contract.START_UPLOAD, bind=True, max_retries=None, throws=EXPECTED)
def start_upload(self: Any, **request: Any) -> str:
    # A sender that names no upload id gets the start task's own id: stable across this task's
    # retries, so a retried start continues the same upload instead of claiming another.
    request.setdefault("upload_id", str(self.request.id).replace("-", ""))
    try:
        return Coordinator(default_context()).start_message(request, dispatch)
    except TransientStoreError as exc:
        _retry_or_fail(self, exc, str(request["upload_id"]), "starting the upload")
        raise


@app.task(name=contract.RESUME_UPLOAD, bind=True, max_retries=None, throws=EXPECTED)
def resume_upload(self: Any, upload_id: str, restart: bool = False) -> dict[str, Any]:
    try:
        plan = Coordinator(default_context()).resume(upload_id, dispatch, restart=restart)
    except TransientStoreError as exc:
        _retry_or_fail(self, exc, upload_id, "resuming the upload")
    return {"upload_id": upload_id, "dispatched": plan.kind, "parts": len(plan.parts), "reason": plan.reason}


@app.task(name=contract.CANCEL_UPLOAD, throws=EXPECTED)
def cancel_upload(upload_id: str) -> str:
    return Coordinator(default_context()).cancel(upload_id)


@app.task(name=contract.UPLOAD_PART, bind=True, max_retries=None, throws=EXPECTED)
def upload_part(self: Any, upload_id: str, part_number: int, generation: int) -> str:
    ctx = default_context()
    try:
        owner = f"{lease_holder(self.request.hostname)}|{self.request.id}"
        outcome = transfer.upload_part(ctx, upload_id, part_number, generation, owner)
    except TransientStoreError as exc:
        _retry_or_fail(self, exc, upload_id, f"part {part_number}", generation)
        raise  # unreachable: _retry_or_fail always raises
    if outcome.outcome == "last":
        # Every part is recorded: complete now rather than wait for the chord, which may belong
        # to an older dispatch or never fire (a part of it was lost with its worker).
        record = ctx.checkpoint.get(upload_id)
        if record is not None:
            complete_upload.si(upload_id=upload_id, generation=record.generation).apply_async()
    return outcome.outcome


@app.task(name=contract.PUT_OBJECT, bind=True, max_retries=None, throws=EXPECTED)
def put_object(self: Any, upload_id: str, generation: int) -> str:
    try:
        return transfer.put_single(default_context(), upload_id, generation, token=self.request.id)
    except TransientStoreError as exc:
        _retry_or_fail(self, exc, upload_id, "PutObject", generation)
        raise


@app.task(name=contract.COMPLETE_UPLOAD, bind=True, max_retries=None, throws=EXPECTED)
def complete_upload(self: Any, upload_id: str, generation: int) -> str:
    ctx = default_context()
    try:
        outcome = completion.complete_upload(ctx, upload_id, generation, token=self.request.id)
    except TransientStoreError as exc:
        _retry_or_fail(self, exc, upload_id, "CompleteMultipartUpload", generation)
        raise
    if outcome.verdict == "redispatch":
        # The trigger fired with parts missing (a redelivered part can fire a chord early, and a
        # killed worker's parts never report): send them again, complete afterwards.
        dispatch(Dispatch(upload_id, "parts", outcome.parts, outcome.generation))
    elif outcome.verdict == "wait":
        # Only parts leased to live workers are missing: they will record and trigger completion;
        # look again once a lease could have lapsed, in case their worker dies first.
        raise self.retry(countdown=ctx.settings.worker_heartbeat_seconds)
    return outcome.verdict


@app.task(name=contract.RECONCILE)
def reconcile() -> list[str]:
    """One reconcile run now, on whichever worker receives it (the workers' recovery leader runs
    one every UPLOADER_RECONCILE_INTERVAL anyway): parts of dead holders sent again, stalled and
    transiently failed uploads resumed."""
    return maintenance.reconcile(default_context(), dispatch).upload_ids


@app.task(name=contract.JANITOR)
def janitor(dry_run: bool = False) -> list[dict[str, str]]:
    """Abort and forget abandoned uploads (only ones this system started)."""
    return [vars(a) for a in maintenance.run_janitor(default_context(), dry_run=dry_run)]


@app.task(name=contract.UPLOAD_FAILED)
def upload_failed(failed_task_id: str, upload_id: str, generation: int) -> bool:
    """Chord errback: a part or the completion of dispatch ``generation`` failed in a way the
    tasks did not handle (a no-op if a resume has superseded that dispatch)."""
    result = app.AsyncResult(failed_task_id)
    reason = f"task {failed_task_id} failed: {result.result!r}" if result.failed() else f"task {failed_task_id} failed"
    return completion.mark_failed(default_context(), upload_id, reason, generation)
