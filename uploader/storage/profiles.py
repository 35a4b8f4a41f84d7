"""Provider profiles: what each S3 implementation accepts, as one small declarative object each.

A :class:`Profile` is data, not code: the S3 adapter reads its wire fields (addressing style,
the per-part checksum, ``Expect: 100-continue``), the planner its part rules, verification
whether the multipart ETag is an MD5, and request validation its option support
(:meth:`Profile.refusal`). Adding a provider adds one entry to :data:`PROFILES`.

Sources are cited per field where the value is not obvious. Values marked *unverified* are
conservative guesses (refuse or use the most widely accepted form) where no documentation was
found; the wire fields of ``seaweedfs`` and ``generic`` are exercised by tests/test_profiles.py.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

#: The per-part checksum the adapter sends (``x-amz-checksum-<name>`` or ``Content-MD5``): a
#: profile's default is crc32 or md5; ``UPLOADER_PART_CHECKSUM`` may choose any of these.
PartChecksum = Literal["crc32", "crc32c", "crc64nvme", "sha1", "sha256", "md5"]

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


class ProfileName(enum.StrEnum):
    AWS = "aws"
    AWS_EXPRESS = "aws-express"
    OSS = "oss"
    MINIO = "minio"
    R2 = "r2"
    GCS = "gcs"
    SEAWEEDFS = "seaweedfs"
    CEPH = "ceph"
    GENERIC = "generic"


class Addressing(enum.StrEnum):
    """botocore's ``s3.addressing_style``."""

    AUTO = "auto"
    PATH = "path"
    VIRTUAL = "virtual"


class ExpectContinue(enum.StrEnum):
    """When a request body goes with ``Expect: 100-continue``."""

    #: Only bodies of at least ``EXPECT_CONTINUE_MIN_BYTES`` (see uploader/storage/adapter.py).
    LARGE_BODIES = "large-bodies"
    #: Never: some servers (and proxies) answer it wrongly, or sign-check it differently.
    NEVER = "never"


@dataclass(frozen=True)
class PartRules:
    """The multipart limits a server enforces."""

    min_part: int = 5 * MiB
    max_part: int = 5 * GiB
    max_parts: int = 10_000
    #: Every part but the last has the same size, and the last is no larger (Cloudflare R2).
    equal_parts: bool = False


#: S3's canned ACLs (https://docs.aws.amazon.com/AmazonS3/latest/userguide/acl-overview.html#canned-acl).
S3_CANNED_ACLS = frozenset({
    "private", "public-read", "public-read-write", "authenticated-read", "aws-exec-read",
    "bucket-owner-read", "bucket-owner-full-control", "log-delivery-write",
})
#: S3's storage classes, each sent as itself.
S3_STORAGE_CLASSES: Mapping[str, str] = {name: name for name in (
    "STANDARD", "REDUCED_REDUNDANCY", "STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING", "GLACIER",
    "DEEP_ARCHIVE", "GLACIER_IR", "OUTPOSTS", "SNOW", "EXPRESS_ONEZONE",
)}
#: Values of the ``checksum_algorithm`` option.
ALL_CHECKSUMS = frozenset({"CRC32", "CRC32C", "CRC64NVME", "SHA1", "SHA256", "MD5"})
ALL_SSE = frozenset({"AES256", "aws:kms", "aws:kms:dsse"})

#: The object options a profile may refuse (``ObjectOptions`` field names).
OPTION_NAMES = (
    "acl", "storage_class", "checksum_algorithm", "sse", "sse_kms_key_id", "bucket_key_enabled", "sse_customer_key",
    "tags", "no_overwrite", "object_lock_mode", "object_lock_retain_until", "object_lock_legal_hold",
    "expected_bucket_owner", "request_payer",
)
#: Options whose value "off" means not asked for.
_OFF: tuple[object, ...] = (None, False, "", (), [], {})


@dataclass(frozen=True)
class Profile:
    """What one S3 implementation accepts. ``None`` for a set means "anything: the server decides"."""

    name: ProfileName
    addressing: Addressing
    #: The per-part checksum sent with every UploadPart (and repeated on Complete for CRC32).
    part_checksum: PartChecksum
    #: Values of the ``checksum_algorithm`` option the server verifies.
    checksum_algorithms: frozenset[str] | None
    #: ``ChecksumType=FULL_OBJECT`` on CreateMultipartUpload (the server checks the whole object).
    full_object_checksum: bool
    expect_continue: ExpectContinue
    parts: PartRules
    #: Whether a multipart object's ETag is ``md5(md5(part1)..md5(partN))-N`` (objects without
    #: SSE-KMS / SSE-C). Where it is not, completion verifies the size (and checksums) only.
    multipart_etag_is_md5: bool
    acls: frozenset[str] | None
    #: Storage class accepted in a request -> the provider's class it becomes (sent as the key).
    storage_classes: Mapping[str, str] | None
    #: ``If-None-Match: *`` on PutObject and CompleteMultipartUpload (``no_overwrite``).
    conditional_write: bool
    sse: frozenset[str] | None
    sse_customer_key: bool
    tagging: bool
    object_lock: bool
    #: ``x-amz-expected-bucket-owner`` and ``x-amz-request-payer``: AWS account concepts.
    aws_account_headers: bool
    #: The server answers UploadPart, PutObject, CompleteMultipartUpload and HeadObject with
    #: ``x-oss-hash-crc64ecma`` (Alibaba OSS): each part's is checked against the CRC-64/ECMA of the
    #: bytes sent, the object's against the combine of the parts' (uploader.checksums).
    reports_crc64ecma: bool = False
    #: The server limits a request's own rate when asked with ``x-oss-traffic-limit`` (bits per
    #: second; Alibaba OSS): sent on every UploadPart of an upload with ``max_bandwidth``.
    traffic_limit_header: bool = False
    #: The server calls a callback server itself when Complete (or a single PUT) carries
    #: ``x-oss-callback`` (Alibaba OSS): the request's ``oss_callback`` / ``oss_callback_vars``
    #: (uploader/storage/osscallback.py). Refused at submit where this is False.
    oss_callback: bool = False
    #: S3 error codes this server uses for "try again" beyond S3's own (see storage.errors.TRANSIENT_CODES).
    transient_codes: frozenset[str] = frozenset()
    #: Behaviours worth knowing when reading its errors (shown in the README).
    quirks: tuple[str, ...] = ()

    def etag_is_md5(self, options: Mapping[str, Any] | None = None) -> bool:
        """Whether a completed multipart object's ETag is the MD5 of its part MD5s: not on S3
        Express or GCS, and nowhere with SSE-KMS or SSE-C ("Objects encrypted by SSE-KMS ... have
        ETags that are not an MD5 digest": https://docs.aws.amazon.com/AmazonS3/latest/API/API_Object.html)."""
        options = options or {}
        if str(options.get("sse") or "").startswith("aws:kms") or options.get("sse_customer_key") not in _OFF:
            return False
        return self.multipart_etag_is_md5

    def refusal(self, options: Mapping[str, Any], *, endpoint: str | None = None) -> str | None:
        """Why this profile cannot honour ``options`` (option name -> requested value, as in the
        request; options not asked for are ``None``/``False``/empty), or ``None`` if it can.
        The reason names the profile (and the endpoint, when given) and every unsupported option."""
        problems = []

        def asked(name: str) -> bool:
            return options.get(name) not in _OFF

        def check(name: str, allowed: frozenset[str] | Mapping[str, str] | None) -> None:
            value = options.get(name)
            if value in _OFF or allowed is None or value in allowed:
                return
            accepted = ", ".join(sorted(allowed)) or "none"
            problems.append(f"{name} {value!r} (it accepts: {accepted})")

        check("acl", self.acls)
        check("storage_class", self.storage_classes)
        check("checksum_algorithm", self.checksum_algorithms)
        check("sse", self.sse)
        if (asked("sse_kms_key_id") or asked("bucket_key_enabled")) and self.sse is not None and "aws:kms" not in self.sse:
            problems.append("sse_kms_key_id / bucket_key_enabled (no SSE-KMS)")
        for name, supported in (
            ("sse_customer_key", self.sse_customer_key),
            ("tags", self.tagging),
            ("no_overwrite", self.conditional_write),
            ("object_lock_mode", self.object_lock),
            ("object_lock_retain_until", self.object_lock),
            ("object_lock_legal_hold", self.object_lock),
            ("expected_bucket_owner", self.aws_account_headers),
            ("request_payer", self.aws_account_headers),
            ("oss_callback", self.oss_callback),
            ("oss_callback_vars", self.oss_callback),
        ):
            if asked(name) and not supported:
                problems.append(name)
        if not problems:
            return None
        where = f"endpoint {endpoint!r} (profile {self.name.value!r})" if endpoint else f"profile {self.name.value!r}"
        return f"{where} does not support: " + "; ".join(problems)

    def storage_class_value(self, name: str) -> str:
        """What goes on the wire for the request's storage class ``name``: the provider's own
        name for it (OSS's ``IA`` for ``STANDARD_IA``), or ``name`` where the profile maps none.
        The record and the result keep the request's name."""
        return (self.storage_classes or {}).get(name, name)

    def with_overrides(self, *, addressing: str | None = None, part_checksum: PartChecksum | None = None) -> Profile:
        """This profile with an operator's explicit ``UPLOADER_S3_ADDRESSING_STYLE`` /
        ``UPLOADER_PART_CHECKSUM`` taking precedence."""
        changes: dict[str, Any] = {}
        if addressing is not None:
            changes["addressing"] = Addressing(addressing)
        if part_checksum is not None:
            changes["part_checksum"] = part_checksum
        return replace(self, **changes) if changes else self


_AWS = Profile(
    name=ProfileName.AWS,
    addressing=Addressing.AUTO,  # botocore picks virtual-hosted for DNS-compatible names
    part_checksum="crc32",
    checksum_algorithms=ALL_CHECKSUMS,
    # https://docs.aws.amazon.com/AmazonS3/latest/userguide/checking-object-integrity.html
    # (full-object checksums for multipart uploads: CRC32, CRC32C, CRC64NVME)
    full_object_checksum=True,
    expect_continue=ExpectContinue.LARGE_BODIES,
    parts=PartRules(),  # https://docs.aws.amazon.com/AmazonS3/latest/userguide/qfacts.html
    multipart_etag_is_md5=True,
    acls=S3_CANNED_ACLS,
    storage_classes={k: v for k, v in S3_STORAGE_CLASSES.items() if k != "EXPRESS_ONEZONE"},
    conditional_write=True,  # If-None-Match on PutObject / CompleteMultipartUpload (S3, August 2024)
    sse=ALL_SSE,
    sse_customer_key=True,
    tagging=True,
    object_lock=True,
    aws_account_headers=True,
)

PROFILES: Mapping[ProfileName, Profile] = {
    ProfileName.AWS: _AWS,
    ProfileName.AWS_EXPRESS: replace(
        _AWS,
        name=ProfileName.AWS_EXPRESS,
        # Directory buckets are addressed through zonal virtual-hosted endpoints only.
        addressing=Addressing.VIRTUAL,
        # "CRC32, CRC32C, SHA-1 and SHA-256 ... S3 Express One Zone does not support MD5-based
        # checksums": https://docs.aws.amazon.com/AmazonS3/latest/userguide/s3-express-data-protection.html
        checksum_algorithms=frozenset({"CRC32", "CRC32C", "SHA1", "SHA256"}),
        full_object_checksum=False,  # unverified for directory buckets: verify by combined CRC instead
        # "The ETag ... is a random alphanumeric string, not an MD5 checksum":
        # https://docs.aws.amazon.com/AmazonS3/latest/userguide/s3-express-differences.html
        multipart_etag_is_md5=False,
        acls=frozenset({"bucket-owner-full-control"}),  # directory buckets have ACLs disabled
        storage_classes={"EXPRESS_ONEZONE": "EXPRESS_ONEZONE"},
        # SSE-S3 only; no SSE-KMS/DSSE-KMS/SSE-C (s3-express-data-protection.html above).
        sse=frozenset({"AES256"}),
        sse_customer_key=False,
        tagging=False,
        object_lock=False,  # "does not support MFA delete and S3 Versioning" (same page)
    ),
    ProfileName.OSS: Profile(
        name=ProfileName.OSS,
        # OSS serves only virtual-hosted requests on its S3 endpoint ("Request style"):
        # https://www.alibabacloud.com/help/en/oss/developer-reference/compatibility-with-amazon-s3
        addressing=Addressing.VIRTUAL,
        # OSS rejects x-amz-checksum-* and aws-chunked bodies (boto3 >= 1.36's defaults); it
        # verifies Content-MD5.
        part_checksum="md5",
        checksum_algorithms=frozenset({"MD5"}),
        full_object_checksum=False,  # it reports x-oss-hash-crc64ecma instead
        expect_continue=ExpectContinue.LARGE_BODIES,
        parts=PartRules(),  # OSS allows 100 KiB parts; S3's 5 MiB minimum is within its limits
        # OSS's multipart ETag is not the MD5 of the content and its rule is not documented.
        multipart_etag_is_md5=False,
        # Object ACLs: private, public-read, public-read-write (and "default", the bucket's):
        # https://www.alibabacloud.com/help/en/oss/user-guide/object-acl
        acls=frozenset({"private", "public-read", "public-read-write"}),
        # S3 name -> OSS storage class (unverified mapping of OSS's S3-compatible endpoint).
        storage_classes={"STANDARD": "Standard", "STANDARD_IA": "IA", "GLACIER": "Archive", "DEEP_ARCHIVE": "ColdArchive"},
        conditional_write=False,  # OSS has x-oss-forbid-overwrite, not If-None-Match
        sse=frozenset({"AES256"}),
        sse_customer_key=False,
        tagging=False,  # unverified on the S3-compatible endpoint
        object_lock=False,
        aws_account_headers=False,
        # PutObject and UploadPart return x-oss-hash-crc64ecma, and Complete and HeadObject the
        # object's when every part has one: https://help.aliyun.com/en/oss/user-guide/check-data-transmission-integrity-by-using-crc-64
        reports_crc64ecma=True,
        # https://www.alibabacloud.com/help/en/oss/user-guide/single-connection-bandwidth-throttling
        traffic_limit_header=True,
        # https://www.alibabacloud.com/help/en/oss/developer-reference/callback
        oss_callback=True,
        quirks=("x-oss-hash-crc64ecma on parts and objects",),
    ),
    ProfileName.MINIO: Profile(
        name=ProfileName.MINIO,
        addressing=Addressing.PATH,
        part_checksum="crc32",
        checksum_algorithms=ALL_CHECKSUMS,
        full_object_checksum=False,  # unverified
        expect_continue=ExpectContinue.LARGE_BODIES,
        parts=PartRules(),
        multipart_etag_is_md5=True,
        acls=frozenset({"private"}),  # MinIO has no object ACLs (policies instead)
        storage_classes={"STANDARD": "STANDARD", "REDUCED_REDUNDANCY": "REDUCED_REDUNDANCY"},  # its erasure-coding tiers
        conditional_write=True,
        sse=frozenset({"AES256", "aws:kms"}),
        sse_customer_key=True,
        tagging=True,
        object_lock=True,
        aws_account_headers=False,
        quirks=("purges incomplete multipart uploads after 24 h by default",),
    ),
    ProfileName.R2: Profile(
        name=ProfileName.R2,
        addressing=Addressing.PATH,
        part_checksum="md5",  # R2 rejects aws-chunked trailers; Content-MD5 is the safe form
        checksum_algorithms=frozenset({"MD5"}),
        full_object_checksum=False,
        expect_continue=ExpectContinue.LARGE_BODIES,
        # "All parts except the last one must be the same size. The last part ... must be the
        # same or smaller": https://developers.cloudflare.com/r2/objects/multipart-objects/
        parts=PartRules(equal_parts=True),
        # "For uploads created after June 21, 2023, R2's multipart ETags now mimic the behavior of
        # S3" (same page).
        multipart_etag_is_md5=True,
        acls=frozenset(),  # R2 has no object ACLs
        storage_classes={"STANDARD": "Standard", "STANDARD_IA": "Infrequent Access"},
        conditional_write=True,
        sse=frozenset(),
        sse_customer_key=True,
        tagging=False,
        object_lock=False,
        aws_account_headers=False,
        quirks=("aborts incomplete multipart uploads after 7 days (same page)",),
    ),
    ProfileName.GCS: Profile(
        name=ProfileName.GCS,
        addressing=Addressing.PATH,
        # Parts are checked with Content-MD5 or x-goog-hash, not x-amz-checksum-*:
        # https://cloud.google.com/storage/docs/xml-api/put-object-multipart
        part_checksum="md5",
        checksum_algorithms=frozenset({"MD5"}),
        full_object_checksum=False,
        expect_continue=ExpectContinue.LARGE_BODIES,
        parts=PartRules(),  # https://cloud.google.com/storage/quotas (5 MiB..5 GiB, 10,000 parts)
        # "An object created from a multipart upload has a CRC32c hash, but not an MD5 hash, and
        # the object's ETag is not based on an MD5 hash":
        # https://cloud.google.com/storage/docs/xml-api/post-object-complete
        multipart_etag_is_md5=False,
        acls=frozenset({"private", "public-read", "public-read-write", "authenticated-read",
                        "bucket-owner-read", "bucket-owner-full-control"}),
        storage_classes={name: name for name in ("STANDARD", "NEARLINE", "COLDLINE", "ARCHIVE")},
        conditional_write=False,  # GCS uses x-goog-if-generation-match, not If-None-Match
        sse=frozenset(),
        sse_customer_key=False,
        tagging=False,
        object_lock=False,
        aws_account_headers=False,
        quirks=("Complete may take minutes (post-object-complete above)",),
    ),
    ProfileName.SEAWEEDFS: Profile(
        name=ProfileName.SEAWEEDFS,
        addressing=Addressing.PATH,
        part_checksum="crc32",  # verified: tests upload with x-amz-checksum-crc32
        checksum_algorithms=None,
        # verified: FULL_OBJECT CRC32/CRC32C/CRC64NVME, a wrong combined value refused with
        # BadDigest (tests/test_object_checksum.py)
        full_object_checksum=True,
        expect_continue=ExpectContinue.LARGE_BODIES,
        parts=PartRules(),
        multipart_etag_is_md5=True,  # verified: completion compares it in every upload test
        acls=None,
        storage_classes=None,
        conditional_write=True,
        sse=None,
        sse_customer_key=True,
        tagging=True,
        object_lock=True,
        aws_account_headers=False,
    ),
    ProfileName.CEPH: Profile(
        name=ProfileName.CEPH,
        addressing=Addressing.PATH,
        part_checksum="md5",  # RGW verifies x-amz-checksum-* only from Squid (19) on
        checksum_algorithms=frozenset({"MD5"}),
        full_object_checksum=False,
        # RGW behind some front ends answered Expect: 100-continue uploads with 400
        # InvalidArgument: https://github.com/cloudfoundry/bosh-s3cli/issues/16
        expect_continue=ExpectContinue.NEVER,
        parts=PartRules(),
        multipart_etag_is_md5=True,
        acls=S3_CANNED_ACLS,
        storage_classes=None,  # RGW storage classes are the operator's placement targets
        conditional_write=False,
        sse=frozenset({"AES256", "aws:kms"}),
        sse_customer_key=True,
        tagging=True,
        object_lock=True,
        aws_account_headers=False,
    ),
    ProfileName.GENERIC: Profile(
        name=ProfileName.GENERIC,
        # The forms every S3 dialect accepts: path-style, Content-MD5, no Expect ("Some providers
        # don't implement the Expect: 100-continue support": https://github.com/discourse/discourse/pull/9591).
        addressing=Addressing.PATH,
        part_checksum="md5",
        checksum_algorithms=None,
        full_object_checksum=False,
        expect_continue=ExpectContinue.NEVER,
        parts=PartRules(),
        multipart_etag_is_md5=True,
        # Options are passed through: the server decides.
        acls=None,
        storage_classes=None,
        conditional_write=True,
        sse=None,
        sse_customer_key=True,
        tagging=True,
        object_lock=True,
        aws_account_headers=True,
    ),
}


def profile(name: str | ProfileName) -> Profile:
    """The profile called ``name``; ``ValueError`` naming the known ones otherwise."""
    try:
        return PROFILES[ProfileName(name)]
    except ValueError:
        known = ", ".join(p.value for p in ProfileName)
        raise ValueError(f"unknown S3 profile {str(name)[:40]!r}; known: {known}") from None
