"""Resume after a changed source, cancel, restart, and the message contract from a foreign client."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import uuid

import pytest

from tests.conftest import Stack, sha256_file
from uploader import SourceChanged, UploadCancelled, UploadConflict
from uploader.client import UploadHandle
from uploader.dev.localstack import wait_until
from uploader.planner import MiB

PART = 5 * MiB


def _start_slow_upload(stack: Stack, parts: int, name: str) -> tuple[str, UploadHandle, str]:
    bucket = stack.new_bucket()
    path = stack.make_file(parts * PART)
    handle = stack.uploader.submit(str(path), f"s3://{bucket}/{name}", part_size=PART)
    handle.accepted(timeout=60)
    stack.wait_parts_done(handle.upload_id, 2)
    return bucket, handle, str(path)


def test_changed_source_is_refused_on_resume_and_restart_uploads_the_new_bytes(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack(UPLOADER_WORKER_HEARTBEAT_SECONDS="2")
    bucket = stack.new_bucket()
    source = stack.make_file(8 * PART)
    handle = stack.upload_then_crash(source, f"s3://{bucket}/changing.bin", parts_before=2, part_size=PART)
    path = str(source)

    with open(path, "r+b") as f:  # same size, different bytes, new mtime
        f.seek(3 * PART)
        f.write(os.urandom(1000))
    stack.start_worker("rescuer", concurrency=4)

    with pytest.raises(SourceChanged, match="changed since upload"):
        stack.uploader.resume(handle.upload_id)
    status = stack.uploader.status(handle.upload_id)
    # Whoever notices first records the reason: this resume, or a part the recovery loop sent
    # again meanwhile (the dead worker's leases lapse in 2 s). Both say the source changed and
    # how to go on.
    assert re.search(r"changed since (the )?upload", status.error) and "restart" in status.error, status.error
    assert status.state != "completed"
    # Nothing corrupted: no object was written from a mix of old and new bytes.
    assert stack.s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
    old_mpu = stack.uploader.checkpoint.get(handle.upload_id).mpu_id  # type: ignore[union-attr]

    stack.uploader.resume(handle.upload_id, restart=True)
    status = handle.wait(timeout=120)
    assert status.state == "completed"
    assert stack.object_sha256(bucket, "changing.bin") == sha256_file(path)
    uploads = stack.open_multipart_uploads(bucket)
    assert uploads == [], f"old multipart upload {old_mpu} left behind"


def test_parts_written_to_a_changed_file_mid_upload_fail_the_upload_clearly(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack()
    stack.start_worker("slow", concurrency=1, UPLOADER_MAX_BANDWIDTH=str(10 * MiB))
    bucket, handle, path = _start_slow_upload(stack, 10, "mutating.bin")
    with open(path, "ab") as f:
        f.write(b"appended while uploading")
    with pytest.raises(Exception, match="changed since the upload began"):
        handle.wait(timeout=120)
    assert stack.uploader.status(handle.upload_id).state == "failed"
    assert stack.s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def test_cancel_aborts_and_late_parts_do_not_resurrect(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack()
    stack.start_worker("busy", concurrency=2, UPLOADER_MAX_BANDWIDTH=str(10 * MiB))
    bucket, handle, _ = _start_slow_upload(stack, 12, "cancelled.bin")
    record = stack.uploader.checkpoint.get(handle.upload_id)
    assert record is not None

    assert stack.uploader.cancel(handle.upload_id) == "cancelled"
    with pytest.raises(UploadCancelled):
        handle.wait(timeout=30)
    # Parts that were in flight finish (or fail) after the abort: the state stays cancelled.
    inspect = stack.uploader.celery.control.inspect(destination=[w.name for w in stack.workers], timeout=2)

    def idle() -> bool:
        active = inspect.active() or {}
        return bool(active) and not any(active.values())

    wait_until(idle, 60, "the worker's in-flight parts to finish", interval=0.5)
    status = stack.uploader.status(handle.upload_id)
    assert status.state == "cancelled"
    assert status.parts_done < status.part_count
    with pytest.raises(Exception) as err:
        stack.s3.list_parts(Bucket=bucket, Key="cancelled.bin", UploadId=record.mpu_id)
    assert "NoSuchUpload" in str(err.value)
    assert stack.open_multipart_uploads(bucket) == []
    assert stack.uploader.cancel(handle.upload_id) == "already"
    with pytest.raises(UploadConflict, match="cancelled"):
        stack.uploader.resume(handle.upload_id)


def test_resubmitting_the_same_upload_id_is_idempotent(stack: Stack) -> None:
    bucket = stack.new_bucket()
    path = stack.make_file(12 * MiB)
    upload_id = f"idem-{uuid.uuid4().hex}"
    handles = [stack.uploader.submit(str(path), f"s3://{bucket}/same", upload_id=upload_id, part_size=PART) for _ in range(5)]
    assert {h.accepted(timeout=60) for h in handles} == {upload_id}
    status = handles[0].wait(timeout=120)
    record = stack.uploader.checkpoint.get(upload_id)
    assert record is not None and record.complete_calls == 1
    assert status.state == "completed"
    assert stack.object_sha256(bucket, "same") == sha256_file(path)
    with pytest.raises(UploadConflict, match="already used"):
        stack.uploader.submit(str(path), f"s3://{bucket}/other", upload_id=upload_id).accepted(timeout=60)


def test_a_submit_subscribes_to_its_result_only_when_someone_waits(stack: Stack) -> None:
    """No pub/sub subscription per submitted upload (a round trip per submit, and one held for
    every live handle); accepted() subscribes, and still finds a result stored before it asked."""
    bucket = stack.new_bucket()
    path = stack.make_file(1000)
    handle = stack.uploader.submit(str(path), f"s3://{bucket}/lazy")
    channel = f"celery-task-meta-{handle.start.id}"
    redis = stack.uploader.checkpoint.redis
    wait_until(lambda: redis.exists(channel), 60, "the start task's result to be stored")
    assert redis.pubsub_numsub(channel) == [(channel, 0)]
    assert handle.accepted(timeout=10) == handle.upload_id
    assert handle.wait(timeout=60).state == "completed"


def test_start_upload_from_a_plain_celery_client(stack: Stack) -> None:
    """A client that knows only the documented contract (task and queue names, JSON kwargs)."""
    bucket = stack.new_bucket()
    path = stack.make_file(11 * MiB)
    script = textwrap.dedent(
        f"""
        import json, sys
        from celery import Celery
        app = Celery(broker={stack.redis_url!r}, backend={stack.redis_url!r})
        app.conf.task_serializer = "json"
        result = app.send_task(
            "uploader.start_upload",
            kwargs={{"source": {str(path)!r}, "bucket": {bucket!r}, "key": "from-plain-client",
                     "upload_id": "plain-client-1", "part_size": {PART}, "metadata": {{"via": "plain"}},
                     "content_type": "text/plain"}},
            queue="uploader.control",
        )
        assert "uploader" not in sys.modules
        print(json.dumps(result.get(timeout=60)))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("UPLOADER_")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env, cwd="/")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == "plain-client-1"
    status = stack.uploader.wait("plain-client-1", timeout=120)
    assert status.state == "completed"
    head = stack.s3.head_object(Bucket=bucket, Key="from-plain-client")
    assert (head["Metadata"], head["ContentType"]) == ({"via": "plain"}, "text/plain")
    assert stack.object_sha256(bucket, "from-plain-client") == sha256_file(path)


def test_status_and_list_report_progress(stack: Stack) -> None:
    bucket = stack.new_bucket()
    path = stack.make_file(11 * MiB)
    handle = stack.uploader.submit(str(path), f"s3://{bucket}/listed", part_size=PART)
    status = handle.wait(timeout=60)
    assert (status.parts_done, status.part_count, status.bytes_done, status.size) == (3, 3, 11 * MiB, 11 * MiB)
    assert handle.upload_id in [s.upload_id for s in stack.uploader.list(limit=1000)]
