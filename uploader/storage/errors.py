"""Error classification: every boto3/botocore failure becomes a
:class:`~uploader.errors.TransientStoreError` (worth retrying) or a
:class:`~uploader.errors.PermanentStoreError` (retrying cannot help), each with the S3 error
``code`` and a message free of credentials and with advice where there is some.
"""

from __future__ import annotations

from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from uploader.errors import PermanentStoreError, TransientStoreError

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
        err.code = code
        return err
    if isinstance(exc, HTTPClientError) and isinstance(exc.kwargs.get("error"), (ValueError, UnicodeError)):
        # The request could not even be written (an invalid header value, a non-Latin-1
        # character): sending it again fails the same way.
        err = PermanentStoreError(f"{action} failed: the request could not be sent: {exc.kwargs['error']}")
        err.code = "InvalidRequest"
        return err
    if isinstance(exc, (BotoConnectionError, HTTPClientError, ConnectionError, TimeoutError)):
        err = TransientStoreError(
            f"{action} failed: {type(exc).__name__}: {exc} (check UPLOADER_S3_ENDPOINT_URL and the workers' network)"
        )
        err.code = type(exc).__name__
        return err
    if isinstance(exc, BotoCoreError):
        # NoCredentialsError, ParamValidationError and friends: configuration, not luck.
        err = PermanentStoreError(f"{action} failed: {type(exc).__name__}: {exc}")
        err.code = type(exc).__name__
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
