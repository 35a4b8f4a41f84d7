"""Integrity values S3 servers compute and verify. Pure functions.

One checksum per part is computed, in one pass over the part's buffer (or, for a part larger
than a worker buffers, over its chunks: :func:`checksums_b64`), and sent for the server to
verify; the completed object is then checked against the multipart ETag derived from the part
ETags the server acknowledged.
"""

from __future__ import annotations

import base64
import hashlib
import zlib
from collections.abc import Iterable, Sequence
from typing import Any, Literal

#: Per-part checksums this package sends: ``crc32`` (``x-amz-checksum-crc32``) or ``md5``
#: (``Content-MD5``; its hex form is the part's ETag on every S3 server).
Algorithm = Literal["crc32", "md5"]

Buffer = bytes | bytearray | memoryview


def crc32_b64(data: bytes | bytearray) -> str:
    """Base64 of the big-endian CRC32 of ``data``: the ``x-amz-checksum-crc32`` header value."""
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode("ascii")


def md5_b64(data: bytes | bytearray) -> str:
    """Base64 of the MD5 of ``data``: the ``Content-MD5`` header value."""
    return base64.b64encode(hashlib.md5(data).digest()).decode("ascii")


def checksum_b64(algorithm: Algorithm, data: Buffer) -> str:
    """The header value of ``algorithm`` (``crc32`` or ``md5``) over ``data``, in one pass."""
    return crc32_b64(data) if algorithm == "crc32" else md5_b64(data)


def checksums_b64(chunks: Iterable[Buffer], algorithms: Sequence[Algorithm]) -> tuple[str, ...]:
    """The header values of each of ``algorithms`` over the concatenation of ``chunks``, in one
    pass over them: equal to :func:`checksum_b64` of the whole, for any split into chunks. Lets a
    part larger than the memory a worker allows for it be checksummed a chunk at a time (each
    chunk may reuse the previous one's buffer: it is consumed before the next is asked for)."""
    states: list[Any] = [0 if a == "crc32" else hashlib.md5() for a in algorithms]
    for chunk in chunks:
        for i, algorithm in enumerate(algorithms):
            if algorithm == "crc32":
                states[i] = zlib.crc32(chunk, states[i])
            else:
                states[i].update(chunk)
    out = []
    for algorithm, state in zip(algorithms, states):
        raw = state.to_bytes(4, "big") if algorithm == "crc32" else state.digest()
        out.append(base64.b64encode(raw).decode("ascii"))
    return tuple(out)


def md5_b64_to_etag(value: str) -> str:
    """The quoted hex ETag S3 gives a single-part object whose Content-MD5 was ``value``."""
    return '"' + base64.b64decode(value).hex() + '"'


def multipart_etag(part_etags: Iterable[str]) -> str:
    """The ETag S3 gives an object completed from parts with these ETags (in part order):
    ``"md5(concat(binary part md5s))-N"``."""
    digests = [bytes.fromhex(etag.strip('"')) for etag in part_etags]
    return f'"{hashlib.md5(b"".join(digests)).hexdigest()}-{len(digests)}"'


def composite_crc32(part_checksums: Iterable[str]) -> str:
    """The ``ChecksumCRC32`` S3 reports for a multipart object whose parts had these CRC32
    checksums: CRC32 of the concatenated binary part checksums, suffixed ``-N``."""
    raw = [base64.b64decode(c) for c in part_checksums]
    return f"{crc32_b64(b''.join(raw))}-{len(raw)}"
