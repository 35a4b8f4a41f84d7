"""Alibaba OSS's CRC-64/ECMA under the ``oss`` profile (issue 11), against SeaweedFS behind a
proxy that answers as OSS does (tests/osscrc64.py): each part's ``x-oss-hash-crc64ecma`` is
checked against the bytes sent (a mismatch sends the part again), and the object's against the
combined CRC-64/ECMA of the parts (a mismatch fails the upload, naming it). OSS is addressed
virtual-hosted; here path-style, as the profile lets an operator override."""

from __future__ import annotations

import pytest

from tests.conftest import Stack, sha256_file
from tests.faultproxy import FaultProxy
from tests.osscrc64 import OssCrc64
from uploader import UploadFailed
from uploader.checksums import crc64ecma
from uploader.planner import MiB

PART = 5 * MiB


def test_reported_crc64_verifies_parts_and_object(oss_stack: Stack, proxy: FaultProxy) -> None:
    proxy.add_headers = oss = OssCrc64()
    bucket = oss_stack.new_bucket()
    path = oss_stack.make_file(3 * PART + 12345)
    status = oss_stack.uploader.submit(str(path), f"s3://{bucket}/big.bin", part_size=PART).wait(timeout=120)
    assert status.state == "completed", status
    assert status.verified.endswith("+crc64ecma"), status
    assert status.crc64ecma == str(crc64ecma(path.read_bytes()))
    assert status.result is not None and status.result.crc64ecma == status.crc64ecma
    assert oss.part_requests == {1: 1, 2: 1, 3: 1, 4: 1}
    assert oss_stack.object_sha256(bucket, "big.bin") == sha256_file(path)
    # A single PutObject: its answer's CRC-64/ECMA is checked too.
    small = oss_stack.make_file(5000)
    status = oss_stack.uploader.submit(str(small), f"s3://{bucket}/small.bin").wait(timeout=60)
    assert status.state == "completed" and status.verified == "md5+crc64ecma", status
    assert status.crc64ecma == str(crc64ecma(small.read_bytes()))


def test_a_part_whose_reported_crc64_differs_is_sent_again(oss_stack: Stack, proxy: FaultProxy) -> None:
    proxy.add_headers = oss = OssCrc64(wrong_part=2)
    bucket = oss_stack.new_bucket()
    path = oss_stack.make_file(3 * PART + 7)
    status = oss_stack.uploader.submit(str(path), f"s3://{bucket}/resent.bin", part_size=PART).wait(timeout=120)
    assert status.state == "completed", status
    assert oss.wrong_reported == 1
    assert oss.part_requests == {1: 1, 2: 2, 3: 1, 4: 1}, "part 2, and only part 2, was sent again"
    assert status.verified.endswith("+crc64ecma") and status.crc64ecma == str(crc64ecma(path.read_bytes()))
    assert oss_stack.object_sha256(bucket, "resent.bin") == sha256_file(path)


def test_an_object_whose_reported_crc64_differs_fails_verification(oss_stack: Stack, proxy: FaultProxy) -> None:
    proxy.add_headers = OssCrc64(wrong_object=True)
    bucket = oss_stack.new_bucket()
    path = oss_stack.make_file(2 * PART + 99)
    handle = oss_stack.uploader.submit(str(path), f"s3://{bucket}/bad.bin", part_size=PART)
    with pytest.raises(UploadFailed):
        handle.wait(timeout=120)
    status = oss_stack.uploader.status(handle.upload_id)
    assert status.state == "failed", status
    assert "verification failed" in status.error and "x-oss-hash-crc64ecma" in status.error, status.error
    assert "CRC-64/ECMA" in status.error and status.crc64ecma == ""
