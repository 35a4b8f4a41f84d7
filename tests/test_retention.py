"""What Redis keeps (issue 10, item 7): no result key per part, a settled upload's chord keys go
with it, and the reconciler's cost grows with the uploads that need attention, not with the
finished ones kept for the retention period."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import Stack
from uploader import contract
from uploader.checkpoint import CheckpointStore
from uploader.config import Settings
from uploader.context import UploaderContext
from uploader.dev.localstack import RedisServer, wait_until
from uploader.maintenance import RecoveryLoop, reconcile
from uploader.planner import MiB
from uploader.storage.adapter import object_store

PART = 5 * MiB
#: Task results an upload may keep (each expiring with its record): start_upload's, the chord
#: body's (complete_upload) and the one the last part triggers, or cancel_upload's.
CONTROL_RESULTS = 3


def celery_keys(raw: redis.Redis) -> tuple[list[str], dict[str, str | None]]:
    """The task result keys, and the chord keys with their values (strings only)."""
    results = [k for k in raw.scan_iter(match="celery-task-meta-*", count=1000)]
    chords = {}
    for key in raw.scan_iter(match="celery-taskset-meta-*", count=1000):
        chords[key] = raw.get(key) if raw.type(key) == "string" else None
    return results, chords


def only_done_markers(chords: dict[str, str | None]) -> bool:
    """Nothing left of the chords but Celery's ``.c = "done"`` markers (one small key a chord,
    which make a late part message count for nothing)."""
    return all(key.endswith(".c") and value == "done" for key, value in chords.items())


def settled_cleanly(stack: Stack, raw: redis.Redis, upload_id: str) -> bool:
    store = stack.uploader.checkpoint
    _, chords = celery_keys(raw)
    return (
        raw.llen(contract.PARTS_QUEUE) == 0
        and not raw.exists(store.inflight_key(upload_id), store.chords_key(upload_id))
        and raw.zcard(store.settled_key) == 0
        and only_done_markers(chords)
    )


def test_a_completed_upload_leaves_no_part_results_and_no_chord_keys(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack(UPLOADER_RECONCILE_INTERVAL="1", UPLOADER_LEADER_LEASE_SECONDS="3")
    stack.start_worker("retention", concurrency=4)
    bucket = stack.new_bucket()
    parts = 8
    handle = stack.uploader.submit(str(stack.make_file(parts * PART)), f"s3://{bucket}/done.bin", part_size=PART)
    assert handle.wait(timeout=120).state == "completed"
    raw = redis.Redis.from_url(stack.redis_url, decode_responses=True)

    wait_until(lambda: settled_cleanly(stack, raw, handle.upload_id), 30, "the upload's chord keys to go")
    results, chords = celery_keys(raw)
    assert len(results) <= CONTROL_RESULTS, f"{len(results)} task results for an upload of {parts} parts"
    assert len(chords) <= 1
    for key in chords:  # the done marker expires with the results, not before the queue could drain
        assert 0 < raw.ttl(key) <= stack.settings.retention_seconds
    assert stack.uploader.checkpoint.redis.zscore(stack.uploader.checkpoint.active_key, handle.upload_id) is None


def test_a_cancelled_upload_leaves_no_part_results_and_no_chord_keys(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack(UPLOADER_RECONCILE_INTERVAL="1", UPLOADER_LEADER_LEASE_SECONDS="3")
    # Throttled: when the cancel comes, nearly every part message is still queued.
    stack.start_worker("retention", concurrency=4, UPLOADER_MAX_BANDWIDTH=str(2 * MiB))
    bucket = stack.new_bucket()
    parts = 400
    path = stack.sources_root / f"sparse-{uuid.uuid4().hex}.bin"
    with open(path, "wb") as f:
        f.truncate(parts * PART)
    try:
        handle = stack.uploader.submit(str(path), f"s3://{bucket}/cancelled.bin", part_size=PART)
        handle.start.get(timeout=120)  # every part message is sent
        raw = redis.Redis.from_url(stack.redis_url, decode_responses=True)
        assert raw.llen(contract.PARTS_QUEUE) > parts // 2
        assert handle.cancel() == "cancelled"

        wait_until(lambda: settled_cleanly(stack, raw, handle.upload_id), 180, "the queue to drain and the chord keys to go")
        results, chords = celery_keys(raw)
        assert len(results) <= CONTROL_RESULTS, f"{len(results)} task results for a cancelled upload of {parts} parts"
        assert len(chords) <= 1
        assert stack.uploader.status(handle.upload_id).state == "cancelled"
        assert stack.open_multipart_uploads(bucket) == []
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.parametrize("fanout", ["auto", "chord"])
def test_a_cancelled_upload_whose_chord_can_never_fire_leaves_no_chord_keys(make_stack, fanout: str) -> None:  # type: ignore[no-untyped-def]
    """Its part messages were lost (a broker restarted without persistence): the chord's size and
    whatever parts returned would otherwise stay for the retention period. With the batched
    fan-out and with Celery's plain chord (``UPLOADER_FANOUT``)."""
    stack: Stack = make_stack(UPLOADER_RECONCILE_INTERVAL="1", UPLOADER_LEADER_LEASE_SECONDS="3", UPLOADER_FANOUT=fanout)
    bucket = stack.new_bucket()
    coordinator = stack.start_worker("coordinator-only", concurrency=1, UPLOADER_MAX_BANDWIDTH=str(1 * MiB))
    handle = stack.uploader.submit(str(stack.make_file(6 * PART)), f"s3://{bucket}/lost.bin", part_size=PART)
    handle.start.get(timeout=120)
    raw = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    coordinator.kill()
    coordinator.proc.wait(10)
    assert raw.delete(contract.PARTS_QUEUE) == 1
    _, chords = celery_keys(raw)
    assert not only_done_markers(chords)  # the chord is waiting for parts that will never come

    stack.start_worker("survivor", concurrency=2)
    assert handle.cancel() == "cancelled"
    wait_until(lambda: settled_cleanly(stack, raw, handle.upload_id), 30, "the chord keys to go")
    results, chords = celery_keys(raw)
    assert len(chords) <= 1 and len(results) <= CONTROL_RESULTS


# -- the reconciler's cost ----------------------------------------------------------------------


@pytest.fixture
def own_redis(workdir: Path) -> Iterator[RedisServer]:
    """A Redis server of this test's own: ``INFO commandstats`` counts this test's commands only."""
    server = RedisServer(workdir)
    yield server
    server.stop()


def _context(url: str) -> UploaderContext:
    settings = Settings(broker_url=url, source_roots="/tmp")
    return UploaderContext(settings, CheckpointStore.from_url(url), object_store(settings))


FIELDS = {"source": "/tmp/x", "bucket": "b", "key": "k", "size": 10, "mtime_ns": 0, "part_size": 5, "part_count": 2,
          "mode": "multipart", "metadata": {}, "content_type": None, "abort_on_failure": False}


def _uploading(store: CheckpointStore, upload_id: str) -> None:
    assert store.claim(upload_id, FIELDS)[0]
    assert store.attach_multipart(upload_id, f"mpu-{upload_id}") == "ok"


def _finished(store: CheckpointStore, prefix: str, count: int) -> None:
    """``count`` uploads in each settled state: completed, cancelled, failed for good."""
    for n in range(count):
        token = uuid.uuid4().hex
        done = f"{prefix}-done-{n}"
        assert store.claim_single(done, {**FIELDS, "mode": "single", "part_count": 1}, token, 300)[0]
        assert store.mark_completed(done, token, 3600, {}) == "ok"
        cancelled = f"{prefix}-cancelled-{n}"
        _uploading(store, cancelled)
        assert store.cancel(cancelled, 3600) == "cancelled"
        failed = f"{prefix}-failed-{n}"
        _uploading(store, failed)
        assert store.mark_failed(failed, "broken") == "uploading"


def _commands(raw: redis.Redis, action: Callable[[], object]) -> int:
    def count() -> int:
        return sum(int(v["calls"]) for k, v in raw.info("commandstats").items() if k.startswith("cmdstat_"))

    before = count()
    action()
    return count() - before - 1  # the INFO itself


def test_reconcile_cost_does_not_grow_with_finished_uploads(own_redis: RedisServer) -> None:
    ctx = _context(own_redis.url)
    store = ctx.checkpoint
    raw = redis.Redis.from_url(own_redis.url)
    for n in range(3):
        _uploading(store, f"busy-{n}")
    # One failed upload with an automatic resume to come still needs attention.
    _uploading(store, "retrying")
    assert store.mark_failed("retrying", "S3 away", auto_resumes=3, backoff=3600) == "uploading"
    _finished(store, "few", 5)
    sent: list[object] = []
    reconcile(ctx, sent.append)  # loads the scripts it calls
    few = _commands(raw, lambda: reconcile(ctx, sent.append))
    _finished(store, "many", 300)
    many = _commands(raw, lambda: reconcile(ctx, sent.append))

    assert sent == []
    assert store.redis.zcard(store.index_key) == 4 + 3 * 305
    assert many == few, f"one reconcile run: {few} Redis commands at 15 finished uploads, {many} at 915"
    assert set(store.active_ids()) == {"busy-0", "busy-1", "busy-2", "retrying"}


def test_the_attention_index_follows_every_transition(store: CheckpointStore) -> None:
    def active() -> set[str]:
        return set(store.active_ids())

    _uploading(store, "u")
    assert active() == {"u"}
    assert store.mark_failed("u", "S3 away", auto_resumes=1, backoff=1) == "uploading"
    assert active() == {"u"}  # an automatic resume is to come
    assert store.claim_auto_resume("u", 1, 1, now=time.time() + 10) == 1
    assert store.reopen("u", "mpu-u") == 2
    assert store.mark_failed("u", "S3 away", auto_resumes=2, backoff=1) == "uploading"
    assert active() == {"u"}
    assert store.claim_auto_resume("u", 1, 1, now=time.time() + 10) == 0  # none left: failed for good
    assert active() == set()
    assert store.reopen("u", "mpu-u") == 3  # a person resumes it
    assert active() == {"u"}
    assert store.mark_failed("u", "broken") == "uploading"
    assert active() == set()
    assert isinstance(store.restart("u", "mpu-u", "mpu-u2", {}), int)
    assert active() == {"u"}
    assert store.cancel("u", 60) == "cancelled"
    assert active() == set()

    _uploading(store, "v")
    assert store.mark_failed("v", "S3 away", auto_resumes=2, backoff=1) == "uploading"
    assert store.note_error("v", "the source changed")  # no more automatic resumes
    assert active() == set()

    assert store.claim("w", FIELDS)[0]
    assert active() == {"w"}
    assert store.discard("w") == "ok"
    assert active() == set()

    _uploading(store, "x")
    store.forget("x")
    assert active() == set() and store.get("x") is None


def test_a_settled_upload_hands_its_chords_over_once(store: CheckpointStore) -> None:
    _uploading(store, "u")
    store.note_chord("u", "g1", 60)
    assert store.take_settled(10) == []  # still uploading: its chord may fire
    assert store.cancel("u", 60) == "cancelled"
    assert store.take_settled(10) == [("u", ["g1"])]
    store.release_chords("u", ["g1"])
    assert store.take_settled(10) == []
    assert not store.redis.exists(store.chords_key("u"))
    # A chord noted after the upload settled (a dispatch racing a cancel) is handed over too.
    store.note_chord("u", "g2", 60)
    assert store.take_settled(10) == [("u", ["g2"])]


def test_records_written_before_the_index_are_indexed_by_the_first_recovery_run(store: CheckpointStore) -> None:
    settings = Settings(broker_url="redis://127.0.0.1:1/0", source_roots="/tmp", reconcile_interval=3600)
    ctx = UploaderContext(settings, store, object_store(settings))
    _uploading(store, "old")
    _finished(store, "kept", 2)
    store.redis.delete(store.active_key)  # as an older version left them
    store.redis.zadd(store.active_key, {"expired": 1})  # and an entry whose record is gone

    RecoveryLoop(ctx, "leader", lambda plan: None).tick()

    assert store.active_ids() == ["old"]
    assert store.recovery().indexed_at is not None
