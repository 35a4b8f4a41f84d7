"""The outbox: notification events the terminal transitions wrote, and their delivery state.

A terminal transition (completed, failed for good, cancelled) of an upload that asked to be
notified writes one event per channel (``webhook``, ``task``) in the same Lua script that changes
the state (``append_outbox`` in ``lua/_shared.lua``), so each event exists exactly once. An event
carries only its upload id, kind and channel; the notifier (:mod:`uploader.notify`) builds the
payload from the record when it delivers.

Keys (under the checkpoint prefix): ``<prefix>:outbox``, a sorted set of event ids scored by when
each is due (a claimed event by when its claim lapses), and ``<prefix>:outbox:<event id>``, the
event's hash: ``upload_id``, ``kind``, ``channel``, ``created``, ``attempts``, ``next_attempt``,
``last_status``, ``last_error``, ``delivered_at``, ``gave_up_at`` (and ``claim``,
``claim_until`` while a notifier holds it). A settled event's hash is kept for the retention
period, so ``status`` can show how its delivery went.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import cast

from uploader.checkpoint.store import MAX_ERROR_CHARS, CheckpointStore


class Channel(enum.StrEnum):
    """How an event is delivered."""

    #: An HTTP POST to the request's ``callback_url``.
    WEBHOOK = "webhook"
    #: A Celery task sent by name (``on_complete`` / ``on_failure``).
    TASK = "task"


class Settlement(enum.StrEnum):
    """How an attempt ended, as ``settle_event.lua`` records it."""

    DELIVERED = "delivered"
    #: Not delivered; try again at the given time.
    RETRY = "retry"
    #: Not delivered, and never will be (a final answer, or the attempts spent).
    FAILED = "failed"


@dataclass(frozen=True)
class ClaimedEvent:
    """An event a notifier holds (until its claim lapses) and must deliver."""

    event_id: str
    upload_id: str
    #: The upload's terminal state that wrote it: completed, failed or cancelled.
    kind: str
    channel: Channel
    #: This attempt's number (1 for the first; an attempt cut short by a crash counts).
    attempt: int


@dataclass(frozen=True)
class Delivery:
    """How an event's delivery went so far (what ``status`` shows); times are unix seconds."""

    event_id: str
    kind: str
    channel: str
    attempts: int
    #: The HTTP status of the last attempt ("" if it got none, or for a task).
    last_status: str
    last_error: str
    next_attempt: float | None
    delivered_at: float | None
    gave_up_at: float | None

    @classmethod
    def from_hash(cls, event_id: str, raw: dict[str, str]) -> Delivery:
        def when(name: str) -> float | None:
            return float(raw[name]) if raw.get(name) else None

        return cls(
            event_id=event_id, kind=raw.get("kind", ""), channel=raw.get("channel", ""),
            attempts=int(raw.get("attempts") or 0), last_status=raw.get("last_status", ""),
            last_error=raw.get("last_error", ""), next_attempt=when("next_attempt"),
            delivered_at=when("delivered_at"), gave_up_at=when("gave_up_at"),
        )

    def to_dict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


class Outbox:
    """Claims, settlements and reads of the outbox in ``store``'s Redis."""

    def __init__(self, store: CheckpointStore) -> None:
        self.store = store

    def claim(self, token: str, *, lease_seconds: float, limit: int, now: float | None = None) -> list[ClaimedEvent]:
        """Claim up to ``limit`` due events for ``lease_seconds`` under ``token``."""
        now = time.time() if now is None else now
        flat = self.store._run("claim_events", [self.store.outbox_key], [now, lease_seconds, limit, token])
        return [
            ClaimedEvent(flat[i], flat[i + 1], flat[i + 2], Channel(flat[i + 3]), int(flat[i + 4]))
            for i in range(0, len(flat), 5)
        ]

    def settle(
        self, event_id: str, token: str, outcome: Settlement, *, status: str = "", error: str = "",
        next_attempt: float = 0.0, keep_seconds: int, now: float | None = None,
    ) -> str:
        """Record an attempt's end: ``ok``, ``fenced`` (the claim lapsed and another notifier
        holds the event: a retry or give-up is not recorded) or ``missing``."""
        now = time.time() if now is None else now
        return cast("str", self.store._run(
            "settle_event", [self.store.outbox_key, self.store.event_key(event_id)],
            [token, now, outcome.value, status, error[:MAX_ERROR_CHARS], next_attempt, keep_seconds],
        ))

    def deliveries(self, event_ids: list[str]) -> list[Delivery]:
        """The delivery state of these events (those whose hash is gone are left out)."""
        if not event_ids:
            return []
        pipe = self.store.redis.pipeline(transaction=False)
        for event_id in event_ids:
            pipe.hgetall(self.store.event_key(event_id))
        return [Delivery.from_hash(i, raw) for i, raw in zip(event_ids, pipe.execute(), strict=True) if raw]

    def pending(self) -> int:
        """How many events wait for delivery (or are being delivered)."""
        return int(self.store.redis.zcard(self.store.outbox_key))
