"""Many small files at once: ``Uploader.submit_many`` and the public ``uploader.start_many``
message, the grouped ``put_objects`` tasks behind them, and what each upload still is on its own
(its status, its failure, its completion exactly once), with real workers, Redis and SeaweedFS."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from celery import Celery

from tests.conftest import Stack, sha256_file
from uploader import contract
from uploader.checkpoint import CheckpointStore
from uploader.client import UploadHandle
from uploader.coordinator import PUT_GROUP_BYTES, PUT_GROUP_FILES, PutGroup, put_groups
from uploader.errors import MessageQuarantined, SourceError
from uploader.planner import KiB

SMALL = 16 * KiB


def _small_files(stack: Stack, count: int, size: int = SMALL) -> list[Path]:
    return [stack.make_file(size) for _ in range(count)]


def _wait_terminal(stack: Stack, upload_ids: list[str], timeout: float) -> dict[str, str]:
    """Poll the checkpoints (one pipelined read a round) until every upload is terminal: its state."""
    deadline = time.monotonic() + timeout
    while True:
        records = stack.uploader.checkpoint.get_many(upload_ids)
        states = {u: (r.state if r is not None else "missing") for u, r in zip(upload_ids, records, strict=True)}
        if all(s in ("completed", "failed", "cancelled") for s in states.values()):
            return states
        if time.monotonic() > deadline:
            unfinished = {u: s for u, s in states.items() if s not in ("completed", "failed", "cancelled")}
            raise TimeoutError(f"{len(unfinished)} uploads unfinished after {timeout} s: {list(unfinished.items())[:5]}")
        time.sleep(0.05)


def _result_keys(stack: Stack) -> set[str]:
    return set(stack.uploader.checkpoint.redis.scan_iter(match="celery-task-meta-*"))


# -- the library, without workers -------------------------------------------------------------


def test_put_groups_are_cut_by_count_and_by_bytes() -> None:
    groups = put_groups([(f"u{i}", 10) for i in range(PUT_GROUP_FILES * 2 + 1)])
    assert [len(g.uploads) for g in groups] == [PUT_GROUP_FILES, PUT_GROUP_FILES, 1]
    assert groups[0].uploads[0] == ("u0", 1)  # a fresh claim is generation 1
    half = PUT_GROUP_BYTES // 2
    assert put_groups([("a", half), ("b", half), ("c", 1), ("d", PUT_GROUP_BYTES * 3)]) == [
        PutGroup((("a", 1), ("b", 1))), PutGroup((("c", 1),)), PutGroup((("d", 1),)),
    ]
    assert put_groups([]) == []


def test_claim_queued_creates_each_record_uploading_once_in_one_round_trip(store: CheckpointStore) -> None:
    def fields(n: int) -> dict[str, object]:
        return {"source": f"/data/{n}", "bucket": "b", "key": f"k{n}", "size": 5, "mtime_ns": 1, "part_size": 5,
                "part_count": 1, "mode": "single"}

    assert store.claim_queued([("u1", fields(1)), ("u2", fields(2))]) == [True, True]
    assert store.claim_queued([("u2", fields(2)), ("u3", fields(3))]) == [False, True]
    records = store.get_many(["u1", "u2", "u3", "nope"])
    assert [r.state if r else None for r in records] == ["uploading", "uploading", "uploading", None]
    assert all(r is not None and (r.mode, r.mpu_id, r.generation) == ("single", "", 1) for r in records[:3])
    assert set(store.active_ids()) >= {"u1", "u2", "u3"}  # recovery sees them
    assert store.begin_completions([("u1", "t1"), ("u2", "t2"), ("u1", "t3")], 60) == ["go", "go", "busy"]
    answers = store.mark_many_completed([("u1", "t1", {"final_etag": "e"}), ("u2", "wrong", {})], 60)
    assert answers == ["ok", "fenced"]
    assert [r.state if r else None for r in store.get_many(["u1", "u2"])] == ["completed", "completing"]


# -- with workers ---------------------------------------------------------------------------------


def test_200_small_files_in_one_message_each_its_own_upload(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack()
    stack.start_worker("many", concurrency=4)
    bucket = stack.new_bucket()
    paths = _small_files(stack, 200)
    results_before = _result_keys(stack)

    handles = stack.uploader.submit_many([(str(p), f"s3://{bucket}/many/{i}.bin") for i, p in enumerate(paths)])

    assert len({h.upload_id for h in handles}) == 200
    assert len({h.start.id for h in handles}) == 1, "200 uploads are one start_many message"
    states = _wait_terminal(stack, [h.upload_id for h in handles], 120)
    assert set(states.values()) == {"completed"}
    for i, (path, handle) in enumerate(zip(paths, handles, strict=True)):
        status = handle.wait(timeout=10)
        assert (status.state, status.key, status.size, status.bytes_done) == ("completed", f"many/{i}.bin", SMALL, SMALL)
        assert status.verified == "md5" and status.final_etag
        assert stack.object_sha256(bucket, f"many/{i}.bin") == sha256_file(path)
    assert handles[0].accepted(timeout=10) == handles[0].upload_id
    # One result for the message (what `accepted` reads), none per file or per group.
    assert len(_result_keys(stack) - results_before) == 1


def test_a_file_that_vanishes_before_its_group_runs_fails_alone(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack()
    # The start runs now; the groups wait in the parts queue until a second worker takes them.
    stack.start_worker("control-only", concurrency=2, queues=contract.CONTROL_QUEUE)
    bucket = stack.new_bucket()
    paths = _small_files(stack, 40)
    handles = stack.uploader.submit_many([(str(p), f"s3://{bucket}/k/{i}") for i, p in enumerate(paths)])
    for handle in handles:
        assert handle.accepted(timeout=60) == handle.upload_id
    assert {stack.uploader.status(h.upload_id).state for h in handles} == {"uploading"}
    doomed = 7
    paths[doomed].unlink()

    stack.start_worker("parts", concurrency=2, queues=contract.PARTS_QUEUE)
    states = _wait_terminal(stack, [h.upload_id for h in handles], 120)

    assert states.pop(handles[doomed].upload_id) == "failed"
    assert set(states.values()) == {"completed"}
    failed = stack.uploader.status(handles[doomed].upload_id)
    assert "disappeared" in failed.error, failed.error
    keys = {o["Key"] for o in stack.s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert keys == {f"k/{i}" for i in range(40) if i != doomed}
    for i in (0, doomed + 1, 39):
        assert stack.object_sha256(bucket, f"k/{i}") == sha256_file(paths[i])


def test_start_many_sent_by_name_from_a_plain_celery_client(stack: Stack) -> None:
    bucket = stack.new_bucket()
    paths = _small_files(stack, 5, 1000)
    client = Celery("foreign", broker=stack.redis_url, backend=stack.redis_url, set_as_current=False)
    uploads: list[dict[str, object]] = [{"source": str(p), "bucket": bucket, "key": f"named/{i}"} for i, p in enumerate(paths)]
    uploads.insert(2, {"source": str(stack.sources_root / "no-such-file"), "bucket": bucket, "key": "named/missing"})
    try:
        result = client.send_task(contract.START_MANY, kwargs={"uploads": uploads}, queue=contract.CONTROL_QUEUE)
        entries = result.get(timeout=60)
    finally:
        client.close()

    assert len(entries) == 6
    refused = entries.pop(2)
    assert refused["kind"] == "SourceError" and "does not exist" in refused["error"]
    assert stack.uploader.status(refused["upload_id"]).state == "refused"
    assert all(e["error"] == "" and e["upload_id"].startswith(result.id.replace("-", "")) for e in entries)
    for i, entry in enumerate(entries):
        status = stack.uploader.wait(entry["upload_id"], timeout=60)
        assert (status.state, status.key) == ("completed", f"named/{i}")
        assert stack.object_sha256(bucket, f"named/{i}") == sha256_file(paths[i])


def test_a_list_above_the_per_message_maximum_is_refused_and_submit_many_splits(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = stack.new_bucket()
    path = stack.make_file(10)
    too_many = [{"source": str(path), "bucket": bucket, "key": f"over/{i}"} for i in range(contract.MAX_UPLOADS_PER_MESSAGE + 1)]
    result = stack.uploader.celery.send_task(contract.START_MANY, kwargs={"uploads": too_many})
    result.get(timeout=60, propagate=False)
    assert isinstance(result.result, MessageQuarantined)
    assert f"above the maximum of {contract.MAX_UPLOADS_PER_MESSAGE} per message" in str(result.result)
    assert stack.s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0

    # The client sends a longer list as several messages (a smaller maximum here, to keep it quick).
    monkeypatch.setattr(contract, "MAX_UPLOADS_PER_MESSAGE", 7)
    paths = _small_files(stack, 20, 100)
    handles = stack.uploader.submit_many([(str(p), f"s3://{bucket}/split/{i}", {"content_type": "text/plain"}) for i, p in enumerate(paths)])
    assert len({h.start.id for h in handles}) == 3
    assert set(_wait_terminal(stack, [h.upload_id for h in handles], 60).values()) == {"completed"}
    assert stack.s3.head_object(Bucket=bucket, Key="split/19")["ContentType"] == "text/plain"


def test_a_refused_request_in_submit_many_raises_from_its_own_handle(stack: Stack) -> None:
    bucket = stack.new_bucket()
    good = stack.make_file(100)
    handles = stack.uploader.submit_many(
        [(str(good), f"s3://{bucket}/ok"), (str(stack.sources_root / "missing.bin"), f"s3://{bucket}/missing")]
    )
    assert handles[0].wait(timeout=60).state == "completed"
    with pytest.raises(SourceError, match="does not exist"):
        handles[1].accepted(timeout=60)
    with pytest.raises(SourceError):
        handles[1].wait(timeout=60)


def test_sigkill_mid_group_then_a_new_worker_completes_every_file_once(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack(
        UPLOADER_WORKER_HEARTBEAT_SECONDS="2", UPLOADER_STALL_SECONDS="3", UPLOADER_RECONCILE_INTERVAL="1",
        UPLOADER_COMPLETION_LEASE_SECONDS="5", UPLOADER_LEADER_LEASE_SECONDS="3",
    )
    doomed = stack.start_worker("doomed", concurrency=1)
    bucket = stack.new_bucket()
    count = 300
    paths = _small_files(stack, count, 64 * KiB)
    # Each upload asks for a completion notification: the record counts its terminal transitions.
    queue = f"done-{uuid.uuid4().hex[:8]}"
    handles: list[UploadHandle] = stack.uploader.submit_many(
        [(str(p), f"s3://{bucket}/crash/{i}", {"on_complete": "backend.done", "callback_queue": queue})
         for i, p in enumerate(paths)]
    )
    ids = [h.upload_id for h in handles]
    store = stack.uploader.checkpoint
    deadline = time.monotonic() + 60
    while True:  # once a group has completed and the next is being sent: leased, not yet marked
        states = [r.state if r is not None else "missing" for r in store.get_many(ids)]
        if states.count("completed") >= 32 and "completing" in states:
            break
        assert time.monotonic() < deadline, f"no group in flight after a completed one: {set(states)}"
        time.sleep(0.002)
    doomed.kill()
    doomed.proc.wait(10)
    at_kill = [r.state if r is not None else "missing" for r in store.get_many(ids)]
    assert at_kill.count("completed") < count, "the worker finished everything before it was killed"

    stack.start_worker("rescuer", concurrency=2)
    states = _wait_terminal(stack, ids, 180)

    assert set(states.values()) == {"completed"}
    for upload_id in ids:
        assert store.redis.hget(store.record_key(upload_id), "notify_seq") == "1", f"{upload_id} completed more than once"
    for i in (0, 100, 299):
        assert stack.object_sha256(bucket, f"crash/{i}") == sha256_file(paths[i])
    assert stack.s3.list_objects_v2(Bucket=bucket, MaxKeys=1000)["KeyCount"] == count
