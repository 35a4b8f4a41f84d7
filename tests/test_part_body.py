"""How a part's bytes are handed to botocore: a zero-copy, seekable file object over the worker's
reusable buffer (see tests/test_slow_link.py for why it matters on a slow link)."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

from uploader.planner import MiB
from uploader.storage.bodies import BodyView
from uploader.transfer import part_buffer

# -- BodyView ---------------------------------------------------------------------------------


def test_body_view_reads_in_pieces_without_copying() -> None:
    buffer = bytearray(b"0123456789")
    body = BodyView(buffer)
    assert len(body) == 10 and body.tell() == 0
    first = body.read(4)
    assert bytes(first) == b"0123" and len(body) == 6 and body.tell() == 4
    buffer[0:1] = b"X"  # a view of the buffer, not a copy
    assert bytes(first) == b"X123"
    assert bytes(body.read(100)) == b"456789"
    assert body.read(16) == b"" and len(body) == 0


def test_body_view_seeks_like_a_file() -> None:
    body = BodyView(memoryview(bytearray(b"abcdef"))[1:5])  # "bcde"
    assert body.seek(0, io.SEEK_END) == 4 and body.tell() == 4
    assert body.seek(-3, io.SEEK_CUR) == 1
    assert bytes(body.read()) == b"cde"
    assert body.seek(0) == 0  # a retry rewinds
    assert bytes(body.read(None)) == b"bcde"
    target = bytearray(3)
    body.seek(1)
    assert body.readinto(target) == 3 and target == b"cde"
    assert body.seek(10) == 10 and body.read(1) == b""


def test_body_view_gives_botocore_the_content_length() -> None:
    from botocore.utils import determine_content_length

    assert determine_content_length(BodyView(bytearray(8 * MiB))) == 8 * MiB
    assert determine_content_length(BodyView(b"")) == 0


def test_a_last_part_reuses_the_threads_buffer() -> None:
    def in_a_fresh_thread() -> None:  # buffers are per thread: earlier tests sized this one's
        full = part_buffer(1024)
        last = part_buffer(100)
        assert len(full) == 1024 and len(last) == 100
        assert last.obj is full.obj, "a shorter part is a slice of the same buffer"
        bigger = part_buffer(2048)
        assert len(bigger) == 2048 and bigger.obj is not full.obj

    with ThreadPoolExecutor(1) as pool:
        pool.submit(in_a_fresh_thread).result()


# -- Expect: 100-continue --------------------------------------------------------------------------


def test_only_large_bodies_wait_for_100_continue(stack) -> None:  # type: ignore[no-untyped-def]
    """A small object goes out with its headers (no round trip for the interim response); a part
    of several MiB still asks first, so that a refused request costs no megabytes."""
    from tests.conftest import s3_client
    from uploader.storage.adapter import EXPECT_CONTINUE_MIN_BYTES, ObjectStore

    objects = ObjectStore(stack.settings, client=s3_client(stack.endpoint_url))
    expect: dict[str, object] = {}
    for operation in ("PutObject", "UploadPart"):
        objects.client.meta.events.register(
            f"before-send.s3.{operation}",
            lambda request, operation=operation, **_: expect.__setitem__(operation, request.headers.get("Expect")),
        )
    bucket = stack.new_bucket()
    objects.put_object(bucket, "small", b"x" * 1024, metadata=None, content_type=None)
    assert stack.s3.get_object(Bucket=bucket, Key="small")["Body"].read() == b"x" * 1024
    mpu = objects.create_multipart_upload(bucket, "large", metadata=None, content_type=None)
    try:
        objects.upload_part(bucket, "large", mpu, 1, bytearray(EXPECT_CONTINUE_MIN_BYTES))
    finally:
        objects.abort_multipart_upload(bucket, "large", mpu)
    assert set(expect) == {"PutObject", "UploadPart"}
    assert expect["PutObject"] is None
    assert expect["UploadPart"] in ("100-continue", b"100-continue")
