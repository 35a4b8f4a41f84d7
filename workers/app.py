"""The Celery application the workers run (``celery -A workers.app worker``).

Crash safety comes from configuration: messages are acknowledged only after a task finishes
(``task_acks_late``), a killed pool child's message is requeued (``task_reject_on_worker_lost``),
and each worker holds one message per slot (prefetch multiplier 1), so a lost worker costs only
the parts it was sending.
"""

from __future__ import annotations

from celery import Celery

from uploader.config import get_settings
from uploader.contract import celery_config

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
    task_track_started=True,
    worker_concurrency=settings.worker_concurrency,
    worker_pool="threads",
    worker_hijack_root_logger=False,
)
