"""What the upload protocol needs at hand: settings, the checkpoint and the object store."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

from uploader.bandwidth import TokenBucket
from uploader.checkpoint import CheckpointStore
from uploader.config import Settings, get_settings
from uploader.sources import HttpAccess, Source, open_source
from uploader.storage.adapter import ObjectStore, object_store


@dataclass(frozen=True)
class UploaderContext:
    settings: Settings
    checkpoint: CheckpointStore
    objects: ObjectStore
    throttle: TokenBucket | None = None

    def objects_for(self, endpoint: str | None) -> ObjectStore:
        """The object store of the named endpoint an upload goes to (``""``/``None``: the default
        one, :attr:`objects`). :class:`~uploader.errors.InvalidRequest` for an unknown name."""
        return object_store(self.settings, endpoint) if endpoint else self.objects

    def source(self, source: str, endpoint: str = "", credentials: str = "") -> Source:
        """The source an upload names, as a worker opens it: a file within the source roots, an
        HTTP(S) URL through the outbound guard with the workers' credentials named
        ``credentials`` (a request's ``source_credentials``), or an S3 object on the named
        ``endpoint`` (``""``: the default one)."""
        return open_source(source, self.settings.source_roots, HttpAccess.of(self.settings, credentials),
                           objects_for=self.objects_for, endpoint=endpoint, source_buckets=self.settings.source_buckets)

    @classmethod
    def from_settings(cls, settings: Settings) -> UploaderContext:
        return cls(
            settings=settings,
            checkpoint=CheckpointStore.from_settings(settings),
            objects=object_store(settings),
            throttle=TokenBucket(settings.max_bandwidth) if settings.max_bandwidth else None,
        )


@lru_cache(maxsize=1)
def default_context() -> UploaderContext:
    """The process-wide context built from the environment (one Redis pool, one S3 client).
    A forked child (a prefork pool process) builds its own: connections are never shared
    across processes."""
    return UploaderContext.from_settings(get_settings())


os.register_at_fork(after_in_child=default_context.cache_clear)
