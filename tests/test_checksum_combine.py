"""The whole-object checksum from part checksums: combine of a split == checksum of the whole,
against independent computations (zlib, hashlib, liblzma through :mod:`lzma`, published check
values)."""

from __future__ import annotations

import base64
import hashlib
import lzma
import zlib
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uploader.checksums import (
    ChecksumAlgorithm,
    ChecksumType,
    check_oss_crc64ecma,
    checksum_b64,
    checksums_b64,
    combine_crc,
    composite_checksum,
    crc64ecma,
    crc64ecma_combine,
    expected_object_checksum,
)
from uploader.errors import InvalidRequest
from uploader.request import parse_request

PROPS = settings(max_examples=150, deadline=None)
CRCS = [ChecksumAlgorithm.CRC32, ChecksumAlgorithm.CRC32C, ChecksumAlgorithm.CRC64NVME]

#: The CRC catalogue's check values (CRC over b"123456789"): CRC-32/ISO-HDLC, CRC-32/ISCSI,
#: CRC-64/NVME.
CHECK_VALUES = {
    ChecksumAlgorithm.CRC32: 0xCBF43926,
    ChecksumAlgorithm.CRC32C: 0xE3069283,
    ChecksumAlgorithm.CRC64NVME: 0xAE8B14860A799888,
}


def _int(b64: str) -> int:
    return int.from_bytes(base64.b64decode(b64), "big")


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in pairwise(bounds)]


@pytest.mark.parametrize("algorithm", CRCS)
def test_crc_check_values(algorithm: ChecksumAlgorithm) -> None:
    assert _int(checksum_b64(algorithm, b"123456789")) == CHECK_VALUES[algorithm]


def test_crc32_is_zlibs_and_hashes_are_hashlibs() -> None:
    data = bytes(range(256)) * 3
    assert _int(checksum_b64(ChecksumAlgorithm.CRC32, data)) == zlib.crc32(data)
    for algorithm, name in [("SHA1", "sha1"), ("SHA256", "sha256"), ("MD5", "md5")]:
        assert base64.b64decode(checksum_b64(ChecksumAlgorithm(algorithm), data)) == hashlib.new(name, data).digest()


@PROPS
@given(data=st.binary(max_size=5000), cuts=st.lists(st.integers(0, 5000), max_size=8), algorithm=st.sampled_from(CRCS))
def test_combine_of_split_is_checksum_of_whole(data: bytes, cuts: list[int], algorithm: ChecksumAlgorithm) -> None:
    pieces = split(data, cuts)
    combined = combine_crc(algorithm, [(checksum_b64(algorithm, p), len(p)) for p in pieces])
    assert combined == checksum_b64(algorithm, data)
    if algorithm is ChecksumAlgorithm.CRC32:
        assert _int(combined) == zlib.crc32(data)
    assert expected_object_checksum(algorithm, ChecksumType.FULL_OBJECT, [(checksum_b64(algorithm, p), len(p)) for p in pieces]).value == combined


@PROPS
@given(data=st.binary(max_size=3000), cuts=st.lists(st.integers(0, 3000), max_size=6),
       algorithm=st.sampled_from(list(ChecksumAlgorithm)))
def test_chunked_checksums_equal_whole(data: bytes, cuts: list[int], algorithm: ChecksumAlgorithm) -> None:
    assert checksums_b64(split(data, cuts), (algorithm, "md5")) == (checksum_b64(algorithm, data), checksum_b64("md5", data))


def test_composite_is_checksum_of_part_checksums_suffixed() -> None:
    parts = [b"a" * 100, b"b" * 7]
    raw = [hashlib.sha256(p).digest() for p in parts]
    expected = base64.b64encode(hashlib.sha256(b"".join(raw)).digest()).decode() + "-2"
    assert composite_checksum(ChecksumAlgorithm.SHA256, [base64.b64encode(r).decode() for r in raw]) == expected


def test_sha_does_not_combine() -> None:
    with pytest.raises(ValueError, match="do not combine"):
        combine_crc(ChecksumAlgorithm.SHA256, [("AAAA", 1)])


def test_request_checksum_algorithm_validated() -> None:
    ok = parse_request({"source": "/a", "bucket": "bkt", "key": "k", "checksum_algorithm": "crc64nvme"})
    assert ok.checksum_algorithm == "CRC64NVME"
    with pytest.raises(InvalidRequest, match="unknown checksum algorithm 'adler32'; choose one of CRC32, CRC32C"):
        parse_request({"source": "/a", "bucket": "bkt", "key": "k", "checksum_algorithm": "adler32"})


# -- Alibaba OSS: CRC-64/ECMA (CRC-64/XZ) ---------------------------------------------------------------
def lzma_crc64(data: bytes) -> int:
    """CRC-64 of ``data`` as liblzma computes it for an .xz block check (CHECK_CRC64): an
    implementation independent of the one under test. The check is the 8 little-endian bytes
    before the index, whose size the stream footer gives."""
    if not data:
        return 0  # an empty .xz stream has no block, hence no check; CRC-64/XZ of b"" is 0
    xz = lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64)
    backward_size = (int.from_bytes(xz[-8:-4], "little") + 1) * 4
    index = len(xz) - 12 - backward_size
    return int.from_bytes(xz[index - 8 : index], "little")


def test_crc64ecma_check_value_and_liblzma() -> None:
    assert crc64ecma(b"123456789") == 0x995DC9BBDF1939FA == lzma_crc64(b"123456789")
    assert crc64ecma(b"") == 0


@PROPS
@given(data=st.binary(max_size=4000), cuts=st.lists(st.integers(0, 4000), max_size=8))
def test_crc64ecma_combine_of_split_is_liblzmas_crc_of_whole(data: bytes, cuts: list[int]) -> None:
    pieces = split(data, cuts)
    whole = lzma_crc64(data)
    assert crc64ecma_combine((lzma_crc64(p), len(p)) for p in pieces) == whole
    # As OSS sends them: decimal text per part and for the object.
    verdict = check_oss_crc64ecma(str(whole), [(str(lzma_crc64(p)), len(p)) for p in pieces])
    assert verdict.ok and verdict.reason == ""


def test_oss_crc64ecma_mismatch_names_both_values() -> None:
    parts = [(lzma_crc64(b"x" * 10), 10), (lzma_crc64(b"y" * 3), 3)]
    tampered = lzma_crc64(b"x" * 9 + b"z" + b"y" * 3)
    verdict = check_oss_crc64ecma(str(tampered), parts)
    assert not verdict.ok
    assert str(tampered) in verdict.reason and str(lzma_crc64(b"x" * 10 + b"y" * 3)) in verdict.reason
