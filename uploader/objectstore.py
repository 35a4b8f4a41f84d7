"""The object store adapter: every boto3 call the uploader makes, with retry classification.

Callers see :class:`TransientStoreError` (worth retrying) or :class:`PermanentStoreError`
(retrying cannot help), each with the S3 error ``code`` and a message free of credentials.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ConnectionError as BotoConnectionError, HTTPClientError

from uploader.checksums import Algorithm, crc32_b64, md5_b64
from uploader.config import Settings
from uploader.errors import PermanentStoreError, SourceChanged, SourceError, TransientStoreError

#: S3 error codes that a later attempt can succeed on.
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        "BadDigest",  # the body was damaged in transit; sending it again fixes it
        "IncompleteBody",
        "OperationAborted",
    }
)


@dataclass(frozen=True)
class UploadedPart:
    """What the server acknowledged for one part."""

    etag: str
    checksum: str


@dataclass(frozen=True)
class ListedPart:
    part_number: int
    etag: str
    size: int


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
        self._filled = 0  # the buffer is reused: what it held is gone
        value = self._source.checksums((algorithm,), self._buffer)[0]
        self.seek(0)
        return value

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

    def _refill(self) -> None:
        self._filled = 0  # nothing valid in the buffer until the read succeeds
        self._source.check()
        self._start = self._pos
        self._filled = self._source.readinto(self._buffer, self._pos)


#: Request bodies smaller than this go without ``Expect: 100-continue`` (the AWS SDK for Go v2,
#: s5cmd's, draws the line at 2 MB too). botocore asks for it on every file-like body: a round
#: trip to the server before the body, and botocore then reads the interim response a byte per
#: ``recv``. For a large part that wait spares sending megabytes the server would refuse
#: (a wrong signature, a redirect); for a small object it only adds latency.
EXPECT_CONTINUE_MIN_BYTES = 2 << 20


def _expect_continue_for_large_bodies_only(params: dict[str, Any], **_: Any) -> None:
    """botocore ``before-call`` handler, run after its own ``add_expect_header``."""
    headers = params.get("headers") or {}
    body = params.get("body")
    if (
        headers.get("Expect") == "100-continue"
        and isinstance(body, (BodyView, RangeBody))
        and len(body) < EXPECT_CONTINUE_MIN_BYTES
    ):
        del headers["Expect"]


def store_error(exc: Exception, action: str) -> TransientStoreError | PermanentStoreError:
    """Classify a boto3/botocore exception raised while doing ``action``."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "Unknown"))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        message = error.get("Message") or code
        text = f"{action} failed: {code}: {message}"
        transient = code in TRANSIENT_CODES or status >= 500 or status == 429
        err: TransientStoreError | PermanentStoreError = (
            TransientStoreError(text) if transient else PermanentStoreError(text + _advice(code))
        )
        err.code = code  # type: ignore[attr-defined]
        return err
    if isinstance(exc, HTTPClientError) and isinstance(exc.kwargs.get("error"), (ValueError, UnicodeError)):
        # The request could not even be written (an invalid header value, a non-Latin-1
        # character): sending it again fails the same way.
        err = PermanentStoreError(f"{action} failed: the request could not be sent: {exc.kwargs['error']}")
        err.code = "InvalidRequest"  # type: ignore[attr-defined]
        return err
    if isinstance(exc, (BotoConnectionError, HTTPClientError, ConnectionError, TimeoutError)):
        err = TransientStoreError(
            f"{action} failed: {type(exc).__name__}: {exc} (check UPLOADER_S3_ENDPOINT_URL and the workers' network)"
        )
        err.code = type(exc).__name__  # type: ignore[attr-defined]
        return err
    if isinstance(exc, BotoCoreError):
        # NoCredentialsError, ParamValidationError and friends: configuration, not luck.
        err = PermanentStoreError(f"{action} failed: {type(exc).__name__}: {exc}")
        err.code = type(exc).__name__  # type: ignore[attr-defined]
        return err
    raise exc


def _advice(code: str) -> str:
    return {
        "NoSuchBucket": " (create the bucket first, or check the bucket name)",
        "AccessDenied": " (check the workers' AWS credentials and the bucket policy)",
        "InvalidAccessKeyId": " (check the workers' AWS credentials)",
        "SignatureDoesNotMatch": " (check the workers' AWS secret key)",
        "NoSuchUpload": " (the multipart upload was aborted or expired on the server)",
    }.get(code, "")


def error_code(exc: BaseException) -> str | None:
    """The S3 error code a classified store error carries, if any."""
    return getattr(exc, "code", None)


class ObjectStore:
    """One boto3 S3 client configured for speed and compatibility, shared by a process's threads
    (boto3 clients are thread-safe)."""

    def __init__(self, settings: Settings, client: Any | None = None) -> None:
        self.settings = settings
        self.checksum = settings.part_checksum
        self.client = client or boto3.session.Session().client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            region_name=settings.s3_region,
            config=Config(
                # boto3 >= 1.36 adds CRC32 trailers to every request by default; OSS and others
                # reject them, and we send our own per-part checksum anyway.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                # Over plain HTTP botocore would SHA-256 every byte to sign it: a second hash
                # of the body that the part checksum already covers.
                s3={"addressing_style": settings.s3_addressing_style, "payload_signing_enabled": False},
                max_pool_connections=max(10, settings.worker_concurrency * 2),
                retries={"mode": "standard", "max_attempts": 3},
                connect_timeout=settings.s3_connect_timeout,
                read_timeout=120,
            ),
        )
        self.client.meta.events.register_last("before-call.s3", _expect_continue_for_large_bodies_only)

    def _call(self, action: str, method: str, **kwargs: Any) -> Any:
        try:
            return getattr(self.client, method)(**kwargs)
        except (ClientError, BotoCoreError, ConnectionError, TimeoutError) as exc:
            raise store_error(exc, action) from None

    def _checksum_args(self, data: bytes | bytearray | memoryview) -> tuple[dict[str, str], str]:
        if self.checksum == "crc32":
            value = crc32_b64(data)
            return {"ChecksumCRC32": value}, value
        value = md5_b64(data)
        return {"ContentMD5": value}, value

    def create_multipart_upload(
        self, bucket: str, key: str, *, metadata: dict[str, str] | None, content_type: str | None
    ) -> str:
        kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key, "Metadata": metadata or {}}
        if content_type:
            kwargs["ContentType"] = content_type
        if self.checksum == "crc32":
            kwargs["ChecksumAlgorithm"] = "CRC32"
        return self._call(f"CreateMultipartUpload s3://{bucket}/{key}", "create_multipart_upload", **kwargs)["UploadId"]

    def upload_part(
        self, bucket: str, key: str, mpu_id: str, part_number: int, data: bytes | bytearray | memoryview | RangeBody
    ) -> UploadedPart:
        """Send one part: a buffer (checksummed in one pass, sent as a :class:`BodyView`), or a
        :class:`RangeBody` (checksummed in a first pass over its range, then streamed).

        Raises :class:`~uploader.errors.SourceChanged` / :class:`~uploader.errors.SourceError`
        when a streamed body's source changed or became unreadable while it was read."""
        body: BodyView | RangeBody
        if isinstance(data, RangeBody):
            body = data
            checksum = body.checksum(self.checksum)
            checksum_args = {"ChecksumCRC32" if self.checksum == "crc32" else "ContentMD5": checksum}
        else:
            checksum_args, checksum = self._checksum_args(data)
            body = BodyView(data)
        action = f"UploadPart {part_number} of s3://{bucket}/{key}"
        try:
            response = self.client.upload_part(
                Bucket=bucket, Key=key, UploadId=mpu_id, PartNumber=part_number, Body=body, **checksum_args
            )
        except HTTPClientError as exc:
            # botocore wraps whatever the body raised while being read (after its own retries,
            # each failing at its first read): a source error is ours, not the network's.
            inner = exc.kwargs.get("error")
            if isinstance(inner, (SourceChanged, SourceError)):
                raise inner from None
            raise store_error(exc, action) from None
        except (ClientError, BotoCoreError, ConnectionError, TimeoutError) as exc:
            raise store_error(exc, action) from None
        etag = response.get("ETag")
        if not etag:  # a response cut off inside its headers can parse as a bare 200
            error = TransientStoreError(f"{action}: response without an ETag")
            error.code = "MissingETag"  # type: ignore[attr-defined]
            raise error
        return UploadedPart(etag=etag, checksum=checksum)

    def complete_multipart_upload(
        self, bucket: str, key: str, mpu_id: str, parts: list[tuple[int, UploadedPart]]
    ) -> dict[str, Any]:
        """Complete with exactly the recorded parts, sorted by part number (some servers reject
        any other order, and ListParts may list a part number twice)."""
        listed = []
        for number, part in sorted(parts, key=lambda p: p[0]):
            entry: dict[str, Any] = {"PartNumber": number, "ETag": part.etag}
            if self.checksum == "crc32":
                entry["ChecksumCRC32"] = part.checksum
            listed.append(entry)
        return self._call(
            f"CompleteMultipartUpload s3://{bucket}/{key}",
            "complete_multipart_upload",
            Bucket=bucket,
            Key=key,
            UploadId=mpu_id,
            MultipartUpload={"Parts": listed},
        )

    def abort_multipart_upload(self, bucket: str, key: str, mpu_id: str) -> bool:
        """Abort; ``False`` if the server no longer knows the upload (already aborted/completed)."""
        try:
            self._call(
                f"AbortMultipartUpload s3://{bucket}/{key}", "abort_multipart_upload", Bucket=bucket, Key=key, UploadId=mpu_id
            )
        except PermanentStoreError as exc:
            if error_code(exc) == "NoSuchUpload":
                return False
            raise
        return True

    def list_parts(self, bucket: str, key: str, mpu_id: str) -> Iterator[ListedPart]:
        """Every part the server holds; a part number may appear more than once on some servers."""
        marker = 0
        while True:
            response = self._call(
                f"ListParts s3://{bucket}/{key}",
                "list_parts",
                Bucket=bucket,
                Key=key,
                UploadId=mpu_id,
                PartNumberMarker=marker,
                MaxParts=1000,
            )
            for part in response.get("Parts", []):
                yield ListedPart(part_number=part["PartNumber"], etag=part["ETag"], size=part["Size"])
            if not response.get("IsTruncated"):
                return
            next_marker = int(response.get("NextPartNumberMarker") or 0)
            if next_marker <= marker:
                return
            marker = next_marker

    def list_multipart_uploads(self, bucket: str, key: str) -> list[tuple[str, float]]:
        """``(upload id, initiated timestamp)`` of every multipart upload in progress for exactly
        ``key``."""
        out = []
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": key}
        while True:
            response = self._call(f"ListMultipartUploads s3://{bucket}/{key}", "list_multipart_uploads", **kwargs)
            for upload in response.get("Uploads", []):
                if upload["Key"] == key:
                    out.append((upload["UploadId"], upload["Initiated"].timestamp()))
            if not response.get("IsTruncated"):
                return out
            kwargs["KeyMarker"] = response.get("NextKeyMarker")
            kwargs["UploadIdMarker"] = response.get("NextUploadIdMarker")

    def part_checksum(self, data: bytes | bytearray | memoryview) -> str:
        """The checksum this store sends with a part (what Complete must repeat)."""
        return self._checksum_args(data)[1]

    def put_object(
        self, bucket: str, key: str, data: bytes, *, metadata: dict[str, str] | None, content_type: str | None
    ) -> dict[str, Any]:
        """Single PUT with Content-MD5, so the returned ETag is the MD5 the server verified."""
        kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key, "Body": BodyView(data), "Metadata": metadata or {}}
        kwargs["ContentMD5"] = md5_b64(data)
        if content_type:
            kwargs["ContentType"] = content_type
        response = self._call(f"PutObject s3://{bucket}/{key}", "put_object", **kwargs)
        response["ContentMD5"] = kwargs["ContentMD5"]
        return response

    def head_object(self, bucket: str, key: str) -> dict[str, Any]:
        return self._call(f"HeadObject s3://{bucket}/{key}", "head_object", Bucket=bucket, Key=key)

    def head_bucket(self, bucket: str) -> None:
        try:
            self._call(f"HeadBucket s3://{bucket}", "head_bucket", Bucket=bucket)
        except PermanentStoreError as exc:
            if error_code(exc) in {"404", "NoSuchBucket", "NotFound"}:
                exc.args = (f"bucket {bucket!r} does not exist (create it first, or check the name)",)
                exc.code = "NoSuchBucket"  # type: ignore[attr-defined]
            raise


_shared: dict[tuple[Any, ...], ObjectStore] = {}
_shared_lock = threading.Lock()


def _forget_after_fork() -> None:
    """In a forked child (a prefork pool process), forget the parent's clients: their pooled
    sockets to S3 are shared with the parent, and two processes writing requests into one
    socket interleave them (seen: BadDigest and bare 400s once the workers' recovery, in the
    parent, had used S3 before a pool process was replaced)."""
    global _shared_lock
    _shared.clear()
    _shared_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


def object_store(settings: Settings) -> ObjectStore:
    """The process's shared :class:`ObjectStore` for ``settings`` (created once, then reused:
    a new boto3 client costs ~10 ms and its own connection pool)."""
    key = (settings.s3_endpoint_url, settings.s3_region, settings.s3_addressing_style, settings.part_checksum)
    with _shared_lock:
        store = _shared.get(key)
        if store is None:
            store = _shared[key] = ObjectStore(settings)
        return store
