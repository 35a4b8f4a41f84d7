"""Thin Celery tasks: each turns a message (ids and numbers) into one library call.

The logic lives in :mod:`uploader.coordinator`, :mod:`uploader.transfer` and
:mod:`uploader.completion`, which run without a broker.
"""

from __future__ import annotations

from typing import Any, NoReturn

from celery.exceptions import Retry
from celery.utils import uuid
from celery.utils.log import get_task_logger
from celery.utils.time import get_exponential_backoff_interval

from uploader import auth, completion, contract, limits, maintenance, metrics, priority, transfer
from uploader.batch.coordinator import Batches, PageVerdict
from uploader.checkpoint.store import part_lease_owner
from uploader.context import default_context
from uploader.coordinator import Coordinator, Dispatch, PutGroup
from uploader.errors import TransientStoreError, UploaderError
from uploader.model import CompletionVerdict, DispatchKind, PartVerdict, UploadRecord
from uploader.request import UploadRequest
from workers import chords, fanout, lanes
from workers.app import app, lease_holder

log = get_task_logger(__name__)


def signed(task: Any, **kwargs: Any) -> dict[str, Any]:
    """``kwargs`` of a message of our internal ``task`` with the fleet key's proof added (see
    uploader/auth.py): workers refuse internal messages without one."""
    key = default_context().settings.fleet_key_bytes
    if key is None:  # the worker refuses to start without one (workers/app.py)
        raise RuntimeError("UPLOADER_FLEET_KEY is not set: internal messages cannot be signed")
    return auth.signed(key, task.name, kwargs)


def signature(task: Any, **kwargs: Any) -> Any:
    """An immutable signature of internal ``task``, signed, shown without its proof."""
    arguments = signed(task, **kwargs)
    return task.si(**arguments).set(kwargsrepr=repr(auth.redacted(arguments)))


def send(task: Any, **kwargs: Any) -> Any:
    """Send internal ``task`` now, signed (``countdown``, ``task_id``, ``ignore_result`` and
    ``priority``, the broker's value: see :func:`message_priority`, and ``queue`` are message options, not arguments)."""
    options = {name: kwargs.pop(name) for name in ("countdown", "task_id", "ignore_result", "priority", "queue")
               if name in kwargs}
    arguments = signed(task, **kwargs)
    return task.apply_async(kwargs=arguments, kwargsrepr=repr(auth.redacted(arguments)), **options)


def message_priority(record: UploadRecord | None) -> int | None:
    """The broker priority of the upload's part messages: the request's ``priority`` as this
    broker ranks it (uploader/priority.py); ``None`` (the broker's default) if it asked none."""
    wanted = record.priority if record is not None else None
    return priority.message_priority(wanted, app.conf.broker_url or "")


def host_queue_of(host: str) -> Any:
    """The queue of ``host``'s workers (a host-local upload's messages: uploader/locality.py)."""
    return contract.host_queue(host)  # declared by the workers of that host


def on_host(host: str) -> dict[str, Any]:
    """``send`` options for a message of ``host``'s uploads: its host's queue, or (``""``: every
    worker can read the source) none, the task's own queue."""
    return {"queue": host_queue_of(host)} if host else {}


def dispatch(plan: Dispatch) -> None:
    """Send what the coordinator decided. Part messages carry the upload id and part number only
    (the plan itself is in the checkpoint), at the upload's priority, in the part lane the
    fewest parts wait in (workers/lanes.py)."""
    upload_id, generation = plan.upload_id, plan.generation
    if plan.kind in (DispatchKind.PARTS, DispatchKind.RESEND):
        # (A part that comes back later, retried or held back by a limit, keeps its message's
        # priority and lane.)
        ctx = default_context()
        record = plan.record or ctx.checkpoint.get(upload_id)
        part_priority = message_priority(record)
        # A host-local upload's parts go to its host's queue (only the workers there can read
        # them), the others to a lane.
        lane = host_queue_of(record.host) if record is not None and record.host else lanes.choose(
            app, ctx.checkpoint, ctx.settings.part_lanes
        )
    if plan.kind is DispatchKind.PARTS:
        # chord(upload_part x parts, complete_upload), sent in batches on Redis: see workers/fanout.py.
        failed = upload_failed.s(**signed(upload_failed, upload_id=upload_id, generation=generation))
        body = signature(complete_upload, upload_id=upload_id, generation=generation).on_error(
            failed.set(kwargsrepr=repr(auth.redacted(failed.kwargs)))
        )
        # Noted first, so that the chord's keys are deleted once the upload settles (workers/chords.py);
        # the part messages store no result (nothing reads one; a key per part outlived the upload).
        group_id = uuid()
        ctx.checkpoint.note_chord(upload_id, group_id, ctx.settings.retention_seconds)
        fanout.send_chord(
            app, upload_part,
            (signed(upload_part, upload_id=upload_id, part_number=n, generation=generation) for n in plan.parts),
            body, group_id=group_id, ignore_header_results=True, priority=part_priority, queue=lane,
        )
    elif plan.kind is DispatchKind.RESEND:
        # Parts taken back from a dead or hung holder: no chord (the last part recorded
        # triggers completion, and the dispatch whose chord these parts belonged to still has one),
        # and no result stored.
        for n in plan.parts:
            send(upload_part, upload_id=upload_id, part_number=n, generation=generation, ignore_result=True,
                 priority=part_priority, queue=lane)
    elif plan.kind is DispatchKind.SINGLE:
        _put_here_or_enqueue(plan)
    elif plan.kind is DispatchKind.COMPLETE:
        send(complete_upload, upload_id=upload_id, generation=generation)
    elif plan.kind is DispatchKind.FORWARD:
        # Signed with the fleet key: whoever asked for this resume was authorized where it arrived.
        send(resume_upload, upload_id=upload_id, restart=plan.restart, queue=host_queue_of(plan.host))


def _put_here_or_enqueue(plan: Dispatch) -> None:
    """A small source is sent by the task that decided it (the coordinator), not by another task:
    a second message, with its events and result, cost more than the PUT of a small object, and
    the queue hop was most of a small upload's latency. On a transient error the PUT continues
    as a ``put_object`` task (with its own retries), under the same completion lease token."""
    token = plan.lease or uuid()
    try:
        transfer.put_single(default_context(), plan.upload_id, plan.generation, token=token, claimed=plan.record)
    except TransientStoreError as exc:
        _retry_put(plan.upload_id, plan.generation, token, exc)


def _retry_put(upload_id: str, generation: int, token: str, exc: TransientStoreError) -> None:
    """Continue a small upload's PUT that met a transient error as a ``put_object`` task (with
    its own retries), under ``token``, the completion lease its sender holds; a host-local
    upload's on its host."""
    log.warning("upload %s: PutObject: %s; retrying as a task", upload_id, exc)
    metrics.retried("put_object", exc)
    record = default_context().checkpoint.get(upload_id)  # (a rare path: one more read is cheap)
    send(put_object, upload_id=upload_id, generation=generation, task_id=token, countdown=1,
         **on_host(record.host if record is not None else ""))


def send_groups(groups: list[PutGroup]) -> None:
    """One ``put_objects`` message per group, storing no result (nothing reads one)."""
    for group in groups:
        send(put_objects, uploads=[list(pair) for pair in group.uploads], ignore_result=True, **on_host(group.host))


def _retry_or_fail(
    task: Any, exc: TransientStoreError, upload_id: str | list[str], what: str, generation: int = 0
) -> None:
    """Retry ``task`` with exponential backoff and full jitter, or fail the upload once the
    configured retries are spent. (The tasks set Celery's own ``max_retries=None``: with its
    default of 3, Celery would raise past this limit without failing the upload.)

    A list of uploads (a start_many's) are noted as not started, each that has no record: the
    others were started by an earlier chunk of the message and go on by themselves."""
    settings = default_context().settings
    retries = task.request.retries
    upload_ids = [upload_id] if isinstance(upload_id, str) else upload_id
    if retries >= settings.part_max_retries:
        reason = f"{what} failed after {retries + 1} attempts: {exc}"
        for one in upload_ids:
            if isinstance(upload_id, list) or not completion.mark_failed(
                default_context(), one, reason, generation, transient=True
            ):
                # Nothing to mark: a start that gave up before it created the record (S3 unreachable
                # while checking the bucket). Say why under the upload id, as for a refusal.
                Coordinator(default_context()).note_abandoned_start(one, exc, reason)
        raise exc
    countdown = get_exponential_backoff_interval(
        factor=1, retries=retries, maximum=settings.retry_backoff_max, full_jitter=True
    )
    metrics.retried(str(task.name).removeprefix("uploader."), exc)
    shown = upload_ids[0] if len(upload_ids) == 1 else f"{upload_ids[0]} and {len(upload_ids) - 1} more"
    log.warning("upload %s: %s: %s; retry %d in %ds", shown, what, exc, retries + 1, countdown)
    raise task.retry(exc=exc, countdown=countdown)


def _come_back(task: Any, countdown: float) -> NoReturn:
    """Send this task's message again in ``countdown`` seconds, under the same task id (so a
    chord still counts it once, when it really ends) and with the same retry count: what
    ``task.retry`` does, except that ``retry`` counts one more retry, and a part waiting its
    turn under its upload's concurrency cap is not failing."""
    request = task.request
    again = task.signature_from_request(request, None, None, countdown=countdown, retries=request.retries)
    again.apply_async()
    raise Retry(None, None, countdown, sig=again)


def _operator(task: Any, proof: str | None) -> bool:
    """Whether this cancel or resume carries an operator's valid proof. (The consumer refused a
    message with an invalid one already; checked again here, where the decision is made.)"""
    if proof is None:
        return False
    arguments = contract.named_arguments(task.name, list(task.request.args or ()), dict(task.request.kwargs or {}))
    return auth.proven(default_context().settings.fleet_key_bytes, task.name, arguments)


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
        return Coordinator(default_context()).start_message(request, dispatch, forward=_start_on_host)
    except TransientStoreError as exc:
        _retry_or_fail(self, exc, str(request["upload_id"]), "starting the upload")
        raise


def _start_on_host(request: UploadRequest) -> None:
    """Send a host-local start to its host's workers, as it came (plus its upload id): a public
    message, not signed with the fleet key."""
    start_upload.apply_async(kwargs=request.to_message(), queue=host_queue_of(request.local_host))
    log.info("upload %s: start sent to the workers of host %s", request.upload_id, request.local_host)


@app.task(name=contract.START_MANY, bind=True, max_retries=None, throws=EXPECTED)
def start_many(self: Any, uploads: list[dict[str, Any]]) -> list[dict[str, str]]:
    # As for start_upload: an entry that names no upload id gets one made of this task's id
    # (stable across its retries) and its place in the list.
    base = str(self.request.id).replace("-", "")
    requests = [{"upload_id": f"{base}-{index}", **entry} for index, entry in enumerate(uploads)]
    try:
        started = Coordinator(default_context()).start_many(requests, dispatch, send_groups)
    except TransientStoreError as exc:
        _retry_or_fail(self, exc, [str(r["upload_id"]) for r in requests], "starting the uploads")
        raise
    return [entry.to_dict() for entry in started]


@app.task(name=contract.RESUME_UPLOAD, bind=True, max_retries=None, throws=EXPECTED)
def resume_upload(
    self: Any, upload_id: str, restart: bool = False, token: str | None = None, proof: str | None = None
) -> dict[str, Any]:
    coordinator = Coordinator(default_context())
    coordinator.authorize(upload_id, "resume", token=token, operator=_operator(self, proof))
    try:
        plan = coordinator.resume(upload_id, dispatch, restart=restart)
    except TransientStoreError as exc:
        _retry_or_fail(self, exc, upload_id, "resuming the upload")
    return {"upload_id": upload_id, "dispatched": plan.kind, "parts": len(plan.parts), "reason": plan.reason}


@app.task(name=contract.CANCEL_UPLOAD, bind=True, throws=EXPECTED)
def cancel_upload(self: Any, upload_id: str, token: str | None = None, proof: str | None = None) -> str:
    coordinator = Coordinator(default_context())
    coordinator.authorize(upload_id, "cancel", token=token, operator=_operator(self, proof))
    return coordinator.cancel(upload_id)


@app.task(name=contract.UPLOAD_PART, bind=True, max_retries=None, throws=EXPECTED)
def upload_part(self: Any, upload_id: str, part_number: int, generation: int, proof: str = "") -> dict[str, Any]:
    ctx = default_context()
    try:
        owner = part_lease_owner(lease_holder(self.request.hostname), self.request.id)
        outcome = transfer.upload_part(ctx, upload_id, part_number, generation, owner)
    except TransientStoreError as exc:
        _retry_or_fail(self, exc, upload_id, f"part {part_number}", generation)
        raise  # unreachable: _retry_or_fail always raises
    if outcome.verdict is PartVerdict.LIMITED:
        # The upload's max_concurrency parts are being sent: come back in a moment. Not an error:
        # no retry is used up, nothing was leased or counted as sent.
        _come_back(self, limits.wait_seconds())
    if outcome.verdict is PartVerdict.LAST:
        # Every part is recorded: complete now rather than wait for the chord, which may belong
        # to an older dispatch or never fire (a part of it was lost with its worker).
        record = ctx.checkpoint.get(upload_id)
        if record is not None:
            send(complete_upload, upload_id=upload_id, generation=record.generation)
    # What Flower shows on the task's row and page: which upload, which part, how it ended and
    # the bytes it sent (nothing reads the result otherwise: it is not stored).
    return {"outcome": outcome.text, "upload_id": upload_id, "part": part_number, "bytes_sent": outcome.bytes_sent}


@app.task(name=contract.PUT_OBJECT, bind=True, max_retries=None, throws=EXPECTED)
def put_object(self: Any, upload_id: str, generation: int, proof: str = "") -> str:
    try:
        return transfer.put_single(default_context(), upload_id, generation, token=self.request.id).text
    except TransientStoreError as exc:
        _retry_or_fail(self, exc, upload_id, "PutObject", generation)
        raise


@app.task(name=contract.PUT_OBJECTS, bind=True, ignore_result=True, throws=EXPECTED)
def put_objects(self: Any, uploads: list[list[Any]], proof: str = "") -> None:
    outcome = transfer.put_many(default_context(), [(str(u), int(g)) for u, g in uploads], _retry_put)
    log.info(
        "put_objects: %d completed, %d failed, %d retrying, %d skipped",
        len(outcome.completed), len(outcome.failed), len(outcome.retrying), len(outcome.skipped),
    )


@app.task(name=contract.COMPLETE_UPLOAD, bind=True, max_retries=None, throws=EXPECTED)
def complete_upload(self: Any, upload_id: str, generation: int, proof: str = "") -> str:
    ctx = default_context()
    try:
        outcome = completion.complete_upload(ctx, upload_id, generation, token=self.request.id)
    except TransientStoreError as exc:
        _retry_or_fail(self, exc, upload_id, "CompleteMultipartUpload", generation)
        raise
    if outcome.verdict is CompletionVerdict.WAIT:
        # Only parts leased to live workers are missing: they will record and trigger completion;
        # look again once a lease could have lapsed, in case their worker dies first.
        raise self.retry(countdown=ctx.settings.worker_heartbeat_seconds)
    return outcome.text


@app.task(name=contract.START_BATCH, bind=True, throws=EXPECTED)
def start_batch(self: Any, **request: Any) -> str:
    # As for start_upload: no batch id named, the task's own (stable across redeliveries).
    request.setdefault("batch_id", "b" + str(self.request.id).replace("-", ""))
    batches = Batches(default_context())
    parsed = batches.parse(request)
    assert parsed.batch_id is not None
    if batches.must_forward(parsed):
        # A host-local directory: listed by the workers of its host only (uploader/locality.py).
        start_batch.apply_async(kwargs=parsed.model_dump(mode="json", exclude_none=True), queue=host_queue_of(parsed.local_host))
        log.info("batch %s: start sent to the workers of host %s", parsed.batch_id, parsed.local_host)
        return parsed.batch_id
    batch_id = batches.start(parsed)
    send_batch_page(batch_id, 0, parsed.local_host)
    return batch_id


#: How long a batch's listing waits for an earlier page's uploads (uploader/batch/coordinator.py's AHEAD_FILES).
BATCH_PAGE_WAIT_SECONDS = 0.2


def send_batch_page(batch_id: str, page: int, host: str = "") -> None:
    """Send the listing of page ``page``, to the workers of ``host`` for a host-local batch."""
    send(list_batch, batch_id=batch_id, page=page, ignore_result=True, **on_host(host))


@app.task(name=contract.LIST_BATCH, bind=True, max_retries=None, throws=EXPECTED)
def list_batch(self: Any, batch_id: str, page: int, proof: str = "") -> str:
    """One page of a batch's directory listed and its files started; then the next page is sent
    (the cursor is in the batch record, so the message is ids and numbers only)."""
    try:
        outcome = Batches(default_context()).list_page(batch_id, page, dispatch, send_groups)
    except TransientStoreError as exc:  # Redis or S3 away while listing: the same page again, later
        log.warning("batch %s: page %d: %s; retrying", batch_id, page, exc)
        raise self.retry(exc=exc, countdown=default_context().settings.retry_backoff_max) from None
    if outcome.verdict is PageVerdict.WAIT:
        # An earlier page's files are mostly still queued: list this one a moment later.
        _come_back(self, BATCH_PAGE_WAIT_SECONDS)
    if outcome.verdict is PageVerdict.MORE:
        send_batch_page(batch_id, page + 1, outcome.host)
    return f"{outcome.verdict}: {outcome.started} started, {outcome.skipped} skipped, {outcome.failed} failed"


@app.task(name=contract.CANCEL_BATCH, bind=True, throws=EXPECTED)
def cancel_batch(self: Any, batch_id: str, token: str | None = None, proof: str | None = None) -> dict[str, Any]:
    batches = Batches(default_context())
    batches.authorize(batch_id, "cancel", token=token, operator=_operator(self, proof))
    return batches.cancel(batch_id)


@app.task(name=contract.RESUME_BATCH, bind=True, throws=EXPECTED)
def resume_batch(self: Any, batch_id: str, token: str | None = None, proof: str | None = None) -> dict[str, Any]:
    batches = Batches(default_context())
    batches.authorize(batch_id, "resume", token=token, operator=_operator(self, proof))
    request = batches.request_of(batch_id)
    if batches.must_forward(request):
        # A host-local directory: only the workers of its host may look at it. (Signed with the
        # fleet key: the sender was authorized here.)
        send(resume_batch, batch_id=batch_id, queue=host_queue_of(request.local_host))
        return {"batch_id": batch_id, "forwarded": request.local_host}
    return batches.resume(batch_id, dispatch, send_groups, send_batch_page)


@app.task(name=contract.RECONCILE)
def reconcile(proof: str = "") -> list[str]:
    """One reconcile run now, on whichever worker receives it (the workers' recovery leader runs
    one every UPLOADER_RECONCILE_INTERVAL anyway): parts of dead holders sent again, stalled and
    transiently failed uploads resumed."""
    return maintenance.reconcile(default_context(), dispatch).upload_ids


@app.task(name=contract.JANITOR)
def janitor(dry_run: bool = False, proof: str = "") -> list[dict[str, str]]:
    """Abort and forget abandoned uploads (only ones this system started)."""
    return [a.to_dict() for a in maintenance.run_janitor(default_context(), dry_run=dry_run, forget_chords=forget_chords)]


def forget_chords(group_ids: list[str]) -> None:
    """Delete these chords' keys from the result backend (see workers/chords.py)."""
    chords.forget(app, group_ids)


@app.task(name=contract.UPLOAD_FAILED)
def upload_failed(failed_task_id: str, upload_id: str, generation: int, proof: str = "") -> bool:
    """Chord errback: a part or the completion of dispatch ``generation`` failed in a way the
    tasks did not handle (a no-op if a resume has superseded that dispatch)."""
    result = app.AsyncResult(failed_task_id)
    reason = f"task {failed_task_id} failed: {result.result!r}" if result.failed() else f"task {failed_task_id} failed"
    return completion.mark_failed(default_context(), upload_id, reason, generation)
