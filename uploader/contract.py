"""The public message contract: task names, queue names and the Celery settings both sides share.

Anything that can send a Celery message (in any language) can drive the uploader with these
names; see the README's "Message contract". Changing a name here is a breaking change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from uploader import auth, locality, priority, signing
from uploader.config import Settings
from uploader.ids import valid_upload_id

if TYPE_CHECKING:
    from kombu import Queue
from uploader.planner import MAX_PARTS
from uploader.redis_tls import celery_tls_config

#: Starts an upload. kwargs: source, bucket, key, [upload_id, part_size, abort_on_failure,
#: capability, endpoint, source_endpoint, checksum_algorithm, priority, source_credentials, locality, host (a
#: host-local file: uploader/locality.py), and every object option (uploader.model.ObjectOptions:
#: metadata, content_type, acl, storage_class, tags, sse, no_overwrite, ...)]. Returns the upload id.
START_UPLOAD = "uploader.start_upload"
#: Starts up to :data:`MAX_UPLOADS_PER_MESSAGE` uploads at once. kwargs: uploads (a list of objects,
#: each the kwargs of a start_upload message). Returns one entry per upload, in order:
#: ``{"upload_id": ..., "error": ""}`` (``error``: why that upload was refused; the others go on).
START_MANY = "uploader.start_many"
#: Continues an upload from its checkpoint. kwargs: upload_id, [restart].
RESUME_UPLOAD = "uploader.resume_upload"
#: Cancels an upload and aborts its multipart upload. kwargs: upload_id.
CANCEL_UPLOAD = "uploader.cancel_upload"
#: Uploads one part. kwargs: upload_id, part_number, generation. Internal (sent by the coordinator).
UPLOAD_PART = "uploader.upload_part"
#: Uploads a small source with one PutObject. kwargs: upload_id, generation. Internal.
PUT_OBJECT = "uploader.put_object"
#: Uploads a group of small sources, each with its own PutObject, record and retries.
#: kwargs: uploads (a list of [upload_id, generation] pairs). Internal.
PUT_OBJECTS = "uploader.put_objects"
#: Chord body: completes the multipart upload. kwargs: upload_id, generation. Internal.
COMPLETE_UPLOAD = "uploader.complete_upload"
#: Periodic: resume uploads that made no progress for stall_seconds. No kwargs.
RECONCILE = "uploader.reconcile"
#: Periodic: abort and forget abandoned uploads. kwargs: [dry_run].
JANITOR = "uploader.janitor"
#: Chord errback: marks the upload failed. args: failed task id; kwargs: upload_id, generation. Internal.
UPLOAD_FAILED = "uploader.upload_failed"
#: Uploads every file of a directory (a batch: uploader/batch.py). kwargs: source (an absolute
#: directory path), bucket, [prefix, batch_id, include, exclude (lists of globs, at most 100 of
#: 1024 characters), skip_unchanged, page_size (1..10,000), capability, options (the
#: start_upload kwargs every file's upload gets)]. Returns the batch id.
START_BATCH = "uploader.start_batch"
#: Lists the next page of a batch's directory and starts its files. kwargs: batch_id, page. Internal.
LIST_BATCH = "uploader.list_batch"
#: Cancels a batch: its listing stops, its uploads are cancelled. kwargs: batch_id.
CANCEL_BATCH = "uploader.cancel_batch"
#: Resumes a batch's failed uploads and refused starts, and a stalled listing. kwargs: batch_id.
RESUME_BATCH = "uploader.resume_batch"

#: Starting, resuming, cancelling, completing and failing uploads: short tasks that must never
#: queue behind thousands of parts.
CONTROL_QUEUE = "uploader.control"
#: Data movement: one message per part (or per small object). The first of the part lanes.
PARTS_QUEUE = "uploader.parts"

CONTROL_TASKS = (
    START_UPLOAD, START_MANY, RESUME_UPLOAD, CANCEL_UPLOAD, COMPLETE_UPLOAD, UPLOAD_FAILED, RECONCILE, JANITOR,
    START_BATCH, LIST_BATCH, CANCEL_BATCH, RESUME_BATCH,
)
PART_TASKS = (UPLOAD_PART, PUT_OBJECT, PUT_OBJECTS)

#: The most uploads one ``uploader.start_many`` message may carry: a message above it is
#: quarantined (never run), its sender told why. ``Uploader.submit_many`` sends a longer list as
#: several messages. (Bounds a coordinator's work per message, and the message's size.)
MAX_UPLOADS_PER_MESSAGE = 1000
#: The most uploads one internal ``uploader.put_objects`` message carries.
MAX_UPLOADS_PER_GROUP = 256


@dataclass(frozen=True)
class Arg:
    """One argument of one of our tasks, as a message must carry it (positionally, in this order,
    or by name): its JSON type and bounds. Workers quarantine a message whose arguments do not
    fit (see ``workers/poison.py``) instead of running the task."""

    name: str
    #: ``str``, ``int`` (never a bool), ``bool`` or ``list`` (a JSON array; ``minimum`` and
    #: ``maximum`` bound its length, ``items`` checks each entry).
    kind: type
    required: bool = True
    minimum: int | None = None
    maximum: int | None = None
    #: For strings: the shape they must have, and its description for the reason.
    check: Callable[[str], bool] | None = None
    shape: str = ""
    #: Never quoted in a reason (reasons are logged and dead-lettered).
    secret: bool = False
    #: Given by name only, never positionally (the proof and the token: a client adds them to
    #: the kwargs of a message whose positional shape predates them).
    keyword_only: bool = False
    #: For lists: why an entry does not fit, or ``None``.
    items: Callable[[Any], str | None] | None = None

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
        elif self.kind is list:
            return self._list_problem(value)
        elif not isinstance(value, str):
            return f"argument {self.name!r} must be a string, not {json_type(value)}"
        elif self.check is not None and not self.check(value):
            shown = "" if self.secret else f" ({value[:64]!r})"
            return f"argument {self.name!r}{shown} is not {self.shape}"
        return None

    def _list_problem(self, value: Any) -> str | None:
        if not isinstance(value, list):
            return f"argument {self.name!r} must be an array, not {json_type(value)}"
        if self.minimum is not None and len(value) < self.minimum:
            return f"argument {self.name!r} has {len(value)} entries, fewer than {self.minimum}"
        if self.maximum is not None and len(value) > self.maximum:
            return (
                f"argument {self.name!r} has {len(value)} entries, above the maximum of {self.maximum} "
                "per message: send a longer list as several messages"
            )
        if self.items is not None:
            for index, item in enumerate(value):
                problem = self.items(item)
                if problem is not None:
                    return f"argument {self.name!r}, entry {index}: {problem}"
        return None


def _start_request_shape(value: Any) -> str | None:
    """An entry of a start_many message: a start_upload message's kwargs (validated by the
    coordinator, which refuses that upload alone if they are wrong)."""
    return None if isinstance(value, dict) else f"must be an object (a start_upload request), not {json_type(value)}"


def _upload_generation_shape(value: Any) -> str | None:
    """An entry of a put_objects message: ``[upload_id, generation]``."""
    if not isinstance(value, list) or len(value) != 2:
        return "must be an array [upload_id, generation]"
    return _UPLOAD_ID.problem(value[0]) or _GENERATION.problem(value[1])


def _token_shape(value: str) -> bool:
    return 0 < len(value) <= 256 and value.isascii() and value.isprintable()


def _task_id_shape(value: str) -> bool:
    return 0 < len(value) <= 255 and value.isascii() and value.isprintable() and " " not in value


_BATCH_ID = Arg("batch_id", str, check=valid_upload_id, shape="a batch id ([A-Za-z0-9][A-Za-z0-9._-]{0,127})")
_UPLOAD_ID = Arg("upload_id", str, check=valid_upload_id, shape="an upload id ([A-Za-z0-9][A-Za-z0-9._-]{0,127})")
_GENERATION = Arg("generation", int, minimum=0, maximum=2**53)
#: An HMAC-SHA256 made with the fleet key (see uploader/auth.py): required on internal tasks,
#: an operator's authority on cancel and resume.
#: (Never "required" here: its absence on an internal task is an authority problem, reported as
#: such by :func:`authority_problem`, after the arguments' shapes.)
_PROOF = Arg(
    auth.PROOF, str, required=False, check=auth.valid_digest, shape="a proof (64 hex digits)", secret=True, keyword_only=True
)
#: An upload's capability token, as ``submit`` returned it.
_TOKEN = Arg(auth.TOKEN, str, required=False, check=_token_shape, shape="a capability token", secret=True, keyword_only=True)

#: The arguments of each of our tasks (``None``: not checked here). ``start_upload``'s kwargs
#: are the request, validated by the task itself (``uploader.request.parse_request``), which
#: reports the problems to the sender; only their container is checked (a JSON object, no
#: positional arguments, no ``self``, on which Celery's own ``Task.__call__`` would raise).
TASK_ARGUMENTS: dict[str, tuple[Arg, ...] | None] = {
    START_UPLOAD: None,
    START_MANY: (
        Arg("uploads", list, minimum=1, maximum=MAX_UPLOADS_PER_MESSAGE, items=_start_request_shape),
    ),
    RESUME_UPLOAD: (_UPLOAD_ID, Arg("restart", bool, required=False), _TOKEN, _PROOF),
    CANCEL_UPLOAD: (_UPLOAD_ID, _TOKEN, _PROOF),
    UPLOAD_PART: (_UPLOAD_ID, Arg("part_number", int, minimum=1, maximum=MAX_PARTS), _GENERATION, _PROOF),
    PUT_OBJECT: (_UPLOAD_ID, _GENERATION, _PROOF),
    PUT_OBJECTS: (
        Arg("uploads", list, minimum=1, maximum=MAX_UPLOADS_PER_GROUP, items=_upload_generation_shape), _PROOF,
    ),
    COMPLETE_UPLOAD: (_UPLOAD_ID, _GENERATION, _PROOF),
    RECONCILE: (_PROOF,),
    JANITOR: (Arg("dry_run", bool, required=False), _PROOF),
    # Like start_upload's, start_batch's kwargs are validated by the task (uploader.batch.BatchRequest).
    START_BATCH: None,
    LIST_BATCH: (_BATCH_ID, Arg("page", int, minimum=0, maximum=2**53), _PROOF),
    CANCEL_BATCH: (_BATCH_ID, _TOKEN, _PROOF),
    RESUME_BATCH: (_BATCH_ID, _TOKEN, _PROOF),
    # The chord errback: Celery sends the failed task's id as its one positional argument.
    UPLOAD_FAILED: (
        Arg("failed_task_id", str, check=_task_id_shape, shape="a task id"), _UPLOAD_ID, _GENERATION, _PROOF,
    ),
}

#: Tasks only the fleet sends: a message of one of them runs only with a valid proof.
INTERNAL_TASKS = frozenset({UPLOAD_PART, PUT_OBJECT, PUT_OBJECTS, COMPLETE_UPLOAD, UPLOAD_FAILED, RECONCILE, JANITOR, LIST_BATCH})


def named_arguments(task: str, args: list[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``args`` and ``kwargs`` of a message of our ``task`` as one mapping by name (for a
    message :func:`task_arguments_problem` accepted)."""
    return {**dict(zip(_POSITIONAL.get(task, ()), args, strict=False)), **kwargs}


def authority_problem(task: str, arguments: dict[str, Any], key: bytes | None) -> str | None:
    """Why a message of our ``task`` with these (well-shaped) ``arguments`` may not run, or
    ``None``: an internal task needs a valid proof, and a proof given to cancel or resume must
    be valid (their other authority, the capability token, is checked against the record)."""
    if task in INTERNAL_TASKS or auth.PROOF in arguments:
        if not auth.proven(key, task, arguments):
            if task in INTERNAL_TASKS:
                return f"{task} is internal: only workers send it, and this message has no valid proof"
            return "its proof is not valid (an operator's proof is made with UPLOADER_FLEET_KEY)"
    return None


def task_arguments_problem(task: str, args: list[Any], kwargs: dict[str, Any]) -> str | None:
    """Why ``args``/``kwargs`` cannot be the arguments of our task ``task``, or ``None`` (also for
    a task name not in :data:`TASK_ARGUMENTS`). Pure and cheap: runs for every message."""
    spec = TASK_ARGUMENTS.get(task)
    if spec is None:
        if task in (START_UPLOAD, START_BATCH) and args:  # the request is keyword arguments only
            return f"{len(args)} positional arguments; {task} takes keyword arguments only"
        if task in (START_UPLOAD, START_BATCH) and "self" in kwargs:  # Celery's own Task.__call__(self, ...) would raise
            return f"unknown argument 'self' for {task}"
        return None
    positional = _POSITIONAL[task]
    if len(args) > len(positional):
        return f"{len(args)} positional arguments; {task} takes at most {len(positional)}"
    values = dict(zip(positional, args, strict=False))
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
#: The names positional arguments stand for, in order (keyword-only ones are given by name only).
_POSITIONAL = {
    task: tuple(a.name for a in spec if not a.keyword_only) for task, spec in TASK_ARGUMENTS.items() if spec is not None
}


def json_type(value: Any) -> str:
    """The JSON name of ``value``'s type (for reasons that name a wrong type)."""
    if value is None:
        return "null"
    return _JSON_TYPES.get(type(value), type(value).__name__)


_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", tuple: "array", dict: "object"}


def part_lanes(count: int) -> tuple[str, ...]:
    """The names of ``count`` part lanes (``UPLOADER_PART_LANES``): ``uploader.parts``, then
    ``uploader.parts.1`` ... ``uploader.parts.<count - 1>``. Each upload's parts go to one lane and
    the workers read the lanes in turn, so that uploads are interleaved (see ``workers/lanes.py``)."""
    return (PARTS_QUEUE, *(f"{PARTS_QUEUE}.{lane}" for lane in range(1, count)))


def queue_arguments(settings: Settings) -> dict[str, Any] | None:
    """The RabbitMQ arguments the workers declare their queues with: ``x-max-priority``
    (``UPLOADER_QUEUE_MAX_PRIORITY``, which its classic queues need to rank messages by priority;
    0: none, as queues were declared before it existed) and ``x-queue-type: quorum``
    (``UPLOADER_QUEUE_TYPE``: replicated queues that survive a broker node's loss). RabbitMQ
    refuses to declare an existing queue with other arguments; Redis brokers ignore them."""
    arguments: dict[str, Any] = {}
    if settings.queue_max_priority:
        arguments["x-max-priority"] = settings.queue_max_priority
    if settings.queue_type == "quorum":
        arguments["x-queue-type"] = "quorum"
    return arguments or None


def task_queues(*, declare: bool = True, lanes: int = 1, arguments: dict[str, Any] | None = None) -> tuple[Queue, ...]:
    """The control queue and the ``lanes`` part lanes, declared with kombu (direct exchanges named
    after each queue), with ``arguments`` (:func:`queue_arguments`).

    ``declare=False`` (clients): never declared by this process. Celery publishes a task routed
    to a queue by the queue's name (its anonymous exchange), so sending needs only an LPUSH on
    the queue's list; declaring would also write kombu's binding sets (``_kombu.binding.*``) and
    read the queues' lengths, which the clients' Redis user may not (deploy/redis/users.acl)."""
    from kombu import Exchange, Queue  # (kombu loads with Celery: a client that only reads status never needs it)

    return tuple(
        Queue(name, Exchange(name, type="direct"), routing_key=name, no_declare=not declare, queue_arguments=arguments)
        for name in (CONTROL_QUEUE, *part_lanes(lanes))
    )


def host_queue(host: str, *, declare: bool = False, arguments: dict[str, Any] | None = None) -> Queue:
    """The queue of host ``host``'s workers (uploader/locality.py), as :func:`task_queues`
    declares its queues: a worker declares its own host's (``declare``); a sender publishes to
    any by name."""
    from kombu import Exchange, Queue

    name = locality.host_queue_name(host)
    return Queue(name, Exchange(name, type="direct"), routing_key=name, no_declare=not declare, queue_arguments=arguments)


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
    """Settings every process of the system (clients and workers) uses. With message signing on,
    task messages are ``auth`` (signed JSON) instead of JSON: see :mod:`uploader.signing`, whose
    ``enable`` each process then calls on its app."""
    config = {
        "broker_url": settings.broker_url,
        "result_backend": settings.effective_result_backend,
        # JSON only: a pickle message from a broker client could run code on every worker.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_queues": task_queues(lanes=settings.part_lanes, arguments=queue_arguments(settings)),
        "task_routes": task_routes(),
        "task_default_queue": CONTROL_QUEUE,
        "task_create_missing_queues": False,
        # Redelivery of unacknowledged messages. A part must finish well within it, or it runs twice.
        # One Redis list per priority (uploader/priority.py): requests' ``priority`` 0-9.
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout, **priority.transport_options(), **sentinel_options(settings),
            # RabbitMQ: publisher confirms, so a send returns once the broker has the message
            # (a part dispatched is a part queued, even if the broker fails right after).
            **({} if priority.is_redis(settings.broker_url) else {"confirm_publish": True}),
        },
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout, **sentinel_options(settings)},
        # Bounds the chord counters too: a chord whose parts outlive it would never fire.
        "result_expires": settings.retention_seconds,
        "task_send_sent_event": True,
        "broker_connection_retry_on_startup": True,
        # TLS for rediss:// URLs, the same for the broker and the results (uploader/redis_tls.py).
        **celery_tls_config(settings),
    }
    config.update(signing.celery_settings(settings))
    return config
