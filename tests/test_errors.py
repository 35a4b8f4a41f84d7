"""Transient errors are retried per part; permanent ones fail the upload at once with a reason,
keeping the uploaded parts for resume unless the request asked to abort."""

from __future__ import annotations

import itertools

import pytest

from tests.conftest import Stack, sha256_file
from tests.faultproxy import FaultProxy
from uploader import UploadFailed
from uploader.client import UploadStatus
from uploader.dev.localstack import wait_until
from uploader.planner import MiB

PART = 5 * MiB


@pytest.mark.parametrize("fault", ["503", "500", "reset"])
def test_transient_part_errors_are_retried_until_the_upload_completes(make_stack, proxy: FaultProxy, fault: str) -> None:  # type: ignore[no-untyped-def]
    proxy.fault, proxy.rate = fault, 0.3
    stack: Stack = make_stack(UPLOADER_PART_MAX_RETRIES="12", UPLOADER_RETRY_BACKOFF_MAX="1")
    stack.start_worker("flaky", concurrency=4, UPLOADER_S3_ENDPOINT_URL=proxy.url)
    bucket = stack.new_bucket()
    path = stack.make_file(10 * PART + 3)
    status = stack.uploader.submit(str(path), f"s3://{bucket}/flaky.bin", part_size=PART).wait(timeout=240)
    assert status.state == "completed"
    assert proxy.counts[f"injected-{fault}"] > 0
    assert stack.object_sha256(bucket, "flaky.bin") == sha256_file(path)
    assert stack.open_multipart_uploads(bucket) == []


def test_a_small_upload_whose_put_fails_is_finished_by_a_put_object_task(make_stack, proxy: FaultProxy) -> None:  # type: ignore[no-untyped-def]
    """The coordinator sends a small source itself, under the completion lease its claim took; when
    that PutObject fails transiently (botocore's own attempts spent), a ``put_object`` task takes
    the same lease over and finishes the upload."""
    stack: Stack = make_stack(UPLOADER_RETRY_BACKOFF_MAX="1")
    worker = stack.start_worker("single", concurrency=2, UPLOADER_S3_ENDPOINT_URL=proxy.url)
    bucket = stack.new_bucket()
    path = stack.make_file(1000)
    failures = itertools.count()
    # The first four PUTs of the object (the coordinator's: botocore tries 1 + 3 retries) answer SlowDown.
    proxy.targets = lambda method, path_: method == "PUT" and path_.endswith("/small.bin") and next(failures) < 4
    proxy.fault, proxy.rate = "503", 1.0
    status = stack.uploader.submit(str(path), f"s3://{bucket}/small.bin").wait(timeout=60)
    assert status.state == "completed" and status.verified == "md5"
    assert proxy.counts["injected-503"] == 4
    assert "retrying as a task" in worker.log_text()
    record = stack.uploader.checkpoint.get(status.upload_id)
    assert record is not None and record.complete_calls == 2  # the coordinator's lease, taken over once
    assert stack.object_sha256(bucket, "small.bin") == sha256_file(path)


def test_a_small_object_the_server_cannot_show_after_its_put_fails_at_once(make_stack, proxy: FaultProxy) -> None:  # type: ignore[no-untyped-def]
    """A PutObject answered with another ETag than the MD5 sent (as servers that encrypt do) is
    checked by HeadObject; when that is refused, the upload fails now with the reason, instead of
    staying ``completing`` until its completion lease lapses (five minutes)."""
    stack: Stack = make_stack(UPLOADER_AUTO_RESUME_LIMIT="0")
    stack.start_worker("unseen", concurrency=2, UPLOADER_S3_ENDPOINT_URL=proxy.url)
    bucket = stack.new_bucket()
    path = stack.make_file(1000)
    proxy.add_headers = lambda method, path_, body, headers: {"ETag": '"00000000000000000000000000000000"'} if method == "PUT" else {}
    proxy.targets = lambda method, path_: method == "HEAD" and path_.endswith("/unseen.bin")
    proxy.fault, proxy.rate = "forbidden", 1.0
    with pytest.raises(UploadFailed, match="verification failed: the server acknowledged the PutObject"):
        stack.uploader.submit(str(path), f"s3://{bucket}/unseen.bin").wait(timeout=30)
    assert proxy.counts["injected-forbidden"] == 1


def test_exhausted_retries_fail_with_a_readable_reason_and_keep_parts(make_stack, proxy: FaultProxy) -> None:  # type: ignore[no-untyped-def]
    # More retries than Celery's own default limit (3), which must not cut them short. With
    # automatic resumes off, the failure is final until someone resumes.
    stack: Stack = make_stack(UPLOADER_PART_MAX_RETRIES="4", UPLOADER_RETRY_BACKOFF_MAX="1", UPLOADER_AUTO_RESUME_LIMIT="0")
    stack.start_worker("down", concurrency=2, UPLOADER_S3_ENDPOINT_URL=proxy.url)
    bucket = stack.new_bucket()
    path = stack.make_file(4 * PART)
    # Parts 1-3 go through; part 4 always gets SlowDown.
    proxy.targets = lambda method, path_: method == "PUT" and "partNumber=4&" in path_ + "&"
    proxy.rate = 1.0
    handle = stack.uploader.submit(str(path), f"s3://{bucket}/down.bin", part_size=PART)
    with pytest.raises(UploadFailed, match=r"part 4 failed after 5 attempts: .*SlowDown"):
        handle.wait(timeout=120)
    status = stack.uploader.status(handle.upload_id)
    assert status.state == "failed" and status.parts_done == 3
    assert len(stack.open_multipart_uploads(bucket)) == 1, "parts are kept for resume"

    proxy.rate = 0.0  # the outage ends: resume sends only the missing part
    stack.uploader.resume(handle.upload_id)
    status = handle.wait(timeout=120)
    assert status.state == "completed"
    # Parts 1-3 were sent once; part 4 five times in vain (first attempt and four retries), then
    # once more.
    assert status.bytes_sent == status.size + 5 * PART
    assert stack.object_sha256(bucket, "down.bin") == sha256_file(path)


def _outage_stack(make_stack, proxy: FaultProxy, auto_resumes: int) -> Stack:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack(
        UPLOADER_PART_MAX_RETRIES="1",
        UPLOADER_RETRY_BACKOFF_MAX="1",
        UPLOADER_AUTO_RESUME_LIMIT=str(auto_resumes),
        UPLOADER_AUTO_RESUME_BACKOFF="1",
        UPLOADER_RECONCILE_INTERVAL="1",
    )
    stack.start_worker("outage", concurrency=4, UPLOADER_S3_ENDPOINT_URL=proxy.url)
    return stack


def _wait_failed(stack: Stack, upload_id: str) -> UploadStatus:
    return stack.wait_status(upload_id, lambda s: s.state == "failed", 120, "the upload to fail")


def test_an_s3_outage_longer_than_the_part_retries_is_resumed_automatically(make_stack, proxy: FaultProxy) -> None:  # type: ignore[no-untyped-def]
    stack = _outage_stack(make_stack, proxy, auto_resumes=5)
    bucket = stack.new_bucket()
    path = stack.make_file(6 * PART + 11)
    proxy.fault, proxy.rate = ["503", "reset"], 1.0  # every UploadPart fails: S3 is down for parts
    handle = stack.uploader.submit(str(path), f"s3://{bucket}/outage.bin", part_size=PART)
    failed = _wait_failed(stack, handle.upload_id)
    assert "failed after 2 attempts" in failed.error
    assert failed.retry_at is not None and not failed.terminal, "a transient failure waits for an automatic resume"
    assert len(stack.open_multipart_uploads(bucket)) == 1, "parts are kept for the resume"

    proxy.rate = 0.0  # the outage ends; nobody runs resume: the workers' reconciler does
    status = handle.wait(timeout=120)
    assert status.state == "completed" and status.auto_resumes >= 1
    record = stack.uploader.checkpoint.get(handle.upload_id)
    assert record is not None and record.complete_calls == 1
    assert stack.object_sha256(bucket, "outage.bin") == sha256_file(path)
    assert stack.open_multipart_uploads(bucket) == []
    print(f"OUTAGE_SUMMARY injected={proxy.injected()} auto_resumes={status.auto_resumes} size={status.size} bytes_sent={status.bytes_sent}")


def test_an_outage_before_the_multipart_upload_exists_is_resumed_automatically(make_stack, proxy: FaultProxy) -> None:  # type: ignore[no-untyped-def]
    stack = _outage_stack(make_stack, proxy, auto_resumes=5)
    bucket = stack.new_bucket()
    path = stack.make_file(2 * PART + 5)
    proxy.targets = lambda method, path_: method == "POST" and path_.endswith("?uploads")  # CreateMultipartUpload
    proxy.fault, proxy.rate = "503", 1.0
    handle = stack.uploader.submit(str(path), f"s3://{bucket}/late.bin", part_size=PART)
    failed = _wait_failed(stack, handle.upload_id)
    assert "starting the upload failed" in failed.error and failed.retry_at is not None
    assert stack.uploader.checkpoint.get(handle.upload_id).mpu_id == ""  # type: ignore[union-attr]

    proxy.rate = 0.0
    status = handle.wait(timeout=120)
    assert status.state == "completed"
    assert stack.object_sha256(bucket, "late.bin") == sha256_file(path)
    assert stack.open_multipart_uploads(bucket) == []


def test_automatic_resumes_end_after_the_limit_with_a_final_failure(make_stack, proxy: FaultProxy) -> None:  # type: ignore[no-untyped-def]
    stack = _outage_stack(make_stack, proxy, auto_resumes=1)
    bucket = stack.new_bucket()
    path = stack.make_file(2 * PART + 1)
    proxy.fault, proxy.rate = "503", 1.0  # an outage that does not end
    handle = stack.uploader.submit(str(path), f"s3://{bucket}/down.bin", part_size=PART, abort_on_failure=True)
    assert _wait_failed(stack, handle.upload_id).retry_at is not None
    # abort_on_failure waits for the final failure: the automatic resume needs the parts.
    assert len(stack.open_multipart_uploads(bucket)) == 1
    with pytest.raises(UploadFailed, match="SlowDown"):
        handle.wait(timeout=120)
    status = stack.uploader.status(handle.upload_id)
    assert status.state == "failed" and status.retry_at is None and status.auto_resumes == 1
    wait_until(lambda: stack.open_multipart_uploads(bucket) == [], 30, "the multipart upload to be aborted")


def test_permanent_error_fails_at_once_and_abort_on_failure_cleans_up(make_stack, proxy: FaultProxy) -> None:  # type: ignore[no-untyped-def]
    proxy.fault, proxy.rate = "forbidden", 1.0
    stack: Stack = make_stack(UPLOADER_PART_MAX_RETRIES="10")
    stack.start_worker("denied", concurrency=2, UPLOADER_S3_ENDPOINT_URL=proxy.url)
    bucket = stack.new_bucket()
    path = stack.make_file(3 * PART)
    handle = stack.uploader.submit(str(path), f"s3://{bucket}/denied.bin", part_size=PART, abort_on_failure=True)
    with pytest.raises(UploadFailed, match="AccessDenied"):
        handle.wait(timeout=60)
    # Failed at once: no retries of a permanent error.
    assert proxy.counts["injected-forbidden"] <= 3
    # The state turns "failed" first, then the worker aborts the multipart upload.
    wait_until(lambda: stack.open_multipart_uploads(bucket) == [], 30, "the multipart upload to be aborted")


def test_multipart_upload_aborted_behind_our_back_fails_then_resume_starts_cleanly(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack()
    stack.start_worker("victim", concurrency=1, UPLOADER_MAX_BANDWIDTH=str(10 * MiB))
    bucket = stack.new_bucket()
    path = stack.make_file(8 * PART)
    handle = stack.uploader.submit(str(path), f"s3://{bucket}/aborted.bin", part_size=PART)
    handle.accepted(timeout=60)
    stack.wait_parts_done(handle.upload_id, 1, timeout=60)
    mpu_id = stack.uploader.checkpoint.get(handle.upload_id).mpu_id  # type: ignore[union-attr]
    stack.s3.abort_multipart_upload(Bucket=bucket, Key="aborted.bin", UploadId=mpu_id)
    with pytest.raises(UploadFailed, match="NoSuchUpload"):
        handle.wait(timeout=120)

    stack.uploader.resume(handle.upload_id)  # ListParts says NoSuchUpload: a new multipart upload
    status = handle.wait(timeout=180)
    assert status.state == "completed"
    assert stack.uploader.checkpoint.get(handle.upload_id).mpu_id != mpu_id  # type: ignore[union-attr]
    assert stack.object_sha256(bucket, "aborted.bin") == sha256_file(path)
    assert stack.open_multipart_uploads(bucket) == []
