"""Request bodies botocore can send without a copy: a view of a buffer, or a byte range of a
source streamed from disk (checksummed in a first pass, then read again as it is sent).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Protocol

from uploader.checksums import Algorithm
from uploader.errors import SourceChanged, SourceError


class _RequestBody:
    """The file-object surface botocore and urllib3 use of a request body: read-only, seekable
    (botocore rewinds a body for a retry and measures it for ``Content-Length`` with seek/tell),
    ``len()`` the bytes left from the position. Subclasses have ``read`` and ``_size``."""

    _pos: int

    def _size(self) -> int:
        raise NotImplementedError

    def read(self, size: int | None = -1) -> memoryview:
        raise NotImplementedError

    def __len__(self) -> int:
        return max(0, self._size() - self._pos)

    def readinto(self, target: bytearray | memoryview) -> int:
        chunk = self.read(len(memoryview(target)))
        memoryview(target).cast("B")[: len(chunk)] = chunk
        return len(chunk)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        bases = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size()}
        if whence not in bases:
            raise ValueError(f"invalid whence {whence!r}")
        base = bases[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        pass  # the buffer or source range belongs to the caller, who releases it after the request


class BodyView(_RequestBody):
    """A read-only, seekable file object over a buffer (bytes, bytearray, memoryview) that never
    copies it: ``read`` returns memoryview slices of the buffer.

    Request bodies go to botocore as one of these, never as a bare ``bytearray``:

    * Sending: urllib3 sends a bytes-like body in one ``sock.sendall()``, and the socket's timeout
      during the send is the *connect* timeout (``urllib3/connection.py`` ``request()`` does
      ``self.sock.settimeout(self.timeout)``, which ``connectionpool._make_request`` set to
      ``timeout_obj.connect_timeout``; the read timeout is applied only after the body is out).
      Since Python 3.5 a socket's timeout bounds the *whole* ``sendall``, so a part that takes
      longer than the connect timeout to send is cut off and sent again, forever on a slow link.
      A file object is sent ``read(16384)`` at a time (``urllib3.util.request.body_to_chunks``), so
      the timeout bounds each 16 KiB write instead: a send fails only when the link stalls.
      botocore wraps ``bytes`` in a ``BytesIO`` itself (``handlers.convert_body_to_file_like_object``,
      UploadPart and PutObject only), but not a ``bytearray``.
    * Memory: with awscrt installed, botocore's CRT signer does ``BytesIO(request.body)`` for any
      body without ``seek`` (``botocore/crt/auth.py``), which copies a ``bytearray``: a second
      copy of every part in flight. It uses a seekable body as it is.

    ``seek``/``tell`` let botocore rewind the body for a retry and measure it for
    ``Content-Length``; ``len()`` is the bytes left from the current position (what botocore's
    ``determine_content_length`` would compute with seek/tell)."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def _size(self) -> int:
        return len(self._view)

    def __repr__(self) -> str:  # botocore's debug log prints request params
        return f"<BodyView {len(self._view)} bytes at {self._pos}>"

    def read(self, size: int | None = -1) -> memoryview:
        start = self._pos
        end = len(self._view) if size is None or size < 0 else min(start + size, len(self._view))
        self._pos = max(start, end)
        return self._view[start : self._pos]


class RangeReader(Protocol):
    """What :class:`RangeBody` reads from (:class:`uploader.sources.SourceRange`)."""

    length: int

    def readinto(self, buffer: bytearray | memoryview, position: int = 0) -> int: ...

    def check(self) -> None: ...

    def checksums(self, algorithms: Sequence[Algorithm], buffer: bytearray | memoryview) -> tuple[str, ...]: ...


class RangeBody(_RequestBody):
    """A read-only, seekable, sized file object over a byte range of an open source that holds
    at most one ``buffer`` of it in memory: a part larger than the memory a worker allows for one
    part (``UPLOADER_PART_BUFFER_MAX``) is sent through one of these.

    urllib3 reads a file body ``read(16384)`` at a time (``urllib3.util.request.body_to_chunks``);
    each call is served as a view of ``buffer``, which is refilled with one ``preadv`` of up to
    its whole length when the position leaves the bytes it holds, so the system calls stay at one
    per buffer, not one per 16 KiB. A view returned by :meth:`read` is valid until the next call
    (urllib3 sends each chunk before it asks for the next).

    Every refill first checks the source's fingerprint on the open descriptor, so a source that
    changed since its checksum was computed (:meth:`checksum`, the first pass over the range)
    fails with :class:`~uploader.errors.SourceChanged` instead of sending other bytes; a change
    in the middle of a refill is caught by the server, which checks the body against the checksum
    sent in the headers (BadDigest).

    ``seek``/``tell``/``len()`` behave as :class:`BodyView`'s (botocore rewinds the body for a
    retry and measures it for ``Content-Length``)."""

    def __init__(self, source: RangeReader, buffer: bytearray | memoryview) -> None:
        self._source = source
        self._buffer = memoryview(buffer).cast("B")
        if not len(self._buffer) and source.length:
            raise ValueError("RangeBody needs a buffer of at least one byte")
        self._length = source.length
        self._pos = 0
        self._start = 0  # the range position of self._buffer[0]
        self._filled = 0  # bytes of the range the buffer holds from there

    def _size(self) -> int:
        return self._length

    def __repr__(self) -> str:  # botocore's debug log prints request params
        return f"<RangeBody {self._length} bytes at {self._pos}, {len(self._buffer)}-byte buffer>"

    def checksum(self, algorithm: Algorithm) -> str:
        """The range's ``algorithm`` header value, read in chunks through this body's buffer (the
        first pass: the header goes out before the body); the body is left at its start."""
        return self.checksums((algorithm,))[0]

    def checksums(self, algorithms: Sequence[Algorithm]) -> tuple[str, ...]:
        """:meth:`checksum` of each of ``algorithms``, all in the same one pass over the range."""
        self._filled = 0  # the buffer is reused: what it held is gone
        values = self._source.checksums(algorithms, self._buffer)
        self.seek(0)
        return values

    def read(self, size: int | None = -1) -> memoryview:
        """Up to ``size`` bytes from the position (a negative or missing size: what the buffer
        holds from there, at most one buffer; read until an empty result for the rest)."""
        if self._pos >= self._length:
            return self._buffer[:0]
        if not self._start <= self._pos < self._start + self._filled:
            self._refill()
        offset = self._pos - self._start
        available = self._filled - offset
        n = available if size is None or size < 0 else min(size, available)
        self._pos += n
        return self._buffer[offset : offset + n]

    #: The source error the last read raised, if any (see ObjectStore.upload_part).
    failure: SourceChanged | SourceError | None = None

    def _refill(self) -> None:
        self._filled = 0  # nothing valid in the buffer until the read succeeds
        try:
            self._source.check()
            self._start = self._pos
            self._filled = self._source.readinto(self._buffer, self._pos)
        except (SourceChanged, SourceError) as exc:
            self.failure = exc
            raise


class Pace(Protocol):
    """A rate limit a request body draws from (:class:`uploader.limits.bucket.FleetBucket`)."""

    #: Bytes drawn at a time, at least.
    chunk: int
    #: The limit's rate (bytes per second).
    rate: int

    def acquire(self, amount: int) -> float: ...


class PacedBody(_RequestBody):
    """A request body that takes its bytes' worth from a rate limiter as they are read for the
    socket: ``pace(n)`` is called (and may sleep) before more than the bytes already paid for
    are handed out, ``chunk`` bytes at least at a time (urllib3 reads 16 KiB at a time: a call
    per read would be a Redis round trip per 16 KiB). A retry's rewind and second read pay
    again: those bytes go on the wire again. Everything else is the wrapped body's."""

    def __init__(self, body: BodyView | RangeBody, pace: Callable[[int], object], chunk: int, rate: int = 0) -> None:
        self._body = body
        self._pace = pace
        self._chunk = max(1, chunk)
        #: The rate ``pace`` holds the body to (bytes/s; 0: not said), for a server-side limit
        #: on the same request (OSS's ``x-oss-traffic-limit``).
        self.rate = rate
        self._paid = 0  # bytes paid for and not yet handed out

    def _size(self) -> int:
        return self._body.tell() + len(self._body)

    def __len__(self) -> int:
        return len(self._body)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._body.seek(offset, whence)

    def tell(self) -> int:
        return self._body.tell()

    @property
    def failure(self) -> BaseException | None:
        """What the wrapped body's source raised, if anything (see :class:`RangeBody`)."""
        return getattr(self._body, "failure", None)

    def __repr__(self) -> str:
        return f"<PacedBody {self._body!r}>"

    def read(self, size: int | None = -1) -> memoryview:
        left = len(self)
        wanted = left if size is None or size < 0 else min(size, left)
        if wanted > self._paid:
            owed = min(max(self._chunk, wanted - self._paid), left - self._paid)
            self._pace(owed)
            self._paid += owed
        chunk = self._body.read(wanted)
        self._paid = max(0, self._paid - len(chunk))
        return chunk


class ReportedBody(_RequestBody):
    """A request body that says how far it has been read for the socket: ``report(position)``
    each time the position passes another ``step`` bytes (not at the very end: the recorded part
    says that). A retry's rewind starts the count again. Everything else is the wrapped body's."""

    def __init__(self, body: _RequestBody, report: Callable[[int], object], step: int) -> None:
        self._body = body
        self._report = report
        self._step = max(1, step)
        self._next = self._step

    def _size(self) -> int:
        return self._body.tell() + len(self._body)

    def __len__(self) -> int:
        return len(self._body)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        position = self._body.seek(offset, whence)
        self._next = (position // self._step + 1) * self._step
        return position

    def tell(self) -> int:
        return self._body.tell()

    @property
    def failure(self) -> BaseException | None:
        return getattr(self._body, "failure", None)

    @property
    def rate(self) -> int:
        return int(getattr(self._body, "rate", 0))

    def __repr__(self) -> str:
        return f"<ReportedBody {self._body!r}>"

    def read(self, size: int | None = -1) -> memoryview:
        chunk = self._body.read(size)
        position = self._body.tell()
        if position >= self._next and len(self._body):
            self._next = (position // self._step + 1) * self._step
            try:
                self._report(position)
            except Exception:  # noqa: BLE001  (progress is a courtesy: never the part's failure)
                pass
        return chunk
