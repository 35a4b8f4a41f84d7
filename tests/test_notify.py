"""Completion notifications: the outbox is written exactly once by the terminal transitions, and
delivered at least once by the workers' notifiers (webhook and Celery task by name).

Real Redis, SeaweedFS and workers; a real HTTP receiver on loopback (allowed with
UPLOADER_OUTBOUND_ALLOW=127.0.0.1, except in the test of the guard itself)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import pytest
from kombu import Connection, Queue

from tests.conftest import Stack, signed
from tests.receiver import Receiver
from uploader import contract
from uploader.checkpoint import CheckpointStore
from uploader.checkpoint.outbox import Channel, Outbox, Settlement
from uploader.client import UploadStatus
from uploader.dev.localstack import wait_until
from uploader.errors import InvalidRequest
from uploader.model import UploadedPart
from uploader.notify.signature import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from uploader.outbound import OutboundPolicy, OutboundRefused, connect
from uploader.planner import MiB
from uploader.request import parse_request

SECRET = "notify-test-secret-0123456789abcdef"
PART = 5 * MiB


def notify_stack(make_stack: Any, **env: str) -> Stack:
    settings = {
        "UPLOADER_CALLBACK_SECRET": SECRET, "UPLOADER_OUTBOUND_ALLOW": "127.0.0.1",
        "UPLOADER_CALLBACK_BACKOFF": "0.2", "UPLOADER_NOTIFY_POLL_SECONDS": "0.2", **env,
    }
    return make_stack(**{k: v for k, v in settings.items() if v})  # type: ignore[no-any-return]


def wait_delivery(stack: Stack, upload_id: str, done: Any, what: str, timeout: float = 60) -> UploadStatus:
    return stack.wait_status(upload_id, lambda s: bool(s.notifications) and all(done(d) for d in s.notifications),
                             timeout, what)


def settled(delivery: Any) -> bool:
    return bool(delivery.delivered_at or delivery.gave_up_at)


# -- the outbox, transition by transition (real Redis) ---------------------------------------
def _claimed(store: CheckpointStore, upload_id: str, fields: dict[str, Any]) -> None:
    base = {"source": "/x", "bucket": "b", "key": "k", "size": 10, "part_count": 1, "mode": "multipart"}
    assert store.claim(upload_id, {**base, **fields})[0]
    assert store.attach_multipart(upload_id, "mpu-1") == "ok"


def _events(store: CheckpointStore) -> list[str]:
    return store.redis.zrange(store.outbox_key, 0, -1)  # type: ignore[return-value]


def test_completion_writes_one_event_per_channel_and_a_duplicate_writes_none(store: CheckpointStore) -> None:
    _claimed(store, "u1", {"callback_url": "http://example.com/h", "on_complete": "svc.done", "on_failure": "svc.failed"})
    assert store.record_part("u1", "mpu-1", 1, UploadedPart(etag='"e"', checksum=""), 10) == "last"
    assert store.begin_completion("u1", "tok", 60) == "go"
    assert store.mark_completed("u1", "tok", 600, {"final_etag": '"e"'}) == "ok"
    assert store.mark_completed("u1", "tok", 600, {"final_etag": '"e"'}) == "completed"
    assert store.cancel("u1", 600) == "completed"
    assert sorted(_events(store)) == ["u1:1:task", "u1:1:webhook"]
    record = store.get("u1")
    assert record is not None and sorted(record.notified) == ["u1:1:task", "u1:1:webhook"]
    assert [d.kind for d in Outbox(store).deliveries(list(record.notified))] == ["completed", "completed"]


def test_no_event_without_a_request_for_one_nor_for_a_transient_failure(store: CheckpointStore) -> None:
    _claimed(store, "quiet", {})
    assert store.mark_failed("quiet", "boom") == "uploading"
    _claimed(store, "u2", {"on_failure": "svc.failed"})
    store.mark_failed("u2", "S3 away", auto_resumes=3, backoff=1)
    assert _events(store) == []
    # The automatic resumes are spent: the failure becomes final, and only now is it told.
    assert store.claim_auto_resume("u2", 0, 1, now=10**10) == 0
    assert _events(store) == ["u2:1:task"]
    assert store.claim_auto_resume("u2", 0, 1, now=10**10) == 0
    assert store.mark_failed("u2", "again") == "inactive:failed"
    assert _events(store) == ["u2:1:task"]


def test_final_failure_and_cancellation_write_events_once(store: CheckpointStore) -> None:
    _claimed(store, "f", {"callback_url": "http://example.com/h"})
    assert store.mark_failed("f", "source changed") == "uploading"
    assert store.mark_failed("f", "source changed") == "inactive:failed"
    _claimed(store, "c", {"on_failure": "svc.failed"})
    assert store.cancel("c", 600) == "cancelled"
    assert store.cancel("c", 600) == "already"
    _claimed(store, "n", {"on_failure": "svc.failed"})
    store.mark_failed("n", "S3 away", auto_resumes=3, backoff=1)
    assert store.note_error("n", "the source changed: resume by hand")
    assert store.note_error("n", "still changed")
    assert sorted(_events(store)) == ["c:1:task", "f:1:webhook", "n:1:task"]
    assert Outbox(store).deliveries(["c:1:task"])[0].kind == "cancelled"


def test_a_claim_holds_for_its_lease_and_a_lapsed_claim_cannot_push_the_event_back(store: CheckpointStore) -> None:
    _claimed(store, "l", {"on_failure": "svc.failed"})
    store.cancel("l", 600)
    outbox = Outbox(store)
    now = time.time() + 1
    first = outbox.claim("a", lease_seconds=30, limit=10, now=now)
    assert [(e.event_id, e.channel, e.attempt) for e in first] == [("l:1:task", Channel.TASK, 1)]
    assert outbox.claim("b", lease_seconds=30, limit=10, now=now + 10) == []
    (again,) = outbox.claim("b", lease_seconds=30, limit=10, now=now + 31)  # "a" died: its lease lapsed
    assert again.attempt == 2
    assert outbox.settle("l:1:task", "a", Settlement.RETRY, next_attempt=now + 5000, keep_seconds=60) == "fenced"
    assert outbox.settle("l:1:task", "b", Settlement.DELIVERED, status="", keep_seconds=60) == "ok"
    assert outbox.pending() == 0
    (delivery,) = outbox.deliveries(["l:1:task"])
    assert delivery.attempts == 2 and delivery.delivered_at is not None and delivery.next_attempt is None


# -- the request and the outbound guard --------------------------------------------------------
def test_notification_options_are_validated() -> None:
    base = {"source": "/x", "bucket": "bucket", "key": "k"}
    for bad, words in [
        ({"callback_url": "ftp://example.com/"}, "http:// or https://"),
        ({"callback_url": "https://user:pw@example.com/"}, "credentials"),
        ({"on_complete": "uploader.upload_part"}, "own tasks"),
        ({"on_failure": "not a task"}, "Celery task name"),
        ({"callback_queue": "q"}, "needs on_complete or on_failure"),
        ({"callback_url": "https://example.com/", "callback_vars": {"a b": "x"}}, "callback_vars name"),
    ]:
        with pytest.raises(InvalidRequest, match=words):
            parse_request({**base, **bad})
    request = parse_request({**base, "on_complete": "svc.done", "callback_queue": "svc", "callback_vars": {"job": "7"}})
    assert request.notify_fields()["callback_vars"] == {"job": "7"}


def test_the_guard_refuses_internal_addresses_unless_allowed(receiver: Receiver) -> None:
    port = receiver.server.server_address[1]
    with pytest.raises(OutboundRefused, match="loopback address; allow it in UPLOADER_OUTBOUND_ALLOW"):
        connect("localhost", port, OutboundPolicy.parse(""), 5)
    assert OutboundPolicy.parse("").refusal("meta", __import__("ipaddress").ip_address("169.254.169.254")) is not None
    assert OutboundPolicy.parse("10.0.0.0/8").refusal("h", __import__("ipaddress").ip_address("10.1.2.3")) is None
    connect("127.0.0.1", port, OutboundPolicy.parse("127.0.0.0/8"), 5).close()


# -- end to end, with workers ---------------------------------------------------------------------
def test_a_completed_upload_is_posted_once_signed(make_stack, receiver: Receiver) -> None:  # type: ignore[no-untyped-def]
    stack = notify_stack(make_stack)
    stack.start_worker("notify-a")
    stack.start_worker("notify-b")
    bucket = stack.new_bucket()
    path = stack.make_file(3 * PART + 7)
    handle = stack.uploader.submit(str(path), f"s3://{bucket}/hooked.bin", part_size=PART,
                                   callback_url=receiver.url, callback_vars={"job": "42"})
    assert handle.wait(timeout=120).state == "completed"
    status = wait_delivery(stack, handle.upload_id, settled, "the webhook delivered")
    (delivery,) = status.notifications
    assert (delivery.channel, delivery.kind, delivery.attempts, delivery.last_status) == ("webhook", "completed", 1, "200")
    assert delivery.delivered_at is not None
    assert Outbox(stack.uploader.checkpoint).pending() == 0  # nothing left that could be sent again
    (headers, body), = receiver.received
    assert verify(SECRET.encode(), headers[TIMESTAMP_HEADER], headers[SIGNATURE_HEADER], body)
    assert not verify(b"another secret", headers[TIMESTAMP_HEADER], headers[SIGNATURE_HEADER], body)
    sent = json.loads(body)
    assert sent["upload_id"] == handle.upload_id and sent["state"] == "completed"
    assert (sent["bucket"], sent["key"], sent["size"]) == (bucket, "hooked.bin", 3 * PART + 7)
    assert sent["etag"] == status.final_etag and sent["vars"] == {"job": "42"} and sent["error"] == ""
    assert sent["timings"]["seconds"] >= 0
    # Duplicate completion messages after the fact: no second event, no second POST.
    celery = stack.uploader.celery
    record = stack.uploader.checkpoint.get(handle.upload_id)
    assert record is not None
    replays = [celery.send_task(contract.COMPLETE_UPLOAD, kwargs=signed(
        contract.COMPLETE_UPLOAD, upload_id=handle.upload_id, generation=record.generation)) for _ in range(3)]
    assert [r.get(timeout=60) for r in replays] == ["done"] * 3
    after = stack.uploader.status(handle.upload_id)
    assert after.notifications == status.notifications
    assert Outbox(stack.uploader.checkpoint).pending() == 0 and len(receiver.received) == 1
    assert SECRET not in json.dumps(after.to_dict())
    shown = _cli(stack, "status", handle.upload_id)
    assert shown.returncode == 0, shown.stderr
    assert "notify webhook" in shown.stdout and "completed: 1 attempt, last status 200, delivered at" in shown.stdout
    as_json = json.loads(_cli(stack, "status", "--json", handle.upload_id).stdout)
    (entry,) = as_json["notifications"]
    assert (entry["channel"], entry["attempts"], entry["last_status"]) == ("webhook", 1, "200") and entry["delivered_at"]
    for worker in stack.workers:
        assert SECRET not in worker.log_text()


def test_a_receiver_that_fails_three_times_gets_it_on_the_fourth_attempt(make_stack, receiver: Receiver) -> None:  # type: ignore[no-untyped-def]
    stack = notify_stack(make_stack)
    stack.start_worker("notify-retry")
    receiver.statuses = [500, 503, 500, 200]
    bucket = stack.new_bucket()
    handle = stack.uploader.submit(str(stack.make_file(1000)), f"s3://{bucket}/small.bin", callback_url=receiver.url)
    assert handle.wait(timeout=60).state == "completed"
    (delivery,) = wait_delivery(stack, handle.upload_id, settled, "the webhook delivered").notifications
    assert (delivery.attempts, delivery.last_status, delivery.gave_up_at) == (4, "200", None)
    assert len(receiver.received) == 4
    bodies = {body for _, body in receiver.received}
    assert len(bodies) == 1  # the same result each time


#: How long the receiver of the outage test refuses connections (the acceptance's "down for 60 s").
OUTAGE_SECONDS = 60.0


def test_a_receiver_down_for_60_seconds_gets_it_once_it_is_back(make_stack) -> None:  # type: ignore[no-untyped-def]
    """The receiver's port refuses every connection for a real 60 s, then a receiver comes back
    on it: the workers kept retrying throughout (backoff capped at 4 s, attempts enough for well
    past a minute), and the event arrives once, signed, and is recorded as delivered."""
    stack = notify_stack(make_stack, UPLOADER_CALLBACK_BACKOFF="0.5", UPLOADER_CALLBACK_BACKOFF_MAX="4",
                         UPLOADER_CALLBACK_MAX_ATTEMPTS="100")
    stack.start_worker("notify-down-a")
    stack.start_worker("notify-down-b")
    # Bound but not listening: Linux refuses connections to it (RST), and no other process can
    # take the port while the receiver is away.
    placeholder = socket.socket()
    placeholder.bind(("127.0.0.1", 0))
    port = placeholder.getsockname()[1]
    late: Receiver | None = None
    try:
        bucket = stack.new_bucket()
        handle = stack.uploader.submit(str(stack.make_file(1000)), f"s3://{bucket}/later.bin",
                                       callback_url=f"http://127.0.0.1:{port}/hook")
        assert handle.wait(timeout=60).state == "completed"
        (first,) = wait_delivery(stack, handle.upload_id, lambda d: d.attempts >= 1, "the first refused attempt").notifications
        down_since = time.monotonic()
        assert "ConnectionRefusedError" in first.last_error
        # The outage itself: watch the delivery record while the clock runs out (polling, so a
        # delivery given up meanwhile fails at once, not after the minute).
        seen: list[tuple[float, int]] = []
        while (elapsed := time.monotonic() - down_since) < OUTAGE_SECONDS:
            (during,) = stack.uploader.status(handle.upload_id).notifications
            assert during.delivered_at is None and during.gave_up_at is None, during
            assert during.next_attempt is not None and "ConnectionRefusedError" in during.last_error
            if not seen or seen[-1][1] != during.attempts:
                seen.append((elapsed, during.attempts))
            time.sleep(0.2)
        (down,) = stack.uploader.status(handle.upload_id).notifications
        # Retried all along: at the 4 s cap a minute holds at least a dozen attempts, and some of
        # them came in the outage's last 15 s.
        assert down.attempts >= 12, seen
        assert any(elapsed >= OUTAGE_SECONDS - 15 for elapsed, _ in seen[1:]), seen
        placeholder.close()
        late = Receiver()
        late.start(port)
        back = time.monotonic()
        (delivery,) = wait_delivery(stack, handle.upload_id, settled, "the webhook delivered", timeout=20).notifications
        assert delivery.delivered_at is not None and delivery.gave_up_at is None
        assert delivery.last_status == "200" and delivery.attempts > down.attempts
        assert Outbox(stack.uploader.checkpoint).pending() == 0
        (headers, body), = late.received
        assert verify(SECRET.encode(), headers[TIMESTAMP_HEADER], headers[SIGNATURE_HEADER], body)
        sent = json.loads(body)
        assert (sent["upload_id"], sent["state"]) == (handle.upload_id, "completed")
        print(f"outage {back - down_since:.1f} s, {down.attempts} refused attempts, delivered "
              f"{time.monotonic() - back:.1f} s after the receiver came back")
    finally:
        placeholder.close()
        if late is not None:
            late.close()


def _cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "uploader.cli", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **stack.env})


def test_a_loopback_callback_is_refused_without_an_allowlist(make_stack, receiver: Receiver) -> None:  # type: ignore[no-untyped-def]
    stack = notify_stack(make_stack, UPLOADER_OUTBOUND_ALLOW="")
    stack.start_worker("notify-guard")
    bucket = stack.new_bucket()
    handle = stack.uploader.submit(str(stack.make_file(1000)), f"s3://{bucket}/guarded.bin", callback_url=receiver.url)
    assert handle.wait(timeout=60).state == "completed"
    (delivery,) = wait_delivery(stack, handle.upload_id, settled, "the webhook given up").notifications
    assert delivery.delivered_at is None and delivery.attempts == 1
    assert "127.0.0.1, a loopback address; allow it in UPLOADER_OUTBOUND_ALLOW" in delivery.last_error
    assert receiver.received == []


def test_a_callback_url_needs_the_workers_secret(make_stack, receiver: Receiver) -> None:  # type: ignore[no-untyped-def]
    stack = notify_stack(make_stack, UPLOADER_CALLBACK_SECRET="")
    stack.start_worker("notify-nosecret")
    bucket = stack.new_bucket()
    handle = stack.uploader.submit(str(stack.make_file(1000)), f"s3://{bucket}/unsigned.bin", callback_url=receiver.url)
    with pytest.raises(InvalidRequest, match="UPLOADER_CALLBACK_SECRET"):
        handle.accepted(timeout=60)


class CallbackConsumer:
    """A backend service's plain kombu consumer of ``queue``: declared at once (on Redis a message
    published before its queue is bound goes nowhere, as for any Celery queue nobody declared)."""

    def __init__(self, stack: Stack, queue: str) -> None:
        self.conn = Connection(stack.redis_url)
        self.simple = self.conn.SimpleQueue(Queue(queue, routing_key=queue))

    def take(self, count: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """``count`` task messages: (headers, kwargs) each."""
        out: list[tuple[dict[str, Any], dict[str, Any]]] = []
        for _ in range(count):
            message = self.simple.get(block=True, timeout=60)
            _, kwargs, _ = message.decode()
            out.append((message.headers, kwargs))
            message.ack()
        return out

    def close(self) -> None:
        self.simple.close()
        self.conn.close()


def test_a_callback_task_by_name_reaches_its_own_queue(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack = notify_stack(make_stack)
    stack.start_worker("notify-task")
    queue = f"backend-{uuid.uuid4().hex[:8]}"
    consumer = CallbackConsumer(stack, queue)
    bucket = stack.new_bucket()
    handle = stack.uploader.submit(str(stack.make_file(2 * PART)), f"s3://{bucket}/tasked.bin", part_size=PART,
                                   on_complete="backend.upload_done", on_failure="backend.upload_failed",
                                   callback_queue=queue, callback_vars={"tenant": "t1"})
    status = handle.wait(timeout=120)
    ((headers, kwargs),) = consumer.take(1)
    consumer.close()
    assert headers["task"] == "backend.upload_done"
    assert kwargs["upload_id"] == handle.upload_id and kwargs["state"] == "completed"
    assert (kwargs["etag"], kwargs["size"], kwargs["vars"]) == (status.final_etag, 2 * PART, {"tenant": "t1"})
    (delivery,) = wait_delivery(stack, handle.upload_id, settled, "the task sent").notifications
    assert (delivery.channel, delivery.attempts) == ("task", 1) and delivery.delivered_at is not None


def test_failure_and_cancellation_are_notified(make_stack, receiver: Receiver) -> None:  # type: ignore[no-untyped-def]
    stack = notify_stack(make_stack)
    stack.start_worker("notify-slow", concurrency=1, UPLOADER_MAX_BANDWIDTH=str(10 * MiB))
    queue = f"backend-{uuid.uuid4().hex[:8]}"
    consumer = CallbackConsumer(stack, queue)
    bucket = stack.new_bucket()
    changing = stack.make_file(10 * PART)
    failing = stack.uploader.submit(str(changing), f"s3://{bucket}/changing.bin", part_size=PART,
                                    callback_url=receiver.url, on_failure="backend.upload_failed", callback_queue=queue)
    failing.accepted(timeout=60)
    stack.wait_parts_done(failing.upload_id, 1)
    with open(changing, "ab") as f:
        f.write(b"appended while uploading")
    failed = stack.wait_status(failing.upload_id, lambda s: s.terminal, 120, "the upload failed for good")
    assert failed.state == "failed"
    cancelled = stack.uploader.submit(str(stack.make_file(10 * PART)), f"s3://{bucket}/cancelled.bin", part_size=PART,
                                      callback_url=receiver.url, on_failure="backend.upload_failed", callback_queue=queue)
    cancelled.accepted(timeout=60)
    assert stack.uploader.cancel(cancelled.upload_id) == "cancelled"

    tasks = {kwargs["upload_id"]: (headers["task"], kwargs) for headers, kwargs in consumer.take(2)}
    consumer.close()
    assert tasks[failing.upload_id][0] == "backend.upload_failed"
    assert tasks[failing.upload_id][1]["state"] == "failed" and "changed" in tasks[failing.upload_id][1]["error"]
    assert tasks[cancelled.upload_id][1]["state"] == "cancelled"
    for upload_id in (failing.upload_id, cancelled.upload_id):
        deliveries = wait_delivery(stack, upload_id, lambda d: d.delivered_at, "both notifications delivered").notifications
        assert sorted(d.channel for d in deliveries) == ["task", "webhook"]
    posted = {json.loads(body)["upload_id"]: json.loads(body)["state"] for _, body in receiver.received}
    assert posted == {failing.upload_id: "failed", cancelled.upload_id: "cancelled"}


def test_a_worker_killed_while_delivering_leaves_the_event_to_another(make_stack, receiver: Receiver) -> None:  # type: ignore[no-untyped-def]
    stack = notify_stack(make_stack, UPLOADER_NOTIFY_LEASE_SECONDS="3", UPLOADER_WORKER_HEARTBEAT_SECONDS="2")
    doomed = stack.start_worker("notify-doomed")
    release = threading.Event()
    receiver.hold = release  # the first POST hangs: its worker is killed while it waits
    bucket = stack.new_bucket()
    handle = stack.uploader.submit(str(stack.make_file(1000)), f"s3://{bucket}/killed.bin", callback_url=receiver.url)
    assert handle.wait(timeout=60).state == "completed"
    assert receiver.arrived.wait(60)
    doomed.kill()
    doomed.proc.wait(10)
    release.set()
    stack.start_worker("notify-survivor")
    (delivery,) = wait_delivery(stack, handle.upload_id, settled, "the webhook delivered by the survivor").notifications
    assert delivery.delivered_at is not None and delivery.attempts == 2
    assert len(receiver.received) == 2
    wait_until(lambda: Outbox(stack.uploader.checkpoint).pending() == 0, 10, "the outbox emptied")
