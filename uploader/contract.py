"""The public message contract: task names, queue names and the Celery settings both sides share.

Anything that can send a Celery message (in any language) can drive the uploader with these
names; see the README's "Message contract". Changing a name here is a breaking change.
"""

from __future__ import annotations

from typing import Any

from kombu import Exchange, Queue

from uploader.config import Settings

#: Starts an upload. kwargs: source, bucket, key, [upload_id, part_size, metadata, content_type,
#: abort_on_failure]. Returns the upload id.
START_UPLOAD = "uploader.start_upload"
#: Continues an upload from its checkpoint. kwargs: upload_id, [restart].
RESUME_UPLOAD = "uploader.resume_upload"
#: Cancels an upload and aborts its multipart upload. kwargs: upload_id.
CANCEL_UPLOAD = "uploader.cancel_upload"
#: Uploads one part. kwargs: upload_id, part_number, generation. Internal (sent by the coordinator).
UPLOAD_PART = "uploader.upload_part"
#: Uploads a small source with one PutObject. kwargs: upload_id, generation. Internal.
PUT_OBJECT = "uploader.put_object"
#: Chord body: completes the multipart upload. kwargs: upload_id, generation. Internal.
COMPLETE_UPLOAD = "uploader.complete_upload"
#: Periodic: resume uploads that made no progress for stall_seconds. No kwargs.
RECONCILE = "uploader.reconcile"
#: Periodic: abort and forget abandoned uploads. kwargs: [dry_run].
JANITOR = "uploader.janitor"
#: Chord errback: marks the upload failed. args: failed task id; kwargs: upload_id, generation. Internal.
UPLOAD_FAILED = "uploader.upload_failed"

#: Starting, resuming, cancelling, completing and failing uploads: short tasks that must never
#: queue behind thousands of parts.
CONTROL_QUEUE = "uploader.control"
#: Data movement: one message per part (or per small object).
PARTS_QUEUE = "uploader.parts"

CONTROL_TASKS = (START_UPLOAD, RESUME_UPLOAD, CANCEL_UPLOAD, COMPLETE_UPLOAD, UPLOAD_FAILED, RECONCILE, JANITOR)
PART_TASKS = (UPLOAD_PART, PUT_OBJECT)


def task_queues() -> tuple[Queue, ...]:
    """The two queues, declared with kombu (direct exchanges named after each queue)."""
    return tuple(
        Queue(name, Exchange(name, type="direct"), routing_key=name) for name in (CONTROL_QUEUE, PARTS_QUEUE)
    )


def task_routes() -> dict[str, dict[str, str]]:
    routes = {name: {"queue": CONTROL_QUEUE, "routing_key": CONTROL_QUEUE} for name in CONTROL_TASKS}
    routes.update({name: {"queue": PARTS_QUEUE, "routing_key": PARTS_QUEUE} for name in PART_TASKS})
    return routes


def celery_config(settings: Settings) -> dict[str, Any]:
    """Settings every process of the system (clients and workers) uses."""
    return {
        "broker_url": settings.broker_url,
        "result_backend": settings.effective_result_backend,
        # JSON only: a pickle message from a broker client could run code on every worker.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_queues": task_queues(),
        "task_routes": task_routes(),
        "task_default_queue": CONTROL_QUEUE,
        "task_create_missing_queues": False,
        # Redelivery of unacknowledged messages. A part must finish well within it, or it runs twice.
        "broker_transport_options": {"visibility_timeout": settings.visibility_timeout},
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout},
        # Bounds the chord counters too: a chord whose parts outlive it would never fire.
        "result_expires": settings.retention_seconds,
        "task_send_sent_event": True,
        "broker_connection_retry_on_startup": True,
    }
