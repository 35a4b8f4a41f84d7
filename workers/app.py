"""The Celery application the workers run (``celery -A workers.app worker``).

Crash safety comes from configuration: messages are acknowledged only after a task finishes
(``task_acks_late``), a killed pool child's message is requeued (``task_reject_on_worker_lost``),
and each worker holds one message per slot (prefetch multiplier 1), so a lost worker costs only
the parts it was sending.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.signals import celeryd_after_setup, worker_process_init, worker_ready, worker_shutdown

from uploader.config import get_settings
from uploader.context import default_context
from uploader.contract import celery_config
from uploader.checkpoint.heartbeat import Heartbeat, incarnation_name, pool_process_name
from workers.transport import broker_settings

settings = get_settings()

app = Celery("uploader", include=["workers.tasks"])
app.conf.update(
    celery_config(settings),
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    # A worker that loses the broker connection cannot ack: its tasks will be redelivered, so
    # stop them rather than finish work whose acknowledgement is lost. Tasks are idempotent.
    worker_cancel_long_running_tasks_on_connection_loss=True,
    # Flower sees tasks only through events.
    worker_send_task_events=True,
    worker_concurrency=settings.worker_concurrency,
    worker_pool=settings.worker_pool,
    worker_hijack_root_logger=False,
)
# Poison messages are quarantined, never allowed to stop a worker (workers/poison.py): each task
# message is checked before Celery's strategy sees it, and the Redis transport is guarded against
# list items kombu cannot read. Workers only: clients send through plain Celery and kombu.
app.conf.update(
    worker_consumer="workers.consumer:QuarantiningConsumer",
    **broker_settings(app.conf.broker_url, app.conf.broker_use_ssl),
)


class _Incarnation:
    """This worker process start: its holder name (``<node name>#<random>``, unique per start,
    see :mod:`uploader.checkpoint.heartbeat`), its heartbeat and its recovery loop. In a prefork
    pool process, the pool process's own holder name."""

    name: str | None = None
    pool_process: str | None = None
    heartbeat: Heartbeat | None = None
    recovery: Any = None


incarnation = _Incarnation()


def lease_holder(hostname: str) -> str:
    """The holder a part lease taken by this process is held under: the worker incarnation's
    name, or in a prefork pool process that process's own."""
    if incarnation.pool_process:
        return incarnation.pool_process
    if incarnation.name is None:
        incarnation.name = incarnation_name(hostname)
    return incarnation.name


@celeryd_after_setup.connect
def name_incarnation(sender: str = "", **_: Any) -> None:
    """Name this start of the worker, before its prefork pool processes fork (they inherit it)."""
    incarnation.name = incarnation_name(sender)


@worker_ready.connect
def start_heartbeat_and_recovery(sender: Any = None, **_: Any) -> None:
    """Lease in-flight parts to this incarnation for as long as it lives, and take part in the
    fleet's recovery (one worker at a time leads it: see uploader.maintenance)."""
    from uploader.maintenance import RecoveryLoop
    from workers.tasks import dispatch

    name = lease_holder(sender.hostname)
    ctx = default_context()
    incarnation.heartbeat = Heartbeat(ctx.checkpoint, name, settings.worker_heartbeat_seconds, worker=True)
    incarnation.heartbeat.start()
    incarnation.recovery = RecoveryLoop(ctx, name, dispatch)
    incarnation.recovery.start()


@worker_process_init.connect
def start_pool_process_heartbeat(sender: Any = None, **_: Any) -> None:
    """A prefork pool process holds its part leases under a name of its own
    (``<incarnation>/pool-<pid>``) and keeps it alive with a heartbeat of its own. The process may
    die while its worker lives (Celery terminates running tasks when the broker connection is
    lost, and replaces the process): its leases then lapse with its heartbeat instead of looking
    held by the live worker for ever, and leases its tasks could not release during a Redis
    outage are released by its heartbeat, in the process that remembers them."""
    if incarnation.name is None:  # named in celeryd_after_setup, before the pool forks
        incarnation.name = incarnation_name(str(sender))
    holder = pool_process_name(incarnation.name, os.getpid())
    Heartbeat(default_context().checkpoint, holder, settings.worker_heartbeat_seconds).start()
    incarnation.pool_process = holder


@worker_shutdown.connect
def stop_heartbeat_and_recovery(**_: Any) -> None:
    if incarnation.recovery is not None:
        incarnation.recovery.stop()
    if incarnation.heartbeat is not None:
        # Celery's warm shutdown has finished the running tasks by now: nothing of this
        # incarnation holds a lease any more, so its name can go at once.
        incarnation.heartbeat.stop(retire=True)
