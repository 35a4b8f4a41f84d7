"""Local (or shared-mount) files, confined to the source roots.

Every access opens the file once, beneath the descriptor of its root (:mod:`.beneath`: nothing a
writer inside the root renames or links can make it open a file outside), without blocking
(:data:`OPEN_FLAGS`), then checks what it opened on that descriptor: a regular file, not in a
denied place (:mod:`.denylist`), with the expected fingerprint. The reads are on that same
descriptor, whatever is renamed over the path meanwhile.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from uploader.errors import SourceChanged, SourceError
from uploader.sources.beneath import LeavesRoot, OpenMethod, fd_path, open_beneath
from uploader.sources.denylist import denial
from uploader.sources.fingerprint import Fingerprint
from uploader.sources.ranges import SourceRange
from uploader.sources.roots import denied_error, locate

#: How a source is opened. ``O_NONBLOCK``: a FIFO (or a device node) put where a file was would
#: otherwise block ``open()`` until a writer appears, and with it the worker thread, for ever;
#: the descriptor is then ``fstat``-ed and refused unless it is a regular file, for which
#: ``O_NONBLOCK`` changes nothing (reads of regular files never return ``EAGAIN`` on Linux).
#: ``O_NOCTTY``: a terminal never becomes the worker's controlling terminal. ``O_CLOEXEC``: a
#: child process started meanwhile does not inherit the descriptor.
OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY

RESTART_HINT = "resume with restart once a regular file is back in its place"


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


def check_descriptor(fd: int, name: str, *, began: bool) -> os.stat_result:
    """The ``fstat`` of ``fd`` if it is a regular file in no denied place; otherwise
    :class:`SourceError` (or :class:`SourceChanged` once the upload ``began`` from a regular file)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        kind = _file_kind(st.st_mode)
        if began:
            raise SourceChanged(f"source {name!r} is no longer a regular file (it is now {kind}); {RESTART_HINT}")
        if stat.S_ISDIR(st.st_mode):
            raise SourceError(f"source {name!r} is a directory; name a file")
        raise SourceError(f"source {name!r} is not a regular file ({kind})")
    # What was opened, as the kernel names it: a link swapped in after the request was checked
    # may still lead somewhere denied inside a wide root (UPLOADER_SOURCE_ROOTS=/).
    where = fd_path(fd)
    why = denial(where) if where and where.startswith("/") else None
    if why:
        if began:
            raise SourceChanged(f"source {name!r} now leads to a refused place ({why}); the upload stops")
        raise denied_error(name, why)
    return st


class LocalFileSource:
    """A regular file on a local or shared filesystem, confined to the allowed roots.

    ``method``: how to open beneath the root (tests force the fallback walk); by default
    ``openat2`` where the kernel has it."""

    def __init__(self, path: str, roots: Sequence[Path], *, method: OpenMethod | None = None) -> None:
        self.name = path
        self.located = locate(path, roots)
        #: The real path the request resolved to when checked (what is opened is beneath the root).
        self.path = self.located.path
        self.method = method

    @staticmethod
    def is_compatible(source: str) -> bool:
        return "://" not in source or source.startswith("file://")

    def _open(self, *, began: bool) -> tuple[int, os.stat_result]:
        """A descriptor of the file and its ``fstat``; :class:`SourceError` (or, once the upload
        ``began`` from a regular file here, :class:`SourceChanged`) for anything else, without
        blocking and without reading a byte."""
        try:
            fd = open_beneath(self.located.root, self.located.relative, OPEN_FLAGS, method=self.method)
        except LeavesRoot as exc:
            if began:
                raise SourceChanged(
                    f"source {self.name!r} no longer lies inside its source root {str(self.located.root)!r} ({exc}); "
                    "nothing outside the root was read"
                ) from None
            raise SourceError(f"source {self.name!r} resolves outside the allowed source roots ({exc})") from None
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
                        f"{RESTART_HINT}"
                    ) from None
                raise SourceError(f"source {self.name!r} is not a regular file (a socket or a device node)") from None
            raise  # I/O errors (EIO, ESTALE...) are not verdicts on the source: as before
        try:
            st = check_descriptor(fd, self.name, began=began)
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
        return Fingerprint.of(st)

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
