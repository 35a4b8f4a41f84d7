"""A webhook body template like OSS's ``callbackBody`` (the request's ``callback_body``).

``${name}`` placeholders are replaced with the upload's values: ``${bucket}``, ``${object}`` (the
key), ``${etag}``, ``${size}``, ``${mimeType}`` (the content type the request asked for; "" if
none), ``${x:name}`` (the request's ``callback_vars[name]``), and, since the template replaces the
JSON result, ``${uploadId}`` and ``${state}`` (completed, failed or cancelled). Each value is
escaped for the body type (``callback_body_type``): percent-encoded for
``application/x-www-form-urlencoded`` (OSS's default), a JSON value (strings quoted, the size a
number) for ``application/json``, as OSS writes ``{"object":${object}}``. Validation raises
``ValueError`` with a message fit for the submitter.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping
from urllib.parse import quote

#: The longest template (characters).
MAX_TEMPLATE_CHARS = 4096
#: The system variables (``x:`` ones are the request's ``callback_vars``).
SYSTEM_VARIABLES = frozenset({"bucket", "object", "etag", "size", "mimeType", "uploadId", "state"})
_PLACEHOLDER_RE = re.compile(r"\$\{([^}]*)\}")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


class BodyType(enum.StrEnum):
    """How the rendered template is sent, and how its values are escaped."""

    FORM = "application/x-www-form-urlencoded"
    JSON = "application/json"


def placeholders(template: str) -> list[str]:
    """The names of the template's ``${...}`` placeholders, in order."""
    return _PLACEHOLDER_RE.findall(template)


def check_template(value: str) -> str:
    """``ValueError`` unless ``value`` is at most :data:`MAX_TEMPLATE_CHARS` printable characters
    (tabs and line breaks allowed) whose placeholders are all known (``x:name`` with a
    ``callback_vars`` name: the request checks that the variable is given)."""
    if len(value) > MAX_TEMPLATE_CHARS:
        raise ValueError(f"callback_body is longer than {MAX_TEMPLATE_CHARS} characters")
    if _CONTROL_RE.search(value):
        raise ValueError("callback_body must not contain control characters (other than tabs and line breaks)")
    unknown = [name for name in placeholders(value) if name not in SYSTEM_VARIABLES and not _is_var(name)]
    if unknown:
        known = ", ".join(f"${{{n}}}" for n in sorted(SYSTEM_VARIABLES))
        shown = [f"${{{n[:40]}}}" for n in unknown[:5]]
        raise ValueError(f"callback_body has unknown placeholders {shown}; known: {known}, ${{x:name}}")
    return value


def variables_used(template: str) -> list[str]:
    """The ``callback_vars`` names the template's ``${x:name}`` placeholders refer to."""
    return [name[2:] for name in placeholders(template) if _is_var(name)]


def _is_var(name: str) -> bool:
    return name.startswith("x:") and re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name[2:]) is not None


def render(template: str, body_type: BodyType, values: Mapping[str, str | int], variables: Mapping[str, str]) -> bytes:
    """The body: ``template`` with each placeholder replaced by its value escaped for ``body_type``
    (a variable no longer known renders as ""; the request refuses such a template)."""

    def value_of(match: re.Match[str]) -> str:
        name = match.group(1)
        value: str | int = variables.get(name[2:], "") if _is_var(name) else values.get(name, "")
        if body_type is BodyType.JSON:
            return json.dumps(value, ensure_ascii=False)
        return quote(str(value), safe="")

    return _PLACEHOLDER_RE.sub(value_of, template).encode()
