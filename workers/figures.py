"""The fleet's figures a worker's ``/metrics`` shows (uploader/metrics.py), read from Redis and
the broker at each scrape: a few cheap reads (one hash, one sorted set's count, each queue's
length), never a walk over the uploads."""

from __future__ import annotations

import time

from celery import Celery

from uploader.context import default_context
from uploader.contract import CONTROL_QUEUE, part_lanes
from uploader.locality import host_queue_name
from uploader.metrics import FleetFigures
from workers import lanes


def fleet_figures(app: Celery) -> FleetFigures:
    """Uploads needing attention by state and stalled (as the recovery leader last counted
    them), live workers, the waiting messages of every part lane, the control queue and this
    host's queue, the messages being worked on (a Redis broker's unacknowledged ones), and when
    recovery last ran."""
    ctx = default_context()
    store = ctx.checkpoint
    recovery = store.recovery()
    names = (*part_lanes(ctx.settings.part_lanes), CONTROL_QUEUE, host_queue_name(ctx.settings.host_name))
    sizes = lanes.queued(app, names)
    return FleetFigures(
        states=recovery.states,
        stalled=recovery.stalled,
        workers_alive=int(store.redis.zcount(store.workers_key, time.time(), "+inf")),
        queued=dict(zip(names, sizes, strict=True)),
        unacked=_unacked(app),
        recovery_last_run=recovery.reconciled_at,
        janitor_last_run=recovery.janitor_at,
    )


def _unacked(app: Celery) -> int | None:
    """Messages delivered and not yet acknowledged, where the broker keeps them in one place we
    can count (kombu's Redis transport: its ``unacked`` hash); None elsewhere (RabbitMQ counts
    them per queue, outside a client's view)."""
    with app.pool.acquire(block=True) as connection:
        channel = connection.default_channel
        key = getattr(channel, "unacked_key", None)
        if key is None:
            return None
        return int(channel.client.hlen(key))
