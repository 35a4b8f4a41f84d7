"""RabbitMQ as the broker (kombu's AMQP transport), the checkpoint and the results in Redis: an
upload end to end and a SIGKILLed worker's parts taken over, against a real RabbitMQ node
(Debian's rabbitmq-server, started here unless UPLOADER_TEST_RABBITMQ_URL names one)."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Stack, sha256_file
from uploader.dev.localstack import RabbitMQServer, RedisServer, SeaweedS3
from uploader.planner import MiB


@pytest.fixture(scope="module")
def rabbitmq(workdir: Path) -> Iterator[tuple[str, list[str]]]:
    """The broker's URL and the rabbitmqctl command that manages its node."""
    given = os.environ.get("UPLOADER_TEST_RABBITMQ_URL")
    if given:
        yield given, ["rabbitmqctl"]
        return
    server = RabbitMQServer(workdir)
    try:
        yield server.url, ["rabbitmqctl", "-n", server.node]
    finally:
        server.stop(timeout=30)


@pytest.fixture(params=["classic", "quorum"])
def amqp_stack(request: pytest.FixtureRequest, redis_server: RedisServer, seaweed: SeaweedS3, sources_root: Path,
               rabbitmq: tuple[str, list[str]], make_stack) -> Stack:  # type: ignore[no-untyped-def]
    """A stack on RabbitMQ with classic or quorum queues (each on a virtual host of its own: a
    queue's type cannot change), its checkpoint and results on an isolated Redis database."""
    probe: Stack = make_stack()  # an isolated Redis database for this test's checkpoint and results
    redis_url = probe.redis_url
    url, ctl = rabbitmq
    vhost = f"uploader-{request.param}-{uuid.uuid4().hex[:8]}"
    subprocess.run([*ctl, "add_vhost", vhost], check=True, capture_output=True, timeout=60)
    subprocess.run([*ctl, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"], check=True, capture_output=True,
                   timeout=60)
    stack: Stack = make_stack(UPLOADER_BROKER_URL=url.rstrip("/") + "/" + vhost, UPLOADER_CHECKPOINT_URL=redis_url,
                              UPLOADER_RESULT_BACKEND=redis_url, UPLOADER_QUEUE_TYPE=request.param)
    stack.queue_types = lambda: dict(  # type: ignore[attr-defined]
        line.split("\t")[:2] for line in subprocess.run(
            [*ctl, "list_queues", "-p", vhost, "--quiet", "--no-table-headers", "name", "type"],
            check=True, capture_output=True, text=True, timeout=60,
        ).stdout.splitlines() if "\t" in line
    )
    return stack


def test_an_upload_completes_through_rabbitmq(amqp_stack: Stack) -> None:
    """Parts, a small PUT and a part that waits its turn (max_concurrency: sent again with a
    countdown, which quorum queues deliver through RabbitMQ's delayed delivery)."""
    stack = amqp_stack
    stack.start_worker("amqp", concurrency=4)
    bucket = stack.new_bucket()
    path = stack.make_file(4 * 5 * MiB + 123)
    handle = stack.uploader.submit(str(path), f"s3://{bucket}/r.bin", part_size=5 * MiB, max_concurrency=1)
    status = handle.wait(timeout=120)
    assert (status.state, status.parts_done) == ("completed", 5)
    assert stack.object_sha256(bucket, "r.bin") == sha256_file(path)
    small = stack.make_file(1000)
    assert stack.uploader.submit(str(small), f"s3://{bucket}/s.bin").wait(timeout=60).state == "completed"
    # The queues are of the type asked for, and sends wait for the broker's confirmation.
    types = stack.queue_types()  # type: ignore[attr-defined]
    assert types["uploader.parts"] == types["uploader.control"] == stack.settings.queue_type
    assert stack.uploader.celery.conf.broker_transport_options["confirm_publish"] is True


def test_a_killed_workers_parts_are_taken_over_on_rabbitmq(amqp_stack: Stack) -> None:
    stack = amqp_stack
    bucket = stack.new_bucket()
    path = stack.make_file(8 * 5 * MiB)
    handle = stack.upload_then_crash(path, f"s3://{bucket}/k.bin", parts_before=2, part_size=5 * MiB, bandwidth=8 * MiB)
    stack.start_worker("rescuer", concurrency=4)
    status = handle.wait(timeout=180)
    assert status.state == "completed" and status.parts_done == 8
    assert stack.object_sha256(bucket, "k.bin") == sha256_file(path)
    assert stack.open_multipart_uploads(bucket) == []
