"""The Celery task channel: the result sent as the kwargs of a task named by the request."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kombu.exceptions import KombuError

from uploader.checkpoint.outbox import Settlement
from uploader.notify.attempt import Attempt

#: Sends a task by name with kwargs to a queue (``app.send_task`` in a worker: see workers/app.py).
TaskSender = Callable[[str, dict[str, Any], str], None]


def send(sender: TaskSender, name: str, payload: dict[str, Any], queue: str) -> Attempt:
    """Publish the task; a broker that cannot take it now is retried."""
    try:
        sender(name, payload, queue)
    except (KombuError, OSError) as exc:
        return Attempt(Settlement.RETRY, error=f"{type(exc).__name__}: {exc}"[:500])
    return Attempt(Settlement.DELIVERED)
