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
