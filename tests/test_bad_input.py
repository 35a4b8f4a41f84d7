"""Bad input gets a clear error and leaves nothing behind: no multipart upload on the server, no
checkpoint in Redis, no crashed worker. Checked both at the client and at the coordinator (a
message from a foreign client that skipped client-side validation)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from tests.conftest import Stack
from uploader import InvalidRequest, SourceError, UploaderError, contract
from uploader.planner import GiB, MiB


def _assert_nothing_left(stack: Stack, bucket: str, upload_id: str) -> None:
    """Nothing on the server, and in Redis at most the refusal's reason, which expires."""
    assert stack.open_multipart_uploads(bucket) == []
    store = stack.uploader.checkpoint
    assert set(stack.checkpoint_keys(upload_id)) <= {store.refusal_key(upload_id)}
    if stack.checkpoint_keys(upload_id):
        assert 0 < store.redis.ttl(store.refusal_key(upload_id)) <= stack.settings.refusal_retention_seconds
    assert stack.s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def _send_raw(stack: Stack, **kwargs: object) -> Exception:
    """Send start_upload by name, as a foreign client would, and return the coordinator's error."""
    result = stack.uploader.celery.send_task(contract.START_UPLOAD, kwargs=kwargs)
    result.get(timeout=60, propagate=False)
    assert result.failed(), f"coordinator accepted {kwargs}"
    return result.result


@pytest.fixture
def bucket(stack: Stack) -> str:
    return stack.new_bucket()


@pytest.fixture
def outside_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret.bin"
    path.write_bytes(b"not yours")
    return path


def _cases(stack: Stack, outside: Path) -> dict[str, tuple[str, dict[str, object], type[Exception], str]]:
    root = stack.sources_root
    good = stack.make_file(10 * MiB)
    link = root / f"link-{uuid.uuid4().hex}"
    os.symlink(outside, link)
    directory = root / f"dir-{uuid.uuid4().hex}"
    directory.mkdir()
    return {
        "missing file": (str(root / "nope.bin"), {}, SourceError, "does not exist"),
        "directory": (str(directory), {}, SourceError, "is a directory"),
        "outside roots": (str(outside), {}, SourceError, "outside the allowed source roots"),
        "symlink escaping roots": (str(link), {}, SourceError, "outside the allowed source roots"),
        "dot-dot escaping roots": (f"{root}/../{outside.parent.name}/{outside.name}", {}, SourceError, "outside"),
        "relative path": ("relative/file.bin", {}, SourceError, "absolute path"),
        "part size too small": (str(good), {"part_size": 1 * MiB}, InvalidRequest, "5 MiB..5 GiB"),
        "part size too large": (str(good), {"part_size": 6 * GiB}, InvalidRequest, "5 MiB..5 GiB"),
        "unknown option": (str(good), {"colour": "blue"}, InvalidRequest, "unknown option 'colour'"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing file",
        "directory",
        "outside roots",
        "symlink escaping roots",
        "dot-dot escaping roots",
        "relative path",
        "part size too small",
        "part size too large",
        "unknown option",
    ],
)
def test_bad_source_or_option_is_refused_and_leaves_nothing(stack: Stack, bucket: str, outside_file: Path, case: str) -> None:
    source, options, error, words = _cases(stack, outside_file)[case]
    upload_id = f"bad-{uuid.uuid4().hex}"

    # Through the client API: refused at submit (options) or at wait (source, seen by the worker).
    with pytest.raises(error, match=words):
        stack.uploader.submit(source, f"s3://{bucket}/k", upload_id=upload_id, **options).wait(timeout=60)
    _assert_nothing_left(stack, bucket, upload_id)

    # Straight to the coordinator, bypassing client-side validation.
    raw_id = f"raw-{uuid.uuid4().hex}"
    exc = _send_raw(stack, source=source, bucket=bucket, key="k", upload_id=raw_id, **options)
    assert words in str(exc)
    _assert_nothing_left(stack, bucket, raw_id)


@pytest.mark.parametrize(
    ("destination", "words"),
    [
        ("s3://Bad_Bucket/key", "invalid bucket name"),
        ("s3://ab/key", "invalid bucket name"),
        ("s3://192.168.1.1/key", "IP address"),
        # (A prefix keeps the source's name, as aws s3 cp does: tests/test_cli_habits.py.)
        ("s3://good-bucket/" + "k" * 1025 + "/", "at most 1024 bytes"),
        ("s3://good-bucket/" + "k" * 1025, "at most 1024 bytes"),
        ("http://good-bucket/key", "must look like s3://bucket/key"),
    ],
)
def test_bad_destination_is_refused_before_sending(stack: Stack, destination: str, words: str) -> None:
    path = stack.make_file(1000)
    with pytest.raises(InvalidRequest, match=words):
        stack.uploader.submit(str(path), destination)


def test_a_prefix_destination_needs_a_source_with_a_name(stack: Stack) -> None:
    with pytest.raises(InvalidRequest, match="no name to keep"):
        stack.uploader.submit("https://example.com/", "s3://good-bucket/prefix/")


def test_bad_destination_sent_raw_is_refused_by_the_coordinator(stack: Stack, bucket: str) -> None:
    path = stack.make_file(1000)
    for kwargs, words in [
        ({"bucket": "Bad_Bucket", "key": "k"}, "invalid bucket name"),
        ({"bucket": bucket, "key": ""}, "key must not be empty"),
        ({"bucket": bucket, "key": "k" * 1025}, "at most 1024 bytes"),
        ({"bucket": bucket, "key": "k", "part_size": "8MiB"}, "part_size"),
    ]:
        upload_id = f"raw-{uuid.uuid4().hex}"
        exc = _send_raw(stack, source=str(path), upload_id=upload_id, **kwargs)
        assert words in str(exc)
        _assert_nothing_left(stack, bucket, upload_id)


def test_missing_bucket_is_refused_and_leaves_nothing(stack: Stack) -> None:
    path = stack.make_file(20 * MiB)
    upload_id = f"nobucket-{uuid.uuid4().hex}"
    with pytest.raises(UploaderError, match="does not exist"):
        stack.uploader.submit(str(path), "s3://no-such-bucket-here/k", upload_id=upload_id).wait(timeout=60)
    store = stack.uploader.checkpoint
    assert stack.checkpoint_keys(upload_id) == [store.refusal_key(upload_id)]
    assert stack.uploader.status(upload_id).state == "refused"


def test_workers_survive_bad_input(stack: Stack, bucket: str) -> None:
    """After every refusal above, the same workers still upload."""
    path = stack.make_file(2000)
    _send_raw(stack, source="/definitely/not/here", bucket=bucket, key="k")
    status = stack.uploader.submit(str(path), f"s3://{bucket}/ok").wait(timeout=60)
    assert status.state == "completed"
    assert all(worker.alive() for worker in stack.workers)
