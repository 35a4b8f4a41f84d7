"""Priorities (the README's "Priorities"): a request's ``priority``, 0-9 with 9 the most urgent,
ranks its messages on the Redis broker: a small urgent upload overtakes a backlog of parts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import redis

from tests.conftest import Stack, sha256_file
from uploader import contract
from uploader.errors import InvalidRequest
from uploader.planner import MiB
from uploader.priority import message_priority
from uploader.request import parse_request

PART = 5 * MiB
BACKLOG_PARTS = 20


def test_an_urgent_upload_overtakes_a_backlog_of_parts(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack()
    # One worker, one part at a time, each part about half a second: a 20-part backlog is ~10 s.
    stack.start_worker("prio", concurrency=1, UPLOADER_MAX_BANDWIDTH=str(10 * MiB))
    bucket = stack.new_bucket()

    backlog_path = stack.make_file(BACKLOG_PARTS * PART)
    backlog = stack.uploader.submit(str(backlog_path), f"s3://{bucket}/backlog.bin", part_size=PART, priority=0)
    backlog.accepted(timeout=60)
    # Its 20 part messages are queued (the coordinator fanned them out) and one is being sent.
    stack.wait_parts_done(backlog.upload_id, 1)

    urgent_path = stack.make_file(2 * PART)
    urgent = stack.uploader.submit(str(urgent_path), f"s3://{bucket}/urgent.bin", part_size=PART, priority=9)
    status = urgent.wait(timeout=120)
    assert status.state == "completed", status
    behind = stack.uploader.status(backlog.upload_id)
    # The urgent upload's start, two parts and completion went ahead of the waiting backlog: it
    # finished while most of the backlog was still queued (FIFO, it would wait for all 20 parts).
    assert behind.state == "uploading" and behind.parts_done <= BACKLOG_PARTS // 2, behind
    assert stack.object_sha256(bucket, "urgent.bin") == sha256_file(urgent_path)
    record = stack.uploader.checkpoint.get(urgent.upload_id)
    assert record is not None and record.priority == 9

    # The backlog still completes, whole.
    assert backlog.wait(timeout=240).state == "completed"
    assert stack.object_sha256(bucket, "backlog.bin") == sha256_file(backlog_path)


def test_messages_go_on_kombus_list_for_their_priority(make_stack) -> None:  # type: ignore[no-untyped-def]
    """No worker: the start messages stay where the client put them. kombu's Redis lists read
    lowest first, so our 9 is kombu's 0 (the plain list, where a message without a priority stays,
    as in deployments from before priorities) and our 2 is kombu's 7."""
    stack: Stack = make_stack()
    bucket = stack.new_bucket()
    path = stack.make_file(1024)
    client = redis.Redis.from_url(stack.redis_url)
    sep = "\x06\x16"
    control = contract.CONTROL_QUEUE

    def lengths() -> dict[str, int]:
        found = {control: client.llen(control)}
        found.update({f"{control}{sep}{n}": client.llen(f"{control}{sep}{n}") for n in range(1, 10)})
        return {key: length for key, length in found.items() if length}

    stack.uploader.submit(str(path), f"s3://{bucket}/plain.bin")
    assert lengths() == {control: 1}
    stack.uploader.submit(str(path), f"s3://{bucket}/urgent.bin", priority=9)
    assert lengths() == {control: 2}
    stack.uploader.submit(str(path), f"s3://{bucket}/low.bin", priority=2)
    assert lengths() == {control: 2, f"{control}{sep}7": 1}


def test_priority_is_checked_before_anything_is_sent() -> None:
    base = {"source": "/data/f", "bucket": "bucket", "key": "k"}
    assert parse_request({**base, "priority": 0}).priority == 0
    assert parse_request(base).priority is None
    for bad in (10, -1, True, "9", 4.0):
        with pytest.raises(InvalidRequest, match="priority"):
            parse_request({**base, "priority": bad})


def test_our_scale_is_translated_for_redis_only() -> None:
    assert [message_priority(p, "redis://h:6379/0") for p in (0, 5, 9)] == [9, 4, 0]
    assert message_priority(9, "sentinel://a:26379;sentinel://b:26379") == 0
    assert [message_priority(p, "amqp://guest@h//") for p in (0, 9)] == [0, 9]
    assert message_priority(None, "redis://h") is None


def test_the_cli_takes_priority_0_to_9(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack()
    path = stack.make_file(1024)

    def submit(*flags: str) -> subprocess.CompletedProcess[str]:
        # A process of its own, as a user runs it (the settings come from its environment).
        return subprocess.run(
            [sys.executable, "-m", "uploader.cli", "submit", str(path), "s3://bucket/k", *flags],
            env={**os.environ, **stack.env}, capture_output=True, text=True, timeout=120, check=False,
        )

    refused = submit("--priority", "10")
    assert refused.returncode == 2 and "--priority" in refused.stderr
    sent = submit("--priority", "0", "--accept-timeout", "0")
    assert sent.returncode == 0, sent.stderr
    broker = redis.Redis.from_url(stack.redis_url)
    # No worker: the start message waits on kombu's list for our 0 (kombu's 9).
    assert broker.llen(f"{contract.CONTROL_QUEUE}\x06\x169") == 1
