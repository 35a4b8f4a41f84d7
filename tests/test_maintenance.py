"""Automatic recovery and cleanup: the stall reconciler the workers run, and the janitor."""

from __future__ import annotations

import os
import subprocess
import sys

import redis

from tests.conftest import Stack, sha256_file
from uploader import contract
from uploader.context import UploaderContext
from uploader.dev.localstack import wait_until
from uploader.maintenance import janitor_plan
from uploader.planner import MiB

PART = 5 * MiB


def test_lost_broker_messages_are_redispatched_by_the_stall_reconciler(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack(
        UPLOADER_STALL_SECONDS="2", UPLOADER_RECONCILE_INTERVAL="1", UPLOADER_WORKER_HEARTBEAT_SECONDS="2"
    )
    bucket = stack.new_bucket()
    path = stack.make_file(6 * PART)
    # Only the coordinator runs at first: it dispatches the parts, which we then "lose".
    coordinator = stack.start_worker("coordinator-only", concurrency=1)
    handle = stack.uploader.submit(str(path), f"s3://{bucket}/lost.bin", part_size=PART)
    broker = redis.Redis.from_url(stack.redis_url)
    wait_until(lambda: broker.llen(contract.PARTS_QUEUE) >= 6 or _parts_started(stack, handle.upload_id), 60, "parts queued")
    coordinator.kill()
    coordinator.proc.wait(10)
    lost = broker.llen(contract.PARTS_QUEUE)
    broker.delete(contract.PARTS_QUEUE)  # a broker restarted without persistence loses these
    assert lost > 0

    stack.start_worker("survivor", concurrency=4)
    status = handle.wait(timeout=120)
    assert status.state == "completed"
    assert stack.object_sha256(bucket, "lost.bin") == sha256_file(path)
    record = stack.uploader.checkpoint.get(handle.upload_id)
    assert record is not None and record.complete_calls == 1
    assert stack.open_multipart_uploads(bucket) == []


def _parts_started(stack: Stack, upload_id: str) -> bool:
    record = stack.uploader.checkpoint.get(upload_id)
    return record is not None and record.parts_sent > 0


def _gc(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "uploader.cli", "gc", *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, **stack.env, "COLUMNS": "250"},
    )


def test_janitor_aborts_abandoned_uploads_and_leaves_foreign_ones_alone(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack(UPLOADER_ABANDON_SECONDS="1", UPLOADER_PART_MAX_RETRIES="0")
    stack.start_worker("janitor", concurrency=1, UPLOADER_MAX_BANDWIDTH=str(10 * MiB))
    bucket = stack.new_bucket()
    foreign = stack.s3.create_multipart_upload(Bucket=bucket, Key="someone-elses.bin")["UploadId"]

    # An upload that fails (its source grows under it) and keeps its parts for resume.
    path = stack.make_file(6 * PART)
    handle = stack.uploader.submit(str(path), f"s3://{bucket}/abandoned.bin", part_size=PART)
    handle.accepted(timeout=60)
    with open(path, "ab") as f:
        f.write(b"more")
    wait_until(lambda: stack.uploader.status(handle.upload_id).state == "failed", 60, "the upload to fail")
    ours = stack.uploader.checkpoint.get(handle.upload_id).mpu_id  # type: ignore[union-attr]
    assert {u["UploadId"] for u in stack.open_multipart_uploads(bucket)} == {foreign, ours}
    ctx = UploaderContext.from_settings(stack.settings)
    # The abandon limit (1 s) counts from the failure.
    wait_until(lambda: [a.upload_id for a in janitor_plan(ctx)] == [handle.upload_id], 10, "the upload to count as abandoned")

    dry = _gc(stack, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert handle.upload_id in dry.stdout and "1 upload(s) to remove" in dry.stdout
    assert {u["UploadId"] for u in stack.open_multipart_uploads(bucket)} == {foreign, ours}

    real = _gc(stack)
    assert real.returncode == 0, real.stderr
    assert "1 upload(s) removed" in real.stdout
    assert [u["UploadId"] for u in stack.open_multipart_uploads(bucket)] == [foreign]
    assert stack.checkpoint_keys(handle.upload_id) == []
    stack.s3.abort_multipart_upload(Bucket=bucket, Key="someone-elses.bin", UploadId=foreign)
