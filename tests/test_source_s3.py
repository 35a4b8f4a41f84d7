"""S3 objects as sources (uploader/sources/s3.py), against real servers: a second bucket on the
session's SeaweedFS (the same endpoint: copied on the server, no part bytes through the workers,
checked on the wire by a proxy in front of it) and moto as a second S3 server (another endpoint:
a migration by ranged GETs into UploadPart)."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.conftest import Stack, s3_client
from tests.faultproxy import FaultProxy, is_upload_part
from uploader import InvalidRequest, SourceError, UploadFailed
from uploader.dev.localstack import MotoS3, SeaweedS3
from uploader.planner import MiB
from uploader.request import parse_request
from uploader.sources.fingerprint import FileId, Fingerprint, ObjectVersion

pytestmark = pytest.mark.timeout(180)


# -- unit: the fingerprint of an object, the request -------------------------------------------
def test_an_object_version_round_trips_through_the_record() -> None:
    version = ObjectVersion('"0123abc-2"', "v1.x_y")
    fp = Fingerprint(10, 5, version)
    back = Fingerprint.from_record(**fp.to_record())  # type: ignore[arg-type]
    assert back == fp and back.version == version
    assert Fingerprint.from_record(10, 5, "12:34@boot/ns").version is None
    assert fp.difference(Fingerprint(10, 5, ObjectVersion('"other"', "v1.x_y"))) == 'ETag "0123abc-2" -> "other"'
    assert "version v1.x_y -> v2" in str(fp.difference(Fingerprint(10, 5, ObjectVersion('"0123abc-2"', "v2"))))
    assert fp.difference(Fingerprint(10, 5, FileId(1, 2, "s"))) == "another kind of source is in its place"
    assert ObjectVersion.decode("s3:not json") is None


def test_source_endpoint_is_for_s3_sources_only() -> None:
    base = {"bucket": "dest", "key": "k"}
    assert parse_request({**base, "source": "s3://src/a/b", "source_endpoint": "oss"}).source_endpoint == "oss"
    with pytest.raises(InvalidRequest, match="source_endpoint is for S3 sources"):
        parse_request({**base, "source": "/data/x", "source_endpoint": "oss"})
    with pytest.raises(InvalidRequest, match="s3://bucket/key"):
        parse_request({**base, "source": "s3://src"})
    with pytest.raises(InvalidRequest, match="invalid bucket name"):
        parse_request({**base, "source": "s3://Bad_Bucket/k"})


# -- integration -------------------------------------------------------------------------------
def _put_random(client, bucket: str, key: str, size: int) -> str:  # type: ignore[no-untyped-def]
    data = os.urandom(size)
    client.put_object(Bucket=bucket, Key=key, Body=data)
    return hashlib.sha256(data).hexdigest()


def _everything(method: str, path: str) -> bool:
    return True


ProxiedStack = Callable[..., tuple[Stack, FaultProxy]]


@pytest.fixture
def proxied(make_stack, seaweed: SeaweedS3) -> Iterator[ProxiedStack]:  # type: ignore[no-untyped-def]
    """``proxied(concurrency, **proxy options)``: a stack with one worker that reaches SeaweedFS
    through a :class:`FaultProxy` (the test's own S3 client does not), reading from any bucket."""
    proxies: list[FaultProxy] = []

    def factory(concurrency: int, **options: Any) -> tuple[Stack, FaultProxy]:
        proxy = FaultProxy(seaweed.endpoint_url, **options)
        proxies.append(proxy)
        stack: Stack = make_stack(UPLOADER_S3_ENDPOINT_URL=proxy.url, UPLOADER_SOURCE_BUCKETS="*")
        stack.start_worker("proxied", concurrency=concurrency)
        return stack, proxy

    yield factory
    for proxy in proxies:
        proxy.close()


def _finished(stack: Stack, upload_id: str, timeout: float = 120):  # type: ignore[no-untyped-def]
    return stack.wait_status(upload_id, lambda s: s.state in {"completed", "failed", "refused"}, timeout, "the end")


@pytest.mark.parametrize("size", [21 * MiB + 12345, 3 * MiB])
def test_same_endpoint_copies_on_the_server(proxied: ProxiedStack, size: int) -> None:
    """Another bucket of the same server: UploadPartCopy (or CopyObject for a small object),
    the object byte-identical, and no request through the workers carrying the object's bytes
    (a proxy that sees every request measures them)."""
    stack, wire = proxied(4, targets=_everything)
    src, dst = stack.new_bucket(), stack.new_bucket()
    digest = _put_random(stack.s3, src, "in/big.bin", size)
    handle = stack.uploader.submit(f"s3://{src}/in/big.bin", f"s3://{dst}/out.bin", part_size=5 * MiB)
    status = _finished(stack, handle.upload_id)
    assert status.state == "completed", status
    assert stack.object_sha256(dst, "out.bin") == digest
    sent = sum(int(headers.get("content-length") or 0) for _, _, headers in wire.requests)
    assert sent < 64 * 1024, f"{sent} bytes of request bodies went through the workers"
    assert not [p for m, p, _ in wire.requests if m == "GET" and "in/big.bin" in p], "the source was read"
    copies = [h for m, p, h in wire.requests if m == "PUT" and h.get("x-amz-copy-source")]
    if size >= stack.settings.multipart_threshold:
        assert len(copies) == 5 and all(h.get("x-amz-copy-source-range") for h in copies)
        assert all(h.get("x-amz-copy-source-if-match") for h in copies)
        assert status.verified == "size+multipart-etag"
    else:
        assert len(copies) == 1 and copies[0].get("x-amz-copy-source-if-match")
        assert status.verified == "size+etag"  # an object stored in one PUT: its copy has its ETag
    assert stack.open_multipart_uploads(dst) == []


def test_a_source_overwritten_mid_copy_fails_as_changed(proxied: ProxiedStack) -> None:
    """Each part copy waits 2 s in the proxy; the object is overwritten once the first part is
    recorded: the next copies are refused by CopySourceIfMatch and the upload fails as changed."""
    stack, _ = proxied(1, fault="slow", rate=1.0, targets=is_upload_part, slow_seconds=2.0)
    src, dst = stack.new_bucket(), stack.new_bucket()
    _put_random(stack.s3, src, "obj", 16 * MiB)
    handle = stack.uploader.submit(f"s3://{src}/obj", f"s3://{dst}/copy", part_size=5 * MiB)
    stack.wait_parts_done(handle.upload_id, 1)
    _put_random(stack.s3, src, "obj", 16 * MiB)
    with pytest.raises(UploadFailed, match="changed since the upload began"):
        handle.wait(timeout=120)
    with pytest.raises(ClientError, match="404|Not Found"):
        stack.s3.head_object(Bucket=dst, Key="copy")


def test_a_copy_interrupted_by_a_crash_resumes_without_copying_a_recorded_part_again(proxied: ProxiedStack) -> None:
    """A worker killed mid-copy; resume on another: the parts recorded before the crash are not
    copied again (their recorded ETags are the ones ListParts lists), the object is whole."""
    stack, wire = proxied(1, fault="slow", rate=1.0, targets=is_upload_part, slow_seconds=1.0)
    src, dst = stack.new_bucket(), stack.new_bucket()
    digest = _put_random(stack.s3, src, "obj", 26 * MiB)
    handle = stack.uploader.submit(f"s3://{src}/obj", f"s3://{dst}/obj", part_size=5 * MiB)
    stack.wait_parts_done(handle.upload_id, 2)
    stack.workers[0].kill()
    stack.workers[0].proc.wait(10)
    recorded = set(stack.uploader.checkpoint.parts(handle.upload_id))
    wire.rate = 0.0
    stack.start_worker("rescuer", concurrency=2)
    stack.uploader.resume(handle.upload_id)
    assert handle.wait(timeout=120).state == "completed"
    assert stack.object_sha256(dst, "obj") == digest
    copied = [p for m, p, h in wire.requests if m == "PUT" and h.get("x-amz-copy-source")]
    for number in recorded:
        assert sum(f"partNumber={number}&" in p or p.endswith(f"partNumber={number}") for p in copied) == 1, number


def test_a_missing_source_is_refused_before_anything_is_created(make_stack) -> None:  # type: ignore[no-untyped-def]
    """A missing object or bucket, an unknown source endpoint, a bucket the workers do not
    name: each refused with its reason, and nothing created in the destination bucket."""
    stack: Stack = make_stack(UPLOADER_SOURCE_BUCKETS="*")
    stack.start_worker("refuser", concurrency=2)
    dst = stack.new_bucket()
    src = stack.new_bucket()
    handle = stack.uploader.submit(f"s3://{src}/nothing-here", f"s3://{dst}/x", part_size=5 * MiB)
    with pytest.raises(SourceError, match=rf"source s3://{src}/nothing-here does not exist"):
        handle.accepted(timeout=60)
    assert stack.uploader.status(handle.upload_id).state == "refused"
    handle = stack.uploader.submit("s3://no-such-bucket-here/k", f"s3://{dst}/y")
    with pytest.raises(SourceError, match="does not exist"):
        handle.accepted(timeout=60)
    handle = stack.uploader.submit(f"s3://{src}/k", f"s3://{dst}/z", source_endpoint="nowhere")
    with pytest.raises(InvalidRequest, match="unknown endpoint 'nowhere'"):
        handle.accepted(timeout=60)
    closed: Stack = make_stack(UPLOADER_SOURCE_BUCKETS=f"{src}-other")
    closed.start_worker("closed", concurrency=1)
    stack.s3.put_object(Bucket=src, Key="k", Body=b"x" * 1000)
    handle = closed.uploader.submit(f"s3://{src}/k", f"s3://{dst}/w")
    with pytest.raises(SourceError, match="not among the workers' source buckets"):
        handle.accepted(timeout=60)
    assert stack.open_multipart_uploads(dst) == []
    assert "Contents" not in stack.s3.list_objects_v2(Bucket=dst)


def test_a_source_the_workers_may_not_read_is_refused(proxied: ProxiedStack) -> None:
    """A server answering 403 AccessDenied to the source (a proxy in front of SeaweedFS, as a
    bucket policy would): refused with that reason, no multipart upload left."""
    stack, _ = proxied(2, fault="forbidden", rate=1.0, targets=lambda method, path: method == "HEAD" and "/secret" in path)
    src, dst = stack.new_bucket(), stack.new_bucket()
    _put_random(stack.s3, src, "secret", 6 * MiB)
    handle = stack.uploader.submit(f"s3://{src}/secret", f"s3://{dst}/x", part_size=5 * MiB)
    with pytest.raises(SourceError, match=rf"source s3://{src}/secret cannot be read: access denied"):
        handle.accepted(timeout=60)
    assert stack.open_multipart_uploads(dst) == []


@pytest.fixture
def migrating(make_stack, moto: MotoS3) -> Stack:  # type: ignore[no-untyped-def]
    """Workers with moto as the named endpoint ``mem``, streaming parts larger than 2 MiB."""
    endpoints = {"mem": {"profile": "generic", "endpoint_url": moto.endpoint_url}}
    stack: Stack = make_stack(UPLOADER_ENDPOINTS=json.dumps(endpoints), UPLOADER_SOURCE_BUCKETS="mem:*")
    stack.start_worker("migrator", concurrency=4, UPLOADER_PART_BUFFER_MAX=str(2 * MiB))
    return stack


def test_migration_from_another_server_by_ranged_gets(migrating: Stack, moto: MotoS3) -> None:
    """moto (named endpoint ``mem``) to SeaweedFS (the default): each part read with ranged
    GETs (If-Match) into UploadPart, streamed through a 2 MiB buffer; byte-identical; a
    small object the same way in one PUT."""
    stack = migrating
    other = s3_client(moto.endpoint_url)
    src = f"mig-{uuid.uuid4().hex[:10]}"
    other.create_bucket(Bucket=src)
    dst = stack.new_bucket()
    big = _put_random(other, src, "data/big.bin", 17 * MiB + 7)
    small = _put_random(other, src, "data/small.bin", 1 * MiB + 3)
    handles = [
        stack.uploader.submit(f"s3://{src}/data/big.bin", f"s3://{dst}/big.bin", part_size=5 * MiB, source_endpoint="mem"),
        stack.uploader.submit(f"s3://{src}/data/small.bin", f"s3://{dst}/small.bin", source_endpoint="mem"),
    ]
    for handle in handles:
        status = _finished(stack, handle.upload_id)
        assert status.state == "completed", status
    assert stack.object_sha256(dst, "big.bin") == big
    assert stack.object_sha256(dst, "small.bin") == small
    assert stack.open_multipart_uploads(dst) == []


def test_a_source_overwritten_mid_migration_fails_as_changed(make_stack, moto: MotoS3) -> None:  # type: ignore[no-untyped-def]
    """Parts are sent slowly (through a throttled worker); the moto object is overwritten after the
    first part: the next ranged GET is refused by If-Match and the upload fails as changed."""
    endpoints = {"mem": {"profile": "generic", "endpoint_url": moto.endpoint_url}}
    stack: Stack = make_stack(UPLOADER_ENDPOINTS=json.dumps(endpoints), UPLOADER_SOURCE_BUCKETS="mem:*")
    stack.start_worker("slow-migrator", concurrency=1, UPLOADER_MAX_BANDWIDTH=str(5 * MiB))
    other = s3_client(moto.endpoint_url)
    src = f"mig-{uuid.uuid4().hex[:10]}"
    other.create_bucket(Bucket=src)
    dst = stack.new_bucket()
    _put_random(other, src, "obj", 20 * MiB)
    handle = stack.uploader.submit(f"s3://{src}/obj", f"s3://{dst}/obj", part_size=5 * MiB, source_endpoint="mem")
    stack.wait_parts_done(handle.upload_id, 1)
    _put_random(other, src, "obj", 20 * MiB)
    with pytest.raises(UploadFailed, match="changed since the upload began"):
        handle.wait(timeout=120)
