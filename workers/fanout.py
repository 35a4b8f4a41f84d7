"""Sending a chord of thousands of part tasks fast: the Redis fast path of ``dispatch``.

``chord(group(upload_part.si(...) for n in parts), body).apply_async()``, from the coordinator
task, costs per header task (10,000 parts; ``python -m bench.fanout``, py-spy with ``--profile``):
0.60 ms of worker CPU, 7 s in all on an idle machine (29.7 s on a busy one). Of the dispatching
thread's samples ~80 % are in kombu/redis-py: two Redis round trips per part (the LPUSH of the
message, and a PUBLISH of its ``task-sent`` event, ~20 %), each on a ``redis.Redis`` client kombu
builds per publish. The rest is Celery's canvas: a clone and a freeze per signature, an
``AsyncResult`` per part that the group's barrier subscribes to (pub/sub, in the coordinator
worker), and the 10,000-id ``GroupResult`` added as a child to the coordinator's own result.

:func:`send_chord` sends the same protocol-2 messages (``tests/test_fanout.py`` compares them
field by field with Celery's) through Celery's and kombu's public APIs, without a signature per
part: 0.05 ms of worker CPU per part, 0.5 s for 10,000 parts.

- The body is frozen once, as ``chord.run`` freezes it (task id, group id, its ``link_error``).
- ``backend.set_chord_size`` is called once, *before* the first header message. (Celery sets it
  just before the last one; with batched publishing, parts that all finished before the size was
  set would never fire the body. Set first, the body fires when the ready count reaches the size:
  when every header task has finished, as before.)
- Every header message comes from ``app.amqp.create_task_message`` with the group id, its group
  index and the body as ``chord`` (what ``request.group``/``request.chord`` and the Redis
  backend's chord counting read in the worker), parent and root ids as ``send_task`` sets them,
  and goes out through ``app.amqp.send_task_message`` (``before/after_task_publish`` signals
  still fire) on one producer acquired once.
- Publishing runs inside kombu's ``Producer.batch()``: the Redis transport buffers the LPUSHes in
  a non-transactional pipeline flushed every :data:`BATCH_SIZE` messages (~1.9 KB each, the body
  included), one round trip and one Redis client per batch. Settings that cannot batch safely
  (a redis-py ``retry`` that could replay a pipeline) make kombu publish one by one instead.
- A failed batch ("delivery is uncertain") or a lost connection sends every message again under
  the same task ids, as often as ``task_publish_retry_policy`` allows (Celery retries each
  message that way): duplicates are harmless, the tasks are idempotent and the Redis backend
  counts a header task id and index once.

No ``task-sent`` event per part (``create_sent_event=False``). Measured, 10,000 parts, three
interleaved runs (``python -m bench.fanout --modes fast,fast-sent --repeats 3``): with the event
(batched too, so no extra round trip) 0.096 ms of CPU per part and 1.0 s, without 0.048 ms and
0.5 s: the event costs as much as the message it describes. And 10,000 events at once fill
Flower's task list (10,000 entries by default) with PENDING parts, pushing out every other task.
Flower still sees every part from the worker-side events (``-E``: task-received, -started,
-succeeded, -failed, -retried carry the same name, args and kwargs); every other task (start,
complete, errback, resume, ...) still sends ``task-sent`` as configured.

Only for a Redis broker and the Redis result backend (the chord counting above is the Redis
backend's); any other broker or backend, and ``UPLOADER_FANOUT=chord`` in the worker's
environment (an escape hatch; the benchmark compares with it), takes Celery's plain
``chord(...).apply_async()``.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from celery import Celery, chord, group
from celery.canvas import Signature
from celery.utils import uuid
from kombu.exceptions import BatchPublishError, OperationalError

from uploader import auth
from uploader.config import get_settings

log = logging.getLogger(__name__)

#: Messages per Redis pipeline round trip, by default (``UPLOADER_FANOUT_BATCH``). 10,000 parts
#: take 20 round trips; a batch of 500 part messages is about 1 MB, and the first parts start
#: within milliseconds of the dispatch. The tests use a small one to cross batch boundaries.
BATCH_SIZE = 500

#: Broker URL schemes served by kombu's Redis transport.
REDIS_SCHEMES = frozenset({"redis", "rediss", "redis+socket", "sentinel"})


def mode() -> str:
    """``UPLOADER_FANOUT``: ``auto``, ``chord`` or ``fast-sent`` (see :class:`~uploader.config.Settings`)."""
    return get_settings().fanout


def batch_size() -> int:
    return get_settings().fanout_batch


def fast_path_available(app: Celery) -> bool:
    """A Redis broker (per the configured URL scheme) and Celery's Redis result backend."""
    from celery.backends.redis import RedisBackend

    url = app.conf.broker_write_url or app.conf.broker_url or ""
    first = url.split(";")[0] if isinstance(url, str) else ""
    scheme = urlsplit(first).scheme.lower()
    return scheme in REDIS_SCHEMES and isinstance(app.backend, RedisBackend)


def send_chord(
    app: Celery, header_task: Any, header_kwargs: Iterable[Mapping[str, Any]], body: Signature,
    *, group_id: str | None = None, ignore_header_results: bool = False, priority: int | None = None,
    queue: str | None = None,
) -> str:
    """Send ``chord(header_task.si(**kw) for kw in header_kwargs, body)``; returns the group id
    (``group_id`` if given: a caller that notes it before sending can find the chord's keys).

    ``body`` may carry ``link_error`` (``on_error``); it is sent as is, inside every header
    message, and fires once every header task has finished.

    ``ignore_header_results``: the header messages ask the worker not to store their results
    (``ignore_result``; nor a RETRY or FAILURE state, with ``task_store_errors_even_if_ignored``
    off). The Redis backend still counts each header task towards the chord: ``mark_as_done`` and
    ``mark_as_failure`` call ``on_chord_part_return`` whether or not the result is stored, and the
    outcome goes into the chord's own ``.j`` key, which the body's publication deletes.

    ``priority``: the header messages' broker priority (``None``: none, the broker's default);
    ``queue``: the queue they go to (``None``: the task's route); the body is sent as it is.
    """
    selected = mode()
    if selected == "chord" or not fast_path_available(app):
        return _plain_chord(header_task, header_kwargs, body, group_id, ignore_header_results, priority, queue)
    return _send_batched(app, header_task, list(header_kwargs), body, sent_events=selected == "fast-sent",
                         group_id=group_id, ignore_header_results=ignore_header_results, priority=priority,
                         queue=queue)


def _plain_chord(
    header_task: Any, header_kwargs: Iterable[Mapping[str, Any]], body: Signature, group_id: str | None = None,
    ignore_header_results: bool = False, priority: int | None = None, queue: str | None = None,
) -> str:
    # (Shown with their proofs by the sender's task-sent events; workers redact what they show.)
    options: dict[str, Any] = {"ignore_result": True} if ignore_header_results else {}
    if priority is not None:
        options["priority"] = priority
    if queue is not None:
        options["queue"] = queue
    canvas = chord(group(header_task.si(**kw).set(**options) for kw in header_kwargs), body)
    if group_id is not None:
        # chord() keeps only the header's tasks; chord.apply_async keeps a header that is a group
        # (its task_id becomes the group id, as chord.run reads it).
        canvas.tasks = group(canvas.tasks, app=header_task.app, task_id=group_id)
    result = canvas.apply_async()
    return result.parent.id if result.parent is not None else ""


def _send_batched(app: Celery, task: Any, header_kwargs: list[Mapping[str, Any]], body: Signature,
                  *, sent_events: bool, group_id: str | None = None, ignore_header_results: bool = False,
                  priority: int | None = None, queue: str | None = None) -> str:
    # The route and the task's own execution options depend on the task name only: resolve once.
    exec_options = {k: v for k, v in task._get_exec_options().items() if v is not None}
    if queue is not None:
        exec_options["queue"] = queue  # (the router keeps an explicit queue over the task's route)
    if exec_options.get("expires") is not None or not header_kwargs:
        # send_task turns a task-level expiry into a per-message one: not worth repeating here.
        # An empty header: chord.run sends the body at once.
        return _plain_chord(task, header_kwargs, body, group_id, ignore_header_results, priority, queue)
    group_id = group_id or uuid()
    body = body.clone()
    # As chord.run: the body's task id, group id and reply_to are fixed now; the worker that
    # finishes the last header task sends it (with itself as parent).
    body.freeze(uuid(), group_id=group_id, root_id=body.options.get("root_id"))

    # As send_task: children of a worker task share its root and name it as their parent.
    parent = app.current_worker_task
    root_id = (parent.request.root_id or parent.request.id) if parent else None
    parent_id = parent.request.id if parent else None

    name = task.name
    amqp = app.amqp
    ignore_result = exec_options.pop("ignore_result", task.ignore_result) or ignore_header_results
    time_limit = exec_options.pop("time_limit", None)
    soft_time_limit = exec_options.pop("soft_time_limit", None)
    route = amqp.router.route(exec_options, name, (), dict(header_kwargs[0]), task)
    if priority is not None:
        route["priority"] = priority  # (send_task_message passes it on to the producer's publish)
    reply_to = app.thread_oid
    send = amqp.send_task_message
    task_ids = [uuid() for _ in header_kwargs]

    def publish_all(producer: Any, route: dict[str, Any]) -> None:
        with producer.connection._reraise_as_library_errors(), producer.batch(max_size=batch_size()):
            for index, (task_id, kwargs) in enumerate(zip(task_ids, header_kwargs, strict=True)):
                kwargs = dict(kwargs)
                message = amqp.create_task_message(
                    task_id, name, (), kwargs,
                    group_id=group_id, group_index=index, chord=body,
                    reply_to=reply_to, time_limit=time_limit, soft_time_limit=soft_time_limit,
                    create_sent_event=sent_events, root_id=root_id, parent_id=parent_id,
                    ignore_result=ignore_result,
                    # What saferepr gives for a flat dict of str and int, without its cost.
                    argsrepr="()", kwargsrepr=repr(auth.redacted(kwargs)),
                )
                send(producer, name, message, **route)

    # Size first (see the module docstring), then the messages.
    app.backend.set_chord_size(group_id, len(header_kwargs))
    policy = dict(app.conf.task_publish_retry_policy or {})
    retries = int(policy.get("max_retries") or 0) if app.conf.task_publish_retry else 0
    for attempt in itertools.count():
        try:
            with app.producer_or_acquire() as producer:
                route_now = dict(route)
                queue = route_now.get("queue")
                if queue is not None:
                    # send_task_message declares the queue with every message, and kombu binds a
                    # copy of the (unbound) Queue each time to check whether it was declared:
                    # ~20 % of this path's CPU. Declare it once; declare=[] skips it per message.
                    queue = amqp.queues[queue] if isinstance(queue, str) else queue
                    producer.maybe_declare(queue, retry=True, **policy)
                    route_now.update(queue=queue, declare=[])
                # Retries are per dispatch, below: inside a batch a publish only buffers.
                publish_all(producer, {**route_now, "retry": False})
            return group_id
        except (BatchPublishError, OperationalError) as exc:
            # A pipeline that failed may have been applied in part ("delivery is uncertain"):
            # send every message again under the same task ids. Duplicates are harmless: the
            # tasks are idempotent, and Celery 5.7's Redis backend counts a header task id and
            # index once towards the chord (and ignores it once the body has fired); with an
            # older one a duplicate may fire the body early, which complete_upload handles
            # like any redelivery (it checks the checkpoint, see DESIGN.md's pitfalls).
            if attempt >= retries:
                raise
            wait = min(policy.get("interval_start", 0) + policy.get("interval_step", 0.2) * attempt,
                       policy.get("interval_max", 1))
            log.warning("fan-out of %d %s messages failed (%r); sending them again in %.1f s (%d/%d)",
                        len(task_ids), name, exc, wait, attempt + 1, retries)
            time.sleep(wait)
    raise AssertionError("unreachable")
