"""The notification options of a request, validated (used by :mod:`uploader.request`).

Pure functions raising ``ValueError`` with a message fit for the submitter (pydantic turns them
into the request's refusal)."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from uploader.model import check_callback_vars

#: The longest ``callback_url`` (characters).
MAX_URL_CHARS = 2048
#: ``callback_vars`` names: 1-64 of ``[A-Za-z0-9_.-]`` (their number and values: see
#: :func:`uploader.model.check_callback_vars`).
_VAR_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: A Celery task name: dotted Python-like identifiers, at most 200 characters.
_TASK_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
MAX_TASK_CHARS = 200
#: Names a callback may not take: the fleet's own tasks and Celery's.
RESERVED_TASK_PREFIXES = ("uploader.", "celery.")
_QUEUE_RE = re.compile(r"[A-Za-z0-9_.:-]{1,200}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: Where a callback task goes when the request names no ``callback_queue``: Celery's default
#: queue (a backend service's plain ``celery worker`` consumes it), never the fleet's own.
DEFAULT_CALLBACK_QUEUE = "celery"


def check_url(value: str) -> str:
    if len(value) > MAX_URL_CHARS:
        raise ValueError(f"callback_url is longer than {MAX_URL_CHARS} characters")
    if _CONTROL_RE.search(value) or " " in value:
        raise ValueError("callback_url must not contain spaces or control characters")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise ValueError("callback_url is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("callback_url must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        # It would be stored in the checkpoint and shown by status: sign requests instead.
        raise ValueError("callback_url must not carry credentials (user:password@); the POST is signed instead")
    if port == 0:
        raise ValueError("callback_url has port 0")
    return value


def check_vars(value: dict[str, str]) -> dict[str, str]:
    return check_callback_vars(
        value, what="callback_vars", name_re=_VAR_NAME_RE, name_rule="1-64 letters, digits, '_', '.' or '-'"
    )


def check_task(option: str, value: str) -> str:
    if len(value) > MAX_TASK_CHARS or not _TASK_RE.fullmatch(value):
        raise ValueError(f"{option} must be a Celery task name (dotted identifiers, at most {MAX_TASK_CHARS} characters)")
    if value.startswith(RESERVED_TASK_PREFIXES):
        raise ValueError(f"{option} must not name one of the uploader's or Celery's own tasks")
    return value


def check_queue(value: str) -> str:
    if not _QUEUE_RE.fullmatch(value):
        raise ValueError("callback_queue must be 1-200 letters, digits, '_', '.', ':' or '-'")
    return value
