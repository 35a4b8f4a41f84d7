"""Sources: where an upload's bytes come from, one small class per kind.

A source is named by a string in the request. :func:`open_source` picks the class whose
``is_compatible`` accepts it (the shape of s3transfer's upload input managers), so new kinds
(HTTP ranges, S3 objects) slot in without touching the callers.

Every worker resolves the source itself, so a local path must name the same file on every worker
machine (a shared mount); the fingerprint catches a file that differs or changed.
"""

from __future__ import annotations

import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

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


class LocalFileSource:
    """A regular file on a local or shared filesystem, confined to the allowed roots."""

    def __init__(self, path: str, roots: tuple[Path, ...]) -> None:
        self.name = path
        self.path = resolve_within_roots(path, roots)

    @staticmethod
    def is_compatible(source: str) -> bool:
        return "://" not in source or source.startswith("file://")

    def fingerprint(self) -> Fingerprint:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise SourceError(f"source {self.name!r} does not exist") from None
        except PermissionError:
            raise SourceError(f"source {self.name!r} cannot be read: permission denied") from None
        if stat.S_ISDIR(st.st_mode):
            raise SourceError(f"source {self.name!r} is a directory; name a file")
        if not stat.S_ISREG(st.st_mode):
            raise SourceError(f"source {self.name!r} is not a regular file")
        if not os.access(self.path, os.R_OK):
            raise SourceError(f"source {self.name!r} cannot be read: permission denied")
        return Fingerprint(size=st.st_size, mtime_ns=st.st_mtime_ns)

    def read_range(
        self, offset: int, length: int, expected: Fingerprint, into: bytearray | memoryview | None = None
    ) -> bytes | bytearray | memoryview:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise SourceChanged(f"source {self.name!r} disappeared during the upload") from None
        except PermissionError:
            raise SourceError(f"source {self.name!r} cannot be read: permission denied") from None
        try:
            st = os.fstat(fd)
            if Fingerprint(size=st.st_size, mtime_ns=st.st_mtime_ns) != expected:
                raise SourceChanged(
                    f"source {self.name!r} changed since the upload began "
                    f"(size {expected.size} -> {st.st_size}); resume with restart to upload it again"
                )
            # One read into one buffer: the part body is never copied again before it is sent.
            if into is None:
                data: bytes | bytearray | memoryview = os.pread(fd, length, offset)
                got = len(data)
            else:
                assert len(into) == length, "the buffer must have the part's length"
                data, got = into, os.preadv(fd, [into], offset)
        finally:
            os.close(fd)
        if got != length:
            raise SourceChanged(f"source {self.name!r} is shorter than when the upload began")
        return data


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
