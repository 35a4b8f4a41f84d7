"""Whole-object integrity end to end: each checksum algorithm through real workers against
SeaweedFS and moto, the stored object's checksum read back with HeadObject
(``ChecksumMode=ENABLED``), and a tampered part failing verification.

What the servers implement (probed with boto3, recorded in the README):

* SeaweedFS: CRC32, CRC32C, CRC64NVME part headers verified (BadDigest); ``FULL_OBJECT`` for the
  three CRCs, the combined value verified on Complete (BadDigest when wrong); COMPOSITE for
  CRC32/CRC32C/SHA1/SHA256 (``-N`` suffixed); CRC64NVME refused as COMPOSITE (as on AWS);
  GetObjectAttributes does not return ``Checksum``.
* moto: stores what it is told and verifies nothing (wrong part checksums and a wrong
  FULL_OBJECT value are accepted); reports CRC32 and CRC64NVME FULL_OBJECT values correctly but
  a CRC32 where CRC32C was asked; composite values without the ``-N`` suffix.
"""

from __future__ import annotations

import base64
import hashlib
import zlib
from pathlib import Path

import pytest
from awscrt import checksums as crt

from tests.conftest import Stack, sha256_file
from tests.faultproxy import FaultProxy
from uploader.planner import MiB

SIZE = 2 * 5 * MiB + 12345
PART = 5 * MiB


def whole_crc(algorithm: str, path: Path) -> str:
    """The CRC of the file read whole (not combined from parts)."""
    data = path.read_bytes()
    value, width = {
        "CRC32": (zlib.crc32(data), 4),
        "CRC32C": (crt.crc32c(data), 4),
        "CRC64NVME": (crt.crc64nvme(data), 8),
    }[algorithm]
    return base64.b64encode(value.to_bytes(width, "big")).decode()


def composite(algorithm: str, path: Path, part_size: int) -> str:
    data = path.read_bytes()
    parts = [data[i : i + part_size] for i in range(0, len(data), part_size)]
    name = algorithm.lower()
    raw = b"".join(hashlib.new(name, p).digest() for p in parts)
    return base64.b64encode(hashlib.new(name, raw).digest()).decode() + f"-{len(parts)}"


def upload(stack: Stack, path: Path, algorithm: str, part_size: int | None = PART):  # type: ignore[no-untyped-def]
    bucket = stack.new_bucket()
    handle = stack.uploader.submit(str(path), f"s3://{bucket}/obj", part_size=part_size, checksum_algorithm=algorithm)
    return bucket, _wait(stack, handle)




def _wait(stack: Stack, handle):  # type: ignore[no-untyped-def]
    return stack.wait_status(handle.upload_id, lambda s: s.terminal, 180, "the upload to finish")


@pytest.mark.parametrize("server", ["seaweed", "moto"])
@pytest.mark.parametrize("algorithm", ["CRC32", "CRC32C", "CRC64NVME"])
def test_crc_full_object_checksum(make_stack, server: str, algorithm: str) -> None:  # type: ignore[no-untyped-def]
    if server == "moto" and algorithm == "CRC32C":
        pytest.skip("moto reports a CRC32 as the FULL_OBJECT CRC32C (see test_moto_wrong_crc32c_is_caught)")
    stack = make_stack(s3=server)
    stack.start_worker(server, concurrency=3)
    path = stack.make_file(SIZE)
    bucket, status = upload(stack, path, algorithm)
    assert status.state == "completed", status.error
    expected = whole_crc(algorithm, path)
    assert (status.checksum_algorithm, status.checksum_type, status.checksum) == (algorithm, "FULL_OBJECT", expected)
    head = stack.s3.head_object(Bucket=bucket, Key="obj", ChecksumMode="ENABLED")
    assert head[f"Checksum{algorithm}"] == expected
    assert head.get("ChecksumType") == "FULL_OBJECT"
    attributes = stack.s3.get_object_attributes(
        Bucket=bucket, Key="obj", ObjectAttributes=["Checksum", "ObjectSize", "ETag"]
    )
    assert attributes["ObjectSize"] == SIZE and attributes["ETag"].strip('"') == status.final_etag.strip('"')
    if server == "moto":  # SeaweedFS's GetObjectAttributes leaves the checksum out
        assert attributes["Checksum"] == {f"Checksum{algorithm}": expected, "ChecksumType": "FULL_OBJECT"}
    assert stack.object_sha256(bucket, "obj") == sha256_file(path)


@pytest.mark.parametrize("server", ["seaweed", "moto"])
@pytest.mark.parametrize("algorithm", ["SHA1", "SHA256"])
def test_sha_composite_checksum(make_stack, server: str, algorithm: str) -> None:  # type: ignore[no-untyped-def]
    stack = make_stack(s3=server)
    stack.start_worker(server, concurrency=3)
    path = stack.make_file(SIZE)
    bucket, status = upload(stack, path, algorithm)
    assert status.state == "completed", status.error
    expected = composite(algorithm, path, PART)
    assert (status.checksum_algorithm, status.checksum_type, status.checksum) == (algorithm, "COMPOSITE", expected)
    head = stack.s3.head_object(Bucket=bucket, Key="obj", ChecksumMode="ENABLED")
    # moto leaves out the -N suffix
    assert head[f"Checksum{algorithm}"] in (expected, expected.split("-")[0])


@pytest.mark.parametrize("server", ["seaweed", "moto"])
def test_crc32_composite_when_full_object_is_off(make_stack, server: str) -> None:  # type: ignore[no-untyped-def]
    stack = make_stack(s3=server, UPLOADER_FULL_OBJECT_CHECKSUM="false")
    stack.start_worker(server, concurrency=3)
    path = stack.make_file(SIZE)
    bucket, status = upload(stack, path, "CRC32")
    assert status.state == "completed", status.error
    data = path.read_bytes()
    raw = b"".join(zlib.crc32(data[i : i + PART]).to_bytes(4, "big") for i in range(0, SIZE, PART))
    expected = base64.b64encode(zlib.crc32(raw).to_bytes(4, "big")).decode() + "-3"
    assert (status.checksum_type, status.checksum) == ("COMPOSITE", expected)
    head = stack.s3.head_object(Bucket=bucket, Key="obj", ChecksumMode="ENABLED")
    assert head["ChecksumCRC32"] in (expected, expected.split("-")[0])


@pytest.mark.parametrize("algorithm", ["CRC32C", "SHA256"])
def test_single_put_carries_the_checksum(make_stack, algorithm: str) -> None:  # type: ignore[no-untyped-def]
    stack = make_stack(s3="seaweed")
    stack.start_worker("single", concurrency=2)
    path = stack.make_file(3000)
    bucket, status = upload(stack, path, algorithm, part_size=None)
    assert status.state == "completed", status.error
    data = path.read_bytes()
    expected = (
        whole_crc(algorithm, path) if algorithm == "CRC32C" else base64.b64encode(hashlib.sha256(data).digest()).decode()
    )
    assert (status.checksum, status.checksum_type) == (expected, "FULL_OBJECT")
    head = stack.s3.head_object(Bucket=bucket, Key="obj", ChecksumMode="ENABLED")
    assert head[f"Checksum{algorithm}"] == expected


def test_md5_keeps_the_multipart_etag_check(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack = make_stack(s3="seaweed")
    stack.start_worker("md5", concurrency=3)
    path = stack.make_file(SIZE)
    bucket, status = upload(stack, path, "MD5")
    assert status.state == "completed", status.error
    assert status.checksum_algorithm == "MD5" and status.checksum == "" and "multipart-etag" in status.verified


def test_moto_wrong_crc32c_is_caught(make_stack) -> None:  # type: ignore[no-untyped-def]
    """moto stores a CRC32 as the object's FULL_OBJECT CRC32C: the comparison with the combined
    part CRC32Cs catches a server reporting another checksum, and fails the upload saying so."""
    stack = make_stack(s3="moto")
    stack.start_worker("moto", concurrency=3)
    path = stack.make_file(SIZE)
    bucket, status = upload(stack, path, "CRC32C")
    head = stack.s3.head_object(Bucket=bucket, Key="obj", ChecksumMode="ENABLED")
    if head.get("ChecksumCRC32C") == whole_crc("CRC32C", path):
        pytest.skip("this moto reports the right CRC32C: nothing wrong to catch")
    assert status.state == "failed"
    assert "verification failed: stored CRC32C checksum" in status.error
    assert whole_crc("CRC32C", path) in status.error


@pytest.mark.parametrize("algorithm", ["CRC32", "CRC64NVME"])
def test_part_tampered_in_transit_fails_verification(make_stack, moto, algorithm: str) -> None:  # type: ignore[no-untyped-def]
    """A part damaged on its way to a server that checks no part checksum (moto) is stored as
    damaged, with a matching ETag: today's multipart-ETag check passes it. The whole-object
    checksum the server reports no longer matches the combined CRCs of what was read."""
    stack = make_stack(s3="moto")
    proxy = FaultProxy(
        moto.endpoint_url, fault="corrupt", rate=1.0,
        targets=lambda method, path: method == "PUT" and "partNumber=2&" in path + "&",
    )
    try:
        stack.start_worker("tampered", concurrency=3, UPLOADER_S3_ENDPOINT_URL=proxy.url)
        path = stack.make_file(SIZE)
        bucket, status = upload(stack, path, algorithm)
        assert proxy.counts["injected-corrupt"] >= 1
        assert status.state == "failed"
        assert f"verification failed: stored {algorithm} checksum" in status.error
        assert whole_crc(algorithm, path) in status.error
    finally:
        proxy.close()


def test_seaweed_refuses_a_wrong_whole_object_checksum(make_stack, proxy: FaultProxy) -> None:  # type: ignore[no-untyped-def]
    """A part damaged in transit to SeaweedFS is refused by its part checksum (BadDigest) and
    sent again; the object completes with the whole-object checksum the server verified."""
    stack = make_stack(s3="seaweed")
    proxy.fault, proxy.rate = "corrupt", 0.5
    stack.start_worker("flaky", concurrency=3, UPLOADER_S3_ENDPOINT_URL=proxy.url)
    path = stack.make_file(SIZE)
    bucket, status = upload(stack, path, "CRC32C")
    assert proxy.counts["injected-corrupt"] >= 1
    assert status.state == "completed", status.error
    assert status.checksum == whole_crc("CRC32C", path)
    assert stack.object_sha256(bucket, "obj") == sha256_file(path)
