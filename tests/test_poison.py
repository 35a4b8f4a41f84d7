"""Poison messages (workers/poison.py, workers/consumer.py, workers/transport.py): every malformed
message on either queue is logged once, dead-lettered and acknowledged, never stops a worker and
never comes back; our own messages pass untouched.

The malformed shapes are built from real envelopes (Celery's ``send_task`` through kombu's
in-memory transport, which writes the same envelope as the Redis transport), then broken one
way each. The unit tests run them through the pure checks; the integration test pushes them raw
onto the Redis lists of a real worker.
"""

from __future__ import annotations

import base64
import inspect
import json
import logging
import ssl
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from queue import Empty
from typing import Any

import pytest
import redis
from celery import Celery, chord, group
from celery.utils import uuid as celery_uuid
from click.testing import CliRunner
from kombu import Connection
from kombu.serialization import dumps as kombu_dumps

from tests.conftest import FLEET_KEY, Stack, listen_for_events, sha256_file
from uploader import auth, contract
from uploader.checkpoint.deadletter import BODY_BYTES, DeadLetters, make_entry, printable
from uploader.config import Settings
from uploader.contract import CONTROL_QUEUE, PARTS_QUEUE
from uploader.dev.localstack import wait_until
from uploader.planner import MiB
from workers import poison, transport

VISIBILITY_TIMEOUT = Settings().visibility_timeout
#: The Redis database tests without a stack share (as conftest's ``store``), under keys of their own.
SHARED_DB = 40
QUARANTINED = "quarantined a message from queue"
UPLOAD_ID = "job-42.a_b"

# -- real envelopes, from Celery's own send_task ------------------------------------------------


@pytest.fixture(scope="module")
def client_app() -> Iterator[Celery]:
    """A Celery client as any sender builds one (uploader.contract's settings), on kombu's
    in-memory transport: what it sends can be read back as the raw envelope."""
    app = Celery("poison-client", set_as_current=False)
    conf = contract.celery_config(Settings())
    conf.update(broker_url="memory://", result_backend="cache+memory://", broker_transport_options={})
    app.conf.update(conf)
    yield app
    app.close()


def sent(app: Celery, queue: str, send: Callable[[], Any]) -> list[dict[str, Any]]:
    """The raw envelopes ``send()`` put on ``queue``, in order (both queues are drained: kombu's
    in-memory broker is shared by the whole process)."""
    out: dict[str, list[dict[str, Any]]] = {PARTS_QUEUE: [], CONTROL_QUEUE: []}
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        send()
        for name, envelopes in out.items():
            while True:
                try:
                    envelopes.append(channel._get(name))
                except Empty:
                    break
    return out[queue]


def template(app: Celery, queue: str) -> dict[str, Any]:
    """A well-formed envelope of one of our tasks on ``queue``, as send_task writes it."""
    if queue == PARTS_QUEUE:
        name, kwargs = contract.UPLOAD_PART, {"upload_id": UPLOAD_ID, "part_number": 3, "generation": 1}
    else:
        name, kwargs = contract.COMPLETE_UPLOAD, {"upload_id": UPLOAD_ID, "generation": 1}
    (envelope,) = sent(app, queue, lambda: app.send_task(name, kwargs=kwargs))
    return envelope


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def body_of(envelope: dict[str, Any]) -> list[Any]:
    return json.loads(base64.b64decode(envelope["body"]))


def with_body(envelope: dict[str, Any], payload: Any) -> dict[str, Any]:
    envelope["body"] = b64(json.dumps(payload))
    return envelope


def edit_kwargs(envelope: dict[str, Any], edit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    args, kwargs, embed = body_of(envelope)
    edit(kwargs)
    return with_body(envelope, [args, kwargs, embed])


def set_header(name: str, value: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def edit(envelope: dict[str, Any]) -> dict[str, Any]:
        envelope["headers"][name] = value
        return envelope

    return edit


def drop(*path: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def edit(envelope: dict[str, Any]) -> dict[str, Any]:
        target = envelope
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
        return envelope

    return edit


def far_eta() -> str:
    return (datetime.now(UTC) + timedelta(seconds=VISIBILITY_TIMEOUT + 3600)).isoformat()


def _kwarg(name: str, value: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda e: edit_kwargs(e, lambda kw: kw.__setitem__(name, value))


#: name -> (how to break a good envelope, or make a raw item; words the reason must contain).
#: An edit returns the envelope (a dict, sent as JSON) or the raw list item (str or bytes).
MALFORMED: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    # The body.
    "no body": (drop("body"), "no body"),
    "empty body": (lambda e: {**e, "body": ""}, "empty body"),
    "body not base64": (lambda e: {**e, "body": "***not base64***"}, "not valid base64"),
    "body not JSON": (lambda e: {**e, "body": b64("{not json")}, "body is not JSON"),
    "body not UTF-8": (lambda e: {**e, "body": b64(b"\xff\xfe[[], {}, {}]")}, "not UTF-8"),
    "body an object": (lambda e: with_body(e, {"args": [], "kwargs": {}}), "body must be [args, kwargs, embed]"),
    "body of two items": (lambda e: with_body(e, [[], {}]), "body must be [args, kwargs, embed]"),
    "kwargs an array": (lambda e: with_body(e, [[], [], {}]), "kwargs must be an object"),
    "args a string": (lambda e: with_body(e, ["x", {}, {}]), "args must be an array"),
    "embed chord not a signature": (lambda e: with_body(e, [*body_of(e)[:2], {"chord": 5}]), "embed 'chord'"),
    "body nested too deeply": (lambda e: {**e, "body": b64("[" * 100_000 + "]" * 100_000)}, "nested too deeply"),
    # The envelope.
    "not JSON at all": (lambda e: "this is not json", "not a JSON message envelope"),
    "not UTF-8 at all": (lambda e: b"\xff\xfe\x00garbage", "not a JSON message envelope"),
    "envelope an array": (lambda e: json.dumps([e]), "the envelope is a JSON array"),
    "envelope a string": (lambda e: json.dumps("hello"), "the envelope is a JSON string"),
    "no properties": (drop("properties"), "no 'properties'"),
    "no delivery_tag": (drop("properties", "delivery_tag"), "delivery_tag"),
    "no delivery_info": (drop("properties", "delivery_info"), "delivery_info"),
    "no routing_key": (drop("properties", "delivery_info", "routing_key"), "delivery_info"),
    "headers an array": (lambda e: {**e, "headers": ["task"]}, "'headers' is array"),
    "unknown body_encoding": (lambda e: {**e, "properties": {**e["properties"], "body_encoding": "rot13"}}, "rot13"),
    "bad compression": (set_header("compression", "application/x-nonsense"), "could not be decoded"),
    "content type pickle": (lambda e: {**e, "content-type": "application/x-python-serialize"}, "is not application/json"),
    "no content type": (drop("content-type"), "content type None"),
    "content encoding binary": (lambda e: {**e, "content-encoding": "binary"}, "content encoding 'binary'"),
    # The headers.
    "no task header": (drop("headers", "task"), "no 'task' header"),
    "task a number": (set_header("task", 7), "'task' must be a string"),
    "unknown task": (set_header("task", "evil.task"), "unknown task name 'evil.task'"),
    "forged log line in the task name": (
        set_header("task", "x\n[2030-01-01 00:00:00,000: ERROR/MainProcess] FORGED"), "unknown task name"
    ),
    "no id": (drop("headers", "id"), "no 'id' header"),
    "id with a line break": (set_header("id", "a\nb"), "header 'id' is not a task id"),
    "id a number": (set_header("id", 12), "header 'id' is not a task id"),
    "timelimit a string": (set_header("timelimit", "abc"), "header 'timelimit'"),
    "timelimit of strings": (set_header("timelimit", ["abc", "x"]), "header 'timelimit'"),
    "timelimit negative": (set_header("timelimit", [-1, None]), "header 'timelimit'"),
    "eta garbage": (set_header("eta", "garbage"), "header 'eta' is not an ISO 8601 time"),
    "eta a number": (set_header("eta", 1234), "header 'eta' must be an ISO 8601 time"),
    "eta beyond the visibility timeout": (lambda e: set_header("eta", far_eta())(e), "beyond the visibility timeout"),
    "expires garbage": (set_header("expires", "soon"), "header 'expires' is not an ISO 8601 time"),
    "retries a string": (set_header("retries", "x"), "header 'retries'"),
    "retries negative": (set_header("retries", -1), "header 'retries'"),
    "retries null": (set_header("retries", None), "header 'retries'"),
    "root_id an object": (set_header("root_id", {"a": 1}), "header 'root_id'"),
    "argsrepr a number": (set_header("argsrepr", 5), "header 'argsrepr' must be a string"),
    "shadow with an escape sequence": (set_header("shadow", "\x1b[2Jx"), "header 'shadow'"),
    # Our tasks' arguments.
    "generation a string": (_kwarg("generation", "1"), "argument 'generation' must be an integer"),
    "generation a boolean": (_kwarg("generation", True), "argument 'generation' must be an integer"),
    "generation negative": (_kwarg("generation", -1), "below 0"),
    "upload id hostile": (_kwarg("upload_id", "../../etc/passwd"), "is not an upload id"),
    "upload id a number": (_kwarg("upload_id", 42), "argument 'upload_id' must be a string"),
    "missing argument": (lambda e: edit_kwargs(e, lambda kw: kw.pop("generation")), "missing argument(s) 'generation'"),
    "unknown argument": (_kwarg("sneaky", 1), "unknown argument(s) 'sneaky'"),
    "too many positional arguments": (lambda e: with_body(e, [[1, 2, 3, 4], {}, {}]), "positional arguments"),
}


def malformed(app: Celery, queue: str, name: str) -> bytes:
    edit, _ = MALFORMED[name]
    item = edit(template(app, queue))
    if isinstance(item, dict):
        item = json.dumps(item)
    return item.encode() if isinstance(item, str) else item


def verdict_of(app: Celery, item: bytes, *, tasks: Any = None) -> str | None:
    """What the worker decides about a raw list item, through the same pure functions and kombu's
    own decoding: the transport's checks first, then the consumer's."""
    from kombu.utils.encoding import bytes_to_str
    from kombu.utils.json import loads

    try:
        raw = loads(bytes_to_str(item))  # as kombu's Channel._brpop_read
    except Exception as exc:
        return poison.item_problem(exc)
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        try:
            message = channel.Message(raw, channel=channel)
            raw["properties"]["delivery_info"]["exchange"], raw["properties"]["delivery_info"]["routing_key"]
        except Exception as exc:
            return poison.envelope_problem(raw, exc)
        if message.errors:
            return "the message could not be decoded"
        return poison.inspect_message(
            message.headers, message.content_type, message.content_encoding, message.body,
            tasks=tasks if tasks is not None else ALL_TASKS, visibility_timeout=VISIBILITY_TIMEOUT,
            decode=message.decode,
        ).problem


ALL_TASKS = frozenset(contract.TASK_ARGUMENTS) | {"celery.chord_unlock", "celery.backend_cleanup"}


# -- unit: the pure checks ----------------------------------------------------------------------


@pytest.mark.parametrize("queue", [PARTS_QUEUE, CONTROL_QUEUE])
@pytest.mark.parametrize("name", MALFORMED)
def test_each_malformed_message_is_refused_with_its_reason(client_app: Celery, queue: str, name: str) -> None:
    reason = verdict_of(client_app, malformed(client_app, queue, name))
    assert reason is not None and MALFORMED[name][1] in reason, reason
    assert reason.isprintable() and len(reason) < 400


def test_messages_celery_sends_for_each_of_our_tasks_pass(client_app: Celery) -> None:
    app = client_app
    ours = {
        contract.START_UPLOAD: ((), {"source": "/data/big.bin", "bucket": "bucket-1", "key": "k", "metadata": {"é": "ü"}}),
        contract.RESUME_UPLOAD: ((UPLOAD_ID,), {"restart": True}),
        contract.CANCEL_UPLOAD: ((), {"upload_id": UPLOAD_ID}),
        contract.UPLOAD_PART: ((), {"upload_id": UPLOAD_ID, "part_number": 10_000, "generation": 0}),
        contract.PUT_OBJECT: ((), {"upload_id": UPLOAD_ID, "generation": 2}),
        contract.START_MANY: ((), {"uploads": [{"source": "/data/a", "bucket": "bucket-1", "key": "a"}]}),
        contract.PUT_OBJECTS: ((), {"uploads": [[UPLOAD_ID, 1], [UPLOAD_ID + "x", 2]]}),
        contract.COMPLETE_UPLOAD: ((), {"upload_id": UPLOAD_ID, "generation": 2}),
        contract.RECONCILE: ((), {}),
        contract.JANITOR: ((), {"dry_run": True}),
        contract.UPLOAD_FAILED: ((celery_uuid(),), {"upload_id": UPLOAD_ID, "generation": 2}),
        contract.START_BATCH: ((), {"source": "/data/dir", "bucket": "bucket-1", "include": ["*.bin"], "options": {"part_size": 5 << 20}}),
        contract.LIST_BATCH: ((), {"batch_id": UPLOAD_ID, "page": 12}),
        contract.CANCEL_BATCH: ((UPLOAD_ID,), {}),
        contract.RESUME_BATCH: ((), {"batch_id": UPLOAD_ID}),
    }
    assert set(ours) == set(contract.TASK_ARGUMENTS)
    envelopes = []
    for name, (args, kwargs) in ours.items():
        queue = PARTS_QUEUE if name in contract.PART_TASKS else CONTROL_QUEUE
        envelopes += sent(app, queue, lambda name=name, args=args, kwargs=kwargs: app.send_task(name, args=args, kwargs=kwargs))
        # A retry: countdown and retries, as Task.retry sends it; with an expiry and time limits.
        envelopes += sent(app, queue, lambda name=name, args=args, kwargs=kwargs: app.send_task(
            name, args=args, kwargs=kwargs, countdown=60, retries=3, expires=600, time_limit=30, soft_time_limit=20,
        ))
    # The chord errback as Celery sends it for a failed part: a group of one, the failed id first.
    errback = app.signature(contract.UPLOAD_FAILED, kwargs={"upload_id": UPLOAD_ID, "generation": 2})
    envelopes += sent(app, CONTROL_QUEUE, lambda: group([errback]).apply_async((celery_uuid(),)))
    # Celery's own chord of parts with an errback on its body (the fan-out's fallback).
    body = app.signature(contract.COMPLETE_UPLOAD, kwargs={"upload_id": UPLOAD_ID, "generation": 2}, immutable=True)
    parts = [app.signature(contract.UPLOAD_PART, kwargs={"upload_id": UPLOAD_ID, "part_number": n, "generation": 2},
                           immutable=True) for n in (1, 2, 3)]
    envelopes += sent(app, PARTS_QUEUE, lambda: chord(group(parts), body.on_error(errback)).apply_async())
    assert len(envelopes) == 2 * len(ours) + 1 + 3
    for envelope in envelopes:
        assert verdict_of(app, json.dumps(envelope).encode()) is None, envelope["headers"]


def test_fan_out_part_messages_pass() -> None:
    """A part message exactly as workers/fanout.py builds one (chord body with its errback, group
    id and index, parent and root ids), decoded as it arrives."""
    from workers import tasks
    from workers.app import app

    body = tasks.complete_upload.si(upload_id=UPLOAD_ID, generation=4).on_error(
        tasks.upload_failed.s(upload_id=UPLOAD_ID, generation=4)
    )
    body.freeze(celery_uuid(), group_id=celery_uuid())
    kwargs = {"upload_id": UPLOAD_ID, "part_number": 7, "generation": 4}
    message = app.amqp.create_task_message(
        celery_uuid(), contract.UPLOAD_PART, (), kwargs, group_id=celery_uuid(), group_index=6, chord=body,
        reply_to=celery_uuid(), create_sent_event=False, root_id=celery_uuid(), parent_id=celery_uuid(),
        argsrepr="()", kwargsrepr=repr(kwargs),
    )
    content_type, encoding, data = kombu_dumps(message.body, serializer="json")
    headers = json.loads(json.dumps(message.headers))
    verdict = poison.inspect_message(headers, content_type, encoding, data, tasks=app.tasks, visibility_timeout=60)
    assert verdict == (None, contract.UPLOAD_PART, message.headers["id"])


def test_eta_within_the_visibility_timeout_passes_and_beyond_it_is_refused(client_app: Celery) -> None:
    (envelope,) = sent(client_app, PARTS_QUEUE, lambda: client_app.send_task(
        contract.UPLOAD_PART, kwargs={"upload_id": UPLOAD_ID, "part_number": 1, "generation": 0}, countdown=100,
    ))
    headers, body = envelope["headers"], base64.b64decode(envelope["body"])
    eta = datetime.fromisoformat(headers["eta"])

    def check(now: datetime, timeout: float) -> str | None:
        return poison.inspect_message(headers, "application/json", "utf-8", body, tasks=ALL_TASKS,
                                      visibility_timeout=timeout, now=now).problem

    assert check(eta - timedelta(seconds=100), 100) is None
    problem = check(eta - timedelta(seconds=101), 100)
    assert problem is not None and "101 s ahead, beyond the visibility timeout (100 s)" in problem
    assert check(eta + timedelta(days=365), 100) is None  # long overdue: runs at once


def test_task_arguments_table_matches_the_tasks() -> None:
    from workers import tasks

    for name, spec in contract.TASK_ARGUMENTS.items():
        task = tasks.app.tasks[name]
        params = [p for p in inspect.signature(task.run).parameters.values() if p.name != "self"]
        if spec is None:  # start_upload: kwargs only, checked by the task
            assert [p.kind for p in params] == [inspect.Parameter.VAR_KEYWORD]
            continue
        assert [a.name for a in spec] == [p.name for p in params], name
        assert [a.required for a in spec] == [p.default is inspect.Parameter.empty for p in params], name


@pytest.mark.parametrize(("task", "args", "kwargs", "problem"), [
    (contract.RESUME_UPLOAD, [UPLOAD_ID], {}, None),
    (contract.RESUME_UPLOAD, [], {"upload_id": UPLOAD_ID, "restart": False}, None),
    (contract.RESUME_UPLOAD, [], {"upload_id": UPLOAD_ID, "sneaky": 1}, "unknown argument(s) 'sneaky'"),
    (contract.RESUME_UPLOAD, [UPLOAD_ID], {"upload_id": UPLOAD_ID}, "argument 'upload_id' given twice"),
    (contract.RESUME_UPLOAD, [], {"restart": True}, "missing argument(s) 'upload_id'"),
    (contract.JANITOR, [], {}, None),
    (contract.JANITOR, [], {"dry_run": "no"}, "argument 'dry_run' must be a boolean, not string"),
    (contract.UPLOAD_PART, [UPLOAD_ID, 10_000, 0], {}, None),
    (contract.UPLOAD_PART, [UPLOAD_ID, 10_001, 0], {}, "argument 'part_number' is 10001, above 10000"),
    (contract.UPLOAD_PART, [UPLOAD_ID, 0, 0], {}, "argument 'part_number' is 0, below 1"),
    (contract.UPLOAD_FAILED, ["a b"], {"upload_id": UPLOAD_ID, "generation": 0}, "is not a task id"),
    (contract.START_UPLOAD, [], {"anything": ["the task checks it"]}, None),
    (contract.START_MANY, [], {"uploads": [{"anything": "the coordinator checks it"}]}, None),
    (contract.START_MANY, [], {"uploads": [{}] * (contract.MAX_UPLOADS_PER_MESSAGE + 1)},
     f"above the maximum of {contract.MAX_UPLOADS_PER_MESSAGE} per message: send a longer list as several messages"),
    (contract.START_MANY, [], {"uploads": []}, "has 0 entries, fewer than 1"),
    (contract.START_MANY, [], {"uploads": {"source": "x"}}, "argument 'uploads' must be an array, not object"),
    (contract.START_MANY, [], {"uploads": ["x"]}, "entry 0: must be an object"),
    (contract.PUT_OBJECTS, [], {"uploads": [[UPLOAD_ID, 1]]}, None),
    (contract.PUT_OBJECTS, [], {"uploads": [[UPLOAD_ID]]}, "entry 0: must be an array [upload_id, generation]"),
    (contract.PUT_OBJECTS, [], {"uploads": [["../x", 1]]}, "entry 0: argument 'upload_id'"),
    ("celery.chord_unlock", [1, 2], {"x": 1}, None),
])
def test_task_arguments(task: str, args: list[Any], kwargs: dict[str, Any], problem: str | None) -> None:
    found = contract.task_arguments_problem(task, args, kwargs)
    assert found == problem if problem is None else (found is not None and problem in found), found


def test_printable_escapes_what_could_forge_a_log_line() -> None:
    assert printable("plain é ü 漢") == "plain é ü 漢"
    assert printable("a\nb\r\x1b[2J\u2028c\x00") == "a\\nb\\r\\x1b[2J\\u2028c\\x00"
    assert printable("x" * 500, 10) == "x" * 10 + "..."
    assert "\n" not in poison.escape({"k": "v\n"})


def test_dead_letter_entries_are_bounded() -> None:
    entry = make_entry(queue="q", reason="r", task="t", task_id="i",
                       headers={"task": "t", "big": "x" * 1000, "nested": {"a": 1}, "n": 3}, body=b"\xff" * 10_000)
    assert entry["headers"] == {"task": "t", "big": "x" * 256, "n": 3}
    assert entry["body"]["truncated"] and entry["body"]["size"] == 10_000
    assert len(base64.b64decode(entry["body"]["base64"])) == BODY_BYTES
    text = make_entry(queue="q", reason="r", body="ünïcode" * 1000)["body"]
    assert text["text"].startswith("ünïcode") and len(text["text"].encode()) <= BODY_BYTES


def test_quarantine_logs_the_entry_when_redis_is_unreachable(monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    dead = DeadLetters(redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1))
    monkeypatch.setattr(poison, "_deadletters", dead)
    with caplog.at_level(logging.ERROR, logger="workers.poison"):
        poison.quarantine(queue=PARTS_QUEUE, reason="no body", task="t\nx", task_id="id-1", body=b"payload")
    (record,) = caplog.records
    line = record.getMessage()
    assert "\n" not in line and "no body" in line and "t\\nx" in line and "unreachable" in line
    assert '"queue": "uploader.parts"' in line and len(line) < 1200


def test_the_backstop_quarantines_whatever_celerys_handler_raises(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """An exception out of Celery's strategy (a malformation the checks missed) is quarantined and
    acked, never raised; an error of the broker connection is raised (the consumer reconnects)."""
    from workers.app import app
    from workers.consumer import QuarantiningConsumer

    raised: list[BaseException] = []

    def strategy(*_: Any) -> None:
        raise raised[-1]

    consumer = object.__new__(QuarantiningConsumer)
    # (A public task: an internal one would be refused first, for having no proof.)
    consumer.app, consumer.strategies, consumer.on_task_message = app, {contract.CANCEL_UPLOAD: strategy}, set()
    consumer.call_soon_ack = lambda *a, **k: None
    consumer._maximum_prefetch_restored, consumer.restart_count = True, 0
    quarantined: list[tuple[str, Any]] = []
    monkeypatch.setattr(consumer, "_quarantine", lambda message, reason, task, task_id: quarantined.append((reason, task_id)))
    handler = consumer.create_task_handler()

    class Message:
        headers = {"task": contract.CANCEL_UPLOAD, "id": "id-1", "lang": "py"}
        content_type, content_encoding, body = "application/json", "utf-8", b'[[], {"upload_id": "up-1"}, {}]'
        ack_log_error = reject_log_error = None

        def decode(self) -> Any:
            return json.loads(self.body)

    raised.append(ValueError("surprise"))
    handler(Message())
    assert quarantined == [("Celery could not accept it (ValueError: surprise)", "id-1")]
    raised.append(redis.ConnectionError("broker away"))
    with pytest.raises(redis.ConnectionError):
        handler(Message())


def test_broker_settings_select_the_guarded_transport_and_keep_tls() -> None:
    guarded = "workers.transport:Transport"
    assert transport.broker_settings("redis://h:6379/0") == {"broker_transport": guarded}
    assert transport.broker_settings("sentinel://a:26379;sentinel://b:26379") == {
        "broker_transport": "workers.transport:SentinelTransport"
    }
    assert transport.broker_settings("amqp://h//") == {}
    assert transport.broker_settings("redis+socket:///tmp/r.sock") == {}
    # kombu turns TLS on for rediss:// by the scheme's name: an explicit transport must too.
    assert transport.broker_settings("rediss://h:6380/0") == {
        "broker_transport": guarded, "broker_use_ssl": {"ssl_cert_reqs": ssl.CERT_NONE}
    }
    assert transport.broker_settings("rediss://h:6380/0?ssl_cert_reqs=required") == {"broker_transport": guarded}
    assert transport.broker_settings("rediss://h:6380/0", {"ssl_cert_reqs": ssl.CERT_REQUIRED}) == {"broker_transport": guarded}

    # What kombu's Connection makes of them (no connection is opened).
    stock = Connection("rediss://:pw@h:6380/2?ssl_cert_reqs=required&ssl_ca_certs=/ca.pem")
    ours = Connection("rediss://:pw@h:6380/2?ssl_cert_reqs=required&ssl_ca_certs=/ca.pem", transport=guarded)
    assert (ours.hostname, ours.port, ours.virtual_host, ours.password, ours.ssl) == (
        stock.hostname, stock.port, stock.virtual_host, stock.password, stock.ssl
    )
    assert ours.ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/ca.pem"}
    assert ours.transport_cls == guarded and issubclass(ours.get_transport_cls(), transport.Transport)
    settings = transport.broker_settings("rediss://h:6380/0")
    bare = Connection("rediss://h:6380/0", transport=settings["broker_transport"], ssl=settings["broker_use_ssl"])
    assert bare.ssl == Connection("rediss://h:6380/0").ssl == {"ssl_cert_reqs": ssl.CERT_NONE}
    sentinel = Connection("sentinel://a:26379;sentinel://b:26379", transport="workers.transport:SentinelTransport")
    assert issubclass(sentinel.get_transport_cls(), transport.SentinelTransport)
    assert sentinel.alt == ["sentinel://a:26379", "sentinel://b:26379"]
    assert transport.SentinelTransport.Channel is transport.SentinelChannel


def test_only_the_worker_loads_the_guards() -> None:
    import subprocess
    import sys

    code = "import sys, uploader.client, uploader.cli; print(sorted(m for m in sys.modules if m.startswith('workers')))"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root).stdout
    assert out.strip() == "[]"
    from workers.app import app

    assert app.conf.worker_consumer == "workers.consumer:QuarantiningConsumer"


# -- with a real Redis ----------------------------------------------------------------------------


@pytest.fixture
def dead_letters(redis_server) -> Iterator[DeadLetters]:  # type: ignore[no-untyped-def]
    client = redis.Redis.from_url(redis_server.url.rsplit("/", 1)[0] + f"/{SHARED_DB}", decode_responses=True)
    store = DeadLetters(client, prefix=f"dl-{uuid.uuid4().hex[:8]}", max_entries=5)
    yield store
    client.delete(store.key)
    client.close()


def test_dead_letter_list_push_list_count_purge_and_cap(dead_letters: DeadLetters) -> None:
    for n in range(7):
        dead_letters.push(make_entry(queue=PARTS_QUEUE, reason=f"r{n}", task_id=f"id-{n}", body=b"x"))
    assert dead_letters.count() == 5  # capped: the oldest two are gone
    assert [e["reason"] for e in dead_letters.list(3)] == ["r6", "r5", "r4"]  # newest first
    assert dead_letters.list(0) == []
    assert dead_letters.purge() == 5
    assert dead_letters.count() == 0 and dead_letters.purge() == 0


def test_cli_lists_and_purges_the_dead_letter_list(redis_server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from uploader import cli
    from uploader.config import get_settings

    url = redis_server.url.rsplit("/", 1)[0] + f"/{SHARED_DB}"
    prefix = f"dl-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("UPLOADER_BROKER_URL", url)
    monkeypatch.setenv("UPLOADER_KEY_PREFIX", prefix)
    get_settings.cache_clear()
    try:
        store = DeadLetters(redis.Redis.from_url(url), prefix=prefix)
        store.push(make_entry(queue=PARTS_QUEUE, reason="no body", task="uploader.upload_part", task_id="id-1"))
        store.push(make_entry(queue=CONTROL_QUEUE, reason="bad\x1b[2J", task="t\nforged", task_id="id-2"))
        runner = CliRunner()
        result = runner.invoke(cli.main, ["deadletter", "list", "--json"])
        assert result.exit_code == 0, result.output
        assert [e["task_id"] for e in json.loads(result.output)] == ["id-2", "id-1"]
        result = runner.invoke(cli.main, ["deadletter", "list", "--limit", "5"])
        assert result.exit_code == 0 and "2 shown of 2 quarantined message(s)" in result.output
        assert "\x1b" not in result.output and "no body" in result.output
        result = runner.invoke(cli.main, ["deadletter", "purge"], input="n\n")
        assert result.exit_code != 0 and store.count() == 2
        result = runner.invoke(cli.main, ["deadletter", "purge", "--yes"])
        assert result.exit_code == 0 and "purged 2 quarantined message(s)" in result.output
        assert store.count() == 0
    finally:
        get_settings.cache_clear()


def test_the_channel_client_remembers_brpop_with_a_global_key_prefix(redis_server) -> None:  # type: ignore[no-untyped-def]
    from kombu.transport.redis import PrefixedStrictRedis

    url = redis_server.url.rsplit("/", 1)[0] + f"/{SHARED_DB}"
    with Connection(url, transport="workers.transport:Transport", transport_options={"global_keyprefix": "pfx:"}) as conn:
        client = conn.default_channel.client
        assert isinstance(client, transport._RemembersBRPOP) and isinstance(client, PrefixedStrictRedis)
    with Connection(url, transport="workers.transport:Transport") as conn:
        client = conn.default_channel.client
        assert isinstance(client, transport._RemembersBRPOP) and isinstance(client, redis.Redis)


@pytest.mark.parametrize("prefix", ["", "pfx-"], ids=["plain", "global-key-prefix"])
def test_the_transport_quarantines_items_kombu_cannot_read(redis_server, monkeypatch, prefix: str) -> None:  # type: ignore[no-untyped-def]
    """In process, through kombu's own consuming loop: a list item that is not JSON and an
    envelope kombu cannot make a message of are dead-lettered, and the good messages around them
    are delivered."""
    from kombu import Exchange, Queue

    url = redis_server.url.rsplit("/", 1)[0] + f"/{SHARED_DB}"
    raw = redis.Redis.from_url(url)
    name = f"poison-q-{uuid.uuid4().hex[:8]}"
    prefix = prefix and f"{prefix}{uuid.uuid4().hex[:8]}:"
    dead = DeadLetters(raw, prefix=name)
    monkeypatch.setattr(poison, "_deadletters", dead)
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    received: list[Any] = []

    def on_message(body: Any, message: Any) -> None:
        received.append(body)
        message.ack()

    options = {"global_keyprefix": prefix} if prefix else {}
    try:
        with Connection(url, transport="workers.transport:Transport", transport_options=options) as conn:
            producer = conn.Producer()
            with conn.Consumer(queue, callbacks=[on_message], accept=["json"]):
                producer.publish({"n": 1}, exchange=queue.exchange, routing_key=name, declare=[queue])
                raw.lpush(prefix + name, b"\xffnot json")
                raw.lpush(prefix + name, json.dumps({"body": "***", "properties": {"body_encoding": "base64"}}))
                producer.publish({"n": 2}, exchange=queue.exchange, routing_key=name)
                for _ in range(20):
                    if len(received) == 2 and dead.count() == 2:
                        break
                    try:
                        conn.drain_events(timeout=1)
                    except TimeoutError:
                        pass
        assert received == [{"n": 1}, {"n": 2}]
        entries = dead.list()
        assert {e["reason"].split(" (")[0] for e in entries} == {
            "the envelope has no 'properties.delivery_tag'", "the list item is not a JSON message envelope",
        }
        assert {e["queue"] for e in entries} == {name}
        assert raw.llen(prefix + name) == 0
        assert not [tag for tag, v in raw.hgetall(prefix + "unacked").items() if name.encode() in v]
    finally:
        raw.delete(dead.key, *raw.keys(f"*{name}*"))


# -- with a real worker ---------------------------------------------------------------------------


def _raw_redis(stack: Stack) -> redis.Redis:
    return redis.Redis.from_url(stack.redis_url)


def test_poison_messages_are_quarantined_and_the_worker_keeps_going(make_stack, client_app: Celery) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack()
    worker = stack.start_worker("poison", concurrency=2)
    r = _raw_redis(stack)
    dead = DeadLetters(r, prefix=stack.settings.key_prefix)
    expected: list[tuple[str, str, str]] = []
    for queue in (PARTS_QUEUE, CONTROL_QUEUE):
        for name, (_, words) in MALFORMED.items():
            before = dead.count()
            r.lpush(queue, malformed(client_app, queue, name))
            wait_until(lambda before=before: dead.count() > before or not worker.alive(), 30, f"{name!r} on {queue} quarantined")
            assert worker.alive(), worker.log_text()[-3000:]
            (entry,) = dead.list(1)
            assert entry["queue"] == queue, (name, entry)
            assert words in entry["reason"], (name, entry["reason"])
            expected.append((queue, name, entry["reason"]))

    assert worker.alive()
    assert dead.count() == len(expected) == 2 * len(MALFORMED)
    # Acknowledged: nothing left in either queue, in kombu's unacked hash or its index (the
    # acknowledgement follows the dead-letter entry).
    assert r.llen(PARTS_QUEUE) == r.llen(CONTROL_QUEUE) == 0
    try:
        wait_until(lambda: r.hlen("unacked") == 0 and r.zcard("unacked_index") == 0, 10, "every message acknowledged")
    except TimeoutError:
        raise AssertionError(f"left unacknowledged: {r.hgetall('unacked')}") from None

    # One log line per message, each naming its reason and queue; nothing else went wrong.
    lines = worker.log_text().splitlines()
    quarantined = [line for line in lines if QUARANTINED in line]
    assert len(quarantined) == len(expected)
    for line, (queue, _name, reason) in zip(quarantined, expected, strict=True):
        assert f"{QUARANTINED} {queue}: {printable(reason, 300)}" in line
        assert len(line) < 1000
    text = "\n".join(lines)
    for trouble in ("Traceback", "CRITICAL", "Unrecoverable", "Connection to broker lost", "Received invalid task",
                    "Received unregistered task", "Restoring"):
        assert trouble not in text, trouble
    assert not any(line.startswith("[2030-01-01") for line in lines)  # the forged line stayed inside its own

    # The worker still does its job: a multipart upload through it completes, and nothing of
    # ours was taken for poison.
    bucket = stack.new_bucket()
    path = stack.make_file(3 * 5 * MiB + 1234)
    handle = stack.uploader.submit(str(path), f"s3://{bucket}/after-poison.bin", part_size=5 * MiB)
    status = handle.wait(timeout=180)
    assert (status.state, status.part_count, status.parts_done) == ("completed", 4, 4)
    assert stack.object_sha256(bucket, "after-poison.bin") == sha256_file(path)
    assert dead.count() == len(expected)
    assert worker.alive()
    # Nothing comes back after the visibility timeout either: kombu restores only what is in its
    # unacked hash, and none of them is.
    assert r.hlen("unacked") == 0


def test_a_client_sending_wrong_argument_types_by_task_name_is_quarantined(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack()
    worker = stack.start_worker("poison-args", concurrency=2)
    dead = DeadLetters(_raw_redis(stack), prefix=stack.settings.key_prefix)
    app = Celery("bare-client", set_as_current=False)
    app.conf.update(broker_url=stack.redis_url, result_backend=stack.redis_url)  # a bare Celery client
    sends = [
        (contract.UPLOAD_PART, PARTS_QUEUE, {"upload_id": "job-1", "part_number": "3", "generation": 0},
         "argument 'part_number' must be an integer, not string"),
        (contract.CANCEL_UPLOAD, CONTROL_QUEUE, {"upload_id": ["job-1"]}, "argument 'upload_id' must be a string, not array"),
        (contract.RESUME_UPLOAD, CONTROL_QUEUE, {"upload_id": "job-1", "restart": "yes"},
         "argument 'restart' must be a boolean, not string"),
        (contract.COMPLETE_UPLOAD, CONTROL_QUEUE, {"upload_id": "job-1", "generation": 1.5},
         "argument 'generation' must be an integer, not number"),
    ]
    ids = {}
    results = []
    for name, queue, kwargs, reason in sends:
        result = app.send_task(name, kwargs=kwargs, queue=queue)
        results.append(result)
        ids[result.id] = (name, queue, reason)
    wait_until(lambda: dead.count() >= len(sends) or not worker.alive(), 60, "the messages quarantined")
    # A sender waiting for the result hears that the task will never run, and why.
    for result in results:
        result.get(timeout=30, propagate=False)
        assert result.failed() and type(result.result).__name__ == "MessageQuarantined", result.result
        assert ids[result.id][2] in str(result.result)
    assert worker.alive()
    entries = {e["task_id"]: e for e in dead.list(10)}
    assert set(entries) == set(ids)
    for task_id, (name, queue, reason) in ids.items():
        assert (entries[task_id]["task"], entries[task_id]["queue"], entries[task_id]["reason"]) == (name, queue, reason)
    r = _raw_redis(stack)
    assert r.llen(PARTS_QUEUE) == r.llen(CONTROL_QUEUE) == r.hlen("unacked") == 0
    assert sum(QUARANTINED in line for line in worker.log_text().splitlines()) == len(sends)
    app.close()


def test_display_headers_with_line_breaks_are_made_printable_not_refused(make_stack) -> None:  # type: ignore[no-untyped-def]
    """``kwargsrepr`` is only shown (the worker's log, Flower), and Celery's own saferepr keeps a
    CR or LF of a string value as it is: the message runs, its display headers escaped, and no
    line of the log is forged."""
    stack: Stack = make_stack()
    worker = stack.start_worker("display", concurrency=1)
    app = Celery("bare-client", set_as_current=False)
    app.conf.update(broker_url=stack.redis_url, result_backend=stack.redis_url)
    events: list[dict[str, Any]] = []
    listen_for_events(app, events)
    forged = "x\n[2030-01-01 00:00:00,000: ERROR/MainProcess] FORGED"
    kwargs = auth.signed(FLEET_KEY.encode(), contract.RECONCILE, {})
    result = app.send_task(
        contract.RECONCILE, kwargs=kwargs, queue=CONTROL_QUEUE, argsrepr=forged + "\r\n" + "y" * 20000,
        kwargsrepr=forged,
    )
    assert result.get(timeout=60) == []
    lines = worker.log_text().splitlines()
    assert not any(line.startswith("[2030-01-01") for line in lines)
    # What Flower shows (the task-received event) is one printable line of bounded length.
    wait_until(lambda: any(e.get("type") == "task-received" and e.get("uuid") == result.id for e in events), 30, "the event")
    received = next(e for e in events if e.get("type") == "task-received" and e.get("uuid") == result.id)
    shown = received["args"]
    assert "FORGED" in shown and shown.isprintable() and len(shown) <= 8192 + 3, shown[:200]
    # The kwargs hold a proof: they are shown as they are, the proof redacted, whatever the
    # sender's kwargsrepr said.
    assert received["kwargs"] == "{'proof': '***'}" and kwargs["proof"] not in worker.log_text()
    assert DeadLetters(_raw_redis(stack), prefix=stack.settings.key_prefix).count() == 0
    app.close()
