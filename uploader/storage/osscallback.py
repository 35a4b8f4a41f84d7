"""Alibaba OSS's own upload callback (the request's ``oss_callback`` / ``oss_callback_vars``).

OSS calls the callback server itself when CompleteMultipartUpload (or a single PutObject) asks
for it with ``x-oss-callback`` (the callback JSON, base64) and ``x-oss-callback-var`` (the
``x:`` variables as a JSON object, base64), and answers that request with the callback server's
body instead of its usual XML (https://www.alibabacloud.com/help/en/oss/developer-reference/callback).
botocore models neither header, so the adapter passes them as an extra call parameter that a
``before-parameter-build`` handler moves into the call's context and a ``before-call`` handler
turns into headers (before signing, so they are signed). The answer is taken from the raw body
by a ``before-parse`` handler, ahead of botocore's own check, which would read a 200 with a
body that is not XML as a broken answer and send the request again.

Validation here raises ``ValueError`` with a message fit for the submitter (the request turns it
into its refusal); it has no I/O, and loads botocore only to install the handlers.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from typing import Any

from uploader.logsafe import escape_controls
from uploader.model import check_callback_vars

#: The call parameter the adapter passes (popped before botocore validates the call's parameters).
PARAM = "UploaderOssCallback"
#: Where the callback server's answer appears in the adapter's response.
ANSWER = "OssCallbackAnswer"
CALLBACK_HEADER = "x-oss-callback"
CALLBACK_VAR_HEADER = "x-oss-callback-var"
#: The operations that carry the headers.
OPERATIONS = ("CompleteMultipartUpload", "PutObject")
#: Our caps (the record keeps both; a header of a few KiB is well within what servers accept).
MAX_CALLBACK_BYTES = 4096
#: How much of the callback server's answer the record keeps (characters).
MAX_ANSWER_CHARS = 2000
#: The fields OSS's callback JSON has (callbackSNI is a boolean, the others text).
CALLBACK_FIELDS = frozenset({"callbackUrl", "callbackHost", "callbackBody", "callbackBodyType", "callbackSNI"})
#: OSS's custom variables: ``x:`` then lower-case letters, digits and underscores.
_VAR_NAME_RE = re.compile(r"x:[a-z0-9_]{1,64}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def check_callback(value: Any) -> dict[str, Any]:
    """The callback JSON (an object, or its text) as a dict; ``ValueError`` unless it is an
    object of OSS's fields with a non-empty ``callbackUrl`` and at most :data:`MAX_CALLBACK_BYTES`."""
    if isinstance(value, str):
        if len(value.encode()) > MAX_CALLBACK_BYTES:
            raise ValueError(f"oss_callback is longer than {MAX_CALLBACK_BYTES} bytes")
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError("oss_callback must be a JSON object (OSS's callback parameters)") from None
    if not isinstance(value, dict):
        raise ValueError("oss_callback must be a JSON object (OSS's callback parameters)")
    unknown = sorted(str(k)[:40] for k in value if k not in CALLBACK_FIELDS)
    if unknown:
        raise ValueError(f"oss_callback has unknown fields {unknown[:5]}; OSS's are {', '.join(sorted(CALLBACK_FIELDS))}")
    for name, field in value.items():
        if not isinstance(field, bool if name == "callbackSNI" else str):
            raise ValueError(f"oss_callback {name} must be {'true or false' if name == 'callbackSNI' else 'text'}")
    url = value.get("callbackUrl")
    if not url or _CONTROL_RE.search(url):
        raise ValueError("oss_callback needs a callbackUrl (printable text)")
    if len(encode(value)) > MAX_CALLBACK_BYTES:
        raise ValueError(f"oss_callback is longer than {MAX_CALLBACK_BYTES} bytes as JSON")
    return value


def check_vars(value: dict[str, str]) -> dict[str, str]:
    """``ValueError`` unless every name is ``x:`` and 1-64 of ``[a-z0-9_]`` and every value is
    printable text of at most :data:`~uploader.model.MAX_CALLBACK_VAR_CHARS`."""
    return check_callback_vars(
        value, what="oss_callback_vars", name_re=_VAR_NAME_RE, name_rule="'x:' and 1-64 lower-case letters, digits or '_'"
    )


def encode(value: dict[str, Any]) -> bytes:
    """Compact JSON, as stored in the record and sent (base64) in the header."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class OssCallback:
    """What one upload asks OSS to call: the callback JSON and its variables (may be empty)."""

    callback: dict[str, Any]
    variables: dict[str, str]

    @classmethod
    def from_record(cls, callback: str, variables: dict[str, str]) -> OssCallback | None:
        """From a record's ``oss_callback`` (JSON text) and ``oss_callback_vars``; None if unset."""
        return cls(json.loads(callback), dict(variables)) if callback else None

    def headers(self) -> dict[str, str]:
        """The request headers: the JSON texts, base64-encoded."""
        headers = {CALLBACK_HEADER: base64.b64encode(encode(self.callback)).decode("ascii")}
        if self.variables:
            headers[CALLBACK_VAR_HEADER] = base64.b64encode(encode(self.variables)).decode("ascii")
        return headers


def answer_fields(callback: OssCallback | None, response: dict[str, Any]) -> dict[str, str]:
    """The record field of the callback server's answer in ``response`` (none without a callback)."""
    return {"oss_callback_answer": str(response.get(ANSWER) or "")} if callback is not None else {}


def _take_param(params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
    """``before-parameter-build``: move our parameter out of botocore's sight, into the context."""
    callback = params.pop(PARAM, None)
    if callback is not None:
        context[PARAM] = callback


def _add_headers(params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
    """``before-call``: the headers of the callback the context carries (before signing)."""
    callback = context.get(PARAM)
    if isinstance(callback, OssCallback):
        params.setdefault("headers", {}).update(callback.headers())


def _take_answer(
    operation_model: Any, response_dict: dict[str, Any], customized_response_dict: dict[str, Any], **_: Any
) -> None:
    """``before-parse``: OSS answers a request with a callback with the callback server's body
    (JSON, as OSS requires of it), or with 203 and an XML error when the call failed (the object
    is stored all the same). Either is kept as the answer, and a body that is not XML is taken
    away from botocore's parser."""
    if operation_model.name not in OPERATIONS:
        return
    status = response_dict.get("status_code", 0)
    body = response_dict.get("body") or b""
    if not (200 <= status < 300) or not body:
        return
    if status == 203 or not body.lstrip().startswith(b"<"):
        # Escaped: a remote server's text, shown by ``status`` on terminals.
        customized_response_dict[ANSWER] = escape_controls(body.decode("utf-8", "replace")[:MAX_ANSWER_CHARS])
        if status != 203:
            response_dict["body"] = b""


#: botocore's own ``before-parse`` handlers for S3, among them the one that reads a 200 whose
#: body is not XML as a broken answer (``(event, handler, section)``; no section: the middle).
_S3_BEFORE_PARSE = "before-parse.s3.*"


def register(events: Any) -> None:
    """Install the handlers on a client's event system (for profiles with ``oss_callback``)."""
    # Here, not at the top: the request validates with this module and must not load botocore.
    from botocore.handlers import BUILTIN_HANDLERS, REGISTER_FIRST, REGISTER_LAST

    for operation in OPERATIONS:
        events.register(f"before-parameter-build.s3.{operation}", _take_param)
        events.register_last(f"before-call.s3.{operation}", _add_headers)
    # The answer must be taken before botocore's handlers see the body: they are registered on
    # the same event (a handler on a more specific event would run after them), so they are
    # taken off and put back behind ours, each in its own section as botocore registers it.
    builtin = [entry for entry in BUILTIN_HANDLERS if entry[0] == _S3_BEFORE_PARSE]
    for entry in builtin:
        events.unregister(entry[0], entry[1])
    events.register_first(_S3_BEFORE_PARSE, _take_answer)
    for entry in builtin:
        section = entry[2] if len(entry) > 2 else None
        if section == REGISTER_FIRST:
            events.register_first(entry[0], entry[1])
        elif section == REGISTER_LAST:
            events.register_last(entry[0], entry[1])
        else:
            events.register(entry[0], entry[1])
