"""The Celery application the workers run (``celery -A workers.app worker``).

Crash safety comes from configuration: messages are acknowledged only after a task finishes
(``task_acks_late``), a killed pool child's message is requeued (``task_reject_on_worker_lost``),
and each worker holds one message per slot (prefetch multiplier 1), so a lost worker costs only
the parts it was sending.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_ready, worker_shutdown

from uploader.config import get_settings
from uploader.context import default_context
from uploader import contract
from uploader.contract import celery_config
from uploader.heartbeat import Heartbeat

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
    # Run by one `uploader beat` per deployment (or `uploader worker --beat` on a single node).
    beat_schedule_filename=os.path.join(tempfile.gettempdir(), "uploader-beat-schedule"),
    beat_schedule={
        "reconcile-stalled-uploads": {"task": contract.RECONCILE, "schedule": settings.reconcile_interval},
        "janitor": {"task": contract.JANITOR, "schedule": settings.janitor_interval},
    },
)


_heartbeat: Heartbeat | None = None


@worker_ready.connect
def start_heartbeat(sender: Any = None, **_: Any) -> None:
    """Lease in-flight parts to this worker for as long as it lives."""
    global _heartbeat
    _heartbeat = Heartbeat(default_context().checkpoint, sender.hostname, settings.worker_heartbeat_seconds)
    _heartbeat.start()


#: In a prefork pool process: the name its part leases are held under (see below).
_pool_process_holder: str | None = None


def lease_holder(hostname: str) -> str:
    """The worker name a part lease taken by this process is held under: the worker's, or in a
    prefork pool process that process's own."""
    return _pool_process_holder or hostname


@worker_process_init.connect
def start_pool_process_heartbeat(sender: Any = None, **_: Any) -> None:
    """A prefork pool process holds its part leases under a name of its own
    (``<worker>/pool-<pid>``) and keeps it alive with a heartbeat of its own. The process may die
    while its worker lives (Celery terminates running tasks when the broker connection is lost,
    and replaces the process): its leases then lapse with its heartbeat instead of looking held
    by the live worker for ever, and leases its tasks could not release during a Redis outage are
    released by its heartbeat, in the process that remembers them."""
    global _pool_process_holder
    holder = f"{sender}/pool-{os.getpid()}"
    Heartbeat(default_context().checkpoint, holder, settings.worker_heartbeat_seconds).start()
    _pool_process_holder = holder


@worker_shutdown.connect
def stop_heartbeat(**_: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()
