"""Issue 10: one ``uploader.start_upload`` message from anyone with broker access uploaded the
worker's ``~/.aws/credentials`` and ``/etc/shadow`` (the default root was ``/``). Now a worker with
default settings reads no local source at all, and the deny-list's places are refused even with
``UPLOADER_SOURCE_ROOTS=/``: each request is refused with a clear error, visible in ``status``,
and nothing is created (no record, no multipart upload, no object)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.conftest import Stack
from tests.test_bad_input import _assert_nothing_left, _send_raw
from uploader import SourceError

pytestmark = pytest.mark.timeout(300)

CANARY = "canary-secret-never-uploaded"


@pytest.fixture
def worker_home(tmp_path: Path) -> Path:
    """The workers' home: AWS credentials and an SSH key in it, as on a real worker."""
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text(f"[default]\naws_access_key_id = CANARY\naws_secret_access_key = {CANARY}\n")
    (home / ".ssh").mkdir()
    (home / ".ssh" / "id_ed25519").write_text(CANARY)
    return home


def _worker_env(sources_root: Path, home: Path, tmp_path: Path) -> dict[str, str]:
    # The credentials file the AWS SDK is pointed at lies inside the source root: refused anyway.
    shared = sources_root / f"aws-credentials-{uuid.uuid4().hex}"
    shared.write_text(f"[default]\naws_access_key_id = CANARY\naws_secret_access_key = {CANARY}\n")
    config = tmp_path / "aws-config"
    config.write_text("[default]\nregion = us-east-1\n")
    return {"HOME": str(home), "AWS_SHARED_CREDENTIALS_FILE": str(shared), "AWS_CONFIG_FILE": str(config)}


def _secret_sources(stack: Stack, env: dict[str, str]) -> list[str]:
    env_file = stack.sources_root / ".env"
    env_file.write_text(f"UPLOADER_SECRET={CANARY}\n")
    home = env["HOME"]
    return [
        f"{home}/.aws/credentials",
        f"file://{home}/.aws/credentials",
        f"{home}/.aws/../.aws/credentials",
        f"{home}/.ssh/id_ed25519",
        env["AWS_SHARED_CREDENTIALS_FILE"],
        env["AWS_CONFIG_FILE"],
        "/proc/self/environ",
        "/proc/1/environ",
        "/proc/self/root/etc/shadow",
        "/sys/kernel/notes",
        "/dev/zero",
        "/dev/shm/x",
        "/etc/environment",
        "/etc/shadow",
        "/root/.bashrc",
        "/root/.aws/credentials",
        "/home/alice/.ssh/id_rsa",
        "/run/secrets/db-password",
        "/var/run/secrets/kubernetes.io/serviceaccount/token",
        str(env_file),
    ]


def _roots_stack(make_stack, monkeypatch: pytest.MonkeyPatch, roots: str | None, env: dict[str, str]) -> Stack:  # type: ignore[no-untyped-def]
    """A stack whose worker has ``roots`` as UPLOADER_SOURCE_ROOTS (None: not set at all)."""
    monkeypatch.delenv("UPLOADER_SOURCE_ROOTS", raising=False)  # the worker inherits this environment
    stack: Stack = make_stack()
    if roots is None:
        stack.env.pop("UPLOADER_SOURCE_ROOTS")
    else:
        stack.env["UPLOADER_SOURCE_ROOTS"] = roots
    stack.start_worker("secrets", concurrency=2, **env)
    return stack


@pytest.mark.parametrize("roots", [None, "/"], ids=["default-settings", "slash-as-root"])
def test_the_workers_secrets_are_refused_and_nothing_is_created(
    make_stack, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sources_root: Path, worker_home: Path,  # type: ignore[no-untyped-def]
    roots: str | None,
) -> None:
    env = _worker_env(sources_root, worker_home, tmp_path)
    stack = _roots_stack(make_stack, monkeypatch, roots, env)
    bucket = stack.new_bucket()
    for source in _secret_sources(stack, env):
        upload_id = f"secret-{uuid.uuid4().hex}"
        exc = _send_raw(stack, source=source, bucket=bucket, key="loot", upload_id=upload_id)
        assert isinstance(exc, SourceError), (source, exc)
        message = str(exc)
        assert "is refused: it is in" in message and "whatever UPLOADER_SOURCE_ROOTS says" in message, (source, message)
        assert CANARY not in message
        status = stack.uploader.status(upload_id)
        assert status.state == "refused" and status.refusal_kind == "SourceError", (source, status)
        assert "is refused: it is in" in status.error, (source, status.error)
        _assert_nothing_left(stack, bucket, upload_id)
    # Through the client API as well.
    with pytest.raises(SourceError, match="is refused: it is in /etc/shadow"):
        stack.uploader.submit("/etc/shadow", f"s3://{bucket}/shadow").wait(timeout=60)
    assert all(worker.alive() for worker in stack.workers)


def test_with_no_roots_configured_a_source_is_refused_saying_to_set_them(
    make_stack, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    stack = _roots_stack(make_stack, monkeypatch, None, {})
    bucket = stack.new_bucket()
    path = stack.make_file(10 << 20)  # an ordinary file in what other stacks use as their root
    upload_id = f"noroots-{uuid.uuid4().hex}"
    with pytest.raises(SourceError, match="no source roots are configured.*set UPLOADER_SOURCE_ROOTS"):
        stack.uploader.submit(str(path), f"s3://{bucket}/k", upload_id=upload_id).wait(timeout=60)
    status = stack.uploader.status(upload_id)
    assert status.state == "refused" and "set UPLOADER_SOURCE_ROOTS" in status.error
    _assert_nothing_left(stack, bucket, upload_id)

    # Naming the root is all it takes.
    stack.workers.pop().stop()
    stack.env["UPLOADER_SOURCE_ROOTS"] = str(stack.sources_root)
    stack.start_worker("with-roots", concurrency=2)
    done = stack.uploader.submit(str(path), f"s3://{bucket}/ok").wait(timeout=120)
    assert done.state == "completed"
    path.unlink()
