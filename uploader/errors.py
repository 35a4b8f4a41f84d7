"""Exceptions a caller may catch. Every message says what went wrong and what to do about it,
and never contains credentials.

Each class is a plain ``Exception`` with a single string argument so that Celery's JSON result
serialisation round-trips it to clients that do not import this package.
"""

from __future__ import annotations


class UploaderError(Exception):
    """Base class of every error this package raises on purpose."""

    #: The S3 error code of a classified store error (``uploader.storage.errors``); None otherwise.
    code: str | None = None


class InvalidRequest(UploaderError, ValueError):
    """The request is malformed; nothing was created."""


class SourceError(UploaderError):
    """The source cannot be read (missing, a directory, unreadable, outside the allowed roots)."""


class SourceChanged(UploaderError):
    """The source differs from the fingerprint taken when the upload began."""


class UploadNotFound(UploaderError):
    """No checkpoint exists for the upload id (never submitted, rejected, or expired)."""


class UploadConflict(UploaderError):
    """The request contradicts the upload's current state (e.g. resuming a cancelled upload)."""


class PermanentStoreError(UploaderError):
    """The object store refused in a way retrying cannot fix (AccessDenied, NoSuchBucket, ...)."""


class TransientStoreError(UploaderError):
    """The object store or network failed in a way worth retrying (5xx, throttling, resets)."""


class UploadFailed(UploaderError):
    """Raised by ``wait`` when the upload ended ``failed``."""


class UploadCancelled(UploaderError):
    """Raised by ``wait`` when the upload was cancelled."""


class UploadRefused(UploaderError):
    """The coordinator refused the request before creating anything (its reason says why: a
    missing source, a missing bucket, an invalid option...). ``status`` reports it for a while."""


class NotAuthorized(UploaderError):
    """The sender may not do this to that upload: ``cancel``/``resume`` need the upload's
    capability token (kept by whoever submitted it) or an operator's fleet key."""


class MessageQuarantined(UploaderError):
    """A worker could not accept the task message (malformed) and moved it to the dead-letter
    list (``uploader deadletter list``); the task never ran."""


class Unreachable(UploaderError):
    """Redis (broker, results, checkpoint) or S3 could not be reached; the message names the
    setting to check."""


class NoWorkers(UploaderError):
    """No worker has been alive for a while: nothing will move until one is started."""


class NoWorkerOnHost(UploaderError):
    """A host-local upload's host has no live worker: its file can be read nowhere else
    (uploader/locality.py)."""


class Misconfigured(UploaderError):
    """A setting names something unusable (a missing or invalid key or certificate file); the
    message names the setting and never quotes a secret."""


def error_classes() -> dict[str, type[UploaderError]]:
    """Every error class of this package by name (for errors that crossed a Celery result)."""
    found: dict[str, type[UploaderError]] = {}
    pending: list[type[UploaderError]] = [UploaderError]
    while pending:
        cls = pending.pop()
        found[cls.__name__] = cls
        pending.extend(cls.__subclasses__())
    return found
