"""The public message contract: task names, queue names and the Celery settings both sides share.

Anything that can send a Celery message (in any language) can drive the uploader with these
names; see the README's "Message contract". Changing a name here is a breaking change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kombu import Exchange, Queue

from uploader.config import Settings
from uploader.planner import MAX_PARTS
from uploader.request import valid_upload_id

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


@dataclass(frozen=True)
class Arg:
    """One argument of one of our tasks, as a message must carry it (positionally, in this order,
    or by name): its JSON type and bounds. Workers quarantine a message whose arguments do not
    fit (see ``workers/poison.py``) instead of running the task."""

    name: str
    #: ``str``, ``int`` (never a bool) or ``bool``.
    kind: type
    required: bool = True
    minimum: int | None = None
    maximum: int | None = None
    #: For strings: the shape they must have, and its description for the reason.
    check: Callable[[str], bool] | None = None
    shape: str = ""

    def problem(self, value: Any) -> str | None:
        """Why ``value`` does not fit, or ``None``."""
        if self.kind is int:
            if type(value) is not int:
                return f"argument {self.name!r} must be an integer, not {json_type(value)}"
            if self.minimum is not None and value < self.minimum:
                return f"argument {self.name!r} is {value}, below {self.minimum}"
            if self.maximum is not None and value > self.maximum:
                return f"argument {self.name!r} is {value}, above {self.maximum}"
        elif self.kind is bool:
            if type(value) is not bool:
                return f"argument {self.name!r} must be a boolean, not {json_type(value)}"
        elif not isinstance(value, str):
            return f"argument {self.name!r} must be a string, not {json_type(value)}"
        elif self.check is not None and not self.check(value):
            return f"argument {self.name!r} ({value[:64]!r}) is not {self.shape}"
        return None


def _task_id_shape(value: str) -> bool:
    return 0 < len(value) <= 255 and value.isascii() and value.isprintable() and " " not in value


_UPLOAD_ID = Arg("upload_id", str, check=valid_upload_id, shape="an upload id ([A-Za-z0-9][A-Za-z0-9._-]{0,127})")
_GENERATION = Arg("generation", int, minimum=0, maximum=2**53)

#: The arguments of each of our tasks (``None``: not checked here). ``start_upload``'s kwargs
#: are the request, validated by the task itself (``uploader.request.parse_request``), which
#: reports the problems to the sender; only their container is checked (a JSON object).
TASK_ARGUMENTS: dict[str, tuple[Arg, ...] | None] = {
    START_UPLOAD: None,
    RESUME_UPLOAD: (_UPLOAD_ID, Arg("restart", bool, required=False)),
    CANCEL_UPLOAD: (_UPLOAD_ID,),
    UPLOAD_PART: (_UPLOAD_ID, Arg("part_number", int, minimum=1, maximum=MAX_PARTS), _GENERATION),
    PUT_OBJECT: (_UPLOAD_ID, _GENERATION),
    COMPLETE_UPLOAD: (_UPLOAD_ID, _GENERATION),
    RECONCILE: (),
    JANITOR: (Arg("dry_run", bool, required=False),),
    # The chord errback: Celery sends the failed task's id as its one positional argument.
    UPLOAD_FAILED: (Arg("failed_task_id", str, check=_task_id_shape, shape="a task id"), _UPLOAD_ID, _GENERATION),
}


def task_arguments_problem(task: str, args: list[Any], kwargs: dict[str, Any]) -> str | None:
    """Why ``args``/``kwargs`` cannot be the arguments of our task ``task``, or ``None`` (also for
    a task name not in :data:`TASK_ARGUMENTS`). Pure and cheap: runs for every message."""
    spec = TASK_ARGUMENTS.get(task)
    if spec is None:
        return None
    if len(args) > len(spec):
        return f"{len(args)} positional arguments; {task} takes at most {len(spec)}"
    values = dict(zip((a.name for a in spec), args))
    for name, value in kwargs.items():
        if name in values:
            return f"argument {name[:64]!r} given twice"
        values[name] = value
    names = _ARG_NAMES[task]
    unknown = [n for n in values if n not in names]
    if unknown:
        return f"unknown argument(s) {', '.join(repr(n[:64]) for n in sorted(unknown)[:5])} for {task}"
    missing = [a.name for a in spec if a.required and a.name not in values]
    if missing:
        return f"missing argument(s) {', '.join(map(repr, missing))} for {task}"
    for arg in spec:
        if arg.name in values:
            problem = arg.problem(values[arg.name])
            if problem is not None:
                return problem
    return None


_ARG_NAMES = {task: frozenset(a.name for a in spec) for task, spec in TASK_ARGUMENTS.items() if spec is not None}


def json_type(value: Any) -> str:
    """The JSON name of ``value``'s type (for reasons that name a wrong type)."""
    if value is None:
        return "null"
    return _JSON_TYPES.get(type(value), type(value).__name__)


_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", tuple: "array", dict: "object"}


def task_queues() -> tuple[Queue, ...]:
    """The two queues, declared with kombu (direct exchanges named after each queue)."""
    return tuple(
        Queue(name, Exchange(name, type="direct"), routing_key=name) for name in (CONTROL_QUEUE, PARTS_QUEUE)
    )


def task_routes() -> dict[str, dict[str, str]]:
    routes = {name: {"queue": CONTROL_QUEUE, "routing_key": CONTROL_QUEUE} for name in CONTROL_TASKS}
    routes.update({name: {"queue": PARTS_QUEUE, "routing_key": PARTS_QUEUE} for name in PART_TASKS})
    return routes


def sentinel_options(settings: Settings) -> dict[str, Any]:
    """kombu's and Celery's transport options for ``sentinel://`` URLs: the primary's name and
    the sentinels' password (harmless for other URLs, which ignore them)."""
    if not settings.redis_sentinel_master:
        return {}
    options: dict[str, Any] = {"master_name": settings.redis_sentinel_master}
    if settings.redis_sentinel_password_value:
        options["sentinel_kwargs"] = {"password": settings.redis_sentinel_password_value}
    return options


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
        "broker_transport_options": {"visibility_timeout": settings.visibility_timeout, **sentinel_options(settings)},
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout, **sentinel_options(settings)},
        # Bounds the chord counters too: a chord whose parts outlive it would never fire.
        "result_expires": settings.retention_seconds,
        "task_send_sent_event": True,
        "broker_connection_retry_on_startup": True,
    }
