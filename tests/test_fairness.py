"""Fairness between uploads (the README's "Fairness"): each upload's parts go to a part lane of
its own and the workers read the lanes in turn, so uploads are interleaved instead of sent one
after the other. With a single parts queue (first in, first out) each of these tests fails: the
upload submitted second waits for every part of the first."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from celery import Celery
from celery.app.task import Context

from tests.conftest import Stack, sha256_file
from tests.faultproxy import FaultProxy
from uploader.checkpoint import CheckpointStore
from uploader.config import Settings
from uploader.contract import PARTS_QUEUE, UPLOAD_PART, celery_config, part_lanes
from uploader.planner import MiB

PART = 5 * MiB
#: Part bodies reach the server at this rate (a quarter of a second per part), so that an upload
#: of a few dozen parts lasts long enough for another to be submitted while it is being sent.
BODY_RATE = 20 * MiB


def _fleet(make_stack, proxy: FaultProxy, **env: str) -> Stack:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack(**env)
    stack.start_worker("fair", concurrency=2, UPLOADER_S3_ENDPOINT_URL=proxy.url)
    return stack


def _parts_done(stack: Stack, upload_id: str) -> int:
    return stack.uploader.status(upload_id).parts_done


def test_two_large_uploads_submitted_together_progress_at_similar_rates(make_stack, seaweed) -> None:  # type: ignore[no-untyped-def]
    proxy = FaultProxy(seaweed.endpoint_url, body_rate=BODY_RATE)
    try:
        stack = _fleet(make_stack, proxy)
        bucket = stack.new_bucket()
        paths = [stack.make_file(16 * PART), stack.make_file(16 * PART)]
        handles = [stack.uploader.submit(str(p), f"s3://{bucket}/big-{i}.bin", part_size=PART) for i, p in enumerate(paths)]
        for handle in handles:
            handle.accepted(60)

        # Watch both until the first one completes; then the other must be well on its way.
        deadline = time.monotonic() + 180
        while True:
            statuses = [stack.uploader.status(h.upload_id) for h in handles]
            if any(s.terminal for s in statuses) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        first = next(s for s in statuses if s.terminal)
        other = next(s for s in statuses if s is not first)
        assert first.state == "completed", first
        assert other.parts_done >= other.part_count // 2, (
            f"when one upload completed, the other had {other.parts_done} of {other.part_count} parts"
        )
        for i, (handle, path) in enumerate(zip(handles, paths, strict=True)):
            assert handle.wait(timeout=120).state == "completed"
            assert stack.object_sha256(bucket, f"big-{i}.bin") == sha256_file(path)
    finally:
        proxy.close()


def test_a_small_upload_is_not_queued_behind_a_large_one(make_stack, seaweed) -> None:  # type: ignore[no-untyped-def]
    proxy = FaultProxy(seaweed.endpoint_url, body_rate=BODY_RATE)
    try:
        stack = _fleet(make_stack, proxy)
        bucket = stack.new_bucket()
        large_path = stack.make_file(24 * PART)
        large = stack.uploader.submit(str(large_path), f"s3://{bucket}/large.bin", part_size=PART)
        large.accepted(60)
        deadline = time.monotonic() + 60
        while _parts_done(stack, large.upload_id) < 2:
            assert time.monotonic() < deadline, "the large upload started sending"
            time.sleep(0.05)

        small_path: Path = stack.make_file(2 * PART + 7)
        small = stack.uploader.submit(str(small_path), f"s3://{bucket}/small.bin", part_size=PART)
        status = small.wait(timeout=120)
        assert status.state == "completed", status
        left = stack.uploader.status(large.upload_id)
        assert left.state == "uploading" and left.part_count - left.parts_done >= left.part_count // 3, (
            f"the small upload completed after {left.parts_done} of the large one's {left.part_count} parts"
        )
        assert stack.object_sha256(bucket, "small.bin") == sha256_file(small_path)
        assert large.wait(timeout=180).state == "completed"
    finally:
        proxy.close()


def test_with_one_lane_every_upload_uses_the_parts_queue(store: CheckpointStore) -> None:
    assert part_lanes(1) == (PARTS_QUEUE,)
    assert part_lanes(3) == (PARTS_QUEUE, f"{PARTS_QUEUE}.1", f"{PARTS_QUEUE}.2")


def test_a_dispatch_takes_a_free_lane_else_the_shortest(store: CheckpointStore) -> None:
    # All free: the first lane; the next dispatch, moments later, another one.
    assert store.claim_lane([0, 0, 0, 0], 60) == 0
    assert store.claim_lane([0, 0, 0, 0], 60) == 1
    assert store.claim_lane([0, 0, 9, 0], 60) == 3  # lane 2 has a backlog: the only free one
    # None free: the fewest queued, and of those the one held longest ago (0, then 1, then 3).
    assert store.claim_lane([5, 5, 9, 5], 60) == 0
    assert store.claim_lane([5, 5, 9, 5], 60) == 1
    # A long backlog (a cancelled upload's parts, say) loses to held lanes with nothing queued:
    # lane 2, free, first; then the others in the order of their holds (3, then 1), never lane 0.
    assert store.claim_lane([9800, 0, 0, 0], 60) == 2
    assert store.claim_lane([9800, 0, 0, 0], 60) == 3
    assert store.claim_lane([9800, 0, 0, 0], 60) == 1
    assert store.claim_lane([9800, 0, 0, 0], 60) == 2


def test_a_lane_with_fewer_queued_wins_when_none_is_held(store: CheckpointStore) -> None:
    assert store.claim_lane([3, 1], 0.001) == 1
    deadline = time.monotonic() + 10
    while store.claim_lane([2, 5], 0.001) != 0:  # (once the hold of a millisecond has lapsed)
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_short_hold_does_not_cut_a_long_one(store: CheckpointStore) -> None:
    assert store.claim_lane([0, 0], 60) == 0
    assert store.claim_lane([0, 0], 0.001) == 1
    assert store.redis.ttl(store.lane_holds_key) > 30
    assert store.claim_lane([0, 0], 0.001) == 1  # lane 0 still held; lane 1's hold lapsed at once


def test_a_hold_lapses(store: CheckpointStore) -> None:
    assert store.claim_lane([0, 0], 0.2) == 0
    assert store.claim_lane([0, 0], 0.2) == 1
    deadline = time.monotonic() + 10
    while store.claim_lane([0, 3], 0.2) != 0:  # lane 0 is free again once its hold lapsed
        assert time.monotonic() < deadline, "the hold on lane 0 never lapsed"
        time.sleep(0.05)


def test_a_worker_reads_the_last_lane(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack(UPLOADER_PART_LANES="4")
    stack.start_worker("lanes", concurrency=2)
    store = stack.uploader.checkpoint
    for lane in range(3):  # lanes 0-2 taken for a minute by dispatches of (imaginary) uploads
        assert store.claim_lane([0, 0, 0, 0], 60) == lane
    bucket = stack.new_bucket()
    path = stack.make_file(2 * PART + 1)
    handle = stack.uploader.submit(str(path), f"s3://{bucket}/last-lane.bin", part_size=PART)
    assert handle.wait(timeout=120).state == "completed"
    assert store.redis.hexists(store.lane_holds_key, "3"), "its parts went to the last lane"
    assert stack.object_sha256(bucket, "last-lane.bin") == sha256_file(path)


def test_a_part_that_comes_back_stays_in_its_lane(make_stack) -> None:  # type: ignore[no-untyped-def]
    # What Celery sends for a retried part, or one held back by max_concurrency
    # (Task.signature_from_request, as workers/tasks.py's _come_back and task.retry build it), from
    # the message as a worker received it out of lane 3: it goes back to lane 3.
    stack: Stack = make_stack()
    app = Celery("lanes-test")
    app.conf.update(celery_config(Settings(broker_url=stack.redis_url, part_lanes=4)))

    @app.task(name=UPLOAD_PART, bind=True, shared=False)  # (shared: it would replace the real one in every app)
    def part(self: object, **kwargs: object) -> None: ...
    received = Context(id="part-task", args=(), kwargs={"upload_id": "u", "part_number": 1, "generation": 1}, retries=2,
                       delivery_info={"exchange": "", "routing_key": f"{PARTS_QUEUE}.3", "priority": None})
    part.signature_from_request(received, None, None, countdown=0.5, retries=2).apply_async()
    broker = redis.Redis.from_url(stack.redis_url)
    assert {name: broker.llen(name) for name in part_lanes(4)} == {
        PARTS_QUEUE: 0, f"{PARTS_QUEUE}.1": 0, f"{PARTS_QUEUE}.2": 0, f"{PARTS_QUEUE}.3": 1,
    }
    app.close()


def test_a_worker_process_switches_threads_often() -> None:
    # The worker's app sets the GIL switch interval at import (workers/app.py): the worker, its
    # pool processes and anything else that loads the app.
    env = {**os.environ, "UPLOADER_FLEET_KEY": "k" * 40, "UPLOADER_WORKER_SWITCH_INTERVAL": "0.0007"}
    out = subprocess.run([sys.executable, "-c", "import sys, workers.app; print(sys.getswitchinterval())"],
                         env=env, capture_output=True, text=True, timeout=60, check=True).stdout
    assert float(out) == pytest.approx(0.0007)
