"""The batched fan-out (workers/fanout.py): part messages sent through one Redis pipeline per
batch are the messages Celery's own chord sends, and a many-part upload dispatched that way
completes once, through real workers, with the chord body firing."""

from __future__ import annotations

import ast
import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from tests.conftest import ACCESS_KEY, SECRET_KEY, Stack, listen_for_events, sha256_file, signed
from uploader import contract
from uploader.config import get_settings
from uploader.contract import CONTROL_QUEUE, PARTS_QUEUE, celery_config
from uploader.dev.localstack import wait_until
from uploader.planner import MiB
from workers import fanout

PART_KWARGS = {"upload_id", "part_number", "generation", "proof"}


def decode(raw: str) -> dict[str, Any]:
    """A kombu Redis envelope -> its parts, the protocol-2 body decoded to (args, kwargs, embed)."""
    envelope = json.loads(raw)
    assert envelope["properties"]["body_encoding"] == "base64"
    assert envelope["content-type"] == "application/json"
    envelope["decoded"] = json.loads(base64.b64decode(envelope["body"]))
    return envelope


def queued(stack: Stack, queue: str = PARTS_QUEUE) -> list[str]:
    """Messages of ``queue`` in consumption order (kombu LPUSHes, workers BRPOP)."""
    return list(reversed(stack.uploader.checkpoint.redis.lrange(queue, 0, -1)))


def test_many_parts_are_sent_in_batches_and_complete_once_through_the_chord(make_stack) -> None:  # type: ignore[no-untyped-def]
    # A batch of 7 messages: the 41 parts cross five batch boundaries and end in a partial batch.
    stack: Stack = make_stack(UPLOADER_FANOUT_BATCH="7")
    # The coordinator worker takes no parts, so that its dispatch stays in the queue to be read.
    stack.start_worker("fanout-coordinator", concurrency=2, queues=CONTROL_QUEUE)
    app = Celery("fanout-test", set_as_current=False)
    app.conf.update(celery_config(stack.settings))
    events: list[dict] = []
    listener = listen_for_events(app, events)

    bucket = stack.new_bucket()
    path = stack.make_file(40 * 5 * MiB + 4321)  # 41 parts, the last one short
    handle = stack.uploader.submit(str(path), f"s3://{bucket}/fanned.bin", part_size=5 * MiB)
    wait_until(handle.start.ready, 60, "the coordinator's dispatch")
    assert handle.start.successful(), handle.start.result

    raw = queued(stack)
    assert len(raw) == 41
    messages = [decode(m) for m in raw]
    group_ids = {m["headers"]["group"] for m in messages}
    assert len(group_ids) == 1 and None not in group_ids
    (group_id,) = group_ids
    bodies = set()
    for index, message in enumerate(messages):
        headers, (args, kwargs, embed) = message["headers"], message["decoded"]
        assert headers["task"] == contract.UPLOAD_PART
        assert headers["group_index"] == index
        # Children of the coordinator task, as Celery's send_task makes them.
        assert headers["parent_id"] == handle.start.id and headers["root_id"] == handle.start.id
        assert message["properties"]["delivery_info"]["routing_key"] == PARTS_QUEUE
        # Ids and numbers only.
        assert args == [] and set(kwargs) == PART_KWARGS
        assert kwargs == signed(contract.UPLOAD_PART, upload_id=handle.upload_id, part_number=index + 1, generation=kwargs["generation"])
        # Shown (logs, Flower) without the proof.
        assert ast.literal_eval(headers["kwargsrepr"]) == {**kwargs, "proof": "***"}
        body = embed["chord"]
        assert body["task"] == contract.COMPLETE_UPLOAD
        assert body["kwargs"] == signed(contract.COMPLETE_UPLOAD, upload_id=handle.upload_id, generation=kwargs["generation"])
        (errback,) = body["options"]["link_error"]
        assert errback["task"] == contract.UPLOAD_FAILED
        assert errback["kwargs"] == signed(contract.UPLOAD_FAILED, upload_id=handle.upload_id, generation=kwargs["generation"])
        bodies.add(body["options"]["task_id"])
    assert len(bodies) == 1
    (body_id,) = bodies
    everything = "".join(raw)
    for secret_or_plan in (SECRET_KEY, ACCESS_KEY, str(path), bucket, "fanned.bin"):
        assert secret_or_plan not in everything, secret_or_plan
    # The Redis backend's chord counter knows the size before any part can finish.
    backend = app.backend
    assert int(backend.client.get(backend.get_key_for_group(group_id, ".s"))) == 41

    stack.start_worker("fanout-parts", concurrency=4)
    status = handle.wait(timeout=300)
    assert (status.state, status.part_count, status.parts_done) == ("completed", 41, 41)
    assert stack.object_sha256(bucket, "fanned.bin") == sha256_file(path)
    assert stack.open_multipart_uploads(bucket) == []

    # The chord body ran (the part that finishes last also triggers a completion: only one of
    # them completes), and Celery's chord bookkeeping fired it once and cleaned up.
    assert app.AsyncResult(body_id).get(timeout=60) in {"completed", "done", "busy"}
    assert backend.client.get(backend.get_key_for_group(group_id, ".c")) == b"done"
    assert not backend.client.exists(backend.get_key_for_group(group_id, ".s"))

    def completions_seen() -> bool:
        return any(e.get("type") == "task-succeeded" and e.get("uuid") == body_id for e in events)

    wait_until(completions_seen, 30, "the chord body's task-succeeded event")
    names = {e["uuid"]: e["name"] for e in events if e.get("type") == "task-received"}
    completed = [
        e for e in events
        if e.get("type") == "task-succeeded" and names.get(e["uuid"]) == contract.COMPLETE_UPLOAD and e["result"] == "'completed'"
    ]
    assert len(completed) == 1
    # Workers report every part to Flower; the fan-out itself sends no task-sent event per part.
    assert sum(1 for name in names.values() if name == contract.UPLOAD_PART) == 41
    sent = [e for e in events if e.get("type") == "task-sent"]
    assert not [e for e in sent if e.get("name") == contract.UPLOAD_PART]
    # Clients send none (Flower would list each as a worker): the start is seen when received.
    assert not [e for e in sent if e.get("name") == contract.START_UPLOAD]
    assert contract.START_UPLOAD in names.values()
    listener.join(1)


def _parity_app(stack: Stack) -> tuple[Celery, Any]:
    app = Celery("fanout-parity", set_as_current=False)
    app.conf.update(celery_config(stack.settings))

    @app.task(name=contract.UPLOAD_PART, shared=False)
    def upload_part(upload_id: str, part_number: int, generation: int) -> None:  # never run here
        raise AssertionError("sent only")

    return app, upload_part


def _body(app: Celery, upload_id: str, generation: int) -> Any:
    return app.signature(contract.COMPLETE_UPLOAD, kwargs={"upload_id": upload_id, "generation": generation},
                         immutable=True).on_error(
        app.signature(contract.UPLOAD_FAILED, kwargs={"upload_id": upload_id, "generation": generation})
    )


def _normalized(raw: str) -> dict[str, Any]:
    """A message without what differs from one send to the next (task, group and body ids)."""
    message = decode(raw)
    headers = dict(message["headers"])
    task_id = headers.pop("id")
    assert headers.pop("root_id") == task_id  # sent from outside a task: its own root
    headers.pop("group")
    properties = dict(message["properties"])
    assert properties.pop("correlation_id") == task_id
    properties.pop("delivery_tag")
    args, kwargs, embed = message["decoded"]
    body = json.loads(json.dumps(embed["chord"]))
    for key in ("task_id", "group_id"):
        body["options"].pop(key)
    return {"headers": headers, "properties": properties, "args": args, "kwargs": kwargs,
            "embed": {**embed, "chord": body}, "content": (message["content-type"], message["content-encoding"])}


@pytest.fixture(autouse=True)
def _fresh_settings() -> Iterator[None]:
    """The dispatch reads the process-wide settings; tests that change them start and end fresh."""
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def _setting(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    get_settings.cache_clear()


def test_batched_messages_are_the_messages_of_celerys_own_chord(make_stack, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack()  # no workers: the messages stay queued
    app, upload_part = _parity_app(stack)
    header = [{"upload_id": "parity", "part_number": n, "generation": 3} for n in range(1, 13)]
    redis = stack.uploader.checkpoint.redis
    backend = app.backend

    _setting(monkeypatch, "UPLOADER_FANOUT", "chord")
    plain_group = fanout.send_chord(app, upload_part, header, _body(app, "parity", 3))
    plain = queued(stack)
    redis.delete(PARTS_QUEUE)

    _setting(monkeypatch, "UPLOADER_FANOUT", "auto")
    _setting(monkeypatch, "UPLOADER_FANOUT_BATCH", "5")
    fast_group = fanout.send_chord(app, upload_part, header, _body(app, "parity", 3))
    fast = queued(stack)

    assert len(plain) == len(fast) == 12
    assert plain_group and fast_group and plain_group != fast_group
    for group_id, messages in ((plain_group, plain), (fast_group, fast)):
        assert {decode(m)["headers"]["group"] for m in messages} == {group_id}
        assert len({decode(m)["decoded"][2]["chord"]["options"]["task_id"] for m in messages}) == 1
        assert int(backend.client.get(backend.get_key_for_group(group_id, ".s"))) == 12
    for index, (p, f) in enumerate(zip(plain, fast, strict=True)):
        assert _normalized(f) == _normalized(p), f"message {index}"
        assert decode(f)["headers"]["group_index"] == index


@pytest.mark.parametrize(
    ("broker", "fast"),
    [("redis://127.0.0.1:6379/3", True), ("rediss://r:6380/0", True), ("amqp://guest@localhost//", False),
     ("memory://", False)],
)
def test_fast_path_only_for_redis(broker: str, fast: bool) -> None:
    app = Celery("fanout-brokers", set_as_current=False, broker=broker, backend="redis://127.0.0.1:6379/3")
    assert fanout.fast_path_available(app) is fast
    app = Celery("fanout-brokers", set_as_current=False, broker=broker, backend="cache+memory://")
    assert fanout.fast_path_available(app) is False


def test_a_failed_batch_is_sent_again_under_the_same_task_ids(make_stack, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A pipeline that fails after Redis applied it ("delivery is uncertain") makes the dispatch
    send everything again: messages may be duplicated, never lost, and the ids stay the same
    (the Redis backend counts a header task once towards its chord)."""
    from kombu.exceptions import BatchPublishError
    from kombu.transport.redis import PublishBatch

    stack: Stack = make_stack()  # no workers: the messages stay queued
    app, upload_part = _parity_app(stack)
    header = [{"upload_id": "flaky", "part_number": n, "generation": 1} for n in range(1, 13)]
    real_flush = PublishBatch.flush
    failures = []

    def flush_then_fail_once(self: PublishBatch) -> None:
        real_flush(self)
        if not failures:
            failures.append(1)
            raise BatchPublishError("Redis publish batch failed; delivery is uncertain")

    monkeypatch.setattr(PublishBatch, "flush", flush_then_fail_once)
    _setting(monkeypatch, "UPLOADER_FANOUT", "auto")
    _setting(monkeypatch, "UPLOADER_FANOUT_BATCH", "5")
    group_id = fanout.send_chord(app, upload_part, header, _body(app, "flaky", 1))

    messages = [decode(m) for m in queued(stack)]
    assert failures and len(messages) == 5 + 12  # the first batch twice, then all of them
    first, again = messages[:5], messages[5:]
    assert [m["headers"]["id"] for m in first] == [m["headers"]["id"] for m in again[:5]]
    assert [m["headers"]["group_index"] for m in again] == list(range(12))
    assert [m["decoded"][1]["part_number"] for m in again] == list(range(1, 13))
    assert {m["headers"]["group"] for m in messages} == {group_id}
    assert len({m["decoded"][2]["chord"]["options"]["task_id"] for m in messages}) == 1
    backend = app.backend
    assert int(backend.client.get(backend.get_key_for_group(group_id, ".s"))) == 12
