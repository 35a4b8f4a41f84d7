"""End-to-end uploads through real workers: every size class, metadata, and both S3 servers."""

from __future__ import annotations

import pytest

from tests.conftest import Stack, sha256_file
from uploader.planner import MiB

SIZES = {
    "zero-bytes": 0,
    "single-put": 1234,
    "just-below-threshold": 8 * MiB - 1,
    "exact-multiple": 3 * 5 * MiB,
    "part-plus-one": 5 * MiB + 1,
}


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_upload_sizes_round_trip(stack: Stack, size: int) -> None:
    bucket = stack.new_bucket()
    path = stack.make_file(size)
    part_size = 5 * MiB if size >= 8 * MiB or size == 5 * MiB + 1 else None
    handle = stack.uploader.submit(str(path), f"s3://{bucket}/obj", part_size=part_size)
    status = handle.wait(timeout=120)
    assert status.state == "completed"
    assert status.bytes_done == size
    assert stack.object_sha256(bucket, "obj") == sha256_file(path)
    assert stack.open_multipart_uploads(bucket) == []
    head = stack.s3.head_object(Bucket=bucket, Key="obj")
    assert head["ContentLength"] == size
    assert status.final_etag == head["ETag"]


def test_hundred_parts_with_metadata_and_content_type(stack: Stack) -> None:
    bucket = stack.new_bucket()
    path = stack.make_file(101 * 5 * MiB + 17)
    metadata = {"team": "ingest", "origin-host": "db-7"}
    handle = stack.uploader.submit(
        str(path), f"s3://{bucket}/big/object.bin", part_size=5 * MiB, metadata=metadata, content_type="application/x-tar"
    )
    status = handle.wait(timeout=300)
    assert (status.state, status.part_count, status.parts_done) == ("completed", 102, 102)
    head = stack.s3.head_object(Bucket=bucket, Key="big/object.bin")
    assert head["Metadata"] == metadata
    assert head["ContentType"] == "application/x-tar"
    assert head["ETag"].endswith('-102"')
    assert status.verified == "size+multipart-etag"
    assert stack.object_sha256(bucket, "big/object.bin") == sha256_file(path)
    assert stack.open_multipart_uploads(bucket) == []


def test_single_put_keeps_metadata_and_content_type(stack: Stack) -> None:
    bucket = stack.new_bucket()
    path = stack.make_file(4096)
    handle = stack.uploader.submit(str(path), f"s3://{bucket}/small.json", metadata={"k": "v"}, content_type="application/json")
    handle.wait(timeout=60)
    head = stack.s3.head_object(Bucket=bucket, Key="small.json")
    assert (head["Metadata"], head["ContentType"]) == ({"k": "v"}, "application/json")
    assert stack.object_sha256(bucket, "small.json") == sha256_file(path)


@pytest.mark.parametrize("size", [0, 3000, 3 * 5 * MiB + 1], ids=["zero", "single", "multipart"])
def test_moto_server_as_second_implementation(make_stack, size: int) -> None:  # type: ignore[no-untyped-def]
    stack = make_stack(s3="moto")
    stack.start_worker("moto", concurrency=4)
    bucket = stack.new_bucket()
    path = stack.make_file(size)
    status = stack.uploader.submit(str(path), f"s3://{bucket}/o", part_size=5 * MiB).wait(timeout=120)
    assert status.state == "completed"
    assert stack.object_sha256(bucket, "o") == sha256_file(path)
    assert stack.open_multipart_uploads(bucket) == []
