"""Object options as S3 parameters, filtered per call.

An upload's :class:`~uploader.model.ObjectOptions` become S3 parameters once
(:func:`object_args`), and each call takes what its API accepts, as s3transfer's upload.py filters
``ALLOWED_UPLOAD_ARGS`` per call. A new option is one line in :func:`object_args` and, if a call
other than Create/Put takes it, one in its filter.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from uploader.errors import PermanentStoreError
from uploader.model import ObjectOptions

#: What UploadPart takes: the SSE-C headers must be on every part (the server encrypts each).
UPLOAD_PART_ARGS = frozenset(
    {"SSECustomerAlgorithm", "SSECustomerKey", "SSECustomerKeyMD5", "RequestPayer", "ExpectedBucketOwner"}
)
#: What CompleteMultipartUpload takes (IfNoneMatch: ``no_overwrite``).
COMPLETE_MULTIPART_ARGS = UPLOAD_PART_ARGS | {"IfNoneMatch"}
#: What HeadObject and ListParts take (an SSE-C object is read with its key).
READ_ARGS = UPLOAD_PART_ARGS
#: What AbortMultipartUpload takes.
ABORT_ARGS = frozenset({"RequestPayer", "ExpectedBucketOwner"})
#: What CreateMultipartUpload takes: everything but the conditional write, which Complete carries.
CREATE_MULTIPART_EXCLUDED = frozenset({"IfNoneMatch"})


def object_args(options: ObjectOptions, keyring: dict[str, bytes]) -> dict[str, Any]:
    """Every S3 parameter ``options`` asks for (PutObject's names; unset options absent).
    The SSE-C key is looked up in the workers' ``keyring`` by name, here and nowhere else."""
    o = options
    args: dict[str, Any] = {"Metadata": o.metadata or {}}
    headers = {
        "ContentType": o.content_type,
        "CacheControl": o.cache_control,
        "ContentDisposition": o.content_disposition,
        "ContentEncoding": o.content_encoding,
        "ContentLanguage": o.content_language,
        "ACL": o.acl.value if o.acl else None,
        "StorageClass": o.storage_class.value if o.storage_class else None,
        "Tagging": urlencode(o.tags) if o.tags else None,
        "ServerSideEncryption": o.sse.value if o.sse else None,
        "SSEKMSKeyId": o.sse_kms_key_id,
        "BucketKeyEnabled": o.bucket_key_enabled,
        "ObjectLockMode": o.object_lock_mode.value if o.object_lock_mode else None,
        "ObjectLockRetainUntilDate": _when(o.object_lock_retain_until),
        "ObjectLockLegalHoldStatus": o.object_lock_legal_hold.value if o.object_lock_legal_hold else None,
        "Expires": _when(o.expires),
        "ExpectedBucketOwner": o.expected_bucket_owner,
        "RequestPayer": o.request_payer.value if o.request_payer else None,
        "IfNoneMatch": "*" if o.no_overwrite else None,
    }
    args.update((name, value) for name, value in headers.items() if value is not None)
    if o.sse_customer_key is not None:
        key = keyring.get(o.sse_customer_key)
        if key is None:
            error = PermanentStoreError(
                f"the SSE-C key {o.sse_customer_key!r} is not in this worker's keyring (UPLOADER_SSE_C_KEYS)"
            )
            error.code = "MissingSSECustomerKey"
            raise error
        # botocore base64-encodes the key and adds its MD5 (the sse_md5 handler).
        args.update(SSECustomerAlgorithm="AES256", SSECustomerKey=key)
    return args


def _when(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None  # Python 3.11 reads "Z"


def only(args: dict[str, Any], allowed: frozenset[str]) -> dict[str, Any]:
    """The parameters of ``args`` a call taking ``allowed`` sends."""
    return {name: value for name, value in args.items() if name in allowed}
