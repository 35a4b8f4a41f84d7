"""Unit and property tests for uploader.checksums, against independent computations."""

from __future__ import annotations

import base64
import hashlib
import struct
import zlib

from hypothesis import given, settings
from hypothesis import strategies as st

from uploader.checksums import composite_crc32, crc32_b64, md5_b64, md5_b64_to_etag, multipart_etag

PROPS = settings(max_examples=100, deadline=None)


def reference_crc32(data: bytes) -> int:
    """Bitwise CRC-32 (IEEE 802.3, reflected poly 0xEDB88320), independent of zlib."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0xEDB88320 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_reference_crc32_check_value() -> None:
    # The standard CRC-32 check value, so the oracle itself is trustworthy.
    assert reference_crc32(b"123456789") == 0xCBF43926


def test_crc32_known_value() -> None:
    assert crc32_b64(b"123456789") == base64.b64encode(bytes.fromhex("cbf43926")).decode()
    assert crc32_b64(b"") == "AAAAAA=="


@PROPS
@given(data=st.binary(max_size=2048))
def test_crc32_b64_is_big_endian_crc32(data: bytes) -> None:
    value = crc32_b64(data)
    raw = base64.b64decode(value, validate=True)
    assert len(raw) == 4
    assert struct.unpack(">I", raw)[0] == reference_crc32(data)
    assert value == base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode("ascii")


@PROPS
@given(data=st.binary(max_size=4096))
def test_crc32_b64_matches_botocore(data: bytes) -> None:
    from botocore.httpchecksum import Crc32Checksum

    checksum = Crc32Checksum()
    checksum.update(data)
    assert crc32_b64(data) == checksum.b64digest()


def test_md5_known_value() -> None:
    # Content-MD5 of the empty body, as documented widely (d41d8cd98f00b204e9800998ecf8427e).
    assert md5_b64(b"") == "1B2M2Y8AsgTpgAmY7PhCfg=="


@PROPS
@given(data=st.binary(max_size=4096))
def test_md5_b64_is_base64_md5(data: bytes) -> None:
    value = md5_b64(data)
    assert base64.b64decode(value, validate=True) == hashlib.md5(data).digest()
    assert value == base64.b64encode(hashlib.md5(data).digest()).decode("ascii")


@PROPS
@given(data=st.binary(max_size=4096))
def test_md5_b64_to_etag(data: bytes) -> None:
    assert md5_b64_to_etag(md5_b64(data)) == '"' + hashlib.md5(data).hexdigest() + '"'


def s3_multipart_etag(parts: list[bytes]) -> str:
    """S3's rule, computed from the part bodies: md5 of the concatenated binary part MD5s, "-N"."""
    joined = b"".join(hashlib.md5(p).digest() for p in parts)
    return f'"{hashlib.md5(joined).hexdigest()}-{len(parts)}"'


@PROPS
@given(parts=st.lists(st.binary(max_size=512), min_size=1, max_size=20), quoted=st.booleans())
def test_multipart_etag_matches_s3_rule(parts: list[bytes], quoted: bool) -> None:
    etags = [hashlib.md5(p).hexdigest() for p in parts]
    if quoted:
        etags = [f'"{e}"' for e in etags]
    assert multipart_etag(etags) == s3_multipart_etag(parts)
    # consumes any iterable, e.g. a generator, once
    assert multipart_etag(e for e in etags) == s3_multipart_etag(parts)


def test_multipart_etag_single_part_differs_from_plain_etag() -> None:
    body = b"hello"
    plain = '"' + hashlib.md5(body).hexdigest() + '"'
    combined = multipart_etag([plain])
    assert combined.endswith('-1"')
    assert combined != plain
    assert combined == s3_multipart_etag([body])


def test_multipart_etag_depends_on_part_order() -> None:
    etags = [hashlib.md5(b"a").hexdigest(), hashlib.md5(b"b").hexdigest()]
    assert multipart_etag(etags) != multipart_etag(list(reversed(etags)))


def s3_composite_crc32(parts: list[bytes]) -> str:
    joined = b"".join(struct.pack(">I", reference_crc32(p)) for p in parts)
    return base64.b64encode(struct.pack(">I", reference_crc32(joined))).decode() + f"-{len(parts)}"


@PROPS
@given(parts=st.lists(st.binary(max_size=256), min_size=1, max_size=20))
def test_composite_crc32_matches_s3_rule(parts: list[bytes]) -> None:
    assert composite_crc32([crc32_b64(p) for p in parts]) == s3_composite_crc32(parts)


def test_composite_crc32_is_not_whole_object_crc() -> None:
    parts = [b"a" * 10, b"b" * 10]
    assert composite_crc32([crc32_b64(p) for p in parts]) != crc32_b64(b"".join(parts)) + "-2"
