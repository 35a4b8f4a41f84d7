"""Celery's remote control, narrowed to what watching the fleet needs.

Any client that can publish to the broker can broadcast Celery control commands
(``app.control.broadcast("shutdown")``): without this, one such message stops every worker, and
others shrink pools, cancel consumers, revoke tasks or change limits. Celery's message signing
(``uploader/signing.py``) refuses unsigned control messages, but it is off by default, and the
fleet key's proofs do not cover control messages. So by default (``UPLOADER_REMOTE_CONTROL=inspect``)
a worker answers only the read-only commands Flower and ``celery inspect`` use, and refuses every
other one with one log line and an error reply; ``full`` keeps all of Celery's commands, for
deployments whose broker only operators can publish to.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.control import Panel

log = logging.getLogger(__name__)

#: What a worker answers in ``inspect`` mode: Flower's views (stats, queues, registered, tasks,
#: configuration, which Celery censors) and liveness, and ``enable_events``, which Flower sends on
#: start (events are always on here: harmless).
READ_ONLY = frozenset({
    "ping", "stats", "active_queues", "registered", "scheduled", "active", "reserved", "revoked", "conf",
    "clock", "report", "query_task", "hello", "heartbeat", "enable_events",
})


def _refusal(name: str) -> Any:
    def refused(state: Any, **_: Any) -> dict[str, str]:
        log.warning("refused remote control command %r: this worker answers read-only commands only "
                    "(UPLOADER_REMOTE_CONTROL=inspect)", name)
        return {"error": f"remote control command {name!r} is disabled on this worker (UPLOADER_REMOTE_CONTROL=inspect)"}

    refused.__name__ = name
    return refused


def restrict(mode: str) -> list[str]:
    """In ``inspect`` mode, replace every command of Celery's control panel but :data:`READ_ONLY`
    with a refusal (in place: the worker's mailbox reads the same table). Returns the names
    refused."""
    if mode == "full":
        return []
    refused = sorted(name for name in Panel.data if name not in READ_ONLY)
    for name in refused:
        Panel.data[name] = _refusal(name)
    return refused
