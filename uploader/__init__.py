"""Distributed, resumable multipart uploads to S3-compatible storage on Celery workers.

    from uploader import Uploader
    up = Uploader.from_env()
    handle = up.submit("/data/big.bin", "s3://bucket/key")
    handle.wait(timeout=3600)

The names below are imported when first used (PEP 562), so that importing a submodule (the CLI
for ``--help``, a worker's modules) does not load the client, Celery and Redis with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from uploader.lazy import exports

if TYPE_CHECKING:
    from uploader.client import Uploader, UploadHandle, UploadStatus
    from uploader.errors import (
        InvalidRequest,
        NotAuthorized,
        SourceChanged,
        SourceError,
        UploadCancelled,
        UploadConflict,
        UploaderError,
        UploadFailed,
        UploadNotFound,
    )

#: Where each public name lives.
_HOMES = {
    "Uploader": "uploader.client",
    "UploadHandle": "uploader.client",
    "UploadStatus": "uploader.client",
    **dict.fromkeys(
        ("UploaderError", "InvalidRequest", "SourceError", "SourceChanged", "UploadNotFound", "UploadConflict",
         "UploadFailed", "UploadCancelled", "NotAuthorized"),
        "uploader.errors",
    ),
}

__all__ = [
    "Uploader",
    "UploadHandle",
    "UploadStatus",
    "UploaderError",
    "InvalidRequest",
    "SourceError",
    "SourceChanged",
    "UploadNotFound",
    "UploadConflict",
    "UploadFailed",
    "UploadCancelled",
    "NotAuthorized",
]


__getattr__ = exports(__name__, globals(), _HOMES)
