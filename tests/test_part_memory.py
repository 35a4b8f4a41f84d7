"""A worker's memory is the worker's decision: a part larger than ``UPLOADER_PART_BUFFER_MAX``
is checksummed in a first pass and then sent through :class:`~uploader.storage.bodies.RangeBody`,
both reading the part in chunks through a bounded buffer, whatever part size the request chose.

Unit tests of the streaming body and the chunked checksums, the same against a real S3 server,
and real workers whose peak RSS must stay within their own budget."""

from __future__ import annotations

import io
import os
import random
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.procstat import reset_peak_rss
from tests.conftest import Stack, s3_client, sha256_file
from uploader.checksums import checksum_b64, checksums_b64, md5_b64_to_etag
from uploader.config import Settings
from uploader.errors import SourceChanged
from uploader.model import ObjectOptions
from uploader.planner import MiB
from uploader.sources import Fingerprint, LocalFileSource, SourceRange
from uploader.storage.adapter import EXPECT_CONTINUE_MIN_BYTES, ObjectStore
from uploader.storage.bodies import RangeBody
from uploader.transfer import STREAM_CHUNK, stream_chunk_size

KiB = 1024


def _file(tmp_path: Path, size: int, name: str = "src.bin", seed: int = 7) -> tuple[Path, LocalFileSource, Fingerprint, bytes]:
    data = random.Random(seed).randbytes(size)
    path = tmp_path / name
    path.write_bytes(data)
    source = LocalFileSource(str(path), (tmp_path,))
    return path, source, source.fingerprint(), data


class CountingRange:
    """A SourceRange that counts its reads (each ``readinto`` is one ``preadv`` here)."""

    def __init__(self, inner: SourceRange) -> None:
        self.inner = inner
        self.length = inner.length
        self.reads: list[int] = []
        self.checks = 0

    def readinto(self, buffer, position=0):  # type: ignore[no-untyped-def]
        n = self.inner.readinto(buffer, position)
        self.reads.append(n)
        return n

    def check(self) -> None:
        self.checks += 1
        self.inner.check()

    def checksums(self, algorithms, buffer):  # type: ignore[no-untyped-def]
        return self.inner.checksums(algorithms, buffer)


# -- RangeBody -------------------------------------------------------------------------------------


def test_range_body_serves_urllib3_16k_reads_from_few_large_preads(tmp_path: Path) -> None:
    """urllib3 sends a file body read(16384) at a time; the body reads the file one buffer at a
    time, and what goes out is exactly the range."""
    from urllib3.util.request import body_to_chunks

    _, source, fp, data = _file(tmp_path, 3 * MiB + 123)
    offset, length, buffer_size = 1000, 2 * MiB + 5, 256 * KiB
    with source.open_range(offset, length, fp) as rng:
        counting = CountingRange(rng)
        body = RangeBody(counting, bytearray(buffer_size))
        chunks, content_length = body_to_chunks(body, "PUT", 16384)
        assert content_length is None  # urllib3 leaves the length to botocore (len(), below)
        sent = [bytes(chunk) for chunk in chunks]
    assert b"".join(sent) == data[offset : offset + length]
    assert max(map(len, sent)) == 16384 and all(0 < len(c) <= 16384 for c in sent)
    assert counting.reads == [buffer_size] * (length // buffer_size) + [length % buffer_size]
    assert counting.checks == len(counting.reads), "each refill re-checks the fingerprint first"


def test_range_body_reads_never_cross_its_buffer(tmp_path: Path) -> None:
    _, source, fp, data = _file(tmp_path, 100 * KiB)
    with source.open_range(0, len(data), fp) as rng:
        body = RangeBody(rng, bytearray(30 * KiB))
        first = body.read(20 * KiB)
        second = body.read(20 * KiB)  # only 10 KiB left in the buffer: a short read, no copy
        assert (len(first), len(second)) == (20 * KiB, 10 * KiB)
        assert bytes(second) == data[20 * KiB : 30 * KiB]
        rest = body.read()  # no size: at most one buffer
        assert bytes(rest) == data[30 * KiB : 60 * KiB]
        target = bytearray(50 * KiB)
        assert body.readinto(target) == 30 * KiB and bytes(target[: 30 * KiB]) == data[60 * KiB : 90 * KiB]
        assert bytes(body.read(1 << 30)) == data[90 * KiB :]
        assert body.read(16384) == b"" and len(body) == 0


def test_range_body_seeks_tells_and_measures_like_a_file(tmp_path: Path) -> None:
    from botocore.utils import determine_content_length

    _, source, fp, data = _file(tmp_path, 64 * KiB)
    offset, length = 5, 50 * KiB
    expected = data[offset : offset + length]
    with source.open_range(offset, length, fp) as rng:
        body = RangeBody(rng, bytearray(8 * KiB))
        assert len(body) == length and body.tell() == 0
        assert determine_content_length(body) == length
        assert body.seek(0, io.SEEK_END) == length and len(body) == 0 and body.read(10) == b""
        assert body.seek(-10, io.SEEK_CUR) == length - 10
        assert bytes(body.read(100)) == expected[-10:]
        assert body.seek(1234) == 1234 and body.tell() == 1234 and len(body) == length - 1234
        assert bytes(body.read(10)) == expected[1234:1244]
        assert body.seek(length + 10) == length + 10 and len(body) == 0 and body.read(1) == b""
        with pytest.raises(ValueError):
            body.seek(-1)
        with pytest.raises(ValueError):
            body.seek(0, 7)
        assert body.readable() and body.seekable()
        body.close()  # botocore may close it; the range stays the caller's
        body.seek(0)
        assert bytes(body.read(4)) == expected[:4]


def test_range_body_rewinds_after_a_partial_read(tmp_path: Path) -> None:
    """A retry by botocore: the body was half sent, then seek(0) and sent again in full."""
    _, source, fp, data = _file(tmp_path, 200 * KiB)
    with source.open_range(0, len(data), fp) as rng:
        body = RangeBody(rng, bytearray(32 * KiB))
        partial = b"".join(bytes(body.read(16384)) for _ in range(5))
        assert partial == data[: 5 * 16384]
        body.seek(0)
        again = b"".join(iter(lambda: bytes(body.read(16384)), b""))
    assert again == data


def test_range_body_checksum_is_the_first_pass_and_leaves_it_at_the_start(tmp_path: Path) -> None:
    _, source, fp, data = _file(tmp_path, 3 * MiB + 1)
    offset, length = 77, 3 * MiB - 100
    part = data[offset : offset + length]
    with source.open_range(offset, length, fp) as rng:
        body = RangeBody(rng, bytearray(1 * MiB))
        body.read(5)  # not at the start: the checksum still covers the whole range
        assert body.checksum("crc32") == checksum_b64("crc32", part)
        assert body.tell() == 0
        assert body.checksum("md5") == checksum_b64("md5", part)
        assert b"".join(iter(lambda: bytes(body.read(16384)), b"")) == part


def test_range_body_of_an_empty_range(tmp_path: Path) -> None:
    _, source, fp, _ = _file(tmp_path, 10)
    with source.open_range(10, 0, fp) as rng:
        body = RangeBody(rng, bytearray(4))
        assert len(body) == 0 and body.read(16384) == b""
        assert body.checksum("crc32") == checksum_b64("crc32", b"")


@pytest.mark.parametrize("change", ["append", "truncate", "touch", "rewrite"])
def test_range_body_detects_a_source_changed_between_the_passes(tmp_path: Path, change: str) -> None:
    path, source, fp, data = _file(tmp_path, 1 * MiB)
    with source.open_range(0, len(data), fp) as rng:
        body = RangeBody(rng, bytearray(64 * KiB))
        body.checksum("crc32")
        if change == "append":
            with open(path, "ab") as f:
                f.write(b"x")
        elif change == "truncate":
            os.truncate(path, len(data) // 2)
        elif change == "touch":  # same size and bytes, another mtime
            os.utime(path, ns=(fp.mtime_ns, fp.mtime_ns + 1_000_000_000))
        else:  # in place, same size
            with open(path, "r+b") as f:
                f.write(b"X" * 100)
            os.utime(path, ns=(fp.mtime_ns + 2_000_000_000, fp.mtime_ns + 2_000_000_000))
        with pytest.raises(SourceChanged, match="changed since the upload began"):
            body.read(16384)


def test_range_body_detects_a_change_in_the_middle_of_the_send(tmp_path: Path) -> None:
    path, source, fp, data = _file(tmp_path, 1 * MiB)
    with source.open_range(0, len(data), fp) as rng:
        body = RangeBody(rng, bytearray(64 * KiB))
        for _ in range(4):  # the first buffer's worth goes out
            body.read(16384)
        with open(path, "ab") as f:
            f.write(b"more")
        with pytest.raises(SourceChanged):
            body.read(16384)


def test_range_body_detects_a_checksum_pass_over_a_changed_source(tmp_path: Path) -> None:
    path, source, fp, data = _file(tmp_path, 1 * MiB)
    with source.open_range(0, len(data), fp) as rng:
        with open(path, "ab") as f:
            f.write(b"more")
        with pytest.raises(SourceChanged):
            RangeBody(rng, bytearray(64 * KiB)).checksum("md5")


def test_a_source_range_holds_one_descriptor_for_both_passes(tmp_path: Path) -> None:
    """Opened once: a file renamed over the path between the passes is not read; the range's
    own file is, to the end. Closed afterwards."""
    path, source, fp, data = _file(tmp_path, 512 * KiB)
    rng = source.open_range(0, len(data), fp)
    body = RangeBody(rng, bytearray(64 * KiB))
    value = body.checksum("crc32")
    other = tmp_path / "other.bin"
    other.write_bytes(b"Y" * len(data))
    os.replace(other, path)
    assert b"".join(iter(lambda: bytes(body.read(16384)), b"")) == data
    assert value == checksum_b64("crc32", data)
    fd = rng.fd
    rng.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(ValueError, match="closed"):
        rng.readinto(bytearray(1))
    rng.close()  # idempotent


def test_large_bodies_still_wait_for_100_continue() -> None:
    from uploader.storage.adapter import _expect_continue_for_large_bodies_only

    class Fixed:
        def __init__(self, length: int) -> None:
            self.length = length

    for length, kept in ((EXPECT_CONTINUE_MIN_BYTES, True), (EXPECT_CONTINUE_MIN_BYTES - 1, False)):
        params = {"headers": {"Expect": "100-continue"}, "body": RangeBody(Fixed(length), bytearray(1))}  # type: ignore[arg-type]
        _expect_continue_for_large_bodies_only(params)
        assert ("Expect" in params["headers"]) is kept  # type: ignore[operator]


# -- chunked checksums -----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=5000), cuts=st.lists(st.integers(0, 5000), max_size=8))
def test_chunked_checksums_equal_the_one_shot_ones(data: bytes, cuts: list[int]) -> None:
    edges = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    chunks = [memoryview(data)[a:b] for a, b in pairwise(edges)]
    crc, md5 = checksums_b64(chunks, ("crc32", "md5"))
    assert crc == checksum_b64("crc32", data)
    assert md5 == checksum_b64("md5", data)
    assert checksums_b64(iter(chunks), ("md5",)) == (md5,)
    assert checksums_b64(chunks, ()) == ()


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[LocalFileSource, Fingerprint, bytes]:
    root = tmp_path_factory.mktemp("ranges")
    _, source, fp, data = _file(root, 300 * KiB + 11, seed=99)
    return source, fp, data


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_a_range_checksummed_in_chunks_equals_the_one_shot_checksum(
    big_file: tuple[LocalFileSource, Fingerprint, bytes], data: st.DataObject
) -> None:
    source, fp, content = big_file
    offset = data.draw(st.integers(0, len(content)), label="offset")
    length = data.draw(st.integers(0, len(content) - offset), label="length")
    buffer_size = data.draw(st.integers(1, 80 * KiB), label="buffer")
    part = content[offset : offset + length]
    with source.open_range(offset, length, fp) as rng:
        chunks = [bytes(c) for c in rng.chunks(bytearray(buffer_size))]
        assert b"".join(chunks) == part
        assert all(len(c) == buffer_size for c in chunks[:-1])
        assert rng.checksums(("crc32", "md5"), bytearray(buffer_size)) == (
            checksum_b64("crc32", part),
            checksum_b64("md5", part),
        )
        body = RangeBody(rng, bytearray(buffer_size))
        assert body.checksum("crc32") == checksum_b64("crc32", part)
        assert b"".join(iter(lambda: bytes(body.read(16384)), b"")) == part


def test_stream_chunk_size_stays_within_the_budget() -> None:
    assert stream_chunk_size(64 * MiB) == STREAM_CHUNK == 8 * MiB
    assert stream_chunk_size(5 * MiB) == 5 * MiB
    assert Settings().part_buffer_max == 64 * MiB
    with pytest.raises(ValueError):
        Settings(part_buffer_max=1000)


# -- against a real S3 server ----------------------------------------------------------------------


@pytest.mark.parametrize("checksum", ["crc32", "md5"])
def test_a_streamed_part_is_sent_and_adopted_within_the_budget(stack: Stack, tmp_path: Path, checksum: str) -> None:
    """ObjectStore.upload_part streams a RangeBody (SeaweedFS verifies the checksum header against
    the body), and the coordinator's adoption of a lost checkpoint checksums parts in chunks: no
    Python allocation anywhere near a part's size (the old code read each part whole)."""
    from uploader.context import UploaderContext
    from uploader.coordinator import Coordinator

    part_size, budget = 12 * MiB, 5 * MiB
    path = stack.sources_root / f"stream-{checksum}-{os.getpid()}-{time.monotonic_ns()}.bin"
    content = random.Random(3).randbytes(2 * part_size + 3 * MiB)
    path.write_bytes(content)
    source = LocalFileSource(str(path), (stack.sources_root,))
    fp = source.fingerprint()
    worker_settings = stack.settings.model_copy(update={"part_checksum": checksum, "part_buffer_max": budget})
    objects = ObjectStore(worker_settings, client=s3_client(stack.endpoint_url))
    bucket = stack.new_bucket()
    mpu = objects.create_multipart_upload(bucket, "obj", metadata=None, content_type=None)
    try:
        sent = {}
        tracemalloc.start()
        try:
            for number in (1, 2):
                offset = (number - 1) * part_size
                with source.open_range(offset, part_size, fp) as rng:
                    sent[number] = objects.upload_part(bucket, "obj", mpu, number, RangeBody(rng, bytearray(budget)))
            _, upload_peak = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            record = SimpleNamespace(
                source=str(path), bucket=bucket, key="obj", size=fp.size, mtime_ns=fp.mtime_ns,
                file_id=fp.to_record()["file_id"], part_size=part_size, part_count=3, created=time.time(), endpoint="",
                checksum_algorithm="", options=ObjectOptions(), source_endpoint="", source_credentials="",
            )
            ctx = UploaderContext(settings=worker_settings, checkpoint=None, objects=objects)  # type: ignore[arg-type]
            # In a thread of its own, as in a worker (and so as to leave this thread's part buffer alone).
            with ThreadPoolExecutor(1) as pool:
                adopted = pool.submit(Coordinator(ctx)._find_our_multipart_upload, record).result()  # type: ignore[arg-type]
            _, adopt_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        for number in (1, 2):
            part = content[(number - 1) * part_size : number * part_size]
            assert sent[number].etag == md5_b64_to_etag(checksum_b64("md5", part))
            assert sent[number].checksum == checksum_b64(checksum, part)  # type: ignore[arg-type]
        assert adopted == (mpu, [(1, sent[1], part_size), (2, sent[2], part_size)])
        assert upload_peak < 2 * budget + 2 * MiB, f"sending allocated {upload_peak / MiB:.1f} MiB"
        assert adopt_peak < budget + 2 * MiB, f"adopting allocated {adopt_peak / MiB:.1f} MiB"
    finally:
        objects.abort_multipart_upload(bucket, "obj", mpu)
        path.unlink()


def test_a_source_changed_while_streaming_is_a_source_error_not_a_network_one(stack: Stack) -> None:
    """botocore wraps what a body raises into HTTPClientError (retryable); upload_part gives the
    SourceChanged back, so the upload fails for that reason instead of retrying."""
    path = stack.sources_root / f"changing-{os.getpid()}-{time.monotonic_ns()}.bin"
    path.write_bytes(os.urandom(6 * MiB))
    source = LocalFileSource(str(path), (stack.sources_root,))
    fp = source.fingerprint()
    objects = ObjectStore(stack.settings, client=s3_client(stack.endpoint_url))
    bucket = stack.new_bucket()
    mpu = objects.create_multipart_upload(bucket, "obj", metadata=None, content_type=None)

    class ChangesAfterTheChecksum(CountingRange):
        def checksums(self, algorithms, buffer):  # type: ignore[no-untyped-def]
            values = super().checksums(algorithms, buffer)
            with open(path, "ab") as f:
                f.write(b"appended between the passes")
            return values

    try:
        with source.open_range(0, 6 * MiB, fp) as rng:
            with pytest.raises(SourceChanged, match="changed since the upload began"):
                objects.upload_part(bucket, "obj", mpu, 1, RangeBody(ChangesAfterTheChecksum(rng), bytearray(1 * MiB)))
        assert stack.s3.list_parts(Bucket=bucket, Key="obj", UploadId=mpu).get("Parts", []) == []
    finally:
        objects.abort_multipart_upload(bucket, "obj", mpu)
        path.unlink()


# -- real workers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("checksum", ["crc32", "md5"])
def test_parts_larger_than_the_budget_upload_through_a_worker(make_stack, checksum: str) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack()
    stack.start_worker("budget", concurrency=2, UPLOADER_PART_BUFFER_MAX=str(5 * MiB), UPLOADER_PART_CHECKSUM=checksum)
    bucket = stack.new_bucket()
    path = stack.make_file(3 * 12 * MiB - 7 * MiB)  # parts of 12, 12 and 5 MiB: two streamed, one not
    status = stack.uploader.submit(str(path), f"s3://{bucket}/obj", part_size=12 * MiB).wait(timeout=180)
    assert (status.state, status.part_count, status.parts_done) == ("completed", 3, 3)
    assert status.bytes_sent == path.stat().st_size
    assert stack.object_sha256(bucket, "obj") == sha256_file(path)
    assert stack.open_multipart_uploads(bucket) == []
    path.unlink()


def _kib(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


@pytest.mark.timeout(600)
def test_a_workers_peak_memory_is_bounded_by_its_budget_not_by_the_part_size(make_stack) -> None:  # type: ignore[no-untyped-def]
    """4 threads sending 64 MiB parts at once: the old code held 4 x 64 MiB = 256 MiB of part
    buffers; with an 8 MiB budget the worker may hold 4 x 8 MiB."""
    concurrency, budget, part_size = 4, 8 * MiB, 64 * MiB
    stack: Stack = make_stack()
    worker = stack.start_worker("rss", concurrency=concurrency, UPLOADER_PART_BUFFER_MAX=str(budget))
    bucket = stack.new_bucket()
    # Warm-up: boto3's client, the connection pool and every thread's first buffer exist after it.
    warm = stack.make_file(concurrency * 5 * MiB)
    stack.uploader.submit(str(warm), f"s3://{bucket}/warm", part_size=5 * MiB).wait(timeout=120)
    warm.unlink()
    path = stack.make_file(concurrency * part_size)
    base_kib = _kib(worker.pid, "VmRSS")
    reset = reset_peak_rss(worker.pid)
    before_hwm = _kib(worker.pid, "VmHWM")
    status = stack.uploader.submit(str(path), f"s3://{bucket}/big", part_size=part_size).wait(timeout=300)
    peak_kib = _kib(worker.pid, "VmHWM")
    assert (status.state, status.parts_done) == ("completed", concurrency)
    assert stack.object_sha256(bucket, "big") == sha256_file(path)
    path.unlink()
    grown_mib = (peak_kib - (base_kib if reset else min(base_kib, before_hwm))) / 1024
    allowed_mib = concurrency * budget / MiB + 48  # the buffers, plus what sockets and threads churn
    print(f"worker RSS {base_kib / 1024:.0f} MiB before, peak {peak_kib / 1024:.0f} MiB "
          f"(+{grown_mib:.0f} MiB; allowed +{allowed_mib:.0f}; VmHWM reset: {reset})")
    assert grown_mib < allowed_mib, (
        f"the worker grew {grown_mib:.0f} MiB sending {concurrency} parts of {part_size // MiB} MiB with a "
        f"{budget // MiB} MiB budget (base {base_kib / 1024:.0f} MiB, peak {peak_kib / 1024:.0f} MiB)"
    )
