"""Crashes, duplicates and races, with real worker processes killed by SIGKILL.

Bytes sent are counted by the checkpoint (``parts_sent``/``bytes_sent`` grow every time a part is
about to be sent), so "nothing already uploaded is sent again" is measured, not assumed.
"""

from __future__ import annotations

import os
import signal
import threading

import pytest

from tests.conftest import Stack, sha256_file, signed
from uploader import UploadNotFound, contract, transfer
from uploader.context import UploaderContext
from uploader.coordinator import Coordinator
from uploader.dev.localstack import wait_until
from uploader.model import PartVerdict
from uploader.planner import MiB

PART = 5 * MiB


def test_sigkill_mid_upload_resumes_sending_only_in_flight_parts(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack(UPLOADER_WORKER_HEARTBEAT_SECONDS="3")
    concurrency = 4
    bucket = stack.new_bucket()
    path = stack.make_file(40 * PART)
    handle = stack.upload_then_crash(
        path, f"s3://{bucket}/killed.bin", parts_before=8, concurrency=concurrency, bandwidth=20 * MiB, part_size=PART
    )
    at_kill = stack.uploader.status(handle.upload_id)
    in_flight = at_kill.bytes_sent - at_kill.bytes_done  # sent (or about to be) but never recorded
    assert at_kill.state == "uploading" and at_kill.parts_done < at_kill.part_count
    assert 0 <= in_flight <= concurrency * PART

    stack.start_worker("rescuer", concurrency=4)
    stack.uploader.resume(handle.upload_id)
    status = handle.wait(timeout=180)

    assert status.state == "completed"
    assert stack.object_sha256(bucket, "killed.bin") == sha256_file(path)
    resent = status.bytes_sent - status.size
    warnings = [line for worker in stack.workers for line in worker.log_text().splitlines() if "WARNING/" in line]
    assert resent <= in_flight, (
        f"re-sent {resent} bytes, but only {in_flight} were in flight at the kill; the workers' warnings:\n"
        + "\n".join(warnings[-30:])
    )
    assert stack.open_multipart_uploads(bucket) == []
    record = stack.uploader.checkpoint.get(handle.upload_id)
    assert record is not None and record.complete_calls == 1


def test_resume_keeps_a_part_recorded_while_it_lists_the_servers_parts(make_stack, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A live worker records a part while resume is waiting for ListParts (in the test above: the
    rescuer, started before the resume, still sending messages of the first dispatch). The
    server's answer predates that part; resume must not take it for a part the server lost,
    forget it and send it again."""
    stack: Stack = make_stack()
    for name, value in stack.env.items():
        if name.startswith("AWS_"):  # the stack's test credentials, as its workers get them
            monkeypatch.setenv(name, value)
    ctx = UploaderContext.from_settings(stack.settings)
    bucket = stack.new_bucket()
    path = stack.make_file(3 * PART)
    plans: list = []
    coordinator = Coordinator(ctx)
    upload_id = coordinator.start_message(
        {"source": str(path), "bucket": bucket, "key": "listed.bin", "part_size": PART}, plans.append
    )
    generation = plans[0].generation
    assert transfer.upload_part(ctx, upload_id, 1, generation, "live#1|task-1").verdict is PartVerdict.RECORDED
    list_parts = ctx.objects.list_parts

    def list_parts_while_part_2_lands(*args, **kwargs):  # type: ignore[no-untyped-def]
        listed = list(list_parts(*args, **kwargs))  # answered before part 2 landed
        assert transfer.upload_part(ctx, upload_id, 2, generation, "live#1|task-2").verdict is PartVerdict.RECORDED
        return listed

    monkeypatch.setattr(ctx.objects, "list_parts", list_parts_while_part_2_lands)
    plan = coordinator.resume(upload_id, plans.append)

    assert plan.kind == "parts" and plan.parts == (3,), plan
    record = ctx.checkpoint.get(upload_id)
    assert record is not None and record.parts_done == 2 and record.bytes_sent == 2 * PART


def test_a_killed_prefork_pool_process_costs_only_its_parts(make_stack) -> None:  # type: ignore[no-untyped-def]
    """With the prefork pool a part's lease is held by the pool process sending it: when that
    process dies and the worker lives on (and replaces it), the lease lapses with the process's
    own heartbeat, and the upload completes by itself."""
    stack: Stack = make_stack(
        UPLOADER_WORKER_HEARTBEAT_SECONDS="2", UPLOADER_STALL_SECONDS="3", UPLOADER_RECONCILE_INTERVAL="1"
    )
    worker = stack.start_worker("forked", concurrency=2, pool="prefork", UPLOADER_MAX_BANDWIDTH=str(10 * MiB))
    bucket = stack.new_bucket()
    path = stack.make_file(12 * PART + 7)
    handle = stack.uploader.submit(str(path), f"s3://{bucket}/forked.bin", part_size=PART)
    handle.accepted(timeout=60)
    stack.wait_parts_done(handle.upload_id, 2)
    children = open(f"/proc/{worker.proc.pid}/task/{worker.proc.pid}/children").read().split()
    assert len(children) == 2, children
    store = stack.uploader.checkpoint
    holders: list[str] = []

    def leased() -> bool:
        holders[:] = store.redis.hvals(store.inflight_key(handle.upload_id))
        return bool(holders)

    wait_until(leased, 30, "a leased part")
    pids = {holder.partition("|")[0].rpartition("/pool-")[2] for holder in holders}
    assert pids <= set(children), f"leases {holders} are not held by the pool processes {children}"
    os.kill(int(sorted(pids)[0]), signal.SIGKILL)
    status = handle.wait(timeout=120)
    assert status.state == "completed"
    assert worker.alive()
    assert stack.object_sha256(bucket, "forked.bin") == sha256_file(path)
    assert stack.open_multipart_uploads(bucket) == []


def test_duplicate_part_delivery_and_double_chord_callback_complete_once(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack()
    bucket = stack.new_bucket()
    path = stack.make_file(3 * PART + 99)
    handle = stack.uploader.submit(str(path), f"s3://{bucket}/dup.bin", part_size=PART)
    # No worker yet: the coordinator's message waits. Start one, let it finish, then replay.
    stack.start_worker("dup", concurrency=4)
    status = handle.wait(timeout=120)
    record = stack.uploader.checkpoint.get(handle.upload_id)
    assert record is not None
    sent_before = record.bytes_sent

    celery = stack.uploader.celery
    replays = [
        celery.send_task(contract.UPLOAD_PART, kwargs=signed(contract.UPLOAD_PART, upload_id=handle.upload_id, part_number=2, generation=record.generation))
        for _ in range(2)
    ] + [
        celery.send_task(contract.COMPLETE_UPLOAD, kwargs=signed(contract.COMPLETE_UPLOAD, upload_id=handle.upload_id, generation=record.generation))
        for _ in range(2)
    ]
    outcomes = [r.get(timeout=60) for r in replays]
    # (A part task's result names its part and the bytes it sent: nothing, for a replay.)
    assert [(o["outcome"], o["part"], o["bytes_sent"]) for o in outcomes[:2]] == [("inactive:completed", 2, 0)] * 2
    assert outcomes[2:] == ["done", "done"]
    after = stack.uploader.checkpoint.get(handle.upload_id)
    assert after is not None
    assert after.complete_calls == 1
    assert after.bytes_sent == sent_before
    assert status.state == "completed"
    assert stack.object_sha256(bucket, "dup.bin") == sha256_file(path)


def test_duplicates_while_uploading_send_nothing_twice(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack()
    stack.start_worker("slow", concurrency=2, UPLOADER_MAX_BANDWIDTH=str(10 * MiB))
    bucket = stack.new_bucket()
    path = stack.make_file(6 * PART)
    handle = stack.uploader.submit(str(path), f"s3://{bucket}/race.bin", part_size=PART)
    handle.accepted(timeout=60)
    record = stack.uploader.checkpoint.get(handle.upload_id)
    assert record is not None and record.parts_done < 6
    celery = stack.uploader.celery
    # Every part delivered twice more while the first copies are queued or in flight, and the
    # chord callback fired early, twice: the upload must neither complete early nor send a part
    # twice.
    extra = [
        celery.send_task(
            contract.UPLOAD_PART,
            kwargs=signed(contract.UPLOAD_PART, upload_id=handle.upload_id, part_number=n, generation=record.generation),
        )
        for n in range(1, 7)
        for _ in range(2)
    ] + [
        celery.send_task(contract.COMPLETE_UPLOAD, kwargs=signed(contract.COMPLETE_UPLOAD, upload_id=handle.upload_id, generation=record.generation))
        for _ in range(2)
    ]
    stack.start_worker("fast", concurrency=4)
    status = handle.wait(timeout=180)
    for result in extra:
        result.get(timeout=120)
    after = stack.uploader.checkpoint.get(handle.upload_id)
    assert after is not None and after.complete_calls == 1
    assert status.state == "completed"
    assert after.bytes_sent == status.size, "a part was sent twice"
    assert stack.object_sha256(bucket, "race.bin") == sha256_file(path)
    assert stack.open_multipart_uploads(bucket) == []


def test_concurrent_resumes_complete_once(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack(UPLOADER_WORKER_HEARTBEAT_SECONDS="3")
    bucket = stack.new_bucket()
    path = stack.make_file(12 * PART)
    handle = stack.upload_then_crash(path, f"s3://{bucket}/resumed.bin", parts_before=3, part_size=PART)
    stack.start_worker("after", concurrency=4)

    results: list[object] = []
    barrier = threading.Barrier(2)

    def resume() -> None:
        barrier.wait()
        results.append(stack.uploader.resume(handle.upload_id))

    threads = [threading.Thread(target=resume) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 2
    status = handle.wait(timeout=180)
    record = stack.uploader.checkpoint.get(handle.upload_id)
    assert record is not None and record.complete_calls == 1
    assert status.state == "completed"
    assert stack.object_sha256(bucket, "resumed.bin") == sha256_file(path)
    assert stack.open_multipart_uploads(bucket) == []


def test_a_completer_that_died_after_complete_is_finished_without_uploading_again(stack: Stack) -> None:
    bucket = stack.new_bucket()
    path = stack.make_file(3 * PART + 7)
    handle = stack.uploader.submit(str(path), f"s3://{bucket}/finished.bin", part_size=PART)
    done = handle.wait(timeout=120)
    # The state a completer leaves when it dies between CompleteMultipartUpload (which took
    # effect: the multipart upload is gone, the object is there) and recording it: "completing"
    # under a lease that has lapsed.
    store = stack.uploader.checkpoint
    store.redis.hset(store.record_key(handle.upload_id), mapping={"state": "completing", "lease_token": "dead", "lease_until": 0})
    store.redis.hdel(store.record_key(handle.upload_id), "finished")

    outcome = stack.uploader.resume(handle.upload_id)
    # The workers' recovery loop looks for the same lapsed lease; under load it may finish the
    # upload before resume reads the record. Either way it is finished by a completion, not a re-upload.
    assert outcome["dispatched"] == "complete" or (outcome["dispatched"] == "nothing" and outcome["reason"] == "completed"), outcome
    status = handle.wait(timeout=60)
    assert status.state == "completed" and status.final_etag == done.final_etag
    assert status.bytes_sent == done.bytes_sent, "nothing was uploaded again"
    assert stack.object_sha256(bucket, "finished.bin") == sha256_file(path)
    assert stack.open_multipart_uploads(bucket) == []


def test_lost_checkpoint_is_rebuilt_from_the_servers_parts(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack(UPLOADER_WORKER_HEARTBEAT_SECONDS="2")
    bucket = stack.new_bucket()
    path = stack.make_file(12 * PART)
    upload_id = "rebuild-me"
    stack.upload_then_crash(
        path, f"s3://{bucket}/rebuilt.bin", parts_before=4, bandwidth=20 * MiB, part_size=PART, upload_id=upload_id
    )
    old = stack.uploader.checkpoint.get(upload_id)
    assert old is not None
    on_server = {p["PartNumber"] for p in stack.s3.list_parts(Bucket=bucket, Key="rebuilt.bin", UploadId=old.mpu_id)["Parts"]}
    assert len(on_server) >= 4

    store = stack.uploader.checkpoint  # the checkpoint is lost (e.g. Redis restarted without persistence)
    store.redis.delete(store.record_key(upload_id), store.parts_key(upload_id), store.inflight_key(upload_id))
    store.redis.zrem(store.index_key, upload_id)

    stack.start_worker("rescuer", concurrency=4)
    with pytest.raises(UploadNotFound, match="--source PATH --to s3://BUCKET/KEY"):
        stack.uploader.resume(upload_id)  # nothing left says what it was: the error says what to pass
    outcome = stack.uploader.resume(upload_id, source=str(path), destination=f"s3://{bucket}/rebuilt.bin", part_size=PART)
    assert outcome["reason"].startswith("checkpoint rebuilt")
    status = stack.uploader.wait(upload_id, timeout=180)
    assert status.state == "completed"
    record = stack.uploader.checkpoint.get(upload_id)
    assert record is not None and record.mpu_id == old.mpu_id, "the server's multipart upload was adopted"
    # Parts found on the server were not sent again (a part the killed worker had in flight may
    # have landed after we listed, which only lowers the count further).
    assert status.bytes_sent <= status.size - len(on_server) * PART
    assert stack.object_sha256(bucket, "rebuilt.bin") == sha256_file(path)
    assert stack.open_multipart_uploads(bucket) == []


def test_foreign_multipart_upload_on_the_same_key_is_never_adopted(stack: Stack) -> None:
    bucket = stack.new_bucket()
    path = stack.make_file(2 * PART + 1)
    foreign = stack.s3.create_multipart_upload(Bucket=bucket, Key="contested.bin")["UploadId"]
    stack.s3.upload_part(Bucket=bucket, Key="contested.bin", UploadId=foreign, PartNumber=1, Body=os.urandom(PART))
    status = stack.uploader.submit(str(path), f"s3://{bucket}/contested.bin", part_size=PART).wait(timeout=120)
    record = stack.uploader.checkpoint.get(status.upload_id)
    assert record is not None and record.mpu_id != foreign
    assert stack.object_sha256(bucket, "contested.bin") == sha256_file(path)
    assert [u["UploadId"] for u in stack.open_multipart_uploads(bucket)] == [foreign]
    stack.s3.abort_multipart_upload(Bucket=bucket, Key="contested.bin", UploadId=foreign)


def test_sigterm_lets_in_flight_parts_finish_and_requeues_the_rest(make_stack) -> None:  # type: ignore[no-untyped-def]
    """Kubernetes sends SIGTERM: in-flight parts finish, unstarted messages go back to the queue,
    and another worker finishes the upload with nothing sent twice and no resume needed."""
    stack: Stack = make_stack()
    leaving = stack.start_worker("leaving", concurrency=2, UPLOADER_MAX_BANDWIDTH=str(10 * MiB))
    bucket = stack.new_bucket()
    path = stack.make_file(10 * PART)
    handle = stack.uploader.submit(str(path), f"s3://{bucket}/drained.bin", part_size=PART)
    handle.accepted(timeout=60)
    stack.wait_parts_done(handle.upload_id, 2)

    leaving.kill(signal.SIGTERM)
    assert leaving.proc.wait(60) == 0
    at_exit = stack.uploader.status(handle.upload_id)
    assert at_exit.bytes_sent == at_exit.bytes_done, "the worker left parts half-sent"
    store = stack.uploader.checkpoint
    assert store.redis.hlen(store.inflight_key(handle.upload_id)) == 0

    stack.start_worker("staying", concurrency=4)
    status = handle.wait(timeout=120)
    assert status.state == "completed"
    assert status.bytes_sent == status.size
    assert stack.object_sha256(bucket, "drained.bin") == sha256_file(path)
