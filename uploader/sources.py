"""Sources: where an upload's bytes come from, one small class per kind.

A source is named by a string in the request. :func:`open_source` picks the class whose
``is_compatible`` accepts it (the shape of s3transfer's upload input managers), so new kinds
(HTTP ranges, S3 objects) slot in without touching the callers.

Every worker resolves the source itself, so a local path must name the same file on every worker
machine (a shared mount); the fingerprint catches a file that differs or changed.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from uploader.checksums import Algorithm, checksums_b64
from uploader.errors import SourceChanged, SourceError


@dataclass(frozen=True)
class Fingerprint:
    """What identifies one version of a source; any difference means the bytes may differ."""

    size: int
    mtime_ns: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class Source(Protocol):
    """A readable, fingerprintable byte sequence."""

    name: str

    def fingerprint(self) -> Fingerprint: ...

    def read_range(
        self, offset: int, length: int, expected: Fingerprint, into: bytearray | memoryview | None = None
    ) -> bytes | bytearray | memoryview:
        """Exactly ``length`` bytes from ``offset`` (read into ``into`` when given, a writable
        buffer ``length`` bytes long, which is returned), or :class:`SourceChanged` if the source
        no longer matches ``expected``."""
        ...

    def open_range(self, offset: int, length: int, expected: Fingerprint) -> SourceRange:
        """The byte range ``offset..offset+length``, open until closed, to be read in chunks;
        :class:`SourceChanged` if the source no longer matches ``expected``."""
        ...


#: How a source is opened. ``O_NONBLOCK``: a FIFO (or a device node) put where a file was would
#: otherwise block ``open()`` until a writer appears, and with it the worker thread, for ever;
#: the descriptor is then ``fstat``-ed and refused unless it is a regular file, for which
#: ``O_NONBLOCK`` changes nothing (reads of regular files never return ``EAGAIN`` on Linux).
#: ``O_NOCTTY``: a terminal never becomes the worker's controlling terminal. ``O_CLOEXEC``: a
#: child process started meanwhile does not inherit the descriptor.
OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


class LocalFileSource:
    """A regular file on a local or shared filesystem, confined to the allowed roots.

    Every access opens the file once without blocking (:data:`OPEN_FLAGS`) and checks what it
    opened with ``fstat`` on that descriptor, so the check and the reads are on the same file
    whatever is renamed over the path meanwhile."""

    def __init__(self, path: str, roots: tuple[Path, ...]) -> None:
        self.name = path
        self.path = resolve_within_roots(path, roots)

    @staticmethod
    def is_compatible(source: str) -> bool:
        return "://" not in source or source.startswith("file://")

    def _open(self, *, began: bool) -> tuple[int, os.stat_result]:
        """A descriptor of the file and its ``fstat``; :class:`SourceError` (or, once the upload
        ``began`` from a regular file here, :class:`SourceChanged`) for anything else, without
        blocking and without reading a byte."""
        try:
            fd = os.open(self.path, OPEN_FLAGS)
        except (FileNotFoundError, NotADirectoryError):
            if began:
                raise SourceChanged(f"source {self.name!r} disappeared during the upload") from None
            raise SourceError(f"source {self.name!r} does not exist") from None
        except PermissionError:
            raise SourceError(f"source {self.name!r} cannot be read: permission denied") from None
        except OSError as exc:
            if exc.errno in (errno.ENXIO, errno.ENODEV):  # a Unix socket, or a device node without a device
                if began:
                    raise SourceChanged(
                        f"source {self.name!r} is no longer a regular file (it is now a socket or a device node); "
                        "resume with restart once a regular file is back in its place"
                    ) from None
                raise SourceError(f"source {self.name!r} is not a regular file (a socket or a device node)") from None
            raise  # I/O errors (EIO, ESTALE...) are not verdicts on the source: as before
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                kind = _file_kind(st.st_mode)
                if began:
                    raise SourceChanged(
                        f"source {self.name!r} is no longer a regular file (it is now {kind}); "
                        "resume with restart once a regular file is back in its place"
                    )
                if stat.S_ISDIR(st.st_mode):
                    raise SourceError(f"source {self.name!r} is a directory; name a file")
                raise SourceError(f"source {self.name!r} is not a regular file ({kind})")
        except BaseException:
            os.close(fd)
            raise
        return fd, st

    def fingerprint(self) -> Fingerprint:
        fd, st = self._open(began=False)
        os.close(fd)
        # The open above succeeded, so this process can read the file; os.access asks again with
        # the real uid and gid (they differ from the effective ones only in a setuid process).
        if not os.access(self.path, os.R_OK):
            raise SourceError(f"source {self.name!r} cannot be read: permission denied")
        return Fingerprint(size=st.st_size, mtime_ns=st.st_mtime_ns)

    def open_range(self, offset: int, length: int, expected: Fingerprint) -> SourceRange:
        """Open the file once for the bytes ``offset..offset+length`` (read them, as often as
        needed, with the returned object; close it when done), or :class:`SourceChanged` if it
        no longer matches ``expected``."""
        fd, st = self._open(began=True)
        source_range = SourceRange(self.name, fd, offset, length, expected)
        try:
            source_range.check(st)
        except BaseException:
            source_range.close()
            raise
        return source_range

    def read_range(
        self, offset: int, length: int, expected: Fingerprint, into: bytearray | memoryview | None = None
    ) -> bytes | bytearray | memoryview:
        with self.open_range(offset, length, expected) as source_range:
            # One read into one buffer: the part body is never copied again before it is sent.
            if into is None:
                return source_range.read()
            assert len(into) == length, "the buffer must have the part's length"
            source_range.readinto(into)
            return into


class SourceRange:
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
        """:class:`SourceChanged` unless the open file still has the expected size and mtime."""
        st = os.fstat(self.fd) if st is None else st
        if Fingerprint(size=st.st_size, mtime_ns=st.st_mtime_ns) != self.expected:
            raise SourceChanged(
                f"source {self.name!r} changed since the upload began "
                f"(size {self.expected.size} -> {st.st_size}); resume with restart to upload it again"
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

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> SourceRange:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resolve_within_roots(path: str, roots: tuple[Path, ...]) -> Path:
    """The real path of ``path`` (symlinks and ``..`` resolved), or :class:`SourceError` if it
    is relative or lies outside every root in ``roots``."""
    raw = path.removeprefix("file://")
    if not os.path.isabs(raw):
        raise SourceError(f"source {path!r} must be an absolute path")
    real = Path(os.path.realpath(raw))
    for root in roots:
        real_root = Path(os.path.realpath(root))
        if real == real_root or real_root in real.parents:
            return real
    allowed = ", ".join(str(r) for r in roots) or "(none)"
    raise SourceError(
        f"source {path!r} resolves outside the allowed source roots ({allowed}); "
        "set UPLOADER_SOURCE_ROOTS on the workers to allow it"
    )


_SOURCE_KINDS = (LocalFileSource,)


def open_source(source: str, roots: tuple[Path, ...]) -> Source:
    """The source object for ``source``; :class:`SourceError` if no kind accepts it."""
    for kind in _SOURCE_KINDS:
        if kind.is_compatible(source):
            return kind(source, roots)
    raise SourceError(f"unsupported source {source!r}: give an absolute file path")
