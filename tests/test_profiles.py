"""Provider profiles and named endpoints (issue 11).

What each profile puts on the wire is recorded by a proxy on loopback in front of SeaweedFS
(tests/faultproxy.py ``requests``); the virtual-hosted profiles, whose host names do not resolve
here (``*.localhost`` does not), are checked on the URL botocore builds. Option support is checked
on plain mappings of option name -> value, as the coordinator passes them.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
from botocore.exceptions import ClientError
from pydantic import ValidationError

from tests.conftest import ACCESS_KEY, SECRET_KEY, Stack, s3_client, sha256_file
from tests.faultproxy import FaultProxy
from uploader.config import Settings
from uploader.dev.localstack import MotoS3, SeaweedS3
from uploader.errors import InvalidRequest, PermanentStoreError
from uploader.model import ObjectOptions, StorageClass
from uploader.planner import MiB, plan_parts
from uploader.storage.adapter import ObjectStore, object_store
from uploader.storage.endpoints import resolve
from uploader.storage.errors import error_code
from uploader.storage.profiles import PROFILES, Addressing, ExpectContinue, PartRules, ProfileName, profile

#: Profiles SeaweedFS can serve through a loopback proxy (path-style, or ``auto``, which is
#: path-style for an IP address endpoint).
PATH_STYLE = [p for p in ProfileName if PROFILES[p].addressing is not Addressing.VIRTUAL]
VIRTUAL = [p for p in ProfileName if PROFILES[p].addressing is Addressing.VIRTUAL]


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)


def _store(endpoint_url: str, name: ProfileName) -> ObjectStore:
    return ObjectStore(Settings(s3_endpoint_url=endpoint_url, s3_profile=name))


# -- wire behaviour ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", PATH_STYLE, ids=lambda p: p.value)
def test_profile_wire_headers_through_a_recording_proxy(name: ProfileName, seaweed: SeaweedS3, aws_env: None) -> None:
    """A multipart upload (a 6 MiB part, over the Expect threshold, then a small last part) and
    a small PutObject through each path-style profile: it completes on SeaweedFS, and each
    request carries exactly the headers the profile says."""
    chosen = PROFILES[name]
    proxy = FaultProxy(seaweed.endpoint_url)
    try:
        store = _store(proxy.url, name)
        bucket = f"prof-{name.value.replace('-', '')}-{uuid.uuid4().hex[:8]}"
        s3_client(seaweed.endpoint_url).create_bucket(Bucket=bucket)
        big, small = b"a" * (6 * MiB), b"b" * 1000
        mpu = store.create_multipart_upload(bucket, "obj", metadata=None, content_type=None)
        parts = [(1, store.upload_part(bucket, "obj", mpu, 1, big)), (2, store.upload_part(bucket, "obj", mpu, 2, small))]
        store.complete_multipart_upload(bucket, "obj", mpu, parts)
        store.put_object(bucket, "small", small, metadata=None, content_type=None)
        assert store.head_object(bucket, "obj")["ContentLength"] == len(big) + len(small)
    finally:
        proxy.close()
    uploads = [(path, h) for method, path, h in proxy.requests if method == "PUT" and "partNumber=" in path]
    assert len(uploads) == 2, proxy.requests
    (big_path, big_headers), (_, small_headers) = uploads
    assert big_path.startswith(f"/{bucket}/obj?"), "path-style: the bucket is the first path segment"
    if chosen.expect_continue is ExpectContinue.NEVER:
        assert "expect" not in big_headers
    else:
        assert big_headers.get("expect") == "100-continue"
    assert "expect" not in small_headers
    for method, path, headers in proxy.requests:
        # Never boto3 >= 1.36's default trailers: OSS, R2 and GCS reject aws-chunked bodies.
        assert "aws-chunked" not in headers.get("content-encoding", ""), (method, path)
        assert "x-amz-trailer" not in headers and "x-amz-decoded-content-length" not in headers, (method, path)
        assert "x-amz-sdk-checksum-algorithm" not in headers or chosen.part_checksum == "crc32", (method, path)
    for headers in (big_headers, small_headers):
        if chosen.part_checksum == "md5":
            assert "content-md5" in headers
            assert not [h for h in headers if h.startswith("x-amz-checksum-")], headers
        else:
            assert "x-amz-checksum-crc32" in headers


class _Captured(Exception):
    pass


@pytest.mark.parametrize("name", VIRTUAL, ids=lambda p: p.value)
def test_virtual_hosted_profiles_put_the_bucket_in_the_host(name: ProfileName, aws_env: None) -> None:
    store = _store("http://objects.example.test:9000", name)
    seen: list[tuple[str, dict[str, str]]] = []

    def capture(request, **_: object) -> None:  # type: ignore[no-untyped-def]
        seen.append((request.url, {k.lower(): v for k, v in request.headers.items()}))
        raise _Captured

    store.client.meta.events.register_first("before-send.s3", capture)
    with pytest.raises(_Captured):
        store.upload_part("mybucket", "a/key", "mpu1", 1, b"x" * (3 * MiB))
    url, headers = seen[0]
    assert url.startswith("http://mybucket.objects.example.test:9000/a/key?"), url
    if PROFILES[name].part_checksum == "md5":
        assert "content-md5" in headers and not [h for h in headers if h.startswith("x-amz-checksum-")]
    else:
        assert "x-amz-checksum-crc32" in headers
    assert "x-amz-trailer" not in headers


def test_explicit_settings_override_the_profile() -> None:
    settings = Settings(s3_profile="oss", part_checksum="crc32", s3_addressing_style="path")
    chosen = resolve(settings, None).profile
    assert (chosen.addressing, chosen.part_checksum) == (Addressing.PATH, "crc32")
    assert resolve(Settings(s3_profile="oss"), None).profile.addressing is Addressing.VIRTUAL
    # Unset profile: as before profiles (path-style, CRC32 parts, Expect for large bodies only).
    default = resolve(Settings(), None).profile
    assert (default.name, default.addressing, default.part_checksum) == (ProfileName.SEAWEEDFS, Addressing.PATH, "crc32")


# -- option support ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "options", "refused"),
    [
        ("oss", {"acl": "authenticated-read"}, "acl 'authenticated-read'"),
        ("oss", {"acl": "public-read", "storage_class": "STANDARD_IA"}, None),
        ("oss", {"storage_class": "GLACIER_IR"}, "storage_class 'GLACIER_IR'"),
        ("oss", {"checksum_algorithm": "CRC32C"}, "checksum_algorithm 'CRC32C'"),
        ("oss", {"no_overwrite": True}, "no_overwrite"),
        ("r2", {"tags": {"a": "b"}}, "tags"),
        ("r2", {"acl": "private"}, "acl 'private'"),
        ("r2", {"object_lock_mode": "GOVERNANCE", "object_lock_retain_until": "2030-01-01T00:00:00Z"}, "object_lock_mode"),
        ("aws-express", {"checksum_algorithm": "MD5"}, "checksum_algorithm 'MD5'"),
        ("aws-express", {"sse": "aws:kms", "sse_kms_key_id": "k"}, "sse 'aws:kms'"),
        ("gcs", {"no_overwrite": True, "request_payer": "requester"}, "no_overwrite; request_payer"),
        ("minio", {"acl": "public-read"}, "acl 'public-read'"),
        ("minio", {"expected_bucket_owner": "123456789012"}, "expected_bucket_owner"),
        ("aws", {"acl": "bucket-owner-full-control", "storage_class": "GLACIER_IR", "sse": "aws:kms", "sse_kms_key_id": "k",
                 "tags": {"a": "b"}, "no_overwrite": True, "checksum_algorithm": "CRC64NVME", "request_payer": "requester"}, None),
        ("generic", {"acl": "whatever", "storage_class": "ANY", "no_overwrite": True}, None),
        ("aws", {"acl": None, "tags": {}, "no_overwrite": False}, None),
    ],
)
def test_refusal_names_the_profile_and_the_options(name: str, options: dict[str, object], refused: str | None) -> None:
    reason = profile(name).refusal(options)
    if refused is None:
        assert reason is None
    else:
        assert reason is not None and reason.startswith(f"profile {name!r} does not support: "), reason
        assert refused in reason, reason
        assert profile(name).refusal(options, endpoint="west") is not None
        assert f"endpoint 'west' (profile {name!r})" in (profile(name).refusal(options, endpoint="west") or "")


def test_etag_is_md5_only_where_the_profile_says_so() -> None:
    assert profile("aws").etag_is_md5()
    assert not profile("aws").etag_is_md5({"sse": "aws:kms"})
    assert not profile("aws").etag_is_md5({"sse_customer_key": "k1"})
    assert not profile("aws-express").etag_is_md5()
    assert not profile("gcs").etag_is_md5()


def test_unknown_profile_is_a_settings_error() -> None:
    with pytest.raises(ValidationError):
        Settings(s3_profile="azure")
    with pytest.raises(ValueError, match="unknown S3 profile"):
        profile("azure")


# -- part rules ------------------------------------------------------------------------------------
def test_planner_honours_the_profile_part_rules() -> None:
    r2 = PROFILES[ProfileName.R2].parts
    plan = plan_parts(100 * MiB + 7, None, default_part_size=8 * MiB, rules=r2)
    sizes = [plan.part_range(n)[1] for n in range(1, plan.count + 1)]
    assert len(set(sizes[:-1])) == 1 and sizes[-1] <= sizes[0], "R2: equal parts, the last no larger"
    small = PartRules(min_part=5 * MiB, max_part=16 * MiB, max_parts=10)
    plan = plan_parts(100 * MiB, None, default_part_size=8 * MiB, rules=small)
    assert plan.count <= 10 and plan.part_size == 10 * MiB
    with pytest.raises(InvalidRequest, match="provider's limits"):
        plan_parts(100 * MiB, 32 * MiB, rules=small)


# -- named endpoints ------------------------------------------------------------------------------
def test_endpoints_setting_is_validated() -> None:
    with pytest.raises(ValidationError):
        Settings(endpoints={"default": {"profile": "aws"}})
    with pytest.raises(ValidationError):
        Settings(endpoints={"west": {"profile": "nope"}})
    with pytest.raises(ValidationError):
        Settings(endpoints={"west": {"profile": "aws", "secret_access_key": "x"}})
    settings = Settings(endpoints={"west": {"profile": "r2", "endpoint_url": "http://127.0.0.1:1", "region": "auto"}})
    assert resolve(settings, "west").profile.parts.equal_parts
    with pytest.raises(InvalidRequest, match="unknown endpoint 'east'.*default, west"):
        resolve(settings, "east")


@pytest.fixture
def two_endpoint_stack(make_stack, moto: MotoS3) -> Iterator[tuple[Stack, str]]:  # type: ignore[no-untyped-def]
    endpoints = {"mem": {"profile": "generic", "endpoint_url": moto.endpoint_url}}
    stack = make_stack(UPLOADER_ENDPOINTS=json.dumps(endpoints))
    yield stack, moto.endpoint_url


def test_two_named_endpoints_from_the_same_workers(two_endpoint_stack: tuple[Stack, str]) -> None:
    stack, moto_url = two_endpoint_stack
    stack.start_worker("both", concurrency=4)
    seaweed_bucket = stack.new_bucket()
    moto_s3 = s3_client(moto_url)
    moto_bucket = f"mem-{uuid.uuid4().hex[:10]}"
    moto_s3.create_bucket(Bucket=moto_bucket)
    source = stack.make_file(13 * MiB)
    to_seaweed = stack.uploader.submit(str(source), f"s3://{seaweed_bucket}/a.bin", part_size=5 * MiB)
    to_moto = stack.uploader.submit(str(source), f"s3://{moto_bucket}/b.bin", part_size=5 * MiB, endpoint="mem")
    for handle in (to_seaweed, to_moto):
        stack.wait_status(handle.upload_id, lambda s: s.state in {"completed", "failed"}, 120, "the upload to finish")
        assert stack.uploader.status(handle.upload_id).state == "completed", stack.uploader.status(handle.upload_id)
    assert stack.object_sha256(seaweed_bucket, "a.bin") == sha256_file(source)
    got = moto_s3.get_object(Bucket=moto_bucket, Key="b.bin")["Body"].read()
    import hashlib

    assert hashlib.sha256(got).hexdigest() == sha256_file(source)
    # Each went to its own server only.
    assert "Contents" not in moto_s3.list_objects_v2(Bucket=moto_bucket, Prefix="a.bin")
    with pytest.raises(ClientError, match="404"):
        stack.s3.head_object(Bucket=seaweed_bucket, Key="b.bin")
    assert object_store(stack.settings, "mem") is not object_store(stack.settings, None)


def test_unknown_endpoint_is_refused_at_submit(stack: Stack) -> None:
    stack.start_worker("any", concurrency=2)
    bucket = stack.new_bucket()
    source = stack.make_file(6 * MiB)
    handle = stack.uploader.submit(str(source), f"s3://{bucket}/x.bin", endpoint="nowhere")
    status = stack.wait_status(handle.upload_id, lambda s: s.state not in {"pending", "queued"}, 60, "a verdict")
    assert status.state == "refused", status
    assert "unknown endpoint 'nowhere'" in (status.error or ""), status
    assert stack.open_multipart_uploads(bucket) == []


# -- storage classes in the provider's terms ---------------------------------------------------------
def test_storage_class_goes_on_the_wire_in_the_providers_terms(make_stack, proxy: FaultProxy) -> None:  # type: ignore[no-untyped-def]
    """OSS names its storage classes itself (its profile maps STANDARD_IA to IA): a request's
    ``storage_class`` goes out mapped on CreateMultipartUpload, and not on the parts, while the
    record keeps the request's name."""
    stack: Stack = make_stack(UPLOADER_S3_PROFILE="oss", UPLOADER_S3_ADDRESSING_STYLE="path")
    stack.start_worker("oss-classes", concurrency=2, UPLOADER_S3_ENDPOINT_URL=proxy.url)
    bucket = stack.new_bucket()
    big = stack.make_file(2 * 5 * MiB + 1)
    handle = stack.uploader.submit(str(big), f"s3://{bucket}/big.bin", part_size=5 * MiB, storage_class="STANDARD_IA")
    status = handle.wait(timeout=120)
    assert status.state == "completed", status
    record = stack.uploader.checkpoint.get(handle.upload_id)
    assert record is not None and record.options.storage_class is not None
    assert record.options.storage_class.value == "STANDARD_IA"
    creates = [h for m, p, h in proxy.requests if m == "POST" and p.endswith("/big.bin?uploads")]
    assert [h.get("x-amz-storage-class") for h in creates] == ["IA"], creates
    parts = [h for m, p, h in proxy.requests if "big.bin?" in p and "partNumber=" in p]
    assert len(parts) == 3 and all("x-amz-storage-class" not in h for h in parts)


@pytest.mark.parametrize("name, sent", [(ProfileName.OSS, "IA"), (ProfileName.SEAWEEDFS, "STANDARD_IA")])
def test_put_object_sends_the_profiles_storage_class(name: ProfileName, sent: str, seaweed: SeaweedS3, aws_env: None) -> None:
    """PutObject too: OSS's name under ``oss`` (SeaweedFS knows no ``IA`` and refuses it, which
    the recorded header already shows), the request's own under a profile without a mapping."""
    proxy = FaultProxy(seaweed.endpoint_url)
    try:
        store = ObjectStore(Settings(s3_endpoint_url=proxy.url, s3_profile=name, s3_addressing_style="path"))
        bucket = f"cls-{uuid.uuid4().hex[:8]}"
        s3_client(seaweed.endpoint_url).create_bucket(Bucket=bucket)
        try:
            store.put_object(bucket, "o", b"x" * 10, options=ObjectOptions(storage_class=StorageClass.STANDARD_IA))
        except PermanentStoreError as exc:
            assert name is ProfileName.OSS and error_code(exc) == "InvalidStorageClass", exc
    finally:
        proxy.close()
    assert [h.get("x-amz-storage-class") for m, p, h in proxy.requests if m == "PUT" and p.endswith("/o")] == [sent]


def test_the_result_names_a_mapped_storage_class_as_the_request_does() -> None:
    """OSS answers HeadObject with its own class names (IA); the upload's result says STANDARD_IA,
    the name the request used and the README documents."""
    from types import SimpleNamespace

    from uploader.completion import result_fields
    from uploader.model import ObjectOptions

    record = SimpleNamespace(options=ObjectOptions(storage_class="STANDARD_IA"))
    oss = PROFILES[ProfileName.OSS].storage_classes
    assert result_fields(record, {}, "IA", oss)["storage_class"] == "STANDARD_IA"  # type: ignore[arg-type]
    assert result_fields(record, {"VersionId": "v1"}, "", oss) == {"version_id": "v1", "storage_class": "STANDARD_IA"}  # type: ignore[arg-type]
    assert result_fields(record, {}, "GLACIER_IR", None)["storage_class"] == "GLACIER_IR"  # type: ignore[arg-type]
