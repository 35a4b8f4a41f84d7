"""HTTP(S) URLs, read by ranged GETs.

What identifies a version: the server's entity tag (``ETag``), ``Last-Modified`` and length, from
a HEAD (or, when the server refuses HEAD, a GET of the first byte). Every later request is
conditional on that version: a strong ETag goes in ``If-Match`` and ``If-Range``, otherwise
``Last-Modified`` goes in ``If-Unmodified-Since`` and ``If-Range`` (a weak ETag never matches
``If-Match``, RFC 9110 13.1.1). A server that answers 412, or answers a ranged GET with the whole
new body, or sends another ETag, length or date than recorded, raises :class:`SourceChanged`: the
upload fails as changed, as for a local file. A source with neither validator is compared by
length only.

A part is one ranged GET streamed into the part buffer (bounded memory); a part larger than the
buffer is read in chunks, as a file is, once to checksum it and once to send it (two GETs). A
whole small source (below the multipart threshold) is one plain GET, so a server that ignores
Range still serves it; for a larger source the start is refused with a clear message.

Outbound guard: every connection goes through :func:`uploader.outbound.connect`, which checks the
resolved address (loopback, private, link-local, metadata... refused unless allowed by
``UPLOADER_OUTBOUND_ALLOW``) and connects to that very address. Redirects are followed (up to
:data:`MAX_REDIRECTS`: downloads are often served from a redirect to a CDN or a presigned URL),
each hop only to ``http``/``https`` and through the same guard at connect time; the source's
credentials go only to the origin of the URL the request named, never to another host a redirect
points to. Only the scheme, host and path of a URL appear in errors (a query may hold a signature).

Errors: connection failures, timeouts, resets, 5xx, 408 and 429 are
:class:`TransientStoreError` (the part is retried); other 4xx are final (:class:`SourceError`, or
:class:`SourceChanged` for 404/410 once the upload began, as for a file that disappeared).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urljoin, urlsplit

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, HTTPError, NewConnectionError, SSLError

from uploader.errors import SourceChanged, SourceError, TransientStoreError, UploaderError
from uploader.outbound import OutboundPolicy, OutboundRefused, connect
from uploader.sources.fingerprint import Fingerprint
from uploader.sources.ranges import ByteRange

if TYPE_CHECKING:
    from uploader.config import Settings, SourceCredential

SCHEMES = ("http", "https")
#: Redirect hops followed per request (curl's and requests' limits are larger; a download needs one or two).
MAX_REDIRECTS = 5
REDIRECTS = frozenset({301, 302, 303, 307, 308})
#: Statuses worth another attempt besides 5xx: Request Timeout and Too Many Requests.
RETRIED_4XX = frozenset({408, 429})
#: HEAD answers that mean "ask with a GET instead": not allowed or not implemented, and 403 for
#: URLs signed for GET only (S3 presigned URLs).
HEAD_REFUSED = frozenset({403, 405, 501})
#: The longest entity tag recorded (it is kept in the checkpoint; real ones are under 100).
MAX_ETAG = 512
USER_AGENT = "uploader-source/1"


@dataclass(frozen=True)
class HttpAccess:
    """How a worker reaches HTTP(S) sources: the outbound guard, the request's credential (if
    it named one), the timeout, and the multipart threshold (sources this large need Range; by
    default every source does)."""

    policy: OutboundPolicy = OutboundPolicy()
    credential: SourceCredential | None = None
    timeout: float = 30.0
    multipart_threshold: int = 0

    @classmethod
    def of(cls, settings: Settings, credentials: str = "") -> HttpAccess:
        """The access ``settings`` give, with the credential named ``credentials`` ("" for none);
        :class:`SourceError` if the workers hold no credential of that name."""
        credential = None
        if credentials:
            credential = settings.source_credential_map.get(credentials)
            if credential is None:
                raise SourceError(
                    f"the workers have no source credentials named {credentials!r}: add them to UPLOADER_SOURCE_CREDENTIALS"
                )
        return cls(
            OutboundPolicy.parse(settings.outbound_allow), credential, settings.source_timeout,
            settings.multipart_threshold,
        )


def shown(url: str) -> str:
    """``url`` as errors show it: scheme, host and path (a query may carry a signature)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a source (a scheme other than http/https, no host, a user and
    password in it), or None."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in SCHEMES:
        return f"{shown(url)}: only http:// and https:// URLs are read"
    if not parts.hostname:
        return f"{shown(url)}: the URL has no host"
    if "@" in parts.netloc:
        return (
            f"{shown(url)}: the URL carries a user name or password, which would travel in the message: "
            "give the workers the credentials in UPLOADER_SOURCE_CREDENTIALS and name them with source_credentials"
        )
    try:
        _ = parts.port
    except ValueError:
        return f"{shown(url)}: the port is not a number"
    return None


class _GuardedConnectionMixin:
    """Connects through :func:`uploader.outbound.connect`: to an address the policy allows."""

    _dns_host: str
    port: int
    timeout: Any

    def __init__(self, *args: Any, policy: OutboundPolicy, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.policy = policy

    def _new_conn(self) -> socket.socket:
        timeout = self.timeout if isinstance(self.timeout, (int, float)) else 30.0
        try:
            sock = connect(self._dns_host, self.port, self.policy, float(timeout))
        except OutboundRefused:
            raise
        except TimeoutError as exc:
            raise ConnectTimeoutError(self, f"connection to {self._dns_host} timed out") from exc
        except OSError as exc:
            raise NewConnectionError(cast(HTTPConnection, self), f"failed to connect: {exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


class _GuardedHTTPConnection(_GuardedConnectionMixin, HTTPConnection):
    pass


class _GuardedHTTPSConnection(_GuardedConnectionMixin, HTTPSConnection):
    pass


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


@lru_cache(maxsize=64)
def _pool(scheme: str, host: str, port: int | None, policy: OutboundPolicy, timeout: float) -> HTTPConnectionPool:
    """One keep-alive pool per origin, policy and timeout in this process (pools are thread-safe).
    Nothing is retried or redirected by urllib3: retries are the part task's, redirects ours."""
    cls = _GuardedHTTPSPool if scheme == "https" else _GuardedHTTPPool
    return cls(
        host, port, timeout=urllib3.Timeout(connect=timeout, read=timeout), retries=False, maxsize=8, block=False,
        policy=policy,
    )


# A forked child (a prefork pool process) must not share its parent's pooled sockets.
os.register_at_fork(after_in_child=_pool.cache_clear)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    default = 443 if parts.scheme.lower() == "https" else 80
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port or default


def _http_date_ns(value: str | None) -> int:
    """``Last-Modified`` in nanoseconds since the epoch; 0 when absent or unreadable."""
    if not value:
        return 0
    try:
        return int(parsedate_to_datetime(value).timestamp()) * 1_000_000_000
    except (TypeError, ValueError, IndexError, OverflowError):
        return 0


def _content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """``bytes FIRST-LAST/TOTAL`` (or ``bytes */TOTAL``) as numbers; None where absent or ``*``."""
    if not value or not value.lower().startswith("bytes "):
        return None, None, None
    span, _, total = value[6:].strip().partition("/")
    first, _, last = span.partition("-")
    number = lambda text: int(text) if text.strip().isdigit() else None  # noqa: E731
    return number(first), number(last), number(total)


class HttpSource:
    """A file served over HTTP(S), read by (conditional) ranged GETs through the outbound guard."""

    def __init__(self, url: str, access: HttpAccess | None = None) -> None:
        problem = url_problem(url)
        if problem is not None:
            raise SourceError(f"source {problem}")
        self.name = url
        self.url = url
        self.access = access or HttpAccess()

    @staticmethod
    def is_compatible(source: str) -> bool:
        return source[:8].lower().startswith(("http://", "https://"))

    @property
    def shown(self) -> str:
        return shown(self.url)

    # -- requests ------------------------------------------------------------------------------
    def _request(self, method: str, headers: dict[str, str]) -> urllib3.BaseHTTPResponse:
        """The answer to ``method`` on the URL (redirects followed and re-checked), its body not
        read yet; raises for refusals and network errors, never for a status."""
        url = self.url
        home = _origin(self.url)
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            sent = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **headers}
            credential = self.access.credential
            if credential is not None and _origin(url) == home:
                sent[credential.header] = credential.value
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            pool = _pool(parts.scheme.lower(), parts.hostname or "", parts.port, self.access.policy, self.access.timeout)
            try:
                response = pool.urlopen(
                    method, target, headers=sent, redirect=False, retries=False, preload_content=False,
                    decode_content=False, assert_same_host=False,
                )
            except OutboundRefused as exc:
                raise SourceError(f"source {self.shown}: refused: {exc}") from None
            except SSLError as exc:
                raise SourceError(f"source {self.shown}: TLS failed with {parts.hostname}: {exc}"[:500]) from None
            except (HTTPError, OSError) as exc:
                raise TransientStoreError(f"source {self.shown}: {type(exc).__name__}: {exc}"[:500]) from None
            if response.status not in REDIRECTS:
                return response
            location = response.headers.get("Location")
            response.close()
            if not location:
                raise SourceError(f"source {self.shown}: HTTP {response.status} without a Location to follow")
            url = urljoin(url, location)
            problem = url_problem(url)
            if problem is not None:
                raise SourceError(f"source {self.shown}: redirected to {problem}")
        raise SourceError(f"source {self.shown}: more than {MAX_REDIRECTS} redirects")

    def _status_error(self, status: int, *, began: bool) -> UploaderError:
        """What an unexpected status means: retried (5xx, 408, 429), changed, or final."""
        what = f"source {self.shown}: the server answered HTTP {status}"
        if status >= 500 or status in RETRIED_4XX:
            return TransientStoreError(what)
        if status == 412:
            return SourceChanged(
                f"source {self.shown} changed since the upload began (the server's version no longer matches: HTTP 412); "
                "resume with restart to upload it again"
            )
        if status in (404, 410):
            if began:
                return SourceChanged(f"source {self.shown} disappeared during the upload (HTTP {status})")
            return SourceError(f"source {self.shown} does not exist (HTTP {status})")
        if status in (401, 403):
            hint = (
                "the workers' credentials for it were refused" if self.access.credential is not None
                else "name the workers' credentials for it with source_credentials (UPLOADER_SOURCE_CREDENTIALS)"
            )
            return SourceError(f"{what} (access denied): {hint}")
        return SourceError(what)

    # -- fingerprint ---------------------------------------------------------------------------
    def fingerprint(self) -> Fingerprint:
        """ETag, Last-Modified and length by HEAD (or by a GET of byte 0 when HEAD is refused or
        says no length). :class:`SourceError` when the source is at least the multipart threshold
        and the server does not serve ranges."""
        response = self._request("HEAD", {})
        response.drain_conn()  # a HEAD answer has no body: this ends it, and the connection is reused
        response.release_conn()
        length = response.headers.get("Content-Length", "")
        if response.status in HEAD_REFUSED or (response.status == 200 and not length.isdigit()):
            fingerprint, ranges = self._probe()
        elif response.status == 200:
            fingerprint = self._version(response.headers, int(length))
            ranges = "bytes" in response.headers.get("Accept-Ranges", "").lower()
            if not ranges and fingerprint.size >= self.access.multipart_threshold:
                fingerprint, ranges = self._probe()  # not every server that serves ranges says so
        else:
            raise self._status_error(response.status, began=False)
        if not ranges and fingerprint.size >= self.access.multipart_threshold:
            raise SourceError(
                f"the server at {self.shown} does not support Range requests; a source of {fingerprint.size} bytes "
                f"(at least the multipart threshold, {self.access.multipart_threshold}) is read in ranged parts: serve "
                "it from a server that answers a ranged GET with 206, or raise the workers' UPLOADER_MULTIPART_THRESHOLD "
                "above its size to send it in one PUT"
            )
        return fingerprint

    def _probe(self) -> tuple[Fingerprint, bool]:
        """The fingerprint from a GET of byte 0, and whether the server serves ranges (206)."""
        response = self._request("GET", {"Range": "bytes=0-0"})
        response.close()  # not drained: a server that ignores Range is sending the whole body
        headers = response.headers
        if response.status == 206:
            total = _content_range(headers.get("Content-Range"))[2]
            ranges = True
        elif response.status == 416:  # an empty source has no byte 0
            total = _content_range(headers.get("Content-Range"))[2]
            ranges = True
        elif response.status == 200:
            length = headers.get("Content-Length", "")
            total = int(length) if length.isdigit() else None
            ranges = False
        else:
            raise self._status_error(response.status, began=False)
        if total is None:
            raise SourceError(f"source {self.shown}: the server does not say how long it is (no Content-Length)")
        return self._version(headers, total), ranges

    def _version(self, headers: Any, size: int) -> Fingerprint:
        etag = headers.get("ETag", "")
        if len(etag) > MAX_ETAG:
            raise SourceError(f"source {self.shown}: its ETag is longer than {MAX_ETAG} characters")
        return Fingerprint(size, _http_date_ns(headers.get("Last-Modified")), etag=etag)

    # -- reading -------------------------------------------------------------------------------
    def _conditions(self, expected: Fingerprint, ranged: bool) -> dict[str, str]:
        """The headers that pin ``expected``: ``If-Match`` for a strong ETag, else
        ``If-Unmodified-Since``; and ``If-Range`` with the same validator for a ranged GET."""
        validator = ""
        headers = {}
        if expected.etag and not expected.etag.startswith("W/"):
            validator = headers["If-Match"] = expected.etag
        elif expected.mtime_ns:
            from email.utils import formatdate

            validator = headers["If-Unmodified-Since"] = formatdate(expected.mtime_ns // 1_000_000_000, usegmt=True)
        if ranged and validator:
            headers["If-Range"] = validator
        return headers

    def get(self, offset: int, length: int, expected: Fingerprint) -> urllib3.BaseHTTPResponse:
        """An open answer whose body is exactly the bytes ``offset..offset+length`` of the version
        ``expected`` describes (checked on the answer's headers); :class:`SourceChanged` if the
        server holds another version. The whole source is asked for without Range."""
        whole = offset == 0 and length == expected.size
        headers = self._conditions(expected, ranged=not whole)
        if not whole:
            headers["Range"] = f"bytes={offset}-{offset + length - 1}"
        response = self._request("GET", headers)
        try:
            self._check_answer(response, offset, length, expected, whole=whole)
        except BaseException:
            response.close()
            raise
        return response

    def _check_answer(
        self, response: urllib3.BaseHTTPResponse, offset: int, length: int, expected: Fingerprint, *, whole: bool
    ) -> None:
        headers = response.headers
        actual = self._version(headers, expected.size)
        why = None
        if expected.etag and actual.etag and actual.etag != expected.etag:
            why = "entity tag changed"
        elif expected.mtime_ns and actual.mtime_ns and actual.mtime_ns != expected.mtime_ns:
            why = "Last-Modified changed"
        if response.status == 206 and not whole:
            first, last, total = _content_range(headers.get("Content-Range"))
            if total is not None and total != expected.size:
                why = why or f"size {expected.size} -> {total}"
            elif (first, last) != (offset, offset + length - 1):
                raise TransientStoreError(f"source {self.shown}: the server sent another range than asked for")
        elif response.status == 200:
            size = headers.get("Content-Length", "")
            if size.isdigit() and int(size) != expected.size:
                why = why or f"size {expected.size} -> {size}"
            elif not whole and why is None:
                raise SourceError(
                    f"the server at {self.shown} does not support Range requests any more (it answered a ranged GET "
                    "with the whole body); the upload cannot read its parts"
                )
        elif response.status == 416:
            why = why or "shorter than when the upload began"
        else:
            raise self._status_error(response.status, began=True)
        if why is not None:
            raise SourceChanged(
                f"source {self.shown} changed since the upload began ({why}); resume with restart to upload it again"
            )

    def open_range(self, offset: int, length: int, expected: Fingerprint) -> HttpRange:
        """The bytes ``offset..offset+length``, read by GETs as :class:`HttpRange` asks for them."""
        return HttpRange(self, offset, length, expected)

    def read_range(
        self, offset: int, length: int, expected: Fingerprint, into: bytearray | memoryview | None = None
    ) -> bytes | bytearray | memoryview:
        buffer = bytearray(length) if into is None else into
        assert len(buffer) == length, "the buffer must have the part's length"
        with self.open_range(offset, length, expected) as source_range:
            got = 0
            while got < length:
                got += source_range.readinto(memoryview(buffer)[got:], got)
        return buffer


class HttpRange(ByteRange):
    """A byte range of an HTTP(S) source. Reading on from where the last read ended continues
    the same GET; reading from elsewhere (the second pass over a part, a retry's rewind) starts
    a new conditional GET from there to the range's end. Every GET is pinned to the expected
    version, so :meth:`check` has nothing left to ask the server."""

    def __init__(self, source: HttpSource, offset: int, length: int, expected: Fingerprint) -> None:
        self.source = source
        self.name = source.shown
        self.offset = offset
        self.length = length
        self.expected = expected
        self._response: urllib3.BaseHTTPResponse | None = None
        self._at = -1  # the range position the open response's body continues from

    def readinto(self, buffer: bytearray | memoryview, position: int = 0) -> int:
        view = memoryview(buffer).cast("B")
        want = max(0, min(len(view), self.length - position))
        if want == 0:
            return 0
        if self._response is None or self._at != position:
            self._drop()
            self._response = self.source.get(self.offset + position, self.length - position, self.expected)
            self._at = position
        got = 0
        try:
            while got < want:
                n = self._response.readinto(view[got:want])
                if not n:
                    raise TransientStoreError(f"source {self.name}: the server ended the answer early")
                got += n
        except (HTTPError, OSError) as exc:
            self._drop()
            raise TransientStoreError(f"source {self.name}: {type(exc).__name__}: {exc}"[:500]) from None
        except BaseException:
            self._drop()
            raise
        self._at += got
        if self._at == self.length:  # read to its end: the connection can be reused
            self._response.drain_conn()
            self._response.release_conn()
            self._response = None
        return got

    def check(self) -> None:
        """Nothing to do: each GET carried the version's conditions and its answer was checked."""

    def _drop(self) -> None:
        if self._response is not None:
            response, self._response = self._response, None
            response.close()  # not drained: the rest of the range may be large

    def close(self) -> None:
        self._drop()
