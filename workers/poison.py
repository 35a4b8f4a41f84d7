"""Poison messages: a message no worker can accept is quarantined, never allowed to stop a worker.

Celery stops a worker ("Unrecoverable error") on a task message without a body, with a body of
the wrong shape or a ``timelimit`` that is not two numbers, and kombu's Redis transport crashes
it on a list item that is not JSON or an envelope whose body is not base64 (that message is lost
without trace); a message without an ``id`` header makes the consumer reconnect for ever. Two
guards stop that, in the worker only:

- :class:`workers.consumer.QuarantiningConsumer` checks every task message with
  :func:`inspect_message` (pure, a few microseconds) before Celery's strategy sees it, and
  catches whatever Celery's handler still raises;
- :mod:`workers.transport` catches what fails before a kombu message exists (a list item that is
  not JSON, an envelope that cannot be read), with :func:`envelope_problem` naming what is wrong.

Either way :func:`quarantine` logs one line (the reason, the queue, the task name and id if
known; control characters escaped, payload excerpts of at most a few hundred characters) and
adds the message to the dead-letter list (:mod:`uploader.checkpoint.deadletter`), and the
message is acknowledged: it never comes back. Its sender, if it waits for the task's result, gets
a :class:`~uploader.errors.MessageQuarantined` failure (:func:`answer_sender`), and a refused
start request is noted under its upload id for ``status``. Our own messages pass untouched;
display-only headers (``argsrepr``/``kwargsrepr``) are made printable rather than refused.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import reprlib
import threading
from collections.abc import Callable, Container
from datetime import UTC, datetime
from typing import Any, NamedTuple

import redis
from celery import states
from celery.utils.time import maybe_iso8601
from kombu.exceptions import InconsistencyError
from kombu.serialization import loads as kombu_loads
from kombu.utils.json import loads as json_loads
from redis.backoff import NoBackoff
from redis.retry import Retry

from uploader import contract, signing
from uploader.checkpoint.connection import redis_client
from uploader.checkpoint.deadletter import DeadLetters, make_entry, printable
from uploader.context import default_context
from uploader.contract import json_type, named_arguments, task_arguments_problem
from uploader.errors import MessageQuarantined
from uploader.ids import valid_upload_id

log = logging.getLogger(__name__)

#: Errors of the broker connection itself: they propagate (the consumer reconnects and the
#: message, still unacknowledged, comes back); everything else a message causes is its fault.
BROKER_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, InconsistencyError, OSError,
)

JSON_CONTENT_TYPE = "application/json"
#: Characters of a value quoted in a reason or a log line.
EXCERPT = 64
#: Longest ``argsrepr``/``kwargsrepr`` header passed on (longer ones are cut; Celery's own are
#: at most ~1 KiB).
MAX_REPR = 8192


class Verdict(NamedTuple):
    """What :func:`inspect_message` found: ``problem`` is ``None`` for a message to run."""

    problem: str | None
    task: str | None = None
    task_id: str | None = None


#: ``value`` as one printable line, control characters escaped (see ``printable``).
escape = printable


_reprs = reprlib.Repr()  # (keyword arguments only from Python 3.12)
_reprs.maxlevel, _reprs.maxdict, _reprs.maxlist, _reprs.maxtuple = 3, 8, 8, 8
_reprs.maxstring = _reprs.maxother = EXCERPT
_repr = _reprs.repr


def _quote(value: Any) -> str:
    """A short, quoted excerpt of a value for a reason."""
    if isinstance(value, str):
        return repr(value[:EXCERPT] + ("..." if len(value) > EXCERPT else ""))
    text = _repr(value)  # bounded however large the value
    return text[:EXCERPT] + ("..." if len(text) > EXCERPT else "")


def _task_id(value: Any) -> bool:
    # A uuid in our messages; any printable ASCII without spaces from other clients. It is
    # logged by Celery and used in result keys.
    return type(value) is str and 0 < len(value) <= 255 and value.isascii() and value.isprintable() and " " not in value


def _check_optional_id(name: str, value: Any) -> str | None:
    if value is None or _task_id(value):
        return None
    return f"header {name!r} is not a task id: {_quote(value)}"


def _check_optional_text(name: str, value: Any) -> str | None:
    if value is None or (type(value) is str and len(value) <= 255 and value.isprintable()):
        return None
    return f"header {name!r} must be a short printable string, not {_quote(value)}"


def _check_repr(name: str, value: Any) -> str | None:
    # Display only (Celery's "Task received" log line, Flower): a string of any content is
    # made printable by sanitize_display_headers, not refused (Celery's own saferepr leaves
    # control characters of string values as they are).
    if value is None or type(value) is str:
        return None
    return f"header {name!r} must be a string, not {json_type(value)}"


#: Headers that are only shown (logs, Flower), never interpreted.
DISPLAY_HEADERS = ("argsrepr", "kwargsrepr")


def sanitize_display_headers(headers: dict[str, Any]) -> None:
    """Make ``argsrepr``/``kwargsrepr`` one printable line of at most :data:`MAX_REPR`
    characters, in place: a CR or LF in a value would forge a line of the worker's log."""
    for name in DISPLAY_HEADERS:
        value = headers.get(name)
        if type(value) is str and (len(value) > MAX_REPR or not value.isprintable()):
            headers[name] = escape(value, MAX_REPR)


def _check_count(name: str, value: Any) -> str | None:
    if type(value) is int and value >= 0:
        return None
    return f"header {name!r} must be a non-negative integer, not {_quote(value)}"


def _check_optional_count(name: str, value: Any) -> str | None:
    return None if value is None else _check_count(name, value)


def _check_optional_bool(name: str, value: Any) -> str | None:
    if value is None or type(value) is bool:
        return None
    return f"header {name!r} must be a boolean, not {_quote(value)}"


def _check_timelimit(name: str, value: Any) -> str | None:
    # Celery unpacks it as (soft, hard) seconds, each null or a number.
    if value is None or value == []:
        return None
    if type(value) in (list, tuple) and len(value) == 2 and all(
        v is None or (type(v) in (int, float) and math.isfinite(v) and v >= 0) for v in value
    ):
        return None
    return f"header 'timelimit' must be [soft, hard] seconds (numbers or null), not {_quote(value)}"


def _check_time(name: str, value: Any) -> str | None:
    _, problem = _parse_time(name, value)
    return problem


def _check_stamped_headers(name: str, value: Any) -> str | None:
    if value is None or (type(value) is list and all(type(v) is str for v in value)):
        return None
    return f"header {name!r} must be a list of strings, not {_quote(value)}"


def _check_stamps(name: str, value: Any) -> str | None:
    if value is None or type(value) is dict:
        return None
    return f"header {name!r} must be an object, not {_quote(value)}"


def _parse_time(name: str, value: Any) -> tuple[datetime | None, str | None]:
    if value is None or value == "":
        return None, None
    if type(value) is not str:
        return None, f"header {name!r} must be an ISO 8601 time, not {json_type(value)} {_quote(value)}"
    try:
        parsed = maybe_iso8601(value)
        assert parsed is not None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        parsed.timestamp()  # out of range for the platform?
    except Exception:  # noqa: BLE001  (dateutil raises ValueError, OverflowError, ...)
        return None, f"header {name!r} is not an ISO 8601 time: {_quote(value)}"
    return parsed, None


#: Header checks by name (headers not named here are left to Celery; ``task``, ``id`` and
#: ``eta`` are checked apart).
_HEADER_CHECKS = {
    "lang": _check_optional_text,
    "shadow": _check_optional_text,
    "origin": _check_optional_text,
    "meth": _check_optional_text,
    "root_id": _check_optional_id,
    "parent_id": _check_optional_id,
    "group": _check_optional_id,
    "group_index": _check_optional_count,
    "retries": _check_count,
    "replaced_task_nesting": _check_optional_count,
    "timelimit": _check_timelimit,
    "expires": _check_time,
    "argsrepr": _check_repr,
    "kwargsrepr": _check_repr,
    "ignore_result": _check_optional_bool,
    "stamped_headers": _check_stamped_headers,
    "stamps": _check_stamps,
}

_EMBED_LISTS = ("callbacks", "errbacks", "chain")


def _signature_problem(where: str, value: Any) -> str | None:
    if type(value) is dict and type(value.get("task")) is str:
        return None
    return f"{where} is not a task signature (an object with a 'task' string)"


def inspect_message(
    headers: Any, content_type: Any, content_encoding: Any, body: Any, *,
    tasks: Container[str], visibility_timeout: float, now: datetime | None = None,
    decode: Callable[[], Any] | None = None,
    authenticate: Callable[[str, dict[str, Any]], str | None] | None = None,
    signed: bool = False,
) -> Verdict:
    """Whether a task message (Celery protocol 2, as a kombu ``Message`` holds it: its headers,
    content type and encoding, and its body bytes) can be handed to Celery.

    ``tasks`` are the registered task names; an ``eta`` more than ``visibility_timeout`` seconds
    ahead is refused (Redis would deliver the message again while a worker holds it). Pure: no
    I/O, no clock unless the message has an ``eta`` and ``now`` is not given. ``decode``, if
    given, decodes ``body`` instead of kombu's JSON decoder (the worker passes the message's own
    ``decode``, whose result kombu caches for Celery, so the body is decoded once).
    ``authenticate``, if given, is asked last, with the task and its arguments by name, whether
    the sender may send it (the worker passes :func:`uploader.contract.authority_problem` with
    its fleet key). ``signed``: this fleet uses Celery's message signing (:mod:`uploader.signing`);
    only signed messages wrapping JSON are accepted, and ``decode`` verifies their signature
    (a message whose signature does not verify is refused, never raised). Otherwise only JSON is.
    """
    if type(headers) is not dict:
        return Verdict(f"headers are {json_type(headers)}, not an object")
    task = headers.get("task")
    task_id = headers.get("id")
    name = task if type(task) is str else None
    ident = task_id if type(task_id) is str else None
    problem = _problem(
        headers, task, task_id, content_type, content_encoding, body, tasks, visibility_timeout, now, decode, authenticate,
        signed,
    )
    return Verdict(problem, name, ident)


def _problem(
    headers: dict[str, Any], task: Any, task_id: Any, content_type: Any, content_encoding: Any, body: Any,
    tasks: Container[str], visibility_timeout: float, now: datetime | None, decode: Callable[[], Any] | None,
    authenticate: Callable[[str, dict[str, Any]], str | None] | None = None, signed: bool = False,
) -> str | None:
    if task is None:
        return "no 'task' header (Celery message protocol 2 is required)"
    if type(task) is not str:
        return f"header 'task' must be a string, not {json_type(task)}"
    if task not in tasks:
        return f"unknown task name {_quote(task)}"
    if not _task_id(task_id):
        return "no 'id' header" if task_id is None else f"header 'id' is not a task id: {_quote(task_id)}"
    if signed and content_type != signing.SIGNED_CONTENT_TYPE:
        return (f"unsigned message (content type {_quote(content_type)}): this fleet runs only messages signed "
                "with a trusted certificate (Celery's auth serializer, UPLOADER_MESSAGE_SIGNING_*)")
    if not signed and content_type != JSON_CONTENT_TYPE:
        return f"content type {_quote(content_type)} is not {JSON_CONTENT_TYPE}"
    if type(content_encoding) is not str or content_encoding.lower() != "utf-8":
        return f"content encoding {_quote(content_encoding)} is not utf-8"

    for header, value in headers.items():
        check = _HEADER_CHECKS.get(header)
        if check is not None:
            problem = check(header, value)
            if problem is not None:
                return problem
    eta = headers.get("eta")
    if eta is not None:
        when, problem = _parse_time("eta", eta)
        if problem is not None:
            return problem
        if when is not None:
            ahead = (when - (now or datetime.now(UTC))).total_seconds()
            if ahead > visibility_timeout:
                return (f"eta {_quote(eta)} is {ahead:.0f} s ahead, beyond the visibility timeout "
                        f"({visibility_timeout:g} s): it would be delivered again while a worker holds it")

    if not body:
        return "no body" if body is None else "empty body"
    if signed:
        # Before decoding: Celery's signature does not cover the inner content type.
        problem = signing.inner_content_problem(body)
        if problem is not None:
            return problem
    try:
        if decode is not None:
            payload = decode()
        elif signed:
            payload = kombu_loads(body, content_type, content_encoding, accept=[signing.SIGNED_CONTENT_TYPE])
        else:
            payload = json_loads(body)
    except Exception as exc:  # noqa: BLE001  (JSONDecodeError, or kombu's type hooks, maybe as DecodeError)
        if signed:
            refused = signing.verification_problem(exc)
            if refused is not None:
                return escape(refused, 200)
        cause = exc.__cause__ or exc.__context__ or exc
        if isinstance(exc, UnicodeDecodeError) or isinstance(cause, UnicodeDecodeError):
            return "body is not UTF-8 text"
        if isinstance(exc, RecursionError) or isinstance(cause, RecursionError):
            return "body is nested too deeply"
        return f"body is not JSON ({escape(str(exc), EXCERPT)})"
    if type(payload) not in (list, tuple) or len(payload) != 3:
        return f"body must be [args, kwargs, embed], not {json_type(payload)} {_quote(payload)}"
    args, kwargs, embed = payload
    if type(args) not in (list, tuple):
        return f"body: args must be an array, not {json_type(args)}"
    if type(kwargs) is not dict:
        return f"body: kwargs must be an object, not {json_type(kwargs)}"
    if embed is not None:
        if type(embed) is not dict:
            return f"body: embed must be an object, not {json_type(embed)}"
        for key in _EMBED_LISTS:
            value = embed.get(key)
            if value is not None:
                if type(value) is not list:
                    return f"body: embed {key!r} must be an array of signatures, not {json_type(value)}"
                for item in value:
                    problem = _signature_problem(f"body: an item of embed {key!r}", item)
                    if problem is not None:
                        return problem
        chord = embed.get("chord")
        if chord is not None:
            problem = _signature_problem("body: embed 'chord'", chord)
            if problem is not None:
                return problem
    problem = task_arguments_problem(task, list(args), kwargs)
    if problem is None and authenticate is not None:
        problem = authenticate(task, named_arguments(task, list(args), kwargs))
    return problem


def item_problem(exc: BaseException) -> str:
    """What is wrong with a Redis list item that is not even JSON (decoding it raised ``exc``)."""
    if isinstance(exc, UnicodeDecodeError):
        return "the list item is not UTF-8 text"
    return f"the list item is not a JSON message envelope ({type(exc).__name__}: {escape(str(exc), EXCERPT)})"


def envelope_problem(raw: Any, exc: BaseException | None = None) -> str:
    """What is wrong with a Redis list item kombu could not turn into a message (it raised
    ``exc``): the envelope ``{body, content-type, content-encoding, headers, properties:
    {delivery_tag, body_encoding, delivery_info: {exchange, routing_key}}}``. Pure."""
    if type(raw) is not dict:
        return f"the envelope is a JSON {json_type(raw)}, not an object"
    properties = raw.get("properties")
    if type(properties) is not dict:
        return "the envelope has no 'properties'" if properties is None else f"envelope 'properties' is {json_type(properties)}, not an object"
    tag = properties.get("delivery_tag")
    if tag is None:
        return "the envelope has no 'properties.delivery_tag'"
    if type(tag) not in (str, int) or tag == "":
        return f"envelope 'properties.delivery_tag' is not a string: {_quote(tag)}"
    info = properties.get("delivery_info")
    if type(info) is not dict or not all(type(info.get(k)) is str for k in ("exchange", "routing_key")):
        return "envelope 'properties.delivery_info' lacks 'exchange' and 'routing_key' strings"
    headers = raw.get("headers")
    if headers is not None and type(headers) is not dict:
        return f"envelope 'headers' is {json_type(headers)}, not an object"
    encoding = properties.get("body_encoding")
    body = raw.get("body")
    if body is not None and type(body) is not str:
        return f"envelope 'body' is {json_type(body)}, not a string"
    if encoding not in (None, "base64", "utf-8"):
        return f"unknown body_encoding {_quote(encoding)}"
    if body and encoding == "base64":
        try:
            base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError) as error:
            return f"body is not valid base64 ({escape(str(error), EXCERPT)})"
    if exc is None:
        return "the envelope could not be read"
    return f"the envelope could not be read ({type(exc).__name__}: {escape(str(exc), EXCERPT)})"


# -- the side effects: a log line and a dead-letter entry -------------------------------------

_deadletters: DeadLetters | None = None
_deadletters_lock = threading.Lock()


def deadletters() -> DeadLetters:
    """This process's dead-letter list, on the checkpoint Redis. Short timeouts and no retries:
    it is written from the worker's event loop, and an entry that cannot be written is logged."""
    global _deadletters
    with _deadletters_lock:
        if _deadletters is None:
            from uploader.config import get_settings
            from uploader.redis_tls import tls_options

            settings = get_settings()
            client = redis_client(
                settings.effective_checkpoint_url, timeout=2, retry=Retry(NoBackoff(), 0),
                sentinel_master=settings.redis_sentinel_master, sentinel_password=settings.redis_sentinel_password_value,
                tls=tls_options(settings),
            )
            _deadletters = DeadLetters(client, prefix=settings.key_prefix)
        return _deadletters


def quarantine(
    *, queue: str | None, reason: str, task: Any = None, task_id: Any = None, headers: Any = None,
    body: bytes | str | None = None,
) -> None:
    """Log ``reason`` as one line and add the message to the dead-letter list (or, if Redis
    cannot take it, put the entry in that line). Never raises: the caller acknowledges the
    message next, whatever happened here."""
    try:
        entry = make_entry(queue=queue, reason=reason, task=task, task_id=task_id, headers=headers, body=body)
    except Exception as exc:  # noqa: BLE001  (a value nothing could represent)
        entry = make_entry(queue=queue, reason=f"{reason} (entry incomplete: {type(exc).__name__})")
    known = [f"{name} {escape(value, 100)}" for name, value in (("task", task), ("id", task_id)) if value is not None]
    what = f"quarantined a message from queue {escape(queue, 100)}: {escape(reason, 300)}"
    if known:
        what += f" ({', '.join(known)})"
    try:
        store = deadletters()
        store.push(entry)
    except Exception as exc:  # noqa: BLE001  (Redis away, or anything else: log the entry instead)
        log.error("%s; the dead-letter list is unreachable (%s), entry: %s",
                  what, escape(f"{type(exc).__name__}: {exc}", 120), escape(json.dumps(entry, default=repr), 400))
    else:
        log.error("%s; moved to the dead-letter list %s", what, store.key)


def answer_sender(app: Any, reason: str, task: Any, task_id: Any, body: Any) -> None:
    """Tell whoever waits for the quarantined task that it will never run: a FAILURE result
    (:class:`~uploader.errors.MessageQuarantined`) under its id, if it has a usable one; and for
    a start request naming a usable upload id, a refusal ``status`` reports. Never raises."""
    if not _task_id(task_id):
        return
    error = MessageQuarantined(f"the message was quarantined (never run): {escape(reason, 300)}")
    # The refusal first: a sender that sees the result may ask `status` at once.
    if task in (contract.START_UPLOAD, contract.START_MANY):
        _note_refusal(error, body)
    try:
        app.backend.store_result(task_id, error, states.FAILURE)
    except Exception as exc:  # noqa: BLE001  (the result backend away: the log line remains)
        log.warning("could not store the result of quarantined task %s: %s", escape(task_id, 100), escape(str(exc), 120))


def _note_refusal(error: MessageQuarantined, body: Any) -> None:
    """Record ``error`` as the refusal of the start request in ``body`` (of each request, for a
    start_many: at most :data:`~uploader.contract.MAX_UPLOADS_PER_MESSAGE`), if it names a
    usable upload id. Never raises."""
    try:
        _, kwargs, _ = json.loads(body)
        requests = kwargs.get("uploads") if "uploads" in kwargs else [kwargs]
        upload_ids = [r.get("upload_id") for r in requests[: contract.MAX_UPLOADS_PER_MESSAGE] if isinstance(r, dict)]
    except Exception:  # noqa: BLE001  (a body too broken to name an upload)
        return
    for upload_id in upload_ids:
        if isinstance(upload_id, str) and valid_upload_id(upload_id):
            try:
                ctx = default_context()
                ctx.checkpoint.refuse(upload_id, str(error), ctx.settings.refusal_retention_seconds, "MessageQuarantined")
            except Exception as exc:  # noqa: BLE001
                log.warning("could not note the refusal of upload %s: %s", upload_id, escape(str(exc), 120))
