"""The worker's consumer: every task message is checked before Celery's strategy sees it.

Selected with Celery's ``worker_consumer`` setting (``workers/app.py``). A message
:func:`workers.poison.inspect_message` refuses, or one Celery's own handler still raises on, is
quarantined (one log line, a dead-letter entry) and acknowledged, so it is removed from the
queue and from kombu's unacked hash and never comes back. See :mod:`workers.poison`.
"""

from __future__ import annotations

from typing import Any

from celery.worker.consumer import Consumer
from kombu.exceptions import MessageStateError

from uploader import auth, contract
from uploader.config import get_settings
from workers import poison

#: kombu's Redis transport's default, if the app sets none.
DEFAULT_VISIBILITY_TIMEOUT = 3600


class QuarantiningConsumer(Consumer):
    """Celery's consumer, with a guard in front of its task message handler."""

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        handle = super().create_task_handler(*args, **kwargs)
        # Our tasks only: Celery's built-in ones (celery.chain, celery.group, ...) would send
        # whatever signatures a message holds.
        tasks = contract.TASK_ARGUMENTS
        settings = get_settings()
        key = settings.fleet_key_bytes
        # Signed messages only, when the deployment signs (uploader/signing.py); the fleet key's
        # proof stays required on internal tasks on top (the signature covers neither the task
        # name nor any header).
        signed = settings.message_signing

        def authenticate(task: str, arguments: dict[str, Any]) -> str | None:
            return contract.authority_problem(task, arguments, key)

        options = self.app.conf.broker_transport_options or {}
        visibility_timeout = float(options.get("visibility_timeout") or DEFAULT_VISIBILITY_TIMEOUT)
        inspect, quarantine, broker_errors = poison.inspect_message, self._quarantine, poison.BROKER_ERRORS

        def on_task_received(message: Any) -> Any:
            try:
                # message.decode: kombu keeps the decoded body for Celery, which decodes it next.
                verdict = inspect(
                    message.headers, message.content_type, message.content_encoding, message.body,
                    tasks=tasks, visibility_timeout=visibility_timeout, decode=message.decode,
                    authenticate=authenticate, signed=signed,
                )
            except Exception as exc:  # noqa: BLE001  (the check itself must never stop the worker)
                verdict = poison.Verdict(f"the message could not be inspected ({type(exc).__name__}: {poison.escape(str(exc), 64)})")
            if verdict.problem is not None:
                return quarantine(message, verdict.problem, verdict.task, verdict.task_id)
            poison.sanitize_display_headers(message.headers)
            _redact_secrets(message)
            try:
                return handle(message)
            except broker_errors:
                raise
            except Exception as exc:  # noqa: BLE001  (a backstop: whatever Celery's strategy raises)
                reason = f"Celery could not accept it ({type(exc).__name__}: {poison.escape(str(exc), 64)})"
                return quarantine(message, reason, verdict.task, verdict.task_id)

        return on_task_received

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        """kombu could not decode the message (e.g. a bad ``compression`` header): quarantine it
        (Celery would log it with its body and ack it)."""
        headers = message.headers if isinstance(message.headers, dict) else {}
        reason = f"the message could not be decoded ({type(exc).__name__}: {poison.escape(str(exc), 64)})"
        self._quarantine(message, reason, headers.get("task"), headers.get("id"))

    def _quarantine(self, message: Any, reason: str, task: Any, task_id: Any) -> None:
        # The queue the message came from, as the guarded transport recorded it (a Redis
        # envelope's routing key is whatever its sender wrote).
        queue = getattr(message.channel, "poison_queue", None)
        if queue is None:
            info = message.delivery_info if isinstance(message.delivery_info, dict) else {}
            queue = f"(routing key {info.get('routing_key')!r})"
        poison.quarantine(
            queue=queue, reason=reason, task=task, task_id=task_id, headers=message.headers, body=message.body,
        )
        poison.answer_sender(self.app, reason, task, task_id, message.body)
        if not message.acknowledged:
            try:
                message.ack()
            except MessageStateError:  # acknowledged meanwhile (by Celery, before it raised)
                pass


def _redact_secrets(message: Any) -> None:
    """Show a message's kwargs without its proof or capability token (Celery logs and sends to
    Flower the ``kwargsrepr`` header, which a foreign client fills with its kwargs as they are)."""
    _, kwargs, _ = message.decode()  # kombu's cached decoding, checked by inspect_message
    if auth.PROOF in kwargs or auth.TOKEN in kwargs:
        message.headers["kwargsrepr"] = poison.escape(repr(auth.redacted(kwargs)), poison.MAX_REPR)
