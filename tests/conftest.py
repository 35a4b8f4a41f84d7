"""Fixtures: a real Redis, real S3 servers (SeaweedFS, moto) and real ``celery worker`` processes,
all started here on loopback ports of their own, so the tests never touch services a developer
or CI machine happens to run.

A *stack* is one isolated deployment: its own Redis database (broker, results and checkpoints),
its own workers, one S3 server. The session's default stack is shared by tests that do not kill
workers; tests that do build their own.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import hypothesis.internal.observability  # noqa: F401  (imported before worker threads exist: CPython 3.11.7 ast bug)
import pytest
import redis
from botocore.config import Config
from celery import Celery

from tests.faultproxy import FaultProxy
from tests.receiver import Receiver
from uploader import Uploader, UploadNotFound, auth
from uploader.checkpoint import CheckpointStore
from uploader.client import UploadHandle, UploadStatus
from uploader.config import Settings
from uploader.dev.localstack import (
    DATABASES,
    MotoS3,
    RedisServer,
    SeaweedS3,
    Worker,
    object_sha256,
    scratch_dir,
    write_random_file,
)
from uploader.planner import MiB

ACCESS_KEY = "test-access-key"
SECRET_KEY = "test-secret-key-never-logged"
FLEET_KEY = "test-fleet-key-0123456789abcdefghijklmnopqrstuvwxyz"
_databases = itertools.count(1)


def signed(task: str, **kwargs: object) -> dict[str, object]:
    """``kwargs`` of an internal ``task`` with the proof a worker would add (the tests' stacks
    share :data:`FLEET_KEY`)."""
    return auth.signed(FLEET_KEY.encode(), task, kwargs)


@pytest.fixture(scope="session")
def workdir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """The session's scratch directory (sources, server data, worker logs). Removed after a
    session without failures (it holds GBs of test files); kept, for its logs, after one with."""
    path = scratch_dir("uploader-tests-")
    yield path
    if request.session.testsfailed or os.environ.get("UPLOADER_KEEP_TEST_FILES"):
        print(f"\ntest scratch directory kept: {path}")
    else:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server(workdir: Path) -> Iterator[RedisServer]:
    server = RedisServer(workdir)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def seaweed(workdir: Path) -> Iterator[SeaweedS3]:
    server = SeaweedS3(workdir)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moto(workdir: Path) -> Iterator[MotoS3]:
    server = MotoS3(workdir)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sources_root(workdir: Path) -> Path:
    root = workdir / "sources"
    root.mkdir()
    return root


def s3_client(endpoint_url: str):  # type: ignore[no-untyped-def]
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=Config(request_checksum_calculation="when_required", response_checksum_validation="when_required"),
    )


@dataclass
class Stack:
    """One isolated deployment: env for workers, a client, an S3 client, started workers."""

    workdir: Path
    redis_url: str
    endpoint_url: str
    sources_root: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    workers: list[Worker] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.env = {
            "UPLOADER_BROKER_URL": self.redis_url,
            "UPLOADER_S3_ENDPOINT_URL": self.endpoint_url,
            "UPLOADER_SOURCE_ROOTS": str(self.sources_root),
            # The stack's client holds it too: the tests' client is an operator. Tests of an
            # ordinary client build one without it (see tests/test_authority.py).
            "UPLOADER_FLEET_KEY": FLEET_KEY,
            "UPLOADER_RETRY_BACKOFF_MAX": "2",
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            **self.extra_env,
        }
        self.settings = Settings(**{k.removeprefix("UPLOADER_").lower(): v for k, v in self.env.items() if k.startswith("UPLOADER_")})
        self.uploader = Uploader(self.settings)
        self.s3 = s3_client(self.endpoint_url)

    def start_worker(
        self, name: str = "worker", concurrency: int = 4, pool: str = "threads", *, default_name: bool = False,
        queues: str | None = None, **env: str,
    ) -> Worker:
        """A worker on this stack; ``default_name``: started as ``uploader worker`` under Celery's
        default node name (every such worker on this machine shares it)."""
        worker = Worker(
            self.workdir, {**self.env, **env}, name=name, concurrency=concurrency, pool=pool, default_name=default_name,
            queues=queues,
        )
        self.workers.append(worker)
        return worker

    def wait_status(
        self, upload_id: str, predicate: Callable[[UploadStatus], bool], timeout: float, what: str
    ) -> UploadStatus:
        """Poll the checkpoint until ``predicate(status)``; an upload not accepted yet, or Redis
        being away meanwhile, counts as not yet."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                status = self.uploader.status(upload_id)
                if predicate(status):
                    return status
            except (UploadNotFound, redis.RedisError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.05)

    def wait_parts_done(self, upload_id: str, at_least: int, timeout: float = 120) -> UploadStatus:
        return self.wait_status(upload_id, lambda s: s.parts_done >= at_least, timeout, f"{at_least} parts recorded")

    def upload_then_crash(
        self, path: Path, destination: str, *, parts_before: int, concurrency: int = 2, bandwidth: int = 10 * MiB,
        **options: object,
    ) -> UploadHandle:
        """Submit with one throttled worker (so it is caught mid-upload), wait until
        ``parts_before`` parts are recorded, SIGKILL it and wait for it to exit: the upload is
        left as a crashed machine leaves it, with parts in flight. No worker is left running."""
        doomed = self.start_worker("doomed", concurrency=concurrency, UPLOADER_MAX_BANDWIDTH=str(bandwidth))
        handle = self.uploader.submit(str(path), destination, **options)
        handle.accepted(timeout=60)
        self.wait_parts_done(handle.upload_id, parts_before)
        doomed.kill()
        doomed.proc.wait(10)
        return handle

    def new_bucket(self) -> str:
        name = f"t-{uuid.uuid4().hex[:20]}"
        self.s3.create_bucket(Bucket=name)
        return name

    def make_file(self, size: int, name: str | None = None) -> Path:
        path = self.sources_root / (name or f"src-{uuid.uuid4().hex}.bin")
        write_random_file(path, size)
        return path

    def object_sha256(self, bucket: str, key: str) -> str:
        return object_sha256(self.s3, bucket, key)

    def open_multipart_uploads(self, bucket: str) -> list[dict]:
        return self.s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])

    def checkpoint_keys(self, upload_id: str) -> list[str]:
        return sorted(self.uploader.checkpoint.redis.scan_iter(match=f"*{upload_id}*"))

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.uploader.close()


def listen_for_events(app: Celery, events: list[dict]) -> threading.Thread:
    """Collect the Celery events (what Flower sees) on ``app``'s broker into ``events``, in a
    daemon thread that gives up 60 s after the last event."""
    ready = threading.Event()

    def listen() -> None:
        with app.connection() as conn:
            receiver = app.events.Receiver(conn, handlers={"*": events.append})
            ready.set()
            try:
                receiver.capture(limit=None, timeout=60, wakeup=False)
            except Exception:  # socket timeout once the test stops listening
                pass

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    assert ready.wait(10)
    return thread


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture
def make_stack(workdir: Path, redis_server: RedisServer, seaweed: SeaweedS3, sources_root: Path, request):  # type: ignore[no-untyped-def]
    """Factory for an isolated stack on its own Redis database; its workers stop with the test."""
    stacks: list[Stack] = []

    def factory(s3: str = "seaweed", **extra_env: str) -> Stack:
        db = next(_databases)
        assert db < DATABASES, "too many isolated stacks for one Redis; raise localstack.DATABASES"
        endpoint = seaweed.endpoint_url if s3 == "seaweed" else request.getfixturevalue("moto").endpoint_url
        stack = Stack(workdir, redis_server.url.rsplit("/", 1)[0] + f"/{db}", endpoint, sources_root, extra_env)
        stacks.append(stack)
        return stack

    yield factory
    for stack in stacks:
        stack.close()


@pytest.fixture
def proxy(seaweed: SeaweedS3) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the session's SeaweedFS (no faults until told)."""
    fault_proxy = FaultProxy(seaweed.endpoint_url)
    yield fault_proxy
    fault_proxy.close()


#: The ``oss`` profile with SeaweedFS standing in for Alibaba OSS: path-style (OSS is addressed
#: virtual-hosted; the profile lets an operator override), and short retry backoffs.
OSS_SETTINGS = {"UPLOADER_S3_PROFILE": "oss", "UPLOADER_S3_ADDRESSING_STYLE": "path", "UPLOADER_RETRY_BACKOFF_MAX": "1"}


@pytest.fixture
def oss_stack(make_stack, proxy: FaultProxy) -> Stack:  # type: ignore[no-untyped-def]
    """An isolated stack under the ``oss`` profile whose worker reaches SeaweedFS through ``proxy``
    (a test sets the proxy's ``add_headers`` or ``answer`` to answer as OSS does)."""
    stack: Stack = make_stack(**OSS_SETTINGS)
    stack.start_worker("oss", concurrency=3, UPLOADER_S3_ENDPOINT_URL=proxy.url)
    return stack


@pytest.fixture
def store(redis_server: RedisServer) -> Iterator[CheckpointStore]:
    """A checkpoint store on the test Redis, under a key prefix of its own (removed afterwards)."""
    store = CheckpointStore.from_url(redis_server.url.rsplit("/", 1)[0] + "/40", prefix=f"cpm-{uuid.uuid4().hex[:12]}")
    client = store.redis
    yield store
    keys = list(client.scan_iter(match=f"{store.prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(scope="session")
def shared_stack(workdir: Path, redis_server: RedisServer, seaweed: SeaweedS3, sources_root: Path) -> Iterator[Stack]:
    """The session's default stack on SeaweedFS with two running workers."""
    stack = Stack(workdir, redis_server.url, seaweed.endpoint_url, sources_root)
    stack.start_worker("shared-a")
    stack.start_worker("shared-b")
    yield stack
    stack.close()


@pytest.fixture
def stack(shared_stack: Stack) -> Stack:
    return shared_stack


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A webhook receiver on loopback (tests/receiver.py), closed after the test."""
    r = Receiver()
    r.start()
    yield r
    r.close()
