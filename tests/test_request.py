"""Unit and property tests for uploader.request.parse_request / validate_bucket_name."""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from uploader.errors import InvalidRequest
from uploader.request import UploadRequest, parse_request, validate_bucket_name

MIB = 1024**2
GIB = 1024**3
PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])


def valid(**overrides: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"source": "/data/file.bin", "bucket": "my-bucket", "key": "dir/file.bin"}
    kwargs.update(overrides)
    return kwargs


def refusal(kwargs: dict[str, Any]) -> str:
    with pytest.raises(InvalidRequest) as info:
        parse_request(kwargs)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert message.startswith("invalid upload request: ")
    return message


def test_valid_request_minimal() -> None:
    kwargs = valid()
    snapshot = dict(kwargs)
    request = parse_request(kwargs)
    assert isinstance(request, UploadRequest)
    assert (request.source, request.bucket, request.key) == ("/data/file.bin", "my-bucket", "dir/file.bin")
    assert request.part_size is None and request.metadata is None and request.content_type is None
    assert request.abort_on_failure is False
    assert re.fullmatch(r"[0-9a-f]{32}", request.upload_id or "")
    assert kwargs == snapshot, "parse_request must not modify the caller's dict"


def test_fresh_upload_ids_differ() -> None:
    ids = {parse_request(valid()).upload_id for _ in range(20)}
    assert len(ids) == 20


def test_valid_request_full() -> None:
    request = parse_request(
        valid(
            upload_id="nightly-2024.01_05",
            part_size=16 * MIB,
            metadata={"owner": "alice", "x-tag": "a b; c=d"},
            content_type="application/octet-stream",
            abort_on_failure=True,
        )
    )
    assert request.upload_id == "nightly-2024.01_05"
    assert request.part_size == 16 * MIB
    assert request.metadata == {"owner": "alice", "x-tag": "a b; c=d"}
    assert request.content_type == "application/octet-stream"
    assert request.abort_on_failure is True


def test_unknown_option_refused() -> None:
    message = refusal(valid(x=1))
    assert "unknown option 'x'" in message


def test_every_problem_is_named() -> None:
    message = refusal(valid(bucket="A", key="", x=1))
    assert "bucket:" in message and "key:" in message and "unknown option 'x'" in message


@pytest.mark.parametrize("field", ["source", "bucket", "key"])
def test_missing_required_field(field: str) -> None:
    kwargs = valid()
    del kwargs[field]
    assert f"{field}:" in refusal(kwargs)


# -- bucket ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bucket",
    [
        "",
        "ab",  # too short
        "a" * 64,  # too long
        "MyBucket",
        "my_bucket",
        "192.168.1.1",
        "10.0.0.255",
        "-bucket",
        "bucket-",
        ".bucket",
        "bucket.",
        "a..b",
        "my bucket",
        "bücket",
        "my/bucket",
    ],
)
def test_invalid_bucket_refused(bucket: str) -> None:
    message = refusal(valid(bucket=bucket))
    assert "bucket:" in message
    with pytest.raises(ValueError):
        validate_bucket_name(bucket)


@pytest.mark.parametrize("bucket", ["abc", "a" * 63, "my.bucket.name", "1-2", "0bucket9", "192.168.1.1a"])
def test_valid_bucket_accepted(bucket: str) -> None:
    assert parse_request(valid(bucket=bucket)).bucket == bucket


_ip_like = re.compile(r"\d{1,3}(\.\d{1,3}){3}")
_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")


def follows_aws_rules(name: str) -> bool:
    """AWS's documented general-purpose bucket naming rules (docs.aws.amazon.com, "Bucket naming
    rules"): 3-63 of [a-z0-9.-], letter/digit at both ends, no '..', not formatted as an IP
    address, no reserved prefix/suffix."""
    return (
        re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", name) is not None
        and ".." not in name
        and not _ip_like.fullmatch(name)
        and not name.startswith(_RESERVED_PREFIXES)
        and not name.endswith(_RESERVED_SUFFIXES)
    )


_END = "abcdefghijklmnopqrstuvwxyz0123456789"
aws_bucket_names = st.builds(
    lambda first, middle, last: first + middle + last,
    st.sampled_from(_END),
    st.text(alphabet=_END + ".-", min_size=1, max_size=61),
    st.sampled_from(_END),
).filter(follows_aws_rules)


@PROPS
@given(name=aws_bucket_names)
@example(name="a.b-c")
@example(name="1.2.3")
@example(name="a" * 63)
def test_bucket_names_following_s3_rules_are_accepted(name: str) -> None:
    validate_bucket_name(name)
    assert parse_request(valid(bucket=name)).bucket == name


@pytest.mark.parametrize("name", ["my-.bucket", "my.-bucket"])
def test_hyphen_next_to_period_follows_current_aws_rules(name: str) -> None:
    assert follows_aws_rules(name)
    validate_bucket_name(name)


@PROPS
@given(name=st.text(alphabet=_END + ".-_A\n ", max_size=70) | st.text(max_size=70))
def test_accepted_bucket_names_follow_s3_shape(name: str) -> None:
    """The converse: whatever validate_bucket_name accepts has S3's shape."""
    try:
        validate_bucket_name(name)
    except ValueError:
        return
    assert re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", name), repr(name)
    assert ".." not in name
    with pytest.raises(ValueError):
        ipaddress.IPv4Address(name)


# -- key ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "ok"),
    [
        ("", False),
        ("a" * 1024, True),
        ("a" * 1025, False),
        ("é" * 512, True),  # 1024 UTF-8 bytes
        ("é" * 513, False),  # 1026 bytes, only 513 characters
        ("€" * 341 + "a", True),  # 1024 bytes
        ("€" * 342, False),  # 1026 bytes, 342 characters
        ("😀" * 256, True),  # 1024 bytes
        ("😀" * 257, False),  # 1028 bytes, 257 characters
    ],
)
def test_key_length_in_utf8_bytes(key: str, ok: bool) -> None:
    if ok:
        assert parse_request(valid(key=key)).key == key
    else:
        assert "key:" in refusal(valid(key=key))


@PROPS
@given(key=st.text(max_size=600))
@example(key="a\nb").via("a newline forges a log line and breaks status's table")
@example(key="a\x00b").via("S3 servers refuse NUL")
@example(key="a\x85b").via("C1 controls too")
def test_key_accepted_iff_1_to_1024_utf8_bytes_without_control_characters(key: str) -> None:
    size = len(key.encode("utf-8"))
    if 1 <= size <= 1024 and not any(unicodedata.category(c) == "Cc" for c in key):
        assert parse_request(valid(key=key)).key == key
    else:
        assert "key:" in refusal(valid(key=key))


@pytest.mark.parametrize("field", ["key", "source"])
@pytest.mark.parametrize("char", ["\ud800", "\udfff", "\udcff"])
def test_unpaired_surrogates_refused_by_name(field: str, char: str) -> None:
    """JSON can carry them; UTF-8, Redis and S3 cannot (it was a UnicodeEncodeError deep inside)."""
    message = refusal(valid(**{field: f"/data/a{char}b"}))
    assert f"{field}: {field} contains an unpaired surrogate" in message and message.isprintable()


def test_hostile_option_names_are_quoted_short_and_escaped() -> None:
    message = refusal(valid(**{"x" * 10_000: 1, "a\nb": 2, "\ud800": 3, **{f"o{i}": i for i in range(20)}}))
    assert len(message) < 600 and message.isprintable(), message
    assert "unknown option 'a\\nb'" in message and "and 18 more" in message


# -- source ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["", "/data/a\x00b"])
def test_bad_source_refused(source: str) -> None:
    assert "source:" in refusal(valid(source=source))


# -- part_size ------------------------------------------------------------------------------------


@pytest.mark.parametrize("part_size", [0, -1, 5 * MIB - 1, 5 * GIB + 1, 1])
def test_part_size_out_of_range_refused(part_size: int) -> None:
    message = refusal(valid(part_size=part_size))
    assert "part_size:" in message and "5 MiB..5 GiB" in message


@pytest.mark.parametrize("part_size", [5 * MIB, 8 * MIB, 5 * GIB])
def test_part_size_in_range_accepted(part_size: int) -> None:
    assert parse_request(valid(part_size=part_size)).part_size == part_size


# -- upload_id ------------------------------------------------------------------------------------


@pytest.mark.parametrize("upload_id", ["a", "A" * 128, "0.b_c-D", "f" * 32])
def test_upload_id_accepted(upload_id: str) -> None:
    assert parse_request(valid(upload_id=upload_id)).upload_id == upload_id


@pytest.mark.parametrize("upload_id", ["", "a" * 129, ".abc", "-abc", "_abc", "a b", "a/b", "ü", "a:b"])
def test_bad_upload_id_refused(upload_id: str) -> None:
    assert "upload_id:" in refusal(valid(upload_id=upload_id))


@pytest.mark.parametrize("field", ["bucket", "upload_id"])
def test_trailing_newline_refused(field: str) -> None:
    assert f"{field}:" in refusal(valid(**{field: "abc\n"}))


@PROPS
@given(upload_id=st.text(max_size=140))
def test_upload_id_property(upload_id: str) -> None:
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", upload_id):
        assert parse_request(valid(upload_id=upload_id)).upload_id == upload_id
    else:
        assert "upload_id:" in refusal(valid(upload_id=upload_id))


# -- metadata -------------------------------------------------------------------------------------


def test_metadata_size_limit_in_bytes() -> None:
    assert parse_request(valid(metadata={"k": "v" * 2047})).metadata == {"k": "v" * 2047}  # 2048 bytes
    assert "metadata:" in refusal(valid(metadata={"k": "v" * 2048}))  # 2049 bytes
    # 1 + 2 * 1024 = 2049 UTF-8 bytes though only 1025 characters
    assert "metadata:" in refusal(valid(metadata={"k": "é" * 1024}))
    # names count too
    assert "metadata:" in refusal(valid(metadata={"n" * 1000: "v" * 1000, "m" * 49: ""}))


PRINTABLE_ASCII = "".join(chr(c) for c in range(0x20, 0x7F))


@PROPS
@given(
    metadata=st.dictionaries(
        st.text(alphabet="abcdefghij-_0123456789", min_size=1, max_size=40),
        st.text(alphabet=PRINTABLE_ASCII, max_size=300),
        max_size=12,
    )
)
def test_metadata_accepted_iff_within_2kib(metadata: dict[str, str]) -> None:
    total = sum(len(k.encode("utf-8")) + len(v.encode("utf-8")) for k, v in metadata.items())
    if total <= 2048:
        assert parse_request(valid(metadata=metadata)).metadata == metadata
    else:
        assert "metadata:" in refusal(valid(metadata=metadata))


@PROPS
@given(value=st.text(min_size=1, max_size=50))
def test_metadata_values_are_printable_ascii_header_values(value: str) -> None:
    """A value botocore could not send as a header (CR, LF, NUL, other control characters; non-ASCII,
    which boto3 refuses for S3 metadata) is refused at submit, never retried at upload time."""
    if all(0x20 <= ord(c) < 0x7F for c in value):
        assert parse_request(valid(metadata={"k": value})).metadata == {"k": value}
    else:
        assert "printable ASCII" in refusal(valid(metadata={"k": value}))


@pytest.mark.parametrize("content_type", ["text/plain\r\nX-Injected: 1", "text/\x00plain", "ü/x", "a" * 257])
def test_bad_content_type_refused(content_type: str) -> None:
    assert "content_type:" in refusal(valid(content_type=content_type))


@pytest.mark.parametrize("name", ["", "a b", "ü", "a\tb", "a\nb", "\x7f", "a:b", "a(b)", "x@y"])
def test_bad_metadata_name_refused(name: str) -> None:
    assert "metadata:" in refusal(valid(metadata={name: "v"}))


# -- types (strict mode) --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("part_size", "5"),
        ("part_size", str(8 * MIB)),
        ("part_size", float(8 * MIB)),
        ("part_size", True),
        ("bucket", 123),
        ("key", b"bytes-key"),
        ("source", ["/a"]),
        ("upload_id", 7),
        ("content_type", 5),
        ("abort_on_failure", "yes"),
        ("abort_on_failure", 1),
        ("metadata", ["a", "b"]),
        ("metadata", {"a": 1}),
    ],
)
def test_wrong_types_refused(field: str, value: object) -> None:
    message = refusal(valid(**{field: value}))
    assert f"{field}" in message.removeprefix("invalid upload request: ").split(":")[0]
