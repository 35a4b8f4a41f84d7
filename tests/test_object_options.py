"""Object options (issue 11) end to end through real workers, against SeaweedFS and moto: what
the stored object carries (HeadObject, GetObjectTagging, GetObjectAcl, SSE-C, object lock), the
conditional write, the upload's result, and every refusal before anything is created."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.conftest import Stack, _databases, sha256_file
from uploader import UploadFailed
from uploader.checkpoint import CheckpointStore
from uploader.config import Settings
from uploader.contract import START_UPLOAD
from uploader.dev.localstack import MotoS3, RedisServer, SeaweedS3, Worker
from uploader.errors import InvalidRequest, PermanentStoreError, UploadConflict
from uploader.model import ObjectOptions
from uploader.planner import MiB
from uploader.storage.adapter import ObjectStore
from uploader.storage.errors import error_code

#: The workers' SSE-C keyring for these tests: one key, named "vault".
SSE_C_KEY = os.urandom(32)
SSE_C_KEY_B64 = base64.b64encode(SSE_C_KEY).decode()
KEYRING = {"UPLOADER_SSE_C_KEYS": f"vault={SSE_C_KEY_B64}"}
SIZES = {"single": 1234, "multipart": 11 * MiB}
RETAIN_UNTIL = "2031-02-03T04:05:06Z"


def _stack(workdir: Path, redis_server: RedisServer, endpoint: str, sources_root: Path, **env: str) -> Stack:
    db = next(_databases)
    stack = Stack(workdir, redis_server.url.rsplit("/", 1)[0] + f"/{db}", endpoint, sources_root, {**KEYRING, **env})
    stack.start_worker("options", concurrency=4)
    return stack


@pytest.fixture(scope="module")
def moto_stack(workdir: Path, redis_server: RedisServer, moto: MotoS3, sources_root: Path) -> Iterator[Stack]:
    # moto implements AWS's API: the aws profile (path-style addressing: the server is an IP).
    stack = _stack(
        workdir, redis_server, moto.endpoint_url, sources_root, UPLOADER_S3_PROFILE="aws", UPLOADER_S3_ADDRESSING_STYLE="path"
    )
    yield stack
    stack.close()


@pytest.fixture(scope="module")
def seaweed_stack(workdir: Path, redis_server: RedisServer, seaweed: SeaweedS3, sources_root: Path) -> Iterator[Stack]:
    stack = _stack(workdir, redis_server, seaweed.endpoint_url, sources_root)
    yield stack
    stack.close()


@pytest.fixture(params=["seaweed", "moto"])
def server_stack(request: pytest.FixtureRequest) -> Stack:
    return request.getfixturevalue(f"{request.param}_stack")


def _upload(stack: Stack, size: int, key: str, bucket: str | None = None, **options: Any) -> tuple[Any, Path, str]:
    bucket = bucket or stack.new_bucket()
    path = stack.make_file(size)
    part_size = 5 * MiB if size >= 8 * MiB else None
    status = stack.uploader.submit(str(path), f"s3://{bucket}/{key}", part_size=part_size, **options).wait(timeout=120)
    return status, path, bucket


# -- what the object carries ----------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_headers_metadata_tags_and_storage_class_reach_the_object(server_stack: Stack, size: int) -> None:
    stack = server_stack
    status, path, bucket = _upload(
        stack, size, "reports/2030/summary.json",
        cache_control="max-age=60, public", content_disposition='attachment; filename="summary.json"',
        content_language="en-GB", expires="2030-01-31T12:00:00+01:00", metadata={"team": "ingest"},
        storage_class="STANDARD_IA", tags={"project": "apollo", "tier": "gold copy"},
    )
    assert status.state == "completed"
    assert stack.object_sha256(bucket, "reports/2030/summary.json") == sha256_file(path)
    head = stack.s3.head_object(Bucket=bucket, Key="reports/2030/summary.json")
    # No content type given: guessed from the key's extension.
    assert head["ContentType"] == "application/json"
    assert head["CacheControl"] == "max-age=60, public"
    assert head["ContentDisposition"] == 'attachment; filename="summary.json"'
    assert head["ContentLanguage"] == "en-GB"
    assert head["Expires"] == datetime(2030, 1, 31, 11, 0, tzinfo=UTC)
    assert head["Metadata"] == {"team": "ingest"}
    assert head["StorageClass"] == "STANDARD_IA"
    tags = stack.s3.get_object_tagging(Bucket=bucket, Key="reports/2030/summary.json")["TagSet"]
    assert {t["Key"]: t["Value"] for t in tags} == {"project": "apollo", "tier": "gold copy"}
    # The result of the upload.
    result = status.result
    assert result is not None
    assert (result.etag, result.size, result.storage_class) == (head["ETag"], size, "STANDARD_IA")
    assert stack.open_multipart_uploads(bucket) == []


def test_content_type_is_guessed_from_the_file_name_when_the_key_has_no_extension(seaweed_stack: Stack) -> None:
    stack = seaweed_stack
    bucket = stack.new_bucket()
    path = stack.make_file(100, name=f"page-{uuid.uuid4().hex[:8]}.html")
    stack.uploader.submit(str(path), f"s3://{bucket}/index").wait(timeout=60)
    assert stack.s3.head_object(Bucket=bucket, Key="index")["ContentType"] == "text/html"
    # An explicit one wins.
    stack.uploader.submit(str(path), f"s3://{bucket}/raw.html", content_type="text/plain").wait(timeout=60)
    assert stack.s3.head_object(Bucket=bucket, Key="raw.html")["ContentType"] == "text/plain"


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_canned_acl_reaches_the_object(moto_stack: Stack, size: int) -> None:
    # SeaweedFS keeps its own ACLs (it answers owner FULL_CONTROL whatever was asked): moto only.
    status, _, bucket = _upload(moto_stack, size, "public.bin", acl="public-read")
    assert status.state == "completed"
    grants = moto_stack.s3.get_object_acl(Bucket=bucket, Key="public.bin")["Grants"]
    assert {"Grantee": {"Type": "Group", "URI": "http://acs.amazonaws.com/groups/global/AllUsers"}, "Permission": "READ"} in grants


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_sse_aes256(server_stack: Stack, size: int) -> None:
    status, _, bucket = _upload(server_stack, size, "enc.bin", sse="AES256")
    assert status.state == "completed"
    assert server_stack.s3.head_object(Bucket=bucket, Key="enc.bin")["ServerSideEncryption"] == "AES256"


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_sse_c_key_from_the_workers_keyring_encrypts_every_part(seaweed_stack: Stack, size: int) -> None:
    # moto accepts SSE-C headers but does not enforce them (it serves the object without the
    # key): SeaweedFS does, so this runs there.
    stack = seaweed_stack
    status, path, bucket = _upload(stack, size, "secret.bin", sse_customer_key="vault")
    assert status.state == "completed", status.error
    with pytest.raises(ClientError):
        stack.s3.get_object(Bucket=bucket, Key="secret.bin")
    body = stack.s3.get_object(Bucket=bucket, Key="secret.bin", SSECustomerAlgorithm="AES256", SSECustomerKey=SSE_C_KEY)
    import hashlib

    assert hashlib.sha256(body["Body"].read()).hexdigest() == sha256_file(path)
    assert body["SSECustomerAlgorithm"] == "AES256"
    # The key itself is nowhere but on the workers: not in the checkpoint, not in their logs.
    redis = stack.uploader.checkpoint.redis
    for name in redis.scan_iter(match=f"*{status.upload_id}*"):
        dumped = redis.dump(name) or b""
        assert SSE_C_KEY not in dumped and SSE_C_KEY_B64.encode() not in dumped
    for worker in stack.workers:
        assert SSE_C_KEY_B64 not in worker.log_text()


#: moto keeps object lock settings from PutObject but drops them from CreateMultipartUpload (a
#: moto gap: AWS and SeaweedFS keep them), so the multipart case runs on SeaweedFS only.
LOCK_CASES = {"seaweed-single": ("seaweed", "single"), "seaweed-multipart": ("seaweed", "multipart"), "moto-single": ("moto", "single")}


@pytest.mark.parametrize("server,size", LOCK_CASES.values(), ids=LOCK_CASES.keys())
def test_object_lock_on_a_lock_enabled_bucket(request: pytest.FixtureRequest, server: str, size: str) -> None:
    stack: Stack = request.getfixturevalue(f"{server}_stack")
    bucket = f"lock-{uuid.uuid4().hex[:16]}"
    stack.s3.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    status, _, _ = _upload(
        stack, SIZES[size], "locked", bucket=bucket, object_lock_mode="GOVERNANCE",
        object_lock_retain_until=RETAIN_UNTIL, object_lock_legal_hold="ON",
    )
    assert status.state == "completed", status.error
    head = stack.s3.head_object(Bucket=bucket, Key="locked")
    assert head["ObjectLockMode"] == "GOVERNANCE"
    assert head["ObjectLockRetainUntilDate"] == datetime(2031, 2, 3, 4, 5, 6, tzinfo=UTC)
    assert head["ObjectLockLegalHoldStatus"] == "ON"
    # A lock-enabled bucket is versioned: the result names the version.
    assert status.result is not None and status.result.version_id == head["VersionId"]


# -- the result ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_result_names_the_version_on_a_versioned_bucket(server_stack: Stack, size: int) -> None:
    stack = server_stack
    bucket = stack.new_bucket()
    stack.s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    status, _, _ = _upload(stack, size, "v.bin", bucket=bucket)
    head = stack.s3.head_object(Bucket=bucket, Key="v.bin")
    assert head["VersionId"] and head["VersionId"] != "null"
    result = status.result
    assert result is not None
    assert (result.etag, result.version_id, result.size, result.storage_class) == (
        head["ETag"], head["VersionId"], size, "STANDARD",
    )
    # status --json carries it too.
    out = _cli(stack, "status", status.upload_id, "--json")
    assert json.loads(out.stdout)["result"] == result.to_dict()


def test_result_is_empty_without_versioning(seaweed_stack: Stack) -> None:
    status, _, _ = _upload(seaweed_stack, SIZES["single"], "plain.bin")
    assert status.result is not None and status.result.version_id == ""


# -- no_overwrite -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_no_overwrite_of_a_taken_key_is_refused_before_anything_is_sent(server_stack: Stack, size: int) -> None:
    stack = server_stack
    bucket = stack.new_bucket()
    stack.s3.put_object(Bucket=bucket, Key="taken", Body=b"first")
    path = stack.make_file(size)
    part_size = 5 * MiB if size >= 8 * MiB else None
    handle = stack.uploader.submit(str(path), f"s3://{bucket}/taken", part_size=part_size, no_overwrite=True)
    with pytest.raises(UploadConflict, match="exists already and the request asked for no_overwrite"):
        handle.wait(timeout=120)
    assert stack.uploader.status(handle.upload_id).state == "refused"
    assert stack.uploader.checkpoint.get(handle.upload_id) is None
    assert stack.s3.get_object(Bucket=bucket, Key="taken")["Body"].read() == b"first"
    assert stack.open_multipart_uploads(bucket) == []
    # A free key is written.
    status, _, _ = _upload(stack, size, "free", bucket=bucket, no_overwrite=True)
    assert status.state == "completed"


@pytest.mark.parametrize("s3", ["seaweed", "moto"])
def test_no_overwrite_of_a_key_taken_during_the_upload_fails_and_aborts(make_stack: Any, s3: str) -> None:
    """The object appears while the parts are on their way: CompleteMultipartUpload's
    ``If-None-Match: *`` refuses to replace it; the upload fails saying so, and its multipart
    upload is aborted (abort_on_failure or not)."""
    stack = make_stack(s3)
    stack.start_worker("slow", concurrency=2, UPLOADER_MAX_BANDWIDTH=str(2 * MiB))
    bucket = stack.new_bucket()
    path = stack.make_file(12 * MiB)
    handle = stack.uploader.submit(str(path), f"s3://{bucket}/raced", part_size=5 * MiB, no_overwrite=True)
    stack.wait_status(handle.upload_id, lambda s: s.state == "uploading", 60, "the upload to start")
    stack.s3.put_object(Bucket=bucket, Key="raced", Body=b"got there first")
    with pytest.raises(UploadFailed) as failed:
        handle.wait(timeout=120)
    assert "exists already" in str(failed.value) and "no_overwrite" in str(failed.value)
    status = stack.uploader.status(handle.upload_id)
    assert status.state == "failed" and not status.retry_pending
    assert stack.s3.get_object(Bucket=bucket, Key="raced")["Body"].read() == b"got there first"
    assert stack.open_multipart_uploads(bucket) == []


def test_no_overwrite_put_object_is_conditional(seaweed_stack: Stack) -> None:
    """The single-PUT path's conditional write, at the adapter (the coordinator's check runs
    first in an upload, so only a race reaches it there)."""
    stack = seaweed_stack
    bucket = stack.new_bucket()
    stack.s3.put_object(Bucket=bucket, Key="taken", Body=b"first")
    objects = ObjectStore(stack.settings, client=stack.s3)
    with pytest.raises(PermanentStoreError) as refused:
        objects.put_object(bucket, "taken", b"second", options=ObjectOptions(no_overwrite=True))
    assert error_code(refused.value) == "PreconditionFailed"
    assert stack.s3.get_object(Bucket=bucket, Key="taken")["Body"].read() == b"first"


# -- refusals: a clear error, no multipart upload, no checkpoint ---------------------------------------

REFUSED = {
    "unknown-acl": ({"acl": "world-writable"}, "acl"),
    "unknown-storage-class": ({"storage_class": "COLD"}, "storage_class"),
    "eleven-tags": ({"tags": {f"k{i}": "v" for i in range(11)}}, "at most 10"),
    "long-tag-key": ({"tags": {"k" * 129: "v"}}, "1-128 characters"),
    "long-tag-value": ({"tags": {"k": "v" * 257}}, "at most 256"),
    "tag-with-newline": ({"tags": {"k": "a\nb"}}, "may hold only"),
    "kms-key-without-kms": ({"sse": "AES256", "sse_kms_key_id": "alias/x"}, 'sse="aws:kms"'),
    "unknown-sse": ({"sse": "rot13"}, "sse"),
    "lock-mode-without-date": ({"object_lock_mode": "GOVERNANCE"}, "object_lock_retain_until"),
    "date-without-zone": ({"expires": "2030-01-01T00:00:00"}, "time zone"),
    "not-a-date": ({"expires": "tomorrow"}, "ISO 8601"),
    "header-injection": ({"cache_control": "max-age=1\r\nx-amz-acl: public-read"}, "printable ASCII"),
    "key-instead-of-name": ({"sse_customer_key": SSE_C_KEY_B64}, "name of a key"),
    "sse-and-sse-c": ({"sse": "AES256", "sse_customer_key": "vault"}, "choose one"),
    "owner-not-an-account": ({"expected_bucket_owner": "me"}, "12 digits"),
    "bucket-key-without-kms": ({"bucket_key_enabled": True}, "SSE-KMS"),
}


@pytest.mark.parametrize("options,words", REFUSED.values(), ids=REFUSED.keys())
def test_invalid_options_are_refused_by_the_client(seaweed_stack: Stack, options: dict[str, Any], words: str) -> None:
    bucket = seaweed_stack.new_bucket()
    path = seaweed_stack.make_file(10)
    with pytest.raises(InvalidRequest) as refused:
        seaweed_stack.uploader.submit(str(path), f"s3://{bucket}/k", upload_id=f"r-{uuid.uuid4().hex}", **options)
    assert words in str(refused.value)
    assert seaweed_stack.open_multipart_uploads(bucket) == []


@pytest.mark.parametrize(
    "options,words",
    [*REFUSED.values(), ({"sse_customer_key": "no-such-key"}, "not a key in the workers' keyring")],
    ids=[*REFUSED.keys(), "sse-c-name-not-in-keyring"],
)
def test_invalid_options_sent_by_any_client_are_refused_by_the_coordinator(
    seaweed_stack: Stack, options: dict[str, Any], words: str
) -> None:
    stack = seaweed_stack
    bucket = stack.new_bucket()
    path = stack.make_file(9 * MiB)
    upload_id = f"r-{uuid.uuid4().hex}"
    kwargs = {"source": str(path), "bucket": bucket, "key": "k", "upload_id": upload_id, "part_size": 5 * MiB, **options}
    stack.uploader.celery.send_task(START_UPLOAD, kwargs=kwargs)
    status = stack.wait_status(upload_id, lambda s: s.state == "refused", 60, "the refusal")
    assert words in status.error and status.refusal_kind == "InvalidRequest"
    assert stack.uploader.checkpoint.get(upload_id) is None
    assert stack.open_multipart_uploads(bucket) == []
    assert "Contents" not in stack.s3.list_objects_v2(Bucket=bucket)


# -- the CLI ----------------------------------------------------------------------------------------


def _cli(stack: Stack, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **stack.env}
    env.pop("UPLOADER_SSE_C_KEYS", None)  # a client needs no keyring
    return subprocess.run(
        [sys.executable, "-m", "uploader.cli", *argv], env=env, capture_output=True, text=True, timeout=120, check=True
    )


def test_cli_flags(moto_stack: Stack) -> None:
    stack = moto_stack
    bucket = stack.new_bucket()
    path = stack.make_file(6 * MiB)
    out = _cli(
        stack, "submit", str(path), f"s3://{bucket}/cli.tar", "--wait", "--timeout", "120",
        "--cache-control", "no-cache", "--content-disposition", "inline", "--content-language", "fr",
        "--expires", "2030-05-06T07:08:09Z", "-m", "origin=cli", "--acl", "public-read",
        "--storage-class", "GLACIER_IR", "--tag", "a=1", "--tag", "b=2", "--sse", "AES256", "--no-overwrite",
        "--expected-bucket-owner", "123456789012",
    )
    upload_id = out.stdout.splitlines()[0]
    head = stack.s3.head_object(Bucket=bucket, Key="cli.tar")
    assert head["ContentType"] == "application/x-tar"
    assert (head["CacheControl"], head["ContentDisposition"], head["ContentLanguage"]) == ("no-cache", "inline", "fr")
    assert head["Expires"] == datetime(2030, 5, 6, 7, 8, 9, tzinfo=UTC)
    assert head["Metadata"] == {"origin": "cli"}
    assert (head["StorageClass"], head["ServerSideEncryption"]) == ("GLACIER_IR", "AES256")
    tags = stack.s3.get_object_tagging(Bucket=bucket, Key="cli.tar")["TagSet"]
    assert {t["Key"]: t["Value"] for t in tags} == {"a": "1", "b": "2"}
    status = json.loads(_cli(stack, "status", upload_id, "--json").stdout)
    assert status["result"]["storage_class"] == "GLACIER_IR" and status["result"]["etag"] == head["ETag"]
    # --no-overwrite: the second submission of the same destination is refused and says why.
    again = subprocess.run(
        [sys.executable, "-m", "uploader.cli", "submit", str(path), f"s3://{bucket}/cli.tar", "--no-overwrite", "--wait",
         "--timeout", "120"],
        env={**os.environ, **stack.env}, capture_output=True, text=True, timeout=120, check=False,
    )
    assert again.returncode == 2 and "exists already" in again.stderr  # refused


def test_cli_refuses_a_malformed_tag(moto_stack: Stack) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "uploader.cli", "submit", "/x", "s3://bucket-name/k", "--tag", "novalue"],
        env={**os.environ, **moto_stack.env}, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 2 and "KEY=VALUE" in result.stderr


# -- records written before options existed ---------------------------------------------------------


def test_records_from_before_options_keep_their_metadata_and_content_type(store: CheckpointStore) -> None:
    upload_id = uuid.uuid4().hex
    store.claim(upload_id, {
        "source": "/data/a", "bucket": "b-old", "key": "k", "metadata": {"team": "old"}, "content_type": "text/csv",
        "size": 1, "part_size": 1, "part_count": 1, "mode": "multipart",
    })
    record = store.get(upload_id)
    assert record is not None
    assert record.options == ObjectOptions(metadata={"team": "old"}, content_type="text/csv")
    assert (record.metadata, record.content_type) == ({"team": "old"}, "text/csv")


# -- the keyring setting ----------------------------------------------------------------------------


def test_keyring_setting_forms_and_errors_never_quote_a_key() -> None:
    other = base64.b64encode(os.urandom(32)).decode()
    assert Settings(sse_c_keys=f"vault={SSE_C_KEY_B64}, other={other}").sse_c_keyring == {
        "vault": SSE_C_KEY, "other": base64.b64decode(other),
    }
    assert Settings(sse_c_keys=json.dumps({"vault": SSE_C_KEY_B64})).sse_c_keyring == {"vault": SSE_C_KEY}
    assert "vault" not in repr(Settings(sse_c_keys=f"vault={SSE_C_KEY_B64}"))
    short = base64.b64encode(b"k" * 16).decode()
    for bad, words in (
        (f"vault={short}", "16 bytes"), ("vault=not*base64", "not base64"), ("vault", "NAME=BASE64KEY"), ("a/b=c2VjcmV0", "key name"),
        (f"bad name={SSE_C_KEY_B64}", "NAME=BASE64KEY"),
    ):
        with pytest.raises(ValueError) as refused:
            Settings(sse_c_keys=bad)
        assert words in str(refused.value)
        assert SSE_C_KEY_B64 not in str(refused.value) and short not in str(refused.value)


def test_sse_c_key_is_masked_in_debug_logs(make_stack: Any) -> None:
    """At DEBUG, botocore logs every request's headers: the SSE-C key's header is there, masked."""
    stack = make_stack("seaweed", **KEYRING)
    stack.workers.append(Worker(stack.workdir, stack.env, name="debug", concurrency=2, loglevel="DEBUG"))
    status, _, _ = _upload(stack, SIZES["multipart"], "secret.bin", sse_customer_key="vault")
    assert status.state == "completed", status.error
    log = stack.workers[-1].log_text()
    assert "x-amz-server-side-encryption-customer-key" in log.lower()
    assert SSE_C_KEY_B64 not in log and repr(SSE_C_KEY)[2:-1] not in log
