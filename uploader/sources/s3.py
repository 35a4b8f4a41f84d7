"""S3 objects as sources: ``s3://bucket/key``, on a named endpoint of the workers or the default one.

The request names the object and, with ``source_endpoint``, the endpoint it lives on
(``UPLOADER_ENDPOINTS``: the workers hold the credentials; a request never carries any). Only
buckets the workers' ``UPLOADER_SOURCE_BUCKETS`` names are read (none by default), as only files
under ``UPLOADER_SOURCE_ROOTS`` are.

- Fingerprint: HeadObject's size, LastModified, ETag and VersionId (an :class:`ObjectVersion`).
  A missing object or one the workers may not read is refused before anything is created.
- The same S3 server (and credentials) as the destination: the bytes never pass through a
  worker. Parts are copied on the server with UploadPartCopy, a small object with CopyObject,
  each pinned to the fingerprinted version with ``CopySourceIfMatch`` (and its ``VersionId`` in
  a versioned bucket), so an object overwritten mid-upload fails the part as
  :class:`SourceChanged`.
- Another server or provider (a migration: OSS to AWS...): each part is read with ranged
  GetObjects carrying ``If-Match``, streamed into the worker's part buffer, and sent by the
  normal UploadPart path (its checksums, limits and verification).

Reading needs ``s3:GetObject`` on the source (and ``s3:ListBucket`` for a missing object to
answer 404 rather than 403); copying needs it for the destination's credentials.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from uploader.errors import PermanentStoreError, SourceChanged, SourceError
from uploader.sources.fingerprint import Fingerprint, ObjectVersion, version_difference
from uploader.sources.ranges import ByteRange
from uploader.storage.endpoints import DEFAULT_ENDPOINT

if TYPE_CHECKING:
    from uploader.storage.adapter import CopySource, ObjectStore

#: Error codes of a read or copy refused because the object is no longer the version pinned.
_CHANGED_CODES = frozenset({"PreconditionFailed", "412"})
#: Error codes of an object that is not there (HeadObject answers a bare 404).
_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound", "NoSuchVersion"})
_DENIED_CODES = frozenset({"AccessDenied", "403", "Forbidden"})

T = TypeVar("T")

RESTART_HINT = "resume with restart to upload the object as it is now"


def parse_s3_source(source: str) -> tuple[str, str]:
    """``(bucket, key)`` of ``s3://bucket/key``; :class:`SourceError` for anything else."""
    bucket, _, key = source.removeprefix("s3://").partition("/")
    if not (source.startswith("s3://") and bucket and key):
        raise SourceError(f"source {source[:200]!r} must be s3://bucket/key")
    return bucket, key


class S3ObjectSource:
    """One object of an S3 bucket, read through ``objects`` (the source endpoint's store)."""

    def __init__(self, source: str, objects: ObjectStore, allowed: Sequence[str]) -> None:
        """``allowed``: the workers' ``UPLOADER_SOURCE_BUCKETS`` (passed in: ``objects`` is a
        store shared by every settings object with the same endpoint, not these settings')."""
        self.name = source
        self.bucket, self.key = parse_s3_source(source)
        self.objects = objects
        if not bucket_allowed(allowed, objects.endpoint.name, self.bucket):
            where = "" if objects.endpoint.name == DEFAULT_ENDPOINT else f" on endpoint {objects.endpoint.name!r}"
            raise SourceError(
                f"source {source[:200]}: bucket {self.bucket!r}{where} is not among the workers' source buckets "
                f"(UPLOADER_SOURCE_BUCKETS{', which is empty' if not allowed else ''})"
            )

    @staticmethod
    def is_compatible(source: str) -> bool:
        return source.startswith("s3://")

    def _refusal(self, exc: PermanentStoreError, *, began: bool) -> SourceError | SourceChanged:
        """What a permanent error from the source's server means for the upload."""
        code = exc.code or ""
        if code in _CHANGED_CODES:
            return SourceChanged(
                f"source {self.name} changed since the upload began (its ETag is no longer the one pinned); {RESTART_HINT}"
            )
        if code in _MISSING_CODES:
            if began:
                return SourceChanged(f"source {self.name} disappeared during the upload; {RESTART_HINT}")
            return SourceError(f"source {self.name} does not exist (no such object or bucket)")
        if code in _DENIED_CODES:
            return SourceError(f"source {self.name} cannot be read: access denied (check the workers' credentials for it)")
        return SourceError(f"source {self.name} cannot be read: {exc}")

    def fingerprint(self) -> Fingerprint:
        """HeadObject: size, LastModified, ETag and VersionId. :class:`SourceError` for a missing
        or unreadable object; a :class:`~uploader.errors.TransientStoreError` is raised as is."""
        try:
            head = self.objects.head_object(self.bucket, self.key)
        except PermanentStoreError as exc:
            raise self._refusal(exc, began=False) from None
        etag = str(head.get("ETag") or "")
        if not etag:
            raise SourceError(f"source {self.name}: the server reports no ETag, so a change could not be detected")
        modified = head.get("LastModified")
        mtime_ns = int(modified.timestamp() * 1_000_000_000) if modified is not None else 0
        return Fingerprint(
            int(head["ContentLength"]), mtime_ns, ObjectVersion(etag, str(head.get("VersionId") or ""))
        )

    def copy_source(self, expected: Fingerprint) -> CopySource:
        """The pinned version, as UploadPartCopy / CopyObject name it."""
        from uploader.storage.adapter import CopySource

        version = _pinned(self.name, expected)
        return CopySource(self.bucket, self.key, version.etag, version.version_id)

    def copies_to(self, destination: ObjectStore) -> bool:
        """Whether ``destination`` can copy from this object on the server: the same S3 server
        reached with the same credentials (another provider, or other credentials, could not
        read it: the bytes then go through the worker)."""
        mine, theirs = self.objects.endpoint, destination.endpoint
        return (mine.endpoint_url, mine.region, mine.aws_profile) == (
            theirs.endpoint_url, theirs.region, theirs.aws_profile
        )

    def call(self, what: Callable[[], T], *, changes_only: bool = False) -> T:
        """``what()`` (a read of this object, or a copy from it, once the upload began), with a
        permanent error translated for the upload: a changed or vanished object is
        :class:`SourceChanged`, another refusal :class:`SourceError`. ``changes_only``: only the
        former (a copy's other refusals, AccessDenied or NoSuchUpload, may be the destination's,
        and stay :class:`PermanentStoreError`)."""
        try:
            return what()
        except PermanentStoreError as exc:
            if changes_only and (exc.code or "") not in _CHANGED_CODES | {"NoSuchKey", "NoSuchVersion"}:
                raise
            raise self._refusal(exc, began=True) from None

    def open_range(self, offset: int, length: int, expected: Fingerprint) -> ObjectRange:
        """The byte range, read on demand with ranged GETs pinned to the expected version."""
        return ObjectRange(self, offset, length, _pinned(self.name, expected))

    def read_range(
        self, offset: int, length: int, expected: Fingerprint, into: bytearray | memoryview | None = None
    ) -> bytes | bytearray | memoryview:
        buffer = bytearray(length) if into is None else into
        assert len(buffer) == length, "the buffer must have the part's length"
        with self.open_range(offset, length, expected) as source_range:
            if length == 0:
                source_range.check()  # nothing to read: still, the object must be the one pinned
            source_range.readinto(buffer)
        return buffer


def bucket_allowed(allowed: Sequence[str], endpoint: str, bucket: str) -> bool:
    """Whether ``UPLOADER_SOURCE_BUCKETS`` (``allowed``) lets sources be read from ``bucket`` of
    the endpoint named ``endpoint``: an entry ``bucket`` or ``*`` is of the default endpoint,
    ``name:bucket`` or ``name:*`` of the named one."""
    for entry in allowed:
        name, _, pattern = entry.rpartition(":")
        if (name or DEFAULT_ENDPOINT) == endpoint and pattern in ("*", bucket):
            return True
    return False


def _pinned(name: str, expected: Fingerprint) -> ObjectVersion:
    version = expected.version
    if version is None:
        raise SourceChanged(f"source {name}: the checkpoint holds no object version for it; {RESTART_HINT}")
    return version


class ObjectRange(ByteRange):
    """A byte range of an object version (what :class:`~uploader.storage.bodies.RangeBody` reads
    a part larger than the worker's part buffer from): each read is one ranged GET with
    ``If-Match``, so every byte read is of the pinned version, and :meth:`check` has nothing to
    add but a HeadObject for an empty range. Nothing is held open between reads."""

    def __init__(self, source: S3ObjectSource, offset: int, length: int, version: ObjectVersion) -> None:
        self.name = source.name
        self.source = source
        self.offset = offset
        self.length = length
        self.version = version

    def check(self) -> None:
        """Nothing to do for a non-empty range: every GET carries ``If-Match`` (a changed
        object answers 412, raised as :class:`SourceChanged` by :meth:`readinto`)."""
        if self.length:
            return
        actual = self.source.fingerprint().version
        if version_difference(self.version, actual):
            raise SourceChanged(f"source {self.name} changed since the upload began; {RESTART_HINT}")

    def readinto(self, buffer: bytearray | memoryview, position: int = 0) -> int:
        """Fill ``buffer`` (or as much as the range has left) from ``position`` of the range:
        the bytes read; :class:`SourceChanged` if the object changed or ends early."""
        view = memoryview(buffer).cast("B")
        want = max(0, min(len(view), self.length - position))
        source = self.source
        got = source.call(
            lambda: source.objects.read_object_range(
                source.bucket, source.key, self.offset + position, view[:want], if_match=self.version.etag,
                version_id=self.version.version_id,
            )
        )
        if got != want:
            raise SourceChanged(f"source {self.name} is shorter than when the upload began; {RESTART_HINT}")
        return want

    def __enter__(self) -> ObjectRange:
        return self
