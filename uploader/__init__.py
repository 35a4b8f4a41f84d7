"""Distributed, resumable multipart uploads to S3-compatible storage on Celery workers.

    from uploader import Uploader
    up = Uploader.from_env()
    handle = up.submit("/data/big.bin", "s3://bucket/key")
    handle.wait(timeout=3600)
"""

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
