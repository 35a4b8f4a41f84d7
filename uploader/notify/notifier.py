"""Delivery of the outbox, run by every worker.

No leader: claiming is atomic (``claim_events.lua``), so every worker's :class:`NotifierLoop`
takes its share of the due events, each under a lease (``UPLOADER_NOTIFY_LEASE_SECONDS``). A
worker killed while delivering leaves its events claimed until the lease lapses; another worker
then claims and delivers them again: at least once. Every attempt is recorded on the event
(attempts, last status, last error, next attempt, delivered at), which ``status`` shows.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

import redis

from uploader import metrics
from uploader.checkpoint.outbox import Channel, ClaimedEvent, Outbox, Settlement
from uploader.context import UploaderContext
from uploader.notify import task, template, webhook
from uploader.notify.attempt import Attempt, retry_delay
from uploader.notify.payload import result_payload, template_values
from uploader.notify.targets import DEFAULT_CALLBACK_QUEUE
from uploader.outbound import OutboundPolicy

log = logging.getLogger(__name__)

#: The most events claimed per round trip (each is then delivered in turn, within its lease).
CLAIM_BATCH = 10


def claim_batch(lease_seconds: float, timeout: float) -> int:
    """Events to claim at once: as many as can be delivered in turn, each taking its whole
    timeout, in half the lease, so the last is not claimed again by another worker meanwhile."""
    return max(1, min(CLAIM_BATCH, int(lease_seconds / 2 // timeout)))


class Notifier:
    """Claims due events and delivers them, one pass at a time (:meth:`run_once`)."""

    def __init__(self, ctx: UploaderContext, send_task: task.TaskSender) -> None:
        self.ctx = ctx
        self.outbox = Outbox(ctx.checkpoint)
        self.send_task = send_task
        self.policy = OutboundPolicy.parse(ctx.settings.outbound_allow)

    def run_once(self, *, now: float | None = None) -> int:
        """Deliver what is due now; how many events were attempted."""
        settings = self.ctx.settings
        done = 0
        batch = claim_batch(settings.notify_lease_seconds, settings.callback_timeout)
        while True:
            token = uuid.uuid4().hex
            events = self.outbox.claim(token, lease_seconds=settings.notify_lease_seconds, limit=batch, now=now)
            for event in events:
                try:
                    attempt = self.deliver(event)
                except (redis.RedisError, OSError):
                    raise  # Redis away: the claim lapses and the event is tried again
                except Exception as exc:  # a bug or a misconfiguration: recorded, tried again later
                    log.exception("upload %s: %s notification failed unexpectedly", event.upload_id, event.channel.value)
                    attempt = Attempt(Settlement.RETRY, error=f"unexpected error: {type(exc).__name__}")
                self._settle(event, token, attempt)
            done += len(events)
            if len(events) < batch:
                return done

    def deliver(self, event: ClaimedEvent) -> Attempt:
        """One attempt at ``event``; never raises for a receiver's or a network's problem."""
        record = self.ctx.checkpoint.get(event.upload_id)
        if record is None:
            return Attempt(Settlement.FAILED, error="the upload's checkpoint expired before the notification was delivered")
        payload = result_payload(record, event.kind)
        if event.channel is Channel.WEBHOOK:
            secret = self.ctx.settings.callback_secret
            if secret is None:
                return Attempt(Settlement.RETRY, error="UPLOADER_CALLBACK_SECRET is not set on this worker")
            body, content_type = None, "application/json"
            if record.callback_body:
                body_type = template.BodyType(record.callback_body_type or template.BodyType.FORM.value)
                body = template.render(record.callback_body, body_type, template_values(record, event.kind), record.callback_vars)
                content_type = body_type.value
            return webhook.post(
                record.callback_url, payload, secret=secret.get_secret_value().encode(), policy=self.policy,
                timeout=self.ctx.settings.callback_timeout, body=body, content_type=content_type,
            )
        name = record.on_complete if event.kind == "completed" else record.on_failure
        return task.send(self.send_task, name, payload, record.callback_queue or DEFAULT_CALLBACK_QUEUE)

    def _settle(self, event: ClaimedEvent, token: str, attempt: Attempt) -> None:
        settings = self.ctx.settings
        outcome, next_at = attempt.outcome, 0.0
        if outcome is Settlement.RETRY:
            if event.attempt >= settings.callback_max_attempts:
                outcome = Settlement.FAILED
            else:
                next_at = time.time() + retry_delay(event.attempt, settings.callback_backoff, settings.callback_backoff_max)
        self.outbox.settle(
            event.event_id, token, outcome, status=attempt.status, error=attempt.error, next_attempt=next_at,
            keep_seconds=settings.retention_seconds,
        )
        metrics.callback_delivery(event.channel.value, outcome.value)
        level = logging.INFO if outcome is Settlement.DELIVERED else logging.WARNING
        log.log(level, "upload %s: %s notification (%s) attempt %d: %s%s", event.upload_id, event.channel.value,
                event.kind, event.attempt, outcome.value, f" ({attempt.error})" if attempt.error else "")


class NotifierLoop(threading.Thread):
    """Runs :meth:`Notifier.run_once` every ``notify_poll_seconds`` in a worker process; errors
    are logged, never fatal to the worker."""

    def __init__(self, ctx: UploaderContext, send_task: task.TaskSender) -> None:
        super().__init__(name="uploader-notifier", daemon=True)
        self.notifier = Notifier(ctx, send_task)
        self.poll_seconds = ctx.settings.notify_poll_seconds
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(self.poll_seconds):
            try:
                self.notifier.run_once()
            except (redis.RedisError, OSError) as exc:  # Redis away: the next poll tries again
                log.warning("notifier: %s", exc)
            except Exception:  # a bug must not stop the worker's notifications for good
                log.exception("notifier: unexpected error")

    def stop(self) -> None:
        self._stopped.set()
