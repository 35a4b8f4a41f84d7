"""One open byte range of a source (:class:`ByteRange`): for a file, the descriptor the checks
were made on is the one read (:class:`SourceRange`)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Self

from uploader.checksums import Algorithm, checksums_b64
from uploader.errors import SourceChanged
from uploader.sources.fingerprint import Fingerprint


class ByteRange:
    """A byte range of a source, open until :meth:`close`, read as often as needed (a part larger
    than the worker buffers is read twice: once to checksum it, once to send it). Subclasses have
    ``readinto``, ``check`` and ``close``; this class reads in chunks and checksums on them."""

    name: str
    length: int

    def readinto(self, buffer: bytearray | memoryview, position: int = 0) -> int:
        """Fill ``buffer`` (or as much of it as the range has left) with the range's bytes from
        ``position`` on; the bytes read, or :class:`SourceChanged` if the source ends early."""
        raise NotImplementedError

    def check(self) -> None:
        """:class:`SourceChanged` unless the source is still the version the upload began with."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the range holds open (nothing, unless a kind says otherwise)."""

    def chunks(self, buffer: bytearray | memoryview) -> Iterator[memoryview]:
        """The range, in order, as views of ``buffer`` filled one after the other (each chunk is
        overwritten by the next: consume it before asking for another)."""
        view = memoryview(buffer).cast("B")
        if not len(view) and self.length:
            raise ValueError("an empty buffer cannot hold a chunk")
        position = 0
        while position < self.length:
            n = self.readinto(view, position)
            yield view[:n]
            position += n

    def checksums(self, algorithms: Sequence[Algorithm], buffer: bytearray | memoryview) -> tuple[str, ...]:
        """The ``algorithms``' header values over the range, read in chunks through ``buffer``
        (so memory is bounded by it, whatever the range's length), then the fingerprint checked
        again: the values are of the version the upload began with."""
        values = checksums_b64(self.chunks(buffer), algorithms)
        self.check()
        return values

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SourceRange(ByteRange):
    """One byte range of a source, open (one descriptor) until :meth:`close`: read it whole, or
    in chunks as often as needed (a part larger than the worker buffers is read twice: once to
    checksum it, once to send it), re-checking the fingerprint on the same descriptor."""

    def __init__(self, name: str, fd: int, offset: int, length: int, expected: Fingerprint) -> None:
        self.name = name
        self.offset = offset
        self.length = length
        self.expected = expected
        self._fd: int | None = fd

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise ValueError(f"source range of {self.name!r} is closed")
        return self._fd

    def check(self, st: os.stat_result | None = None) -> None:
        """:class:`SourceChanged` unless the open file still matches the expected fingerprint
        (size, mtime and, where comparable, device and inode: see :class:`Fingerprint`)."""
        st = os.fstat(self.fd) if st is None else st
        why = self.expected.difference(Fingerprint.of(st))
        if why:
            raise SourceChanged(
                f"source {self.name!r} changed since the upload began ({why}); resume with restart to upload it again"
            )

    def read(self) -> bytes | bytearray:
        """The whole range as a new ``bytes``."""
        data = os.pread(self.fd, self.length, self.offset)
        if len(data) == self.length:
            return data
        whole = bytearray(self.length)  # a read of 2 GiB or more returns less: read on
        self.readinto(whole)
        return whole

    def readinto(self, buffer: bytearray | memoryview, position: int = 0) -> int:
        """Fill ``buffer`` (or as much of it as the range has left) with the range's bytes from
        ``position`` on; the bytes read, or :class:`SourceChanged` if the file ends early."""
        view = memoryview(buffer).cast("B")
        want = max(0, min(len(view), self.length - position))
        got = 0
        while got < want:  # one preadv but past 2 GiB, where Linux returns less per call
            n = os.preadv(self.fd, [view[got:want]], self.offset + position + got)
            if n == 0:
                raise SourceChanged(f"source {self.name!r} is shorter than when the upload began")
            got += n
        return got

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
