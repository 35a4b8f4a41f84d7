"""Sources are confined to the roots the deployment names (none by default), never read from the
deny-list's places whatever the roots, and opened beneath the root's descriptor, so a writer
inside the root cannot race a check into reading a file outside it. Both ways of opening are
tested: ``openat2`` (RESOLVE_BENEATH) and the ``O_NOFOLLOW`` walk used where it is missing."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.swapper import exchange
from uploader.config import Settings
from uploader.errors import SourceChanged, SourceError
from uploader.sources import FileId, Fingerprint, LocalFileSource, denylist, open_source
from uploader.sources.beneath import LeavesRoot, OpenMethod, open_beneath, openat2_available
from uploader.sources.denylist import denial
from uploader.sources.fingerprint import identity_scope

METHODS = [
    pytest.param(OpenMethod.OPENAT2, id="openat2", marks=pytest.mark.skipif(not openat2_available(), reason="no openat2")),
    pytest.param(OpenMethod.WALK, id="walk"),
]


@pytest.fixture()
def tree(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "file").write_bytes(b"inside" * 100)
    (root / "sub" / "nested").write_bytes(b"nested")
    (outside / "secret").write_bytes(b"SECRET" * 100)
    return {"root": root, "outside": outside, "tmp": tmp_path}


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home directory for this process with AWS credentials in it, as a worker's would be."""
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text("[default]\naws_secret_access_key = canary\n")
    (home / ".ssh").mkdir()
    (home / ".ssh" / "id_ed25519").write_text("canary key\n")
    monkeypatch.setenv("HOME", str(home))
    return home


# -- no implicit root -----------------------------------------------------------------------------


def test_no_root_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UPLOADER_SOURCE_ROOTS", raising=False)
    assert Settings().source_roots == ()
    monkeypatch.setenv("UPLOADER_SOURCE_ROOTS", "")
    assert Settings().source_roots == ()


def test_without_roots_a_source_is_refused_with_the_setting_to_set(tree: dict[str, Path]) -> None:
    with pytest.raises(SourceError, match="no source roots are configured.*set UPLOADER_SOURCE_ROOTS"):
        open_source(str(tree["root"] / "file"), ())


# -- the deny-list --------------------------------------------------------------------------------


def _denied_paths(home: Path, tmp_path: Path) -> list[str]:
    return [
        "/proc/self/environ", "/proc/1/environ", "/proc/self/root/etc/hostname", "/sys/kernel/notes",
        "/dev/null", "/dev/shm/anything", "/dev/../dev/zero",
        "/run/secrets/db-password", "/var/run/secrets/kubernetes.io/serviceaccount/token",
        "/etc/environment", "/etc/shadow", "/etc/gshadow", "/etc/default/uploader", "/etc/sysconfig/uploader",
        "/root/.aws/credentials", "/root/.bashrc", "/root/.ssh/id_rsa", "/home/alice/.ssh/id_rsa",
        "/home/alice/.config/gcloud/credentials.db",
        str(home / ".aws" / "credentials"), str(home / ".aws" / "config"), str(home / ".ssh" / "id_ed25519"),
        str(tmp_path / "root" / ".env"), str(tmp_path / "root" / "sub" / ".env.production"),
    ]


def test_deny_list_refuses_every_place_even_with_slash_as_root(tree: dict[str, Path], home: Path) -> None:
    for path in _denied_paths(home, tree["tmp"]):
        for roots in ((Path("/"),), (tree["root"],), ()):
            with pytest.raises(SourceError, match="is refused: it is in .*whatever UPLOADER_SOURCE_ROOTS says"):
                LocalFileSource(path, roots).fingerprint()
        with pytest.raises(SourceError, match="is refused"):
            LocalFileSource(f"file://{path}", (Path("/"),))


def test_deny_list_leaves_ordinary_files_alone(tree: dict[str, Path], home: Path) -> None:
    for path in ("/etc/hostname", "/home/alice/data/file.bin", "/home/alice/data/.hidden", "/srv/sources/x.env",
                 "/srv/sources/environment", str(home / "data.bin"), "/root/data/.bashrc", "/tmp/.aws/credentials"):
        assert denial(path) is None, path
    # a root's file still reads with / as root
    assert LocalFileSource(str(tree["root"] / "file"), (Path("/"),)).fingerprint().size == 600


@pytest.mark.parametrize("variable", ["AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE"])
def test_aws_files_named_by_the_environment_are_refused_even_inside_a_root(
    tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    path = tree["root"] / "aws-file"
    path.write_text("[default]\naws_secret_access_key = canary\n")
    monkeypatch.setenv(variable, str(path))
    with pytest.raises(SourceError, match=f"is refused: it is in .*{variable}"):
        LocalFileSource(str(path), (tree["root"],)).fingerprint()


def test_links_into_a_denied_place_are_refused(tree: dict[str, Path], home: Path) -> None:
    link = tree["root"] / "innocent.bin"
    link.symlink_to(home / ".aws" / "credentials")
    with pytest.raises(SourceError, match=r"is refused: it is in .*\.aws"):
        LocalFileSource(str(link), (Path("/"),)).fingerprint()
    env_link = tree["root"] / "config.bin"
    env_link.symlink_to("sub/.env")
    (tree["root"] / "sub" / ".env").write_text("SECRET=1\n")
    with pytest.raises(SourceError, match=r"environment file"):
        LocalFileSource(str(env_link), (tree["root"],)).fingerprint()


@pytest.mark.parametrize("method", METHODS)
def test_a_link_into_a_denied_place_swapped_in_after_the_check_is_refused_on_the_descriptor(
    tree: dict[str, Path], home: Path, method: OpenMethod
) -> None:
    """With / as root a relative link stays beneath the root: the check on the opened
    descriptor's path refuses it (openat2 follows it; the walk follows no link at all)."""
    secret = home / ".aws" / "credentials"
    path = tree["root"] / "data.bin"
    path.write_bytes(b"x" * secret.stat().st_size)
    source = LocalFileSource(str(path), (Path("/"),), method=method)
    fp = source.fingerprint()
    path.unlink()
    path.symlink_to(os.path.relpath(secret, path.parent))
    words = r"now leads to a refused place .*\.aws" if method is OpenMethod.OPENAT2 else "no longer lies inside"
    with pytest.raises(SourceChanged, match=words):
        source.read_range(0, fp.size, fp)


# -- opening beneath the root ---------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_open_beneath_reads_inside_and_never_outside(tree: dict[str, Path], method: OpenMethod) -> None:
    root, outside = tree["root"], tree["outside"]
    fd = open_beneath(root, PurePosixPath("sub/nested"), os.O_RDONLY, method=method)
    assert os.read(fd, 100) == b"nested"
    os.close(fd)
    (root / "abs").symlink_to(outside / "secret")
    (root / "rel").symlink_to("../outside/secret")
    (root / "dirlink").symlink_to(outside, target_is_directory=True)
    (root / "proc").symlink_to("/proc/self/root/etc/hostname")
    for relative in ("abs", "rel", "dirlink/secret", "../outside/secret", "sub/../../outside/secret", "proc"):
        with pytest.raises(LeavesRoot):
            open_beneath(root, PurePosixPath(relative), os.O_RDONLY, method=method)


def test_links_inside_the_root_are_followed_by_openat2_only(tree: dict[str, Path]) -> None:
    """The decision: openat2 follows a link that stays inside the root; the fallback walk follows
    none (a link in place when the request was checked is resolved by realpath before)."""
    root = tree["root"]
    (root / "alias").symlink_to("sub/nested")
    if openat2_available():
        fd = open_beneath(root, PurePosixPath("alias"), os.O_RDONLY, method=OpenMethod.OPENAT2)
        assert os.read(fd, 100) == b"nested"
        os.close(fd)
    with pytest.raises(LeavesRoot, match="symbolic link"):
        open_beneath(root, PurePosixPath("alias"), os.O_RDONLY, method=OpenMethod.WALK)
    # Either way a link in place at the check reads its target (inside the root).
    for method in (OpenMethod.OPENAT2, OpenMethod.WALK):
        if method is OpenMethod.OPENAT2 and not openat2_available():
            continue
        source = LocalFileSource(str(root / "alias"), (root,), method=method)
        assert source.read_range(0, 6, source.fingerprint()) == b"nested"


@pytest.mark.parametrize("method", METHODS)
def test_a_link_to_outside_swapped_in_after_the_check_is_never_read(tree: dict[str, Path], method: OpenMethod) -> None:
    root, secret = tree["root"], tree["outside"] / "secret"
    path = root / "file"
    source = LocalFileSource(str(path), (root,), method=method)
    fp = source.fingerprint()
    os.utime(secret, ns=(fp.mtime_ns, fp.mtime_ns))  # same size and mtime as the inside file
    link = root / "swap"
    link.symlink_to(secret)
    exchange(path, link)
    with pytest.raises(SourceChanged, match="no longer lies inside its source root"):
        source.read_range(0, fp.size, fp)
    exchange(path, link)
    assert source.read_range(0, 6, fp) == b"inside"
    # a directory on the way swapped for a link to outside
    (root / "sub" / "nested").write_bytes(b"x" * 600)
    nested = LocalFileSource(str(root / "sub" / "nested"), (root,), method=method)
    nested_fp = nested.fingerprint()
    (tree["outside"] / "nested").write_bytes(b"SECRET" * 100)
    (root / "sublink").symlink_to(tree["outside"], target_is_directory=True)
    exchange(root / "sub", root / "sublink")
    with pytest.raises(SourceChanged, match="no longer lies inside its source root"):
        nested.read_range(0, 600, nested_fp)


def test_the_file_swapped_for_another_with_the_same_size_and_mtime_is_a_changed_source(tree: dict[str, Path]) -> None:
    path = tree["root"] / "file"
    source = LocalFileSource(str(path), (tree["root"],))
    fp = source.fingerprint()
    twin = tree["root"] / "twin"
    twin.write_bytes(b"INSIDE" * 100)
    os.utime(twin, ns=(fp.mtime_ns, fp.mtime_ns))
    os.replace(twin, path)
    with pytest.raises(SourceChanged, match="another file is in its place"):
        source.read_range(0, 10, fp)


# -- the fingerprint as stored --------------------------------------------------------------------


def test_fingerprint_round_trips_through_the_record(tree: dict[str, Path]) -> None:
    fp = LocalFileSource(str(tree["root"] / "file"), (tree["root"],)).fingerprint()
    assert fp.file_id is not None and fp.file_id.scope == identity_scope() != ""
    fields = fp.to_record()
    assert Fingerprint.from_record(fields["size"], fields["mtime_ns"], fields["file_id"]) == fp  # type: ignore[arg-type]


def test_records_without_an_identity_compare_size_and_mtime_only(tree: dict[str, Path]) -> None:
    """Records written before identities were kept (no ``file_id``) still load and resume."""
    fp = LocalFileSource(str(tree["root"] / "file"), (tree["root"],)).fingerprint()
    old = Fingerprint.from_record(fp.size, fp.mtime_ns, "")
    assert old.file_id is None and old.matches(fp)
    assert not old.matches(Fingerprint(fp.size + 1, fp.mtime_ns, fp.file_id))
    for malformed in ("garbage", "1:2", "x:y@scope", ":@"):
        assert FileId.decode(malformed) is None


def test_identities_from_another_machine_or_namespace_are_not_compared() -> None:
    """st_dev of a shared mount is numbered by each client: a part read on another machine is
    checked against size and mtime (it is still confined to the root when opened)."""
    here = Fingerprint(10, 5, FileId(64, 100, "boot-a/1"))
    assert here.matches(Fingerprint(10, 5, FileId(99, 7, "boot-b/1")))
    assert not here.matches(Fingerprint(10, 5, FileId(64, 101, "boot-a/1")))
    assert "another file" in (here.difference(Fingerprint(10, 5, FileId(64, 101, "boot-a/1"))) or "")


# -- the race, in-process, for both methods (the long one, through workers, is test_source_race.py) --


@pytest.mark.parametrize("method", METHODS)
def test_exchange_race_reads_no_outside_byte(tree: dict[str, Path], method: OpenMethod) -> None:
    root, secret = tree["root"], tree["outside"] / "secret"
    path = root / "file"
    path.write_bytes(b"a" * 65536)
    secret.write_bytes(b"\xff" * 65536)
    source = LocalFileSource(str(path), (root,), method=method)
    fp = source.fingerprint()
    os.utime(secret, ns=(fp.mtime_ns, fp.mtime_ns))
    (root / "swap").symlink_to(os.path.relpath(secret, root))
    stop = threading.Event()
    swaps = 0

    def swap() -> None:
        nonlocal swaps
        while not stop.is_set():
            exchange(path, root / "swap")
            swaps += 1

    swapper = threading.Thread(target=swap)
    swapper.start()
    reads = refused = 0
    deadline = time.monotonic() + 3
    try:
        while time.monotonic() < deadline:
            try:
                data = bytes(source.read_range(0, fp.size, fp))
            except SourceChanged:
                refused += 1
                continue
            assert b"\xff" not in data
            reads += 1
    finally:
        stop.set()
        swapper.join()
    assert swaps > 1000 and reads > 10 and refused > 10, (swaps, reads, refused)


# -- records from before the identity was kept, through real workers ------------------------------


@pytest.mark.timeout(240)
def test_an_upload_recorded_without_an_identity_resumes_and_completes(make_stack) -> None:  # type: ignore[no-untyped-def]
    """A record written by the previous version (no ``file_id``) loads; its parts are checked on
    size and mtime, as when it began, and the upload completes with the source's bytes."""
    from tests.conftest import Stack, sha256_file
    from uploader.planner import MiB

    stack: Stack = make_stack()
    bucket = stack.new_bucket()
    path = stack.make_file(8 * 5 * MiB)
    handle = stack.upload_then_crash(path, f"s3://{bucket}/old.bin", parts_before=2, part_size=5 * MiB)
    store = stack.uploader.checkpoint
    assert store.get(handle.upload_id).file_id  # type: ignore[union-attr]
    store.redis.hdel(store.record_key(handle.upload_id), "file_id")  # as the previous version wrote it
    assert store.get(handle.upload_id).file_id == ""  # type: ignore[union-attr]

    stack.start_worker("new-version", concurrency=4)
    stack.uploader.resume(handle.upload_id)
    status = handle.wait(timeout=180)
    assert status.state == "completed"
    assert stack.object_sha256(bucket, "old.bin") == sha256_file(path)
    path.unlink()


@pytest.mark.parametrize("variable", ["UPLOADER_REDIS_TLS_KEY_FILE", "UPLOADER_MESSAGE_SIGNING_KEY"])
def test_the_workers_own_private_keys_are_denied_wherever_they_are(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    from uploader.sources.denylist import denial

    key = tmp_path / "roots" / "client.key"
    assert denial(key) is None
    monkeypatch.setenv(variable, str(key))
    assert denial(key) is not None and variable in denial(key)  # type: ignore[operator]


PATH_PARTS = st.sampled_from(
    ["root", ".aws", ".ssh", "home", "user", ".profile", "proc", "sys", "dev", "etc", "shadow", "tmp", "data", ".env",
     ".env.prod", "credentials", "config", "run", "secrets", "x.aws", ".."]
)


@settings(max_examples=3000, deadline=None)
@given(st.lists(PATH_PARTS, min_size=1, max_size=5))
def test_the_compiled_deny_list_refuses_exactly_what_its_places_hold(parts: list[str]) -> None:
    """The one regular expression ``denial`` tries first agrees with every place's own
    ``holds`` (the loop it replaced), path by path."""
    path = os.path.normpath("/" + "/".join(parts))
    places, any_place = denylist._deny_list()
    held = any(place.holds(path) for place in places)
    assert (any_place.match(path) is not None) == held, path
    assert (denial(path) is not None) == (held or denylist.is_env_file(os.path.basename(path)))
