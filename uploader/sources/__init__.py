"""Sources: where an upload's bytes come from, one small class per kind.

A source is named by a string in the request. :func:`open_source` picks the class whose
``is_compatible`` accepts it (the shape of s3transfer's upload input managers), so new kinds
(HTTP ranges, S3 objects) slot in as one module here without touching the callers.

Every worker resolves the source itself, so a local path must name the same file on every worker
machine (a shared mount); the fingerprint catches a file that differs or changed.

- :mod:`.local`: local and shared-mount files.
- :mod:`.http`: HTTP(S) URLs, read by conditional ranged GETs through the outbound guard.
- :mod:`.s3`: S3 objects (``s3://bucket/key``), copied on the server or read with ranged GETs.
- :mod:`.roots`: the source roots (none by default) and the refusals made before any open.
- :mod:`.denylist`: places never read, whatever the roots.
- :mod:`.beneath`: opening beneath a root's descriptor (``openat2``, or an ``O_NOFOLLOW`` walk).
- :mod:`.fingerprint`, :mod:`.ranges`: what identifies a version; one open byte range.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from uploader.errors import SourceError
from uploader.sources.fingerprint import FileId, Fingerprint
from uploader.sources.http import HttpAccess, HttpSource
from uploader.sources.local import OPEN_FLAGS, LocalFileSource
from uploader.sources.ranges import ByteRange, SourceRange
from uploader.sources.roots import locate, resolve_within_roots
from uploader.sources.s3 import S3ObjectSource

if TYPE_CHECKING:
    from uploader.storage.adapter import ObjectStore

__all__ = [
    "OPEN_FLAGS", "ByteRange", "FileId", "Fingerprint", "HttpAccess", "HttpSource", "LocalFileSource", "S3ObjectSource",
    "Source", "SourceRange", "locate", "open_source", "resolve_within_roots",
]


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

    def open_range(self, offset: int, length: int, expected: Fingerprint) -> ByteRange:
        """The byte range ``offset..offset+length``, open until closed, to be read in chunks;
        :class:`SourceChanged` if the source no longer matches ``expected``."""
        ...


_SOURCE_KINDS = (HttpSource, LocalFileSource)


def open_source(
    source: str,
    roots: Sequence[Path],
    http: HttpAccess | None = None,
    *,
    objects_for: Callable[[str | None], ObjectStore] | None = None,
    endpoint: str = "",
    source_buckets: Sequence[str] = (),
) -> Source:
    """The source object for ``source``; :class:`SourceError` if no kind accepts it. ``roots``
    confine local files; ``http`` says how HTTP(S) URLs are reached (by default: no internal
    address, no credentials; credentials apply to HTTP(S) sources only); ``objects_for`` (the
    context's) gives the store of the named ``endpoint`` an S3 source lives on (``""``: the
    default one), read only from the buckets ``source_buckets`` allows (``UPLOADER_SOURCE_BUCKETS``)."""
    credentials = http is not None and http.credential is not None
    if S3ObjectSource.is_compatible(source):
        if objects_for is None:
            raise SourceError(f"source {source[:200]!r}: S3 objects are read by the workers only")
        if credentials:
            raise SourceError("source_credentials apply to http:// and https:// sources only")
        return S3ObjectSource(source, objects_for(endpoint or None), source_buckets)
    for kind in _SOURCE_KINDS:
        if kind.is_compatible(source):
            if kind is HttpSource:
                return HttpSource(source, http)
            if credentials:
                raise SourceError("source_credentials apply to http:// and https:// sources only")
            return LocalFileSource(source, roots)
    raise SourceError(f"unsupported source {source!r}: give an absolute file path, an http(s):// URL or s3://bucket/key")
