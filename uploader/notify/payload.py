"""What a notification says: the result of the upload, built from its record at delivery time."""

from __future__ import annotations

from typing import Any

from uploader.model import UploadRecord


def result_payload(record: UploadRecord, kind: str) -> dict[str, Any]:
    """The fields of a webhook body and of a callback task's kwargs. ``state`` is the terminal
    transition that wrote the event (``kind``), even if the upload moved on since (a failed
    upload resumed by hand); ``vars`` are the request's ``callback_vars``."""
    completed = kind == "completed"
    return {
        "upload_id": record.upload_id,
        "state": kind,
        "bucket": record.bucket,
        "key": record.key,
        "size": record.size,
        "etag": record.final_etag if completed else "",
        "version_id": record.version_id if completed else "",
        "checksum": record.checksum if completed else "",
        "error": "" if completed else record.error,
        "timings": {
            "created": record.created,
            "finished": record.finished,
            "seconds": round(record.finished - record.created, 3) if record.finished else None,
        },
        "vars": dict(record.callback_vars),
    }


def template_values(record: UploadRecord, kind: str) -> dict[str, str | int]:
    """The values of a ``callback_body`` template's system placeholders (uploader/notify/template.py)."""
    completed = kind == "completed"
    return {
        "bucket": record.bucket,
        "object": record.key,
        "etag": record.final_etag if completed else "",
        "size": record.size,
        "mimeType": record.options.content_type or "",
        "uploadId": record.upload_id,
        "state": kind,
    }
