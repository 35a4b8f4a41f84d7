"""Sources open without blocking: a FIFO, a socket or a device node where a file was expected is
refused at once (an ``open()`` of a FIFO without ``O_NONBLOCK`` waits for a writer, for ever),
at submit and in the middle of an upload, and the worker's threads stay free for other uploads."""

from __future__ import annotations

import fcntl
import os
import socket
import stat
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import Stack, sha256_file
from uploader import SourceError, UploaderError, UploadFailed
from uploader.errors import SourceChanged
from uploader.planner import MiB
from uploader.sources import OPEN_FLAGS, LocalFileSource
from uploader.sources.local import check_descriptor

pytestmark = pytest.mark.timeout(60)


def _regular(tmp_path: Path) -> tuple[Path, LocalFileSource]:
    path = tmp_path / "src.bin"
    path.write_bytes(b"0123456789" * 100)
    return path, LocalFileSource(str(path), (tmp_path,))


def _swap_in_fifo(path: Path) -> None:
    """Atomically replace ``path`` by a FIFO (nothing ever writes to it)."""
    fifo = path.with_name(path.name + ".fifo")
    os.mkfifo(fifo)
    os.replace(fifo, path)


def test_open_flags() -> None:
    for flag in (os.O_NONBLOCK, os.O_CLOEXEC, os.O_NOCTTY):
        assert OPEN_FLAGS & flag
    assert OPEN_FLAGS & os.O_ACCMODE == os.O_RDONLY


def test_a_regular_file_is_read_through_a_non_inheritable_descriptor(tmp_path: Path) -> None:
    _, source = _regular(tmp_path)
    fp = source.fingerprint()
    with source.open_range(10, 10, fp) as rng:
        assert fcntl.fcntl(rng.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert not os.get_inheritable(rng.fd)
        buffer = bytearray(10)
        assert rng.readinto(buffer) == 10 and buffer == b"0123456789"


def test_fingerprint_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(SourceError, match=r"not a regular file \(a FIFO\)"):
        LocalFileSource(str(fifo), (tmp_path,)).fingerprint()
    assert time.monotonic() - started < 1


def test_fingerprint_refuses_a_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen()
        with pytest.raises(SourceError, match=r"not a regular file \(a socket"):
            LocalFileSource(str(path), (tmp_path,)).fingerprint()


@pytest.mark.parametrize("reader", ["read_range", "open_range"])
def test_a_fifo_swapped_in_mid_upload_is_refused_without_blocking(tmp_path: Path, reader: str) -> None:
    path, source = _regular(tmp_path)
    fp = source.fingerprint()
    _swap_in_fifo(path)
    started = time.monotonic()
    with pytest.raises(SourceChanged, match=r"no longer a regular file \(it is now a FIFO\)"):
        getattr(source, reader)(0, 10, fp)
    assert time.monotonic() - started < 1


def test_a_device_or_socket_swapped_in_is_refused(tmp_path: Path) -> None:
    path, source = _regular(tmp_path)
    fp = source.fingerprint()
    path.unlink()
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        with pytest.raises(SourceChanged, match=r"no longer a regular file \(it is now a socket"):
            source.read_range(0, 10, fp)
    if os.path.exists("/dev/null"):
        # /dev itself is refused whatever the roots: a device is checked on its descriptor
        fd = os.open("/dev/null", OPEN_FLAGS)
        try:
            with pytest.raises(SourceChanged, match="it is now a character device"):
                check_descriptor(fd, "/dev/null", began=True)
        finally:
            os.close(fd)
    path.unlink()
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's numbers, in the root
    except PermissionError:
        return  # creating device nodes needs CAP_MKNOD
    with pytest.raises(SourceChanged, match="it is now a character device"):
        source.read_range(0, 10, fp)


def test_a_directory_swapped_in_is_refused(tmp_path: Path) -> None:
    path, source = _regular(tmp_path)
    fp = source.fingerprint()
    path.unlink()
    path.mkdir()
    with pytest.raises(SourceChanged, match="it is now a directory"):
        source.read_range(0, 10, fp)


# -- through real workers -----------------------------------------------------------------------------


def test_a_fifo_source_is_refused_at_submit(stack: Stack) -> None:
    bucket = stack.new_bucket()
    fifo = stack.sources_root / f"fifo-{uuid.uuid4().hex}"
    os.mkfifo(fifo)
    upload_id = f"fifo-{uuid.uuid4().hex}"
    started = time.monotonic()
    with pytest.raises(UploaderError, match=r"not a regular file \(a FIFO\)"):  # refused by the coordinator
        stack.uploader.submit(str(fifo), f"s3://{bucket}/k", upload_id=upload_id).wait(timeout=30)
    assert time.monotonic() - started < 10
    assert stack.open_multipart_uploads(bucket) == []
    fifo.unlink()


@pytest.mark.timeout(240)
def test_a_fifo_swapped_in_mid_upload_fails_it_and_frees_the_workers_threads(make_stack) -> None:  # type: ignore[no-untyped-def]
    """With the old blocking open() both threads of this worker hung in open() on the FIFO: the
    upload never ended, and the worker never ran anything again."""
    stack: Stack = make_stack()
    # Throttled, so that the upload is caught mid-way; 2 threads, both of which meet the FIFO.
    stack.start_worker("fifo", concurrency=2, UPLOADER_MAX_BANDWIDTH=str(10 * MiB))
    bucket = stack.new_bucket()
    path = stack.make_file(12 * 5 * MiB)
    handle = stack.uploader.submit(str(path), f"s3://{bucket}/swapped", part_size=5 * MiB)
    handle.accepted(timeout=60)
    stack.wait_parts_done(handle.upload_id, 1, timeout=60)
    _swap_in_fifo(path)
    swapped = time.monotonic()
    status = stack.wait_status(handle.upload_id, lambda s: s.terminal, timeout=60, what="the upload to end")
    assert status.state == "failed"
    assert "no longer a regular file (it is now a FIFO)" in status.error, status.error
    # Parts already read were sent; the first part that opened the FIFO failed the upload.
    assert time.monotonic() - swapped < 30
    with pytest.raises(UploadFailed, match="FIFO"):
        handle.wait(timeout=10)
    path.unlink()

    # The worker's threads are free: it completes a normal upload.
    other = stack.make_file(3 * 5 * MiB)
    done = stack.uploader.submit(str(other), f"s3://{bucket}/after", part_size=5 * MiB).wait(timeout=60)
    assert done.state == "completed"
    assert stack.object_sha256(bucket, "after") == sha256_file(other)
    assert all(worker.alive() for worker in stack.workers)
    other.unlink()
