"""Every error reaches the user, in seconds: permanent errors at any step end the upload
``failed`` with the reason; a refused request says why (in ``status`` too); the CLI never hangs,
never prints a traceback, and exits with a status that says what kind of end it was."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tests.conftest import Stack
from tests.faultproxy import FaultProxy
from uploader import InvalidRequest, UploadFailed, contract
from uploader.cli import ExitCode
from uploader.dev.localstack import free_port, wait_until
from uploader.planner import MiB
from uploader.storage.errors import store_error

PART = 5 * MiB


def _cli(stack: Stack, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "uploader.cli", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **stack.env, **env},
    )


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


# -- permanent errors after the request was accepted --------------------------------------------


def test_a_worker_without_credentials_fails_the_upload_with_the_reason(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack()
    stack.start_worker(
        "nocreds", concurrency=2,
        AWS_ACCESS_KEY_ID="", AWS_SECRET_ACCESS_KEY="", AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
        AWS_CONFIG_FILE="/nonexistent", AWS_EC2_METADATA_DISABLED="true",
    )
    bucket = stack.new_bucket()
    path = stack.make_file(3 * PART)
    started = time.monotonic()
    with pytest.raises(UploadFailed, match="NoCredentialsError"):
        stack.uploader.submit(str(path), f"s3://{bucket}/nocreds.bin", part_size=PART).wait(timeout=60)
    assert time.monotonic() - started < 30
    assert stack.open_multipart_uploads(bucket) == []


def test_access_denied_while_listing_fails_the_upload_at_once(make_stack, proxy: FaultProxy) -> None:  # type: ignore[no-untyped-def]
    """AccessDenied on ListMultipartUploads (before CreateMultipartUpload): the record used to stay
    ``creating`` with no error, and ``wait`` hung."""
    stack: Stack = make_stack(UPLOADER_PART_MAX_RETRIES="10")
    stack.start_worker("denied", concurrency=2, UPLOADER_S3_ENDPOINT_URL=proxy.url)
    proxy.targets = lambda method, path_: method == "GET" and "uploads" in path_
    proxy.fault, proxy.rate = "forbidden", 1.0
    bucket = stack.new_bucket()
    path = stack.make_file(2 * PART)
    handle = stack.uploader.submit(str(path), f"s3://{bucket}/denied.bin", part_size=PART)
    with pytest.raises(UploadFailed, match="AccessDenied"):
        handle.wait(timeout=60)
    status = stack.uploader.status(handle.upload_id)
    assert status.state == "failed" and status.terminal and "ListMultipartUploads" in status.error
    assert proxy.counts["injected-forbidden"] >= 1
    assert stack.open_multipart_uploads(bucket) == []


# -- refusals -----------------------------------------------------------------------------------


def test_a_refused_submission_exits_non_zero_and_status_says_why(stack: Stack) -> None:
    bucket = stack.new_bucket()
    missing = str(stack.sources_root / f"missing-{uuid.uuid4().hex}.bin")
    upload_id = f"refused-{uuid.uuid4().hex}"
    result = _cli(stack, "submit", missing, f"s3://{bucket}/k", "--upload-id", upload_id)
    assert result.returncode == ExitCode.REFUSED, result
    assert "does not exist" in _one_line_error(result)
    status = _cli(stack, "status", upload_id, "--json")
    assert status.returncode == 0, status.stderr
    assert '"state": "refused"' in status.stdout and "does not exist" in status.stdout
    watched = _cli(stack, "watch", upload_id, timeout=30)
    assert watched.returncode == ExitCode.REFUSED and "does not exist" in watched.stderr


def test_a_conflicting_upload_id_is_refused_with_its_own_exit_status(stack: Stack) -> None:
    bucket = stack.new_bucket()
    first, other = stack.make_file(1000), stack.make_file(2000)
    upload_id = f"taken-{uuid.uuid4().hex}"
    stack.uploader.submit(str(first), f"s3://{bucket}/a", upload_id=upload_id).wait(timeout=60)
    result = _cli(stack, "submit", str(other), f"s3://{bucket}/b", "--upload-id", upload_id)
    assert result.returncode == ExitCode.REFUSED
    assert "already used" in _one_line_error(result)
    assert stack.uploader.status(upload_id).state == "completed"  # the first upload is untouched


def test_invalid_header_values_are_refused_before_anything_is_stored(stack: Stack) -> None:
    bucket = stack.new_bucket()
    path = stack.make_file(1000)
    for options, words in [
        ({"metadata": {"note": "one\r\nX-Amz-Acl: public-read"}}, "printable ASCII"),
        ({"metadata": {"bad name": "x"}}, "HTTP token"),
        ({"content_type": "text/plain\nInjected: 1"}, "printable ASCII"),
        ({"content_type": "x" * 300}, "at most 256"),
    ]:
        upload_id = f"hdr-{uuid.uuid4().hex}"
        # Sent raw, as a client in another language would: the coordinator refuses it.
        result = stack.uploader.celery.send_task(
            contract.START_UPLOAD, kwargs={"source": str(path), "bucket": bucket, "key": "k", "upload_id": upload_id, **options}
        )
        result.get(timeout=60, propagate=False)
        assert result.failed() and words in str(result.result), (options, result.result)
        store = stack.uploader.checkpoint
        assert stack.checkpoint_keys(upload_id) == [store.refusal_key(upload_id)]
        assert len(store.redis.hget(store.refusal_key(upload_id), "reason") or "") <= 2000
    # A 5 MB content type (it was accepted, and stored in a record with no expiry) never leaves
    # the client; sent raw, a message that size is quarantined by the workers (tests/test_poison.py).
    with pytest.raises(InvalidRequest, match="at most 256"):
        stack.uploader.submit(str(path), f"s3://{bucket}/k", content_type="x" * (5 * MiB))
    assert stack.open_multipart_uploads(bucket) == []
    assert stack.s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def test_a_request_the_http_layer_cannot_send_is_a_permanent_error() -> None:
    from botocore.exceptions import HTTPClientError

    error = store_error(HTTPClientError(error=ValueError("Invalid header value b'a\\r\\nb'")), "PutObject s3://b/k")
    assert type(error).__name__ == "PermanentStoreError" and "could not be sent" in str(error)
    reset = store_error(HTTPClientError(error=ConnectionResetError("reset by peer")), "PutObject s3://b/k")
    assert type(reset).__name__ == "TransientStoreError"


# -- infrastructure away ------------------------------------------------------------------------


def test_with_redis_unreachable_commands_fail_in_seconds_with_one_line(stack: Stack) -> None:
    down = f"redis://127.0.0.1:{free_port()}/0"
    path = stack.make_file(1000)
    for args in (["status", "some-id"], ["list"], ["submit", str(path), "s3://bucket/k"], ["cancel", "some-id"]):
        started = time.monotonic()
        result = _cli(stack, *args, timeout=30, UPLOADER_BROKER_URL=down)
        assert time.monotonic() - started < 10, args
        assert result.returncode == ExitCode.UNAVAILABLE, (args, result.stderr)
        line = _one_line_error(result)
        assert "UPLOADER_BROKER_URL" in line and down in line, line


def test_with_no_worker_submit_and_watch_end_with_a_clear_state(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack(UPLOADER_NO_WORKER_SECONDS="3")
    path = stack.make_file(1000)
    upload_id = f"orphan-{uuid.uuid4().hex}"
    result = _cli(stack, "submit", str(path), "s3://bucket/k", "--upload-id", upload_id, "--accept-timeout", "2")
    assert result.returncode == ExitCode.TIMED_OUT, result
    assert result.stdout.strip() == upload_id  # the id, for watching it later
    assert "is a worker running" in _one_line_error(result)
    started = time.monotonic()
    watched = _cli(stack, "watch", upload_id, timeout=60)
    assert watched.returncode == ExitCode.UNAVAILABLE and "no worker" in watched.stderr, watched
    assert time.monotonic() - started < 30


def test_ctrl_c_while_waiting_says_the_upload_goes_on(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack()
    stack.start_worker("slow", concurrency=1, UPLOADER_MAX_BANDWIDTH=str(2 * MiB))
    bucket = stack.new_bucket()
    path = stack.make_file(4 * PART)
    proc = subprocess.Popen(
        [sys.executable, "-m", "uploader.cli", "submit", str(path), f"s3://{bucket}/k", "--part-size", "5MiB", "--wait"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **stack.env},
    )
    upload_id = proc.stdout.readline().strip()  # type: ignore[union-attr]
    assert upload_id
    stack.wait_parts_done(upload_id, 1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == ExitCode.INTERRUPTED, err
    assert "goes on" in err and f"uploader watch {upload_id}" in err and "Traceback" not in err
    wait_until(lambda: stack.uploader.status(upload_id).state == "completed", 120, "the upload to go on and complete")


def test_with_s3_unreachable_submit_says_so_in_seconds(make_stack) -> None:  # type: ignore[no-untyped-def]
    """The workers cannot reach S3 (a wrong endpoint, a network down): the coordinator retries,
    and `submit` says so within its accept timeout, naming the setting, instead of a bare
    "is a worker running?"."""
    stack: Stack = make_stack()
    stack.start_worker("nos3", concurrency=2, UPLOADER_S3_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}")
    path = stack.make_file(1000)
    started = time.monotonic()
    result = _cli(stack, "submit", str(path), "s3://some-bucket/k", "--accept-timeout", "8")
    assert time.monotonic() - started < 20
    assert result.returncode == ExitCode.UNAVAILABLE, result
    line = _one_line_error(result)
    assert "UPLOADER_S3_ENDPOINT_URL" in line, line
    # Once the coordinator gives up, status says why (nothing was created to resume).
    upload_id = result.stdout.strip()
    status = stack.wait_status(upload_id, lambda s: s.state == "refused", 60, "the start to give up")
    assert "not started" in status.error and "EndpointConnectionError" in status.error
