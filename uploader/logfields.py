"""Log lines one upload can be followed by.

A worker binds what it is working on (upload id, part number, batch id, task, task id) for the
duration of each task (:func:`bind`, :func:`clear`: a context variable, so each thread of a
threads pool has its own), and :class:`UploadFields` puts those fields on every record logged
meanwhile, Celery's own lines ("succeeded in 0.4s") included; Celery's "received" line, logged
before the task runs, gets the ids from the message's arguments.

- ``UPLOADER_LOG_FORMAT=text`` (the default): a line about an upload that does not name it
  already starts with ``upload <id> part <n>:``, so ``grep <id>`` finds every line of it.
- ``UPLOADER_LOG_FORMAT=json``: one JSON object per line (:class:`JsonFormatter`): ``time``,
  ``level``, ``logger``, ``message``, and the fields that apply: ``upload_id``, ``part``,
  ``batch_id``, ``task``, ``task_id``, ``worker``, ``event``, ``bytes``, ``duration_s``,
  ``exception``. Values are JSON-escaped (and the message escaped and redacted first, as in text
  mode: uploader/logsafe.py).
"""

from __future__ import annotations

import json
import logging
import re
import time
from contextvars import ContextVar
from typing import Any

#: The fields a record may carry, in the order a JSON line shows them.
FIELDS = ("upload_id", "part", "batch_id", "task", "task_id", "worker", "event", "bytes", "duration_s")

_bound: ContextVar[dict[str, Any] | None] = ContextVar("uploader_log_fields", default=None)
#: This process's worker incarnation (set once it is named: workers/app.py).
worker_name = ""

#: Celery's "received" line carries the message's kwargs as their repr: the ids are read from it
#: (ids have a fixed shape; nothing else of the repr is used).
_UPLOAD_ID_IN_REPR = re.compile(r"'(?:upload_id|batch_id)': '([A-Za-z0-9][A-Za-z0-9._-]{0,127})'")
_PART_IN_REPR = re.compile(r"'part_number': (\d{1,5})\b")
#: Celery's loggers whose records say what happened to a task.
_CELERY_EVENTS = {"celery.worker.strategy": "task_received", "celery.app.trace": "task_done"}


def bind(**values: Any) -> None:
    """Add ``values`` (``None`` ones left out) to the fields of this thread's (or task's) records."""
    current = _bound.get() or {}
    _bound.set({**current, **{k: v for k, v in values.items() if v is not None}})


def clear() -> None:
    _bound.set(None)


def bound() -> dict[str, Any]:
    return dict(_bound.get() or {})


class UploadFields(logging.Filter):
    """Puts the bound fields (and those a record brings in ``extra``) on each record as
    ``record.upload_fields``; with ``prefix``, a message about an upload that does not name it
    starts with ``upload <id>[ part <n>]: ``. Runs after the escaping filter (the message is
    final by then)."""

    def __init__(self, *, prefix: bool) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        fields = bound()
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                fields[name] = value
        if worker_name:
            fields.setdefault("worker", worker_name)
        self._from_celery(record, fields)
        record.upload_fields = fields
        upload_id = fields.get("upload_id") or fields.get("batch_id")
        if self.prefix and upload_id:
            message = record.getMessage()
            if str(upload_id) not in message:
                part = f" part {fields['part']}" if fields.get("part") is not None else ""
                kind = "upload" if fields.get("upload_id") else "batch"
                record.msg, record.args = f"{kind} {upload_id}{part}: {message}", None
        return True

    @staticmethod
    def _from_celery(record: logging.LogRecord, fields: dict[str, Any]) -> None:
        event = _CELERY_EVENTS.get(record.name)
        data = getattr(record, "data", None)
        if event is None or not isinstance(data, dict):
            return
        fields.setdefault("task", data.get("name"))
        fields.setdefault("task_id", data.get("id"))
        if "runtime" in data:
            fields["event"] = "task_succeeded"
            fields["duration_s"] = round(float(data["runtime"]), 6)
        else:
            fields.setdefault("event", event)
        arguments = data.get("kwargs")
        if isinstance(arguments, str) and "upload_id" not in fields:
            found = _UPLOAD_ID_IN_REPR.search(arguments)
            if found:
                fields["upload_id" if "'upload_id'" in arguments else "batch_id"] = found.group(1)
            part = _PART_IN_REPR.search(arguments)
            if part:
                fields["part"] = int(part.group(1))


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "upload_fields", {})
        out.update({name: fields[name] for name in FIELDS if fields.get(name) is not None})
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exception"] = record.exc_text
        return json.dumps(out, ensure_ascii=True, default=str)


def install(handlers: list[logging.Handler], log_format: str) -> None:
    """Put :class:`UploadFields` on each handler (once), after the escaping filters, and with
    ``json`` the :class:`JsonFormatter`."""
    for handler in handlers:
        if not any(isinstance(f, UploadFields) for f in handler.filters):
            handler.addFilter(UploadFields(prefix=log_format != "json"))
        if log_format == "json":
            handler.setFormatter(JsonFormatter())
    if log_format == "json":
        # Python's warnings (Celery's SecurityWarning, deprecations) as log records too, not
        # as lines of their own between the JSON objects.
        logging.captureWarnings(True)
