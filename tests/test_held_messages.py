"""Messages a killed worker had received but not finished go back to their queues within
seconds, not after the broker's visibility timeout (workers/transport.py, ``HeldQoS``).

kombu's Redis transport keeps a delivered message in its ``unacked`` hash until it is
acknowledged, and restores it only after ``visibility_timeout`` (an hour here, as by default).
A task that had not taken a part lease yet (here: a start waiting for its countdown) named no
holder any recovery could see, so it waited that hour; CI saw a SIGKILL storm stop an upload
that way."""

from __future__ import annotations

import time
import uuid

import redis

from tests.conftest import Stack
from uploader import contract


def test_a_message_a_killed_worker_held_goes_back_to_its_queue_at_once(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack(
        UPLOADER_WORKER_HEARTBEAT_SECONDS="2", UPLOADER_RECONCILE_INTERVAL="1", UPLOADER_LEADER_LEASE_SECONDS="3",
    )
    doomed = stack.start_worker("doomed", concurrency=1)
    bucket = stack.new_bucket()
    path = stack.make_file(1000)
    upload_id = f"held-{uuid.uuid4().hex[:12]}"
    # A start with a countdown: the worker takes it off the queue at once and holds it,
    # unacknowledged, until then.
    result = stack.uploader.celery.send_task(
        contract.START_UPLOAD, kwargs={"source": str(path), "bucket": bucket, "key": "held.bin", "upload_id": upload_id},
        countdown=20,
    )
    received = f"uploader.start_upload[{result.id}] received"
    deadline = time.monotonic() + 30
    while received not in doomed.log_text():
        assert time.monotonic() < deadline, "the worker never received the start"
        time.sleep(0.05)
    broker = redis.Redis.from_url(stack.redis_url)
    assert broker.hlen("unacked") == 1

    doomed.kill()
    doomed.proc.wait(10)
    killed = time.monotonic()
    survivor = stack.start_worker("survivor", concurrency=2)
    # Its heartbeat lapses (2 s), the survivor leads recovery (the lease: 3 s) and puts the
    # message back; the survivor receives it and runs it at its countdown.
    while received not in survivor.log_text():
        assert time.monotonic() - killed < 30, "the message the killed worker held was not put back"
        time.sleep(0.05)
    assert "messages held by dead worker" in survivor.log_text()
    status = stack.uploader.wait(upload_id, timeout=60)
    assert status.state == "completed", status
    assert broker.hlen("unacked") == 0
    broker.close()
