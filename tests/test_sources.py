"""Unit and property tests for uploader.sources (local files in temp dirs) and, since it sits on
the same read-and-send path, uploader.bandwidth.TokenBucket."""

from __future__ import annotations

import os
import random
import stat
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uploader.bandwidth import TokenBucket
from uploader.config import Settings
from uploader.errors import SourceChanged, SourceError
from uploader.sources import OPEN_FLAGS, Fingerprint, LocalFileSource, S3ObjectSource, open_source, resolve_within_roots
from uploader.sources.local import check_descriptor
from uploader.storage.adapter import object_store

RUNNING_AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture()
def tree(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    sibling = tmp_path / "rootevil"  # shares the root's name as a string prefix
    for d in (root, root / "sub", outside, sibling):
        d.mkdir()
    (root / "file").write_bytes(b"inside")
    (root / "sub" / "nested").write_bytes(b"nested")
    (outside / "secret").write_bytes(b"secret")
    (sibling / "file").write_bytes(b"evil")
    return {"root": root, "outside": outside, "sibling": sibling, "tmp": tmp_path}


# -- resolve_within_roots -------------------------------------------------------------------------


def test_paths_inside_root_resolve(tree: dict[str, Path]) -> None:
    root = tree["root"]
    real_root = Path(os.path.realpath(root))
    assert resolve_within_roots(str(root / "file"), (root,)) == real_root / "file"
    assert resolve_within_roots(str(root / "sub" / "nested"), (root,)) == real_root / "sub" / "nested"
    assert resolve_within_roots(f"{root}/sub/../file", (root,)) == real_root / "file"
    assert resolve_within_roots(f"file://{root}/file", (root,)) == real_root / "file"
    # not-yet-existing paths inside the root still resolve (the fingerprint reports them missing)
    assert resolve_within_roots(str(root / "missing"), (root,)) == real_root / "missing"


def test_root_itself_is_within_root(tree: dict[str, Path]) -> None:
    root = tree["root"]
    assert resolve_within_roots(str(root), (root,)) == Path(os.path.realpath(root))
    assert resolve_within_roots(f"{root}/", (root,)) == Path(os.path.realpath(root))


def test_dotdot_escape_refused(tree: dict[str, Path]) -> None:
    root = tree["root"]
    for path in (f"{root}/../outside/secret", f"{root}/sub/../../outside/secret", f"{root}/.."):
        with pytest.raises(SourceError, match="outside the allowed source roots"):
            resolve_within_roots(path, (root,))


def test_string_prefix_sibling_refused(tree: dict[str, Path]) -> None:
    with pytest.raises(SourceError):
        resolve_within_roots(str(tree["sibling"] / "file"), (tree["root"],))


def test_symlink_pointing_outside_refused(tree: dict[str, Path]) -> None:
    root = tree["root"]
    (root / "escape").symlink_to(tree["outside"] / "secret")
    (root / "escape_dir").symlink_to(tree["outside"], target_is_directory=True)
    with pytest.raises(SourceError):
        resolve_within_roots(str(root / "escape"), (root,))
    with pytest.raises(SourceError):
        resolve_within_roots(str(root / "escape_dir" / "secret"), (root,))
    with pytest.raises(SourceError):
        LocalFileSource(str(root / "escape"), (root,))


def test_symlink_inside_root_resolves_to_target(tree: dict[str, Path]) -> None:
    root = tree["root"]
    (root / "alias").symlink_to(root / "sub" / "nested")
    assert resolve_within_roots(str(root / "alias"), (root,)) == Path(os.path.realpath(root)) / "sub" / "nested"


def test_symlinked_root(tree: dict[str, Path]) -> None:
    link = tree["tmp"] / "rootlink"
    link.symlink_to(tree["root"], target_is_directory=True)
    # a root given through a symlink admits paths given through either name
    assert resolve_within_roots(str(link / "file"), (link,)) == Path(os.path.realpath(tree["root"])) / "file"
    assert resolve_within_roots(str(tree["root"] / "file"), (link,)) == Path(os.path.realpath(tree["root"])) / "file"
    with pytest.raises(SourceError):
        resolve_within_roots(str(tree["outside"] / "secret"), (link,))


def test_relative_path_refused(tree: dict[str, Path]) -> None:
    for path in ("file", "root/file", "./file", "../x", "file://relative/file"):
        with pytest.raises(SourceError, match="absolute"):
            resolve_within_roots(path, (tree["root"],))


def test_any_of_several_roots(tree: dict[str, Path]) -> None:
    roots = (tree["root"], tree["outside"])
    assert resolve_within_roots(str(tree["outside"] / "secret"), roots).name == "secret"
    with pytest.raises(SourceError):
        resolve_within_roots(str(tree["sibling"] / "file"), roots)


def test_no_roots_refuses_everything(tree: dict[str, Path]) -> None:
    with pytest.raises(SourceError, match=r"\(none\)"):
        resolve_within_roots(str(tree["root"] / "file"), ())


def test_open_source_kinds(tree: dict[str, Path]) -> None:
    root = tree["root"]
    source = open_source(str(root / "file"), (root,))
    assert isinstance(source, LocalFileSource)
    assert source.name == str(root / "file")
    assert isinstance(open_source(f"file://{root}/file", (root,)), LocalFileSource)
    for unsupported in ("ftp://example.com/x", "gs://bucket/key"):
        with pytest.raises(SourceError, match="unsupported"):
            open_source(unsupported, (root,))
    # An S3 object is read through the store of its endpoint, which only workers have.
    with pytest.raises(SourceError, match="read by the workers only"):
        open_source("s3://bucket/key", (root,))
    settings = Settings(
        source_buckets="oss:bucket,open", endpoints={"oss": {"profile": "oss", "endpoint_url": "http://127.0.0.1:1"}}
    )
    allowed = settings.source_buckets
    s3 = open_source("s3://bucket/a/key", (root,), objects_for=lambda name: object_store(settings, name), endpoint="oss",
                     source_buckets=allowed)
    assert isinstance(s3, S3ObjectSource) and (s3.bucket, s3.key) == ("bucket", "a/key")
    assert s3.objects.endpoint.name == "oss"
    # Only from the buckets the workers name (UPLOADER_SOURCE_BUCKETS), on their endpoint.
    for bucket, endpoint in (("bucket", ""), ("open", "oss"), ("other", "oss")):
        with pytest.raises(SourceError, match="is not among the workers' source buckets"):
            open_source(f"s3://{bucket}/k", (root,), objects_for=lambda name: object_store(settings, name), endpoint=endpoint,
                        source_buckets=allowed)
    assert open_source("s3://open/k", (root,), objects_for=lambda name: object_store(settings, name), source_buckets=allowed)


# -- fingerprint ----------------------------------------------------------------------------------


def test_fingerprint_of_regular_file(tree: dict[str, Path]) -> None:
    path = tree["root"] / "file"
    fp = LocalFileSource(str(path), (tree["root"],)).fingerprint()
    st_ = os.stat(path)
    assert (fp.size, fp.mtime_ns) == (st_.st_size, st_.st_mtime_ns)
    # and which file it is (device and inode), for comparisons on this machine
    assert fp.file_id is not None and (fp.file_id.dev, fp.file_id.ino) == (st_.st_dev, st_.st_ino)
    assert fp == Fingerprint.of(st_)
    assert fp.size == len(b"inside")
    assert fp.to_dict() == {"size": st_.st_size, "mtime_ns": st_.st_mtime_ns, "file_id": fp.file_id.encode()}


def test_fingerprint_missing_file(tree: dict[str, Path]) -> None:
    source = LocalFileSource(str(tree["root"] / "missing"), (tree["root"],))
    with pytest.raises(SourceError, match="does not exist"):
        source.fingerprint()


def test_fingerprint_directory(tree: dict[str, Path]) -> None:
    source = LocalFileSource(str(tree["root"] / "sub"), (tree["root"],))
    with pytest.raises(SourceError, match="is a directory"):
        source.fingerprint()


def test_fingerprint_fifo_is_not_a_regular_file(tree: dict[str, Path]) -> None:
    fifo = tree["root"] / "fifo"
    os.mkfifo(fifo)
    source = LocalFileSource(str(fifo), (tree["root"],))
    with pytest.raises(SourceError, match="not a regular file"):
        source.fingerprint()


def test_fingerprint_character_device_is_not_a_regular_file(tmp_path: Path) -> None:
    """/dev is refused whatever the roots (the deny-list); a device node anywhere is refused on
    its descriptor."""
    if not os.path.exists("/dev/null"):
        pytest.skip("no /dev/null")
    with pytest.raises(SourceError, match="refused: it is in /dev"):
        LocalFileSource("/dev/null", (Path("/dev"),)).fingerprint()
    fd = os.open("/dev/null", OPEN_FLAGS)
    try:
        with pytest.raises(SourceError, match=r"not a regular file \(a character device\)"):
            check_descriptor(fd, "/dev/null", began=False)
    finally:
        os.close(fd)
    node = tmp_path / "null"
    try:
        os.mknod(node, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except PermissionError:
        return  # creating device nodes needs CAP_MKNOD
    with pytest.raises(SourceError, match=r"not a regular file \(a character device\)"):
        LocalFileSource(str(node), (tmp_path,)).fingerprint()


@pytest.mark.skipif(RUNNING_AS_ROOT, reason="root bypasses file permissions, so chmod 000 stays readable")
def test_fingerprint_unreadable_file(tree: dict[str, Path]) -> None:
    path = tree["root"] / "locked"
    path.write_bytes(b"x")
    path.chmod(0)
    try:
        with pytest.raises(SourceError, match="permission denied"):
            LocalFileSource(str(path), (tree["root"],)).fingerprint()
    finally:
        path.chmod(0o600)


def test_fingerprint_unreadable_file_simulated(tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Covers the os.access branch even when running as root, by making os.access say 'no' for
    this one path; this does not prove real permission handling (see the skipped test above)."""
    path = tree["root"] / "file"
    source = LocalFileSource(str(path), (tree["root"],))
    real_access = os.access
    target = os.path.realpath(path)
    monkeypatch.setattr(
        os, "access", lambda p, mode, **kw: False if os.fspath(p) == target else real_access(p, mode, **kw)
    )
    with pytest.raises(SourceError, match="permission denied"):
        source.fingerprint()


# -- read_range -----------------------------------------------------------------------------------

DATA = random.Random(1234).randbytes(64 * 1024 + 17)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[LocalFileSource, Fingerprint]:
    root = tmp_path_factory.mktemp("read_range")
    path = root / "data.bin"
    path.write_bytes(DATA)
    source = LocalFileSource(str(path), (root,))
    return source, source.fingerprint()


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_read_range_returns_exact_bytes(data_file: tuple[LocalFileSource, Fingerprint], data: st.DataObject) -> None:
    source, fp = data_file
    offset = data.draw(st.integers(0, len(DATA)), label="offset")
    length = data.draw(st.integers(0, len(DATA) - offset), label="length")
    chunk = source.read_range(offset, length, fp)
    assert len(chunk) == length
    assert chunk == DATA[offset : offset + length]


def test_read_range_whole_file_in_parts(data_file: tuple[LocalFileSource, Fingerprint]) -> None:
    source, fp = data_file
    step = 5000
    pieces = [source.read_range(off, min(step, len(DATA) - off), fp) for off in range(0, len(DATA), step)]
    assert b"".join(pieces) == DATA


def _fresh(tmp_path: Path) -> tuple[Path, LocalFileSource, Fingerprint]:
    path = tmp_path / "f.bin"
    path.write_bytes(b"0123456789" * 100)
    source = LocalFileSource(str(path), (tmp_path,))
    fp = source.fingerprint()
    assert source.read_range(10, 10, fp) == b"0123456789"
    return path, source, fp


def test_read_range_detects_size_change(tmp_path: Path) -> None:
    path, source, fp = _fresh(tmp_path)
    with open(path, "ab") as f:
        f.write(b"more")
    with pytest.raises(SourceChanged):
        source.read_range(0, 10, fp)


def test_read_range_detects_truncation(tmp_path: Path) -> None:
    path, source, fp = _fresh(tmp_path)
    os.truncate(path, 5)
    with pytest.raises(SourceChanged):
        source.read_range(0, 10, fp)


def test_read_range_detects_mtime_change_with_same_size(tmp_path: Path) -> None:
    path, source, fp = _fresh(tmp_path)
    # same size, same bytes even; only the modification time moves
    os.utime(path, ns=(fp.mtime_ns, fp.mtime_ns + 1_000_000_000))
    assert os.stat(path).st_size == fp.size
    with pytest.raises(SourceChanged):
        source.read_range(0, 10, fp)


def test_read_range_detects_in_place_rewrite(tmp_path: Path) -> None:
    path, source, fp = _fresh(tmp_path)
    path.write_bytes(b"X" * fp.size)
    os.utime(path, ns=(fp.mtime_ns + 5_000_000_000, fp.mtime_ns + 5_000_000_000))
    with pytest.raises(SourceChanged):
        source.read_range(0, 10, fp)


def test_read_range_detects_deleted_file(tmp_path: Path) -> None:
    path, source, fp = _fresh(tmp_path)
    path.unlink()
    with pytest.raises(SourceChanged):
        source.read_range(0, 10, fp)


def test_read_range_with_foreign_fingerprint(tmp_path: Path) -> None:
    _path, source, fp = _fresh(tmp_path)
    with pytest.raises(SourceChanged):
        source.read_range(0, 10, Fingerprint(size=fp.size + 1, mtime_ns=fp.mtime_ns))
    with pytest.raises(SourceChanged):
        source.read_range(0, 10, Fingerprint(size=fp.size, mtime_ns=fp.mtime_ns - 1))


# -- bandwidth.TokenBucket ------------------------------------------------------------------------

RATE = 10_000_000  # bytes per second


@pytest.mark.parametrize("rate", [0, -1])
def test_token_bucket_rejects_non_positive_rate(rate: int) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate)


def test_token_bucket_burst_up_to_rate_is_free() -> None:
    bucket = TokenBucket(RATE)
    start = time.monotonic()
    assert bucket.acquire(RATE // 2) == 0.0
    assert bucket.acquire(RATE // 2) == 0.0
    assert time.monotonic() - start < 0.1


def test_token_bucket_sleeps_for_the_debt() -> None:
    bucket = TokenBucket(RATE)
    amount = RATE * 14 // 10  # starting full: (N - R) / R = 0.4 s
    expected = (amount - RATE) / RATE
    start = time.monotonic()
    slept = bucket.acquire(amount)
    elapsed = time.monotonic() - start
    assert slept == pytest.approx(expected, abs=0.05)
    assert expected - 0.02 <= elapsed <= expected + 0.3
    # The bucket is now empty: the next 0.2 s worth of bytes costs about 0.2 s.
    start = time.monotonic()
    slept = bucket.acquire(RATE // 5)
    elapsed = time.monotonic() - start
    assert slept == pytest.approx(0.2, abs=0.05)
    assert 0.15 <= elapsed <= 0.5


def test_token_bucket_shared_between_threads() -> None:
    bucket = TokenBucket(RATE)
    slept: list[float] = []
    threads = [threading.Thread(target=lambda: slept.append(bucket.acquire(RATE * 6 // 10))) for _ in range(2)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    # 1.2 R from a full bucket of R: one thread goes free, the other waits ~0.2 s
    assert sorted(slept)[0] == 0.0
    assert sorted(slept)[1] == pytest.approx(0.2, abs=0.05)
    assert 0.15 <= elapsed <= 0.6
