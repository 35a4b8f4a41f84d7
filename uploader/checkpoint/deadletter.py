"""The dead-letter list: messages no worker could accept, kept for an operator to inspect.

Contract:

- One Redis list, ``{key_prefix}:deadletter``, on the checkpoint Redis, newest entry first
  (``LPUSH``), capped at :data:`MAX_ENTRIES` (``LTRIM`` in the same transaction as the push).
- Each entry is one JSON object: ``at`` (Unix time, float), ``queue``, ``reason`` (what was wrong,
  one line), ``task`` and ``task_id`` (``null`` when unknown), ``headers`` (only fields whose
  values are scalars, names and values truncated) and ``body`` (the first :data:`BODY_BYTES`
  bytes of what was received: ``{"text": ...}`` when it is UTF-8, else ``{"base64": ...}``, with
  ``size``, the full length, and ``truncated``).
- Values are kept as received (bounded, JSON-escaped): show them with :func:`printable`.
- A worker pushes the entry, then acknowledges the message (``workers/poison.py``): an entry is
  a record, nothing reads it back into a queue. ``uploader deadletter list`` and
  ``uploader deadletter purge`` are the operator's side.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import redis

from uploader.logsafe import escape_controls

#: Newest entries kept; older ones are trimmed as new ones arrive.
MAX_ENTRIES = 10_000
#: Bytes of a message's body kept in its entry.
BODY_BYTES = 4096
#: Header fields kept per entry, and characters kept of a header's name and value.
MAX_HEADERS = 32
MAX_NAME = 64
MAX_VALUE = 256


def printable(value: Any, limit: int = 200) -> str:
    """``value`` as one printable line of at most ``limit`` characters (and "..."): control
    characters (newlines, terminal escape sequences, Unicode line separators) are escaped, so a
    hostile value can neither forge a log line nor drive a terminal."""
    text = value if isinstance(value, str) else repr(value)
    # Escaped before it is cut (escapes lengthen it); only what can be shown is escaped.
    text = escape_controls(text[: limit + 1])
    return text[:limit] + "..." if len(text) > limit else text


def deadletter_key(prefix: str) -> str:
    return f"{prefix}:deadletter"


def make_entry(
    *, queue: str | None, reason: str, task: Any = None, task_id: Any = None, headers: Any = None,
    body: bytes | str | None = None, at: float | None = None,
) -> dict[str, Any]:
    """A dead-letter entry, with every field bounded (see the module docstring)."""
    return {
        "at": time.time() if at is None else at,
        "queue": _text(queue, MAX_VALUE),
        "reason": _text(reason, 1024),
        "task": _text(task, MAX_VALUE),
        "task_id": _text(task_id, MAX_VALUE),
        "headers": safe_headers(headers),
        "body": body_excerpt(body),
    }


def safe_headers(headers: Any) -> dict[str, Any]:
    """The scalar fields of ``headers`` (strings truncated), at most :data:`MAX_HEADERS` of them."""
    if not isinstance(headers, dict):
        return {}
    out: dict[str, Any] = {}
    for name, value in headers.items():
        if len(out) >= MAX_HEADERS:
            break
        if value is None or isinstance(value, (bool, int, float)):
            out[str(name)[:MAX_NAME]] = value
        elif isinstance(value, str):
            out[str(name)[:MAX_NAME]] = value[:MAX_VALUE]
    return out


def body_excerpt(body: bytes | str | None) -> dict[str, Any] | None:
    """The first :data:`BODY_BYTES` bytes of ``body``, as text if they are UTF-8, else base64."""
    if body is None:
        return None
    raw = body.encode("utf-8", "surrogateescape") if isinstance(body, str) else bytes(body)
    head = raw[:BODY_BYTES]
    excerpt: dict[str, Any]
    try:
        excerpt = {"text": head.decode("utf-8")}
    except UnicodeDecodeError as exc:
        if len(raw) > BODY_BYTES and exc.reason == "unexpected end of data":
            excerpt = {"text": head[: exc.start].decode("utf-8")}  # a character cut at the limit
        else:
            excerpt = {"base64": base64.b64encode(head).decode("ascii")}
    excerpt.update(size=len(raw), truncated=len(raw) > BODY_BYTES)
    return excerpt


def _text(value: Any, limit: int) -> str | None:
    if value is None:
        return None
    return (value if isinstance(value, str) else repr(value))[:limit]


class DeadLetters:
    """The dead-letter list on ``client`` (a redis-py client, decoded responses or not)."""

    def __init__(self, client: redis.Redis, *, prefix: str = "uploader", max_entries: int = MAX_ENTRIES) -> None:
        self.redis = client
        self.key = deadletter_key(prefix)
        self.max_entries = max_entries

    def push(self, entry: dict[str, Any]) -> None:
        """Add ``entry`` (from :func:`make_entry`) as the newest, dropping the oldest beyond the cap."""
        data = json.dumps(entry, ensure_ascii=True, separators=(",", ":"), default=repr)
        pipe = self.redis.pipeline(transaction=True)
        pipe.lpush(self.key, data)
        pipe.ltrim(self.key, 0, self.max_entries - 1)
        pipe.execute()

    def list(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest ``limit`` entries, newest first."""
        if limit <= 0:
            return []
        entries = []
        for raw in self.redis.lrange(self.key, 0, limit - 1):
            text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
            try:
                entry = json.loads(text)
            except ValueError:
                entry = {"reason": "unreadable dead-letter entry", "body": {"text": text[:BODY_BYTES]}}
            entries.append(entry)
        return entries

    def count(self) -> int:
        return int(self.redis.llen(self.key))

    def purge(self) -> int:
        """Remove every entry; returns how many there were."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.llen(self.key)
        pipe.delete(self.key)
        count, _ = pipe.execute()
        return int(count)
