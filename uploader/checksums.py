"""Integrity values S3 servers compute and verify. Pure functions.

One checksum per part is computed, in one pass over the part's buffer (or, for a part larger
than a worker buffers, over its chunks: :func:`checksums_b64`), and sent for the server to
verify as a precomputed header (``x-amz-checksum-*`` or ``Content-MD5``, never an aws-chunked
trailer). The part checksums then make the whole object's without reading the file again:

* CRC32, CRC32C and CRC64NVME *combine* (:func:`full_object_checksum`): the CRC of the
  concatenation from each part's CRC and length (awscrt's ``combine_*``, the same arithmetic as
  zlib's ``crc32_combine``). Sent on CompleteMultipartUpload with ``ChecksumType=FULL_OBJECT``,
  the server verifies the whole object against it.
* Any algorithm has a *composite* value (:func:`composite_checksum`): the checksum of the
  concatenated binary part checksums, suffixed ``-N``, which is what S3 reports for a multipart
  object created without ``FULL_OBJECT`` (and the only kind SHA1 and SHA256 have).
* Alibaba OSS reports a CRC-64/ECMA (CRC-64/XZ) per part and for the object
  (``x-oss-hash-crc64ecma``): :func:`crc64ecma_combine` and :func:`check_oss_crc64ecma`.

A single-part object and the multipart ETag (``md5(concat(part md5s))-N``) are checked as before.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import anycrc

Buffer = bytes | bytearray | memoryview


class ChecksumAlgorithm(enum.StrEnum):
    """The per-part checksum an upload sends (the request's ``checksum_algorithm``)."""

    CRC32 = "CRC32"
    CRC32C = "CRC32C"
    CRC64NVME = "CRC64NVME"
    SHA1 = "SHA1"
    SHA256 = "SHA256"
    #: ``Content-MD5``: accepted by every S3 dialect; its hex form is the part's ETag.
    MD5 = "MD5"

    @classmethod
    def parse(cls, value: str | ChecksumAlgorithm) -> ChecksumAlgorithm:
        """``value`` in any case (``crc32`` as the ``UPLOADER_PART_CHECKSUM`` setting spells it).
        Raises ``ValueError`` naming the choices."""
        try:
            return cls(str(value).upper())
        except ValueError:
            choices = ", ".join(a.value for a in cls)
            raise ValueError(f"unknown checksum algorithm {str(value)[:32]!r}; choose one of {choices}") from None

    @property
    def combinable(self) -> bool:
        """Whether part checksums combine into the whole object's (a CRC)."""
        return self in _COMBINE

    @property
    def request_field(self) -> str:
        """The boto3 parameter carrying a precomputed value: ``ChecksumCRC32``..., ``ContentMD5``."""
        return "ContentMD5" if self is ChecksumAlgorithm.MD5 else f"Checksum{self.value}"


class ChecksumType(enum.StrEnum):
    """How a multipart object's checksum covers it (S3's ``ChecksumType``)."""

    #: The checksum of the whole object's bytes: the combined part CRCs.
    FULL_OBJECT = "FULL_OBJECT"
    #: The checksum of the concatenated part checksums, ``-N`` suffixed.
    COMPOSITE = "COMPOSITE"


#: Legacy spelling, kept for callers that pass ``"crc32"``/``"md5"``; and ``"crc64ecma"``, which is
#: never sent as a request checksum: it is computed alongside the part checksum, in the same pass,
#: to check what Alibaba OSS reports (``x-oss-hash-crc64ecma``).
Algorithm = ChecksumAlgorithm | Literal["crc32", "md5", "crc64ecma"]

#: The :data:`Algorithm` name of OSS's CRC-64/ECMA (see :func:`crc64ecma`).
CRC64ECMA: Literal["crc64ecma"] = "crc64ecma"

def _crt(name: str) -> Callable[..., int]:
    """awscrt's ``checksums.<name>``, imported at its first call (a client that never computes
    a CRC32C does not load the CRT)."""

    def call(*args: Any) -> int:
        from awscrt import checksums

        return int(getattr(checksums, name)(*args))

    call.__name__ = name
    return call


_WIDTH = {ChecksumAlgorithm.CRC32: 4, ChecksumAlgorithm.CRC32C: 4, ChecksumAlgorithm.CRC64NVME: 8}
_CRC: dict[ChecksumAlgorithm, Callable[[Buffer, int], int]] = {
    ChecksumAlgorithm.CRC32: zlib.crc32,
    ChecksumAlgorithm.CRC32C: _crt("crc32c"),
    ChecksumAlgorithm.CRC64NVME: _crt("crc64nvme"),
}
_COMBINE: dict[ChecksumAlgorithm, Callable[[int, int, int], int]] = {
    ChecksumAlgorithm.CRC32: _crt("combine_crc32"),
    ChecksumAlgorithm.CRC32C: _crt("combine_crc32c"),
    ChecksumAlgorithm.CRC64NVME: _crt("combine_crc64nvme"),
}
_HASH = {ChecksumAlgorithm.SHA1: "sha1", ChecksumAlgorithm.SHA256: "sha256", ChecksumAlgorithm.MD5: "md5"}


class _Crc:
    def __init__(self, algorithm: ChecksumAlgorithm) -> None:
        self._fn, self._width, self._value = _CRC[algorithm], _WIDTH[algorithm], 0

    def update(self, data: Buffer) -> None:
        self._value = self._fn(data, self._value)

    def digest(self) -> bytes:
        return self._value.to_bytes(self._width, "big")


class _Crc64Ecma:
    def __init__(self) -> None:
        self._value = 0

    def update(self, data: Buffer) -> None:
        self._value = int(_CRC64ECMA.calc(data, self._value))

    def digest(self) -> bytes:
        return self._value.to_bytes(8, "big")


def _hasher(algorithm: Algorithm) -> Any:
    if algorithm == CRC64ECMA:
        return _Crc64Ecma()
    algorithm = ChecksumAlgorithm.parse(algorithm)
    return _Crc(algorithm) if algorithm in _CRC else hashlib.new(_HASH[algorithm])


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def crc32_b64(data: Buffer) -> str:
    """Base64 of the big-endian CRC32 of ``data``: the ``x-amz-checksum-crc32`` header value."""
    return _b64(zlib.crc32(data).to_bytes(4, "big"))


def md5_b64(data: Buffer) -> str:
    """Base64 of the MD5 of ``data``: the ``Content-MD5`` header value."""
    return _b64(hashlib.md5(data).digest())


def checksum_b64(algorithm: Algorithm, data: Buffer) -> str:
    """The header value of ``algorithm`` over ``data``, in one pass."""
    return checksums_b64((data,), (algorithm,))[0]


def checksums_b64(chunks: Iterable[Buffer], algorithms: Sequence[Algorithm]) -> tuple[str, ...]:
    """The header values of each of ``algorithms`` over the concatenation of ``chunks``, in one
    pass over them: equal to :func:`checksum_b64` of the whole, for any split into chunks. Lets a
    part larger than the memory a worker allows for it be checksummed a chunk at a time (each
    chunk may reuse the previous one's buffer: it is consumed before the next is asked for)."""
    states = [_hasher(a) for a in algorithms]
    for chunk in chunks:
        for state in states:
            state.update(chunk)
    return tuple(_b64(state.digest()) for state in states)


def combine_crc(algorithm: ChecksumAlgorithm, parts: Iterable[tuple[str, int]]) -> str:
    """The ``algorithm`` CRC (base64) of the concatenation of parts given as
    ``(base64 CRC, length)`` in order. Raises ``ValueError`` for a non-CRC algorithm."""
    combine = _COMBINE.get(algorithm)
    if combine is None:
        raise ValueError(f"{algorithm} checksums do not combine; use a composite checksum")
    value = 0  # the CRC of no bytes, for all three
    for encoded, length in parts:
        value = combine(value, int.from_bytes(base64.b64decode(encoded), "big"), length)
    return _b64(value.to_bytes(_WIDTH[algorithm], "big"))


def composite_checksum(algorithm: ChecksumAlgorithm, part_checksums: Iterable[str]) -> str:
    """What S3 reports as the checksum of a multipart object whose parts had these checksums
    (base64, in order) when it is not FULL_OBJECT: ``algorithm`` over the concatenated binary
    part checksums, suffixed ``-N``."""
    raw = [base64.b64decode(c) for c in part_checksums]
    return f"{checksum_b64(algorithm, b''.join(raw))}-{len(raw)}"


def composite_crc32(part_checksums: Iterable[str]) -> str:
    """:func:`composite_checksum` for CRC32."""
    return composite_checksum(ChecksumAlgorithm.CRC32, part_checksums)


@dataclass(frozen=True)
class ObjectChecksum:
    """A whole object's checksum as S3 reports it: ``value`` (base64, ``-N`` suffixed when
    composite) of ``algorithm``, of ``type``."""

    algorithm: ChecksumAlgorithm
    type: ChecksumType
    value: str


def expected_object_checksum(
    algorithm: ChecksumAlgorithm, checksum_type: ChecksumType, parts: Sequence[tuple[str, int]]
) -> ObjectChecksum:
    """The checksum the object made of ``parts`` (``(base64 part checksum, length)`` in order)
    has, of ``checksum_type``."""
    if checksum_type is ChecksumType.FULL_OBJECT:
        return ObjectChecksum(algorithm, checksum_type, combine_crc(algorithm, parts))
    return ObjectChecksum(algorithm, checksum_type, composite_checksum(algorithm, [c for c, _ in parts]))


def md5_b64_to_etag(value: str) -> str:
    """The quoted hex ETag S3 gives a single-part object whose Content-MD5 was ``value``."""
    return '"' + base64.b64decode(value).hex() + '"'


def multipart_etag(part_etags: Iterable[str]) -> str | None:
    """The ETag S3 gives an object completed from parts with these ETags (in part order):
    ``"md5(concat(binary part md5s))-N"``. A part ETag with a ``-N`` suffix counts as its hex
    digest (SeaweedFS answers UploadPartCopy so, and completes with the digests); None when a
    part ETag is not hex at all (nothing can be predicted)."""
    try:
        digests = [bytes.fromhex(etag.strip('"').split("-")[0]) for etag in part_etags]
    except ValueError:
        return None
    return f'"{hashlib.md5(b"".join(digests)).hexdigest()}-{len(digests)}"'


# -- Alibaba OSS: CRC-64/ECMA ----------------------------------------------------------------------
#: OSS's ``x-oss-hash-crc64ecma``: CRC-64/XZ (ECMA-182 polynomial, reflected, init and xorout
#: all ones; check value ``0x995DC9BBDF1939FA``), computed by anycrc (Mark Adler's crcany).
_CRC64ECMA = anycrc.Model("CRC64-XZ")


def crc64ecma(data: Buffer) -> int:
    """The CRC-64/ECMA of ``data`` (what OSS reports, as an integer)."""
    return int(_CRC64ECMA.calc(data))  # anycrc reads any buffer: no copy


def crc64ecma_text(header_value: str) -> str:
    """The decimal text OSS sends in ``x-oss-hash-crc64ecma`` for the CRC-64/ECMA whose header
    form (big-endian, base64, as :func:`checksums_b64` returns it for ``"crc64ecma"``) is
    ``header_value``."""
    return str(int.from_bytes(base64.b64decode(header_value), "big"))


def crc64ecma_combine(parts: Iterable[tuple[int, int]]) -> int:
    """The CRC-64/ECMA of the concatenation of parts given as ``(crc, length)`` in order."""
    value = 0
    for crc, length in parts:
        value = int(_CRC64ECMA.combine(value, crc, length))
    return value


@dataclass(frozen=True)
class Crc64Verdict:
    """``ok``, with ``expected`` (combined from the parts) and ``reported`` (the object's)."""

    ok: bool
    expected: int
    reported: int

    @property
    def reason(self) -> str:
        return "" if self.ok else (
            f"OSS x-oss-hash-crc64ecma {self.reported} != {self.expected} combined from the parts' CRC-64/ECMA"
        )


def check_oss_crc64ecma(object_crc: str | int, parts: Iterable[tuple[str | int, int]]) -> Crc64Verdict:
    """Check an OSS object's ``x-oss-hash-crc64ecma`` (decimal text, as OSS sends it) against
    the combine of its parts' (``(x-oss-hash-crc64ecma of the UploadPart answer, length)`` in
    part order). For the ``oss`` profile's completion check."""
    expected = crc64ecma_combine((int(crc), length) for crc, length in parts)
    reported = int(object_crc)
    return Crc64Verdict(reported == expected, expected, reported)
