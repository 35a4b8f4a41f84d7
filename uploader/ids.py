"""Upload (and batch) ids: their shape, checked wherever one arrives from outside before it
becomes part of a Redis key. Standard library only: the CLI checks an id before it loads anything."""

from __future__ import annotations

import re
import uuid
from typing import Any

from uploader.errors import InvalidRequest

UPLOAD_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: Characters of a hostile value quoted in a problem.
EXCERPT = 64


def shown(value: str) -> str:
    """A short quoted excerpt of ``value`` for a problem (``repr`` escapes what is unprintable)."""
    return repr(value[:EXCERPT]) + ("..." if len(value) > EXCERPT else "")


def valid_upload_id(value: str) -> bool:
    """Whether ``value`` has the shape of an upload id (safe as part of a Redis key)."""
    return bool(UPLOAD_ID_RE.fullmatch(value))


def check_upload_id(value: Any) -> None:
    """:class:`InvalidRequest` unless ``value`` has the shape of an upload id (one the caller
    typed, before it becomes part of a Redis key)."""
    if not (isinstance(value, str) and valid_upload_id(value)):
        quoted = shown(value) if isinstance(value, str) else type(value).__name__
        raise InvalidRequest(f"{quoted} is not an upload id: 1-128 characters of letters, digits, '.', '_' or '-', starting with a letter or digit")


def new_upload_id() -> str:
    """A fresh, unguessable upload id."""
    return uuid.uuid4().hex
