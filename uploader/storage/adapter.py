"""The object store adapter: every boto3 call the uploader makes, with retry classification.

Callers see :class:`TransientStoreError` (worth retrying) or :class:`PermanentStoreError`
(retrying cannot help), each with the S3 error ``code`` and a message free of credentials
(:mod:`uploader.storage.errors`). Bodies are :mod:`uploader.storage.bodies`; an upload's object
options become each call's parameters in :mod:`uploader.storage.arguments`; what each provider
accepts is its profile (:mod:`uploader.storage.profiles`).
"""

from __future__ import annotations

import base64
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError

from uploader import logsafe
from uploader.checksums import (
    CRC64ECMA,
    Algorithm,
    ChecksumAlgorithm,
    ChecksumType,
    checksum_b64,
    checksums_b64,
    crc64ecma_text,
    md5_b64,
)
from uploader.config import Settings
from uploader.errors import PermanentStoreError, SourceChanged, SourceError, TransientStoreError
from uploader.model import ListedPart, ObjectOptions, UploadedPart
from uploader.storage.arguments import (
    ABORT_ARGS,
    COMPLETE_MULTIPART_ARGS,
    CREATE_MULTIPART_EXCLUDED,
    READ_ARGS,
    UPLOAD_PART_ARGS,
    object_args,
    only,
)
from uploader.storage.bodies import BodyView, Pace, PacedBody, RangeBody, ReportedBody
from uploader.storage.endpoints import Endpoint, default_endpoint, resolve
from uploader.storage.errors import error_code, store_error
from uploader.storage.osscallback import PARAM as OSS_CALLBACK_PARAM
from uploader.storage.osscallback import OssCallback
from uploader.storage.osscallback import register as register_oss_callback
from uploader.storage.profiles import ExpectContinue

#: Request bodies smaller than this go without ``Expect: 100-continue`` (the AWS SDK for Go v2,
#: s5cmd's, draws the line at 2 MB too). botocore asks for it on every file-like body: a round
#: trip to the server before the body, and botocore then reads the interim response a byte per
#: ``recv``. For a large part that wait spares sending megabytes the server would refuse
#: (a wrong signature, a redirect); for a small object it only adds latency.
EXPECT_CONTINUE_MIN_BYTES = 2 << 20
#: A part being sent reports how far it got every this many bytes (``upload_part``'s ``progress``):
#: a few Redis writes per part, and a progress bar that moves within a part.
PROGRESS_STEP = 4 << 20


def _expect_continue_for_large_bodies_only(params: dict[str, Any], **_: Any) -> None:
    """botocore ``before-call`` handler, run after its own ``add_expect_header``."""
    headers = params.get("headers") or {}
    body = params.get("body")
    if (
        headers.get("Expect") == "100-continue"
        and isinstance(body, (BodyView, RangeBody, PacedBody, ReportedBody))
        and len(body) < EXPECT_CONTINUE_MIN_BYTES
    ):
        del headers["Expect"]


def _never_expect_continue(params: dict[str, Any], **_: Any) -> None:
    """botocore ``before-call`` handler for profiles whose servers mishandle ``Expect:
    100-continue`` (botocore's ``add_expect_header`` adds it to every PutObject/UploadPart with a
    file-like body, and urllib3 then waits for the interim answer)."""
    headers = params.get("headers") or {}
    if "Expect" in headers:
        del headers["Expect"]

#: Alibaba OSS's per-request rate limit, in bits per second, and the range it accepts
#: (https://www.alibabacloud.com/help/en/oss/user-guide/single-connection-bandwidth-throttling).
OSS_TRAFFIC_LIMIT_HEADER = "x-oss-traffic-limit"
OSS_TRAFFIC_LIMIT_BITS = (819_200, 838_860_800)


def oss_traffic_limit(rate: int) -> int | None:
    """The ``x-oss-traffic-limit`` (bits/s) for a body held to ``rate`` bytes/s: raised to
    OSS's minimum (100 KiB/s: the fleet-wide bucket still holds the lower rate), ``None`` above
    its maximum (100 MiB/s: the header could only lower the rate asked for)."""
    low, high = OSS_TRAFFIC_LIMIT_BITS
    bits = rate * 8
    if rate <= 0 or bits > high:
        return None
    return max(low, bits)


def _oss_traffic_limit(params: dict[str, Any], **_: Any) -> None:
    """botocore ``before-call`` handler for profiles with ``traffic_limit_header``: a paced body
    (a part or a single PUT of an upload with ``max_bandwidth``) also asks the server to hold the
    request to that rate.
    (Before the request is signed, so the header is signed with it.)"""
    body = params.get("body")
    bits = oss_traffic_limit(body.rate) if isinstance(body, (PacedBody, ReportedBody)) else None
    if bits is not None:
        params.setdefault("headers", {})[OSS_TRAFFIC_LIMIT_HEADER] = str(bits)


#: The response header in which Alibaba OSS reports the CRC-64/ECMA of what it stored (a part's
#: on UploadPart, the object's on PutObject, CompleteMultipartUpload and HeadObject), in decimal.
OSS_CRC64_HEADER = "x-oss-hash-crc64ecma"


def reported_crc64ecma(response: dict[str, Any]) -> str | None:
    """The ``x-oss-hash-crc64ecma`` of a boto3 response (decimal text), or None without one."""
    value = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get(OSS_CRC64_HEADER)
    return value.strip() if isinstance(value, str) else None


def _redact_credentials_in_logs(session: boto3.session.Session) -> None:
    """Whatever chain the credentials came from (environment, shared files, a role), their
    secret parts are masked in every log record (see :mod:`uploader.logsafe`)."""
    logsafe.protect_library_loggers()
    try:
        credentials = session.get_credentials()
        frozen = credentials.get_frozen_credentials() if credentials is not None else None
    except Exception:  # noqa: BLE001  (a role's refresh failing: the upload will say so, not this)
        return
    if frozen is not None:
        logsafe.add_secret(frozen.secret_key)
        logsafe.add_secret(frozen.token)


class ObjectStore:
    """One boto3 S3 client configured for speed and compatibility, shared by a process's threads
    (boto3 clients are thread-safe)."""

    def __init__(self, settings: Settings, client: Any | None = None, endpoint: Endpoint | None = None) -> None:
        self.settings = settings
        self.endpoint = endpoint or default_endpoint(settings)
        self.profile = self.endpoint.profile
        #: The per-part checksum of uploads whose record names none: the profile's (or
        #: UPLOADER_PART_CHECKSUM when set).
        self.checksum = ChecksumAlgorithm.parse(self.profile.part_checksum)
        # A named endpoint may use its own AWS credentials profile (the workers' shared config).
        session = boto3.session.Session(profile_name=self.endpoint.aws_profile)
        self.client = client or session.client(
            "s3",
            endpoint_url=self.endpoint.endpoint_url,
            region_name=self.endpoint.region,
            config=Config(
                # boto3 >= 1.36 adds CRC32 trailers (aws-chunked bodies) to every request by
                # default; OSS, R2 and GCS reject them, and we send our own per-part checksum as a
                # precomputed header anyway. The same for every profile.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                # Over plain HTTP botocore would SHA-256 every byte to sign it: a second hash
                # of the body that the part checksum already covers.
                s3={"addressing_style": self.profile.addressing.value, "payload_signing_enabled": False},
                max_pool_connections=max(10, settings.worker_concurrency * 2),
                retries={"mode": "standard", "max_attempts": 3},
                connect_timeout=settings.s3_connect_timeout,
                read_timeout=120,
            ),
        )
        expect = (
            _never_expect_continue if self.profile.expect_continue is ExpectContinue.NEVER
            else _expect_continue_for_large_bodies_only
        )
        self.client.meta.events.register_last("before-call.s3", expect)
        if self.profile.traffic_limit_header:
            for operation in ("UploadPart", "PutObject"):
                self.client.meta.events.register_last(f"before-call.s3.{operation}", _oss_traffic_limit)
        if self.profile.oss_callback:
            register_oss_callback(self.client.meta.events)
        #: The SSE-C keys by name; their base64 form (what goes in a header) is masked in logs.
        self.keyring = settings.sse_c_keyring
        for key in self.keyring.values():
            logsafe.add_secret(base64.b64encode(key).decode("ascii"))
        if client is None:
            _redact_credentials_in_logs(session)

    def _options(self, options: ObjectOptions | None, allowed: frozenset[str] | None = None) -> dict[str, Any]:
        """The S3 parameters of ``options`` that a call taking ``allowed`` sends (all if None), in
        the provider's terms (its own name for the storage class)."""
        if options is None:
            return {}
        args = object_args(options, self.keyring)
        if "StorageClass" in args:
            args["StorageClass"] = self.profile.storage_class_value(args["StorageClass"])
        return args if allowed is None else only(args, allowed)

    def _call(self, action: str, method: str, **kwargs: Any) -> dict[str, Any]:
        """The response of S3 operation ``method`` (every one answers a dict), errors classified."""
        try:
            response: dict[str, Any] = getattr(self.client, method)(**kwargs)
            return response
        except (ClientError, BotoCoreError, ConnectionError, TimeoutError) as exc:
            raise store_error(exc, action) from None

    def _oss_callback_args(self, callback: OssCallback | None) -> dict[str, Any]:
        """The extra call parameter carrying ``callback`` to the profile's event handlers
        (:mod:`uploader.storage.osscallback`); a profile without them never gets one (the
        request was refused at submit)."""
        if callback is None:
            return {}
        if not self.profile.oss_callback:
            raise PermanentStoreError(f"profile {self.profile.name.value!r} does not support oss_callback")
        return {OSS_CALLBACK_PARAM: callback}

    def algorithm(self, name: str | None) -> ChecksumAlgorithm:
        """The checksum algorithm a record names, or this store's default for "" / None."""
        return ChecksumAlgorithm.parse(name) if name else self.checksum

    def _checksum_args(
        self, data: bytes | bytearray | memoryview, algorithm: ChecksumAlgorithm | None = None
    ) -> tuple[dict[str, str], str]:
        algorithm = algorithm or self.checksum
        value = checksum_b64(algorithm, data)
        return {algorithm.request_field: value}, value

    def create_multipart_upload(
        self,
        bucket: str,
        key: str,
        *,
        options: ObjectOptions | None = None,
        metadata: dict[str, str] | None = None,
        content_type: str | None = None,
        checksum_algorithm: ChecksumAlgorithm | None = None,
        checksum_type: ChecksumType | None = None,
    ) -> str:
        """Create the multipart upload with every option of ``options`` but the conditional write
        (which goes on Complete); ``metadata``/``content_type``: shorthand when no ``options``.
        ``checksum_type`` FULL_OBJECT (a CRC only) has the server verify the whole object against
        the combined value sent on Complete."""
        options = options or ObjectOptions(metadata=metadata, content_type=content_type)
        args = self._options(options)
        kwargs: dict[str, Any] = {
            "Bucket": bucket, "Key": key, **{n: v for n, v in args.items() if n not in CREATE_MULTIPART_EXCLUDED}
        }
        algorithm = checksum_algorithm or self.checksum
        if algorithm is not ChecksumAlgorithm.MD5:
            kwargs["ChecksumAlgorithm"] = algorithm.value
            if checksum_type is not None:
                kwargs["ChecksumType"] = checksum_type.value
        created = self._call(f"CreateMultipartUpload s3://{bucket}/{key}", "create_multipart_upload", **kwargs)
        upload_id: str = created["UploadId"]
        return upload_id

    def upload_part(
        self,
        bucket: str,
        key: str,
        mpu_id: str,
        part_number: int,
        data: bytes | bytearray | memoryview | RangeBody,
        algorithm: ChecksumAlgorithm | None = None,
        options: ObjectOptions | None = None,
        pace: Pace | None = None,
        progress: Callable[[int], object] | None = None,
    ) -> UploadedPart:
        """Send one part: a buffer (checksummed in one pass, sent as a :class:`BodyView`), or a
        :class:`RangeBody` (checksummed in a first pass over its range, then streamed).
        ``pace``: a rate limit the part's bytes are drawn from as they are sent (``pace(n)``
        before ``n`` more bytes leave, at least ``pace.chunk`` at a time: see :class:`PacedBody`).

        Where the profile reports a CRC-64/ECMA per part (OSS), it is computed in the same pass
        as the part checksum and compared with the answer's ``x-oss-hash-crc64ecma``: a mismatch
        means the server stored other bytes than were sent, a :class:`TransientStoreError`
        (code ``Crc64Mismatch``) for the caller to send the part again.

        Raises :class:`~uploader.errors.SourceChanged` / :class:`~uploader.errors.SourceError`
        when a streamed body's source changed or became unreadable while it was read."""
        body: BodyView | RangeBody
        algorithm = algorithm or self.checksum
        algorithms: tuple[Algorithm, ...] = (algorithm, CRC64ECMA) if self.profile.reports_crc64ecma else (algorithm,)
        if isinstance(data, RangeBody):
            body = data
            values = body.checksums(algorithms)
        else:
            values = checksums_b64((data,), algorithms)
            body = BodyView(data)
        checksum = values[0]
        sent: BodyView | RangeBody | PacedBody | ReportedBody = (
            body if pace is None else PacedBody(body, pace.acquire, pace.chunk, pace.rate)
        )
        if progress is not None:  # ``progress(bytes sent so far)`` every PROGRESS_STEP bytes
            sent = ReportedBody(sent, progress, PROGRESS_STEP)
        checksum_args = {algorithm.request_field: checksum}
        crc64 = crc64ecma_text(values[1]) if len(values) > 1 else ""
        action = f"UploadPart {part_number} of s3://{bucket}/{key}"
        try:
            response = self.client.upload_part(
                Bucket=bucket, Key=key, UploadId=mpu_id, PartNumber=part_number, Body=sent, **checksum_args,
                **self._options(options, UPLOAD_PART_ARGS),
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
        except Exception:
            # With awscrt installed (it computes CRC32C/CRC64NVME), botocore signs through the
            # CRT, which reports what a body raised while it read it as a bare AwsCrtError: the
            # body remembers its source error, which is the cause.
            failure = getattr(body, "failure", None)
            if failure is not None:
                raise failure from None
            raise
        etag = response.get("ETag")
        if not etag:  # a response cut off inside its headers can parse as a bare 200
            error = TransientStoreError(f"{action}: response without an ETag")
            error.code = "MissingETag"
            raise error
        reported = reported_crc64ecma(response) if crc64 else None
        if reported is not None and reported != crc64:
            error = TransientStoreError(
                f"{action}: the server's {OSS_CRC64_HEADER} {reported[:24]} != {crc64}, the CRC-64/ECMA of the "
                "bytes sent (the part was damaged on the way; it is sent again)"
            )
            error.code = "Crc64Mismatch"
            raise error
        return UploadedPart(etag=etag, checksum=checksum, crc64ecma=crc64)

    def complete_multipart_upload(
        self,
        bucket: str,
        key: str,
        mpu_id: str,
        parts: list[tuple[int, UploadedPart]],
        algorithm: ChecksumAlgorithm | None = None,
        full_object_checksum: str | None = None,
        options: ObjectOptions | None = None,
        oss_callback: OssCallback | None = None,
    ) -> dict[str, Any]:
        """Complete with exactly the recorded parts, sorted by part number (some servers reject
        any other order, and ListParts may list a part number twice). ``full_object_checksum``
        (the combined part CRCs, for an upload created FULL_OBJECT) is sent for the server to
        verify the whole object against. ``oss_callback`` (profiles with ``oss_callback`` only)
        asks OSS to call the callback server; its answer is the response's ``OssCallbackAnswer``."""
        algorithm = algorithm or self.checksum
        listed = []
        for number, part in sorted(parts, key=lambda p: p[0]):
            entry: dict[str, Any] = {"PartNumber": number, "ETag": part.etag}
            if algorithm is not ChecksumAlgorithm.MD5:
                entry[algorithm.request_field] = part.checksum
            listed.append(entry)
        extra: dict[str, Any] = {}
        if full_object_checksum:
            extra = {algorithm.request_field: full_object_checksum, "ChecksumType": ChecksumType.FULL_OBJECT.value}
        extra.update(self._oss_callback_args(oss_callback))
        return self._call(
            f"CompleteMultipartUpload s3://{bucket}/{key}",
            "complete_multipart_upload",
            Bucket=bucket,
            Key=key,
            UploadId=mpu_id,
            MultipartUpload={"Parts": listed},
            **extra,
            **self._options(options, COMPLETE_MULTIPART_ARGS),
        )

    def abort_multipart_upload(self, bucket: str, key: str, mpu_id: str, options: ObjectOptions | None = None) -> bool:
        """Abort; ``False`` if the server no longer knows the upload (already aborted/completed)."""
        try:
            self._call(
                f"AbortMultipartUpload s3://{bucket}/{key}", "abort_multipart_upload", Bucket=bucket, Key=key, UploadId=mpu_id,
                **self._options(options, ABORT_ARGS),
            )
        except PermanentStoreError as exc:
            if error_code(exc) == "NoSuchUpload":
                return False
            raise
        return True

    def list_parts(self, bucket: str, key: str, mpu_id: str, options: ObjectOptions | None = None) -> Iterator[ListedPart]:
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
                **self._options(options, READ_ARGS),
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

    def part_checksum(self, data: bytes | bytearray | memoryview, algorithm: ChecksumAlgorithm | None = None) -> str:
        """The checksum this store sends with a part (what Complete must repeat)."""
        return self._checksum_args(data, algorithm)[1]

    def put_object(
        self,
        bucket: str,
        key: str,
        data: bytes | bytearray | memoryview,
        *,
        options: ObjectOptions | None = None,
        metadata: dict[str, str] | None = None,
        content_type: str | None = None,
        algorithm: ChecksumAlgorithm | None = None,
        oss_callback: OssCallback | None = None,
        pace: Pace | None = None,
    ) -> dict[str, Any]:
        """Single PUT with Content-MD5, so the returned ETag is the MD5 the server verified,
        every option of ``options`` (``metadata``/``content_type``: shorthand without it), and
        the ``algorithm`` checksum (unless MD5), which becomes the object's; the response
        carries ``ContentMD5`` and ``Checksum`` (that value, or None) as sent.
        ``oss_callback``: as for :meth:`complete_multipart_upload`. ``pace``: as for
        :meth:`upload_part` (the body is ``data`` itself, drawn from the limit as it is read)."""
        options = options or ObjectOptions(metadata=metadata, content_type=content_type)
        view = BodyView(data)
        body: BodyView | PacedBody = view if pace is None else PacedBody(view, pace.acquire, pace.chunk, pace.rate)
        kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key, "Body": body, **self._options(options)}
        kwargs["ContentMD5"] = md5_b64(data)
        kwargs.update(self._oss_callback_args(oss_callback))
        algorithm = algorithm or self.checksum
        checksum = None
        if algorithm is not ChecksumAlgorithm.MD5:
            checksum = kwargs[algorithm.request_field] = checksum_b64(algorithm, data)
        response = self._call(f"PutObject s3://{bucket}/{key}", "put_object", **kwargs)
        response["ContentMD5"] = kwargs["ContentMD5"]
        response["Checksum"] = checksum
        return response

    def head_object(self, bucket: str, key: str, options: ObjectOptions | None = None, *, checksum: bool = False) -> dict[str, Any]:
        """HeadObject (with the SSE-C key, the payer and the owner check that ``options`` ask
        for); ``checksum`` asks for the object's checksum too (``ChecksumMode=ENABLED``)."""
        extra = {"ChecksumMode": "ENABLED"} if checksum else {}
        return self._call(
            f"HeadObject s3://{bucket}/{key}", "head_object", Bucket=bucket, Key=key, **extra,
            **self._options(options, READ_ARGS),
        )

    # -- reading and copying objects (an S3 source: uploader/sources/s3.py) ----------------------
    def read_object_range(
        self, bucket: str, key: str, offset: int, into: memoryview, *, if_match: str, version_id: str = ""
    ) -> int:
        """Fill ``into`` with the object's bytes from ``offset`` (one ranged GetObject carrying
        ``If-Match: if_match``, of ``version_id`` when given), streamed straight into it: the
        bytes read (fewer only where the object ends). A changed object answers 412
        (:class:`PermanentStoreError`, code ``PreconditionFailed``); a connection cut in the
        middle of the body is a :class:`TransientStoreError`."""
        if not len(into):
            return 0
        action = f"GetObject s3://{bucket}/{key} bytes {offset}-{offset + len(into) - 1}"
        extra = {"VersionId": version_id} if version_id else {}
        response = self._call(
            action, "get_object", Bucket=bucket, Key=key, Range=f"bytes={offset}-{offset + len(into) - 1}",
            IfMatch=if_match, **extra,
        )
        body = response["Body"]
        got = 0
        try:
            while got < len(into):
                n = body.readinto(into[got:]) if hasattr(body, "readinto") else _read_into(body, into[got:])
                if not n:
                    break
                got += n
        except (BotoCoreError, ConnectionError, TimeoutError, OSError) as exc:
            error = TransientStoreError(f"{action} failed: the body was cut off after {got} bytes: {type(exc).__name__}")
            error.code = type(exc).__name__
            raise error from None
        finally:
            body.close()
        return got

    def upload_part_copy(
        self,
        bucket: str,
        key: str,
        mpu_id: str,
        part_number: int,
        source: CopySource,
        offset: int,
        length: int,
        algorithm: ChecksumAlgorithm | None = None,
        options: ObjectOptions | None = None,
    ) -> UploadedPart:
        """Copy bytes ``offset..offset+length`` of ``source`` into part ``part_number``, on the
        server (UploadPartCopy with ``CopySourceIfMatch``: a changed source answers 412, code
        ``PreconditionFailed``). Returns what :meth:`upload_part` would record: the part's ETag,
        the ``algorithm`` checksum as the server reports it ("" where it reports none: see
        :class:`uploader.sources.s3.S3ObjectSource` for how such an upload is verified) and the
        part's CRC-64/ECMA where the profile reports one."""
        action = f"UploadPartCopy {part_number} of s3://{bucket}/{key} from {source.url}"
        response = self._call(
            action, "upload_part_copy", Bucket=bucket, Key=key, UploadId=mpu_id, PartNumber=part_number,
            CopySource=source.copy_source(), CopySourceRange=f"bytes={offset}-{offset + length - 1}",
            CopySourceIfMatch=source.etag, **self._options(options, UPLOAD_PART_ARGS),
        )
        result = response.get("CopyPartResult") or {}
        etag = quoted_etag(result.get("ETag") or "")
        if not etag:
            error = TransientStoreError(f"{action}: response without an ETag")
            error.code = "MissingETag"
            raise error
        algorithm = algorithm or self.checksum
        checksum = "" if algorithm is ChecksumAlgorithm.MD5 else str(result.get(algorithm.request_field) or "")
        crc64 = (reported_crc64ecma(response) or "") if self.profile.reports_crc64ecma else ""
        return UploadedPart(etag=etag, checksum=checksum, crc64ecma=crc64)

    def copy_object(
        self, bucket: str, key: str, source: CopySource, *, options: ObjectOptions | None = None
    ) -> dict[str, Any]:
        """CopyObject of ``source`` (with ``CopySourceIfMatch``) to ``bucket``/``key`` with the
        upload's object options (the metadata and tags of the request replace the source's,
        as a PutObject would set them); the response with ``ETag`` lifted out of
        ``CopyObjectResult``."""
        args = self._options(options or ObjectOptions())
        args.pop("IfNoneMatch", None)  # no_overwrite is checked before the copy (CopyObject takes no If-None-Match)
        response = self._call(
            f"CopyObject s3://{bucket}/{key} from {source.url}", "copy_object", Bucket=bucket, Key=key,
            CopySource=source.copy_source(), CopySourceIfMatch=source.etag, MetadataDirective="REPLACE",
            **({"TaggingDirective": "REPLACE"} if "Tagging" in args else {}), **args,
        )
        response["ETag"] = quoted_etag((response.get("CopyObjectResult") or {}).get("ETag", ""))
        return response

    def head_bucket(self, bucket: str) -> None:
        try:
            self._call(f"HeadBucket s3://{bucket}", "head_bucket", Bucket=bucket)
        except PermanentStoreError as exc:
            if error_code(exc) in {"404", "NoSuchBucket", "NotFound"}:
                exc.args = (f"bucket {bucket!r} does not exist (create it first, or check the name)",)
                exc.code = "NoSuchBucket"
            raise


def quoted_etag(etag: str) -> str:
    """``etag`` in quotes, as ListParts and HeadObject give it (SeaweedFS leaves them out of
    the XML answers of the copy calls): what is recorded must compare equal to what is listed."""
    return etag if not etag or etag.startswith('"') else f'"{etag}"'


def _read_into(body: Any, into: memoryview) -> int:
    """``readinto`` for a stream that only has ``read``."""
    data = body.read(len(into))
    into[: len(data)] = data
    return len(data)


@dataclass(frozen=True)
class CopySource:
    """One version of an object that UploadPartCopy / CopyObject copy from: ``etag`` pins it
    (``CopySourceIfMatch``), and ``version_id`` too where the bucket is versioned."""

    bucket: str
    key: str
    etag: str
    version_id: str = ""

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def copy_source(self) -> dict[str, str]:
        source = {"Bucket": self.bucket, "Key": self.key}
        if self.version_id:
            source["VersionId"] = self.version_id
        return source


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


def object_store(settings: Settings, endpoint: str | None = None) -> ObjectStore:
    """The process's shared :class:`ObjectStore` for ``settings`` and the named ``endpoint``
    (``None``: the default one), created once, then reused: a new boto3 client costs ~10 ms and
    its own connection pool. :class:`~uploader.errors.InvalidRequest` for an unknown name."""
    resolved = resolve(settings, endpoint)
    profile = resolved.profile
    key = (resolved.name, resolved.endpoint_url, resolved.region, resolved.aws_profile, profile.name, profile.addressing,
           profile.part_checksum, settings.worker_concurrency, settings.s3_connect_timeout,
           settings.sse_c_keys.get_secret_value() if settings.sse_c_keys else "")
    with _shared_lock:
        store = _shared.get(key)
        if store is None:
            store = _shared[key] = ObjectStore(settings, endpoint=resolved)
        return store
