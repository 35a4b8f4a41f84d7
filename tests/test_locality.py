"""Host-local files (the README's "Host-local files", uploader/locality.py): a file on one
machine's own disk is read by the workers of that host only, its parts still in parallel.

Two worker "hosts" on this machine: each worker has its own ``UPLOADER_HOST_NAME`` and its own
source root, so a worker of one host cannot read the other's files, exactly as on two machines.
A part, a start or a resume that reached the wrong host would fail with the file outside its
roots; the uploads below complete only if every message of theirs went to the right host."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from celery import Celery

from tests.conftest import Stack, sha256_file
from uploader import contract
from uploader.client import Uploader
from uploader.config import Settings
from uploader.dev.localstack import Worker, write_random_file
from uploader.errors import InvalidRequest, NoWorkerOnHost, SourceError
from uploader.planner import MiB
from uploader.request import parse_request

HOST_A, HOST_B = "host-a", "host-b"
PART = 5 * MiB


def host_root(sources_root: Path, host: str) -> Path:
    root = sources_root / f"{host}-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    return root


def start_host_worker(
    stack: Stack, host: str, root: Path, name: str, *, concurrency: int = 2, queues: str | None = None, **env: str
) -> Worker:
    """A worker of ``host`` that can read ``root`` only."""
    return stack.start_worker(
        name, concurrency=concurrency, queues=queues, UPLOADER_HOST_NAME=host, UPLOADER_SOURCE_ROOTS=str(root), **env
    )


def client_on(stack: Stack, host: str) -> Uploader:
    """A client on ``host`` (its ``UPLOADER_HOST_NAME``): ``--local`` uploads name it."""
    return Uploader(stack.settings.model_copy(update={"host_name": host}))


def local_file(root: Path, size: int) -> Path:
    path = root / f"local-{uuid.uuid4().hex[:8]}.bin"
    write_random_file(path, size)
    return path


def test_a_host_local_file_is_read_by_the_workers_of_its_host_only(make_stack, sources_root: Path) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack()
    root_a, root_b = host_root(sources_root, HOST_A), host_root(sources_root, HOST_B)
    start_host_worker(stack, HOST_A, root_a, "a", concurrency=2)
    # Host B's worker reads its host's queue and one lane, not the control queue.
    start_host_worker(stack, HOST_B, root_b, "b", concurrency=2, queues=contract.part_lanes(8)[-1])
    bucket = stack.new_bucket()
    path = local_file(root_b, 3 * PART + 1234)
    client = client_on(stack, HOST_B)
    try:
        handle = client.submit(str(path), f"s3://{bucket}/local.bin", part_size=PART, locality="host")
        status = handle.wait(timeout=120)
        assert status.state == "completed", status
        assert status.host == HOST_B
        assert stack.object_sha256(bucket, "local.bin") == sha256_file(path)
        # The control: the same file as an ordinary upload, started by host A's worker alone
        # (host B's reads only its own queue and one lane), is outside A's roots.
        plain = client.submit(str(path), f"s3://{bucket}/plain.bin", part_size=PART)
        with pytest.raises(SourceError, match="source roots"):
            plain.accepted(60)
    finally:
        client.close()


def test_a_start_sent_by_task_name_to_the_control_queue_goes_to_its_host(make_stack, sources_root: Path) -> None:  # type: ignore[no-untyped-def]
    """A client in any language sends to ``uploader.control``: the worker of host A that takes
    the start hands it to host B's queue (host B's worker does not read the control queue here)."""
    stack: Stack = make_stack()
    root_a, root_b = host_root(sources_root, HOST_A), host_root(sources_root, HOST_B)
    worker_a = start_host_worker(stack, HOST_A, root_a, "a", concurrency=2)
    start_host_worker(stack, HOST_B, root_b, "b", concurrency=2, queues=contract.part_lanes(8)[-1])
    bucket = stack.new_bucket()
    path = local_file(root_b, 2 * PART + 99)
    upload_id = f"raw-{uuid.uuid4().hex[:12]}"
    raw = Celery("a-raw-client", broker=stack.redis_url, set_as_current=False)
    try:
        raw.send_task(
            contract.START_UPLOAD,
            kwargs={"source": str(path), "bucket": bucket, "key": "raw.bin", "part_size": PART, "upload_id": upload_id,
                    "locality": "host", "host": HOST_B},
            queue=contract.CONTROL_QUEUE,
        )
        status = stack.uploader.wait(upload_id, timeout=120)
        assert status.state == "completed", status
        assert stack.object_sha256(bucket, "raw.bin") == sha256_file(path)
        assert f"upload {upload_id}: start sent to the workers of host {HOST_B}" in worker_a.log_text()
    finally:
        raw.close()


def test_a_host_with_no_live_worker_is_said_at_once_and_nothing_is_created(make_stack, sources_root: Path) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack()
    root_a = host_root(sources_root, HOST_A)
    start_host_worker(stack, HOST_A, root_a, "a", concurrency=2)
    bucket = stack.new_bucket()
    path = local_file(root_a, 1000)
    client = client_on(stack, "host-c")
    try:
        # The Python API: refused before anything is sent.
        with pytest.raises(NoWorkerOnHost, match="no worker on host host-c is alive"):
            client.submit(str(path), f"s3://{bucket}/c.bin", locality="host")
        # The CLI: one line, the exit status of an unavailable service.
        env = {**stack.env, "UPLOADER_HOST_NAME": "host-c"}
        result = subprocess.run(
            [str(Path(sys.executable).parent / "uploader"), "submit", "--local", str(path), f"s3://{bucket}/c.bin"],
            env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 5, (result.returncode, result.stderr)  # ExitCode.UNAVAILABLE
        assert "no worker on host host-c is alive" in result.stderr and "Traceback" not in result.stderr
        # A message sent by task name past the client's check: refused by the worker that takes it.
        upload_id = f"nohost-{uuid.uuid4().hex[:12]}"
        stack.uploader.celery.send_task(
            contract.START_UPLOAD,
            kwargs={"source": str(path), "bucket": bucket, "key": "c.bin", "upload_id": upload_id, "locality": "host", "host": "host-c"},
        )
        status = stack.wait_status(upload_id, lambda s: bool(s.error), 60, "the refusal")
        assert status.state == "refused" and "no worker on host host-c is alive" in status.error, status
        assert stack.uploader.checkpoint.get(upload_id) is None
        assert stack.s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
        assert stack.open_multipart_uploads(bucket) == []
    finally:
        client.close()


def test_an_upload_waits_for_its_host_and_goes_on_when_a_worker_there_is_back(make_stack, sources_root: Path) -> None:  # type: ignore[no-untyped-def]
    """Host B's only worker is killed mid-upload: the recovery (led by host A's worker) says the
    upload waits for host B instead of failing it or reading the file elsewhere; a worker started
    again on host B finishes it."""
    stack: Stack = make_stack(
        UPLOADER_WORKER_HEARTBEAT_SECONDS="2", UPLOADER_RECONCILE_INTERVAL="1", UPLOADER_LEADER_LEASE_SECONDS="3",
        UPLOADER_STALL_SECONDS="3",
    )
    root_a, root_b = host_root(sources_root, HOST_A), host_root(sources_root, HOST_B)
    start_host_worker(stack, HOST_A, root_a, "a", concurrency=2)
    worker_b = start_host_worker(stack, HOST_B, root_b, "b", concurrency=2, UPLOADER_MAX_BANDWIDTH=str(4 * MiB))
    bucket = stack.new_bucket()
    path = local_file(root_b, 6 * PART)
    client = client_on(stack, HOST_B)
    try:
        handle = client.submit(str(path), f"s3://{bucket}/wait.bin", part_size=PART, locality="host")
        handle.accepted(60)
        stack.wait_parts_done(handle.upload_id, 1)
        worker_b.kill()
        worker_b.proc.wait(10)
        waiting = stack.wait_status(
            handle.upload_id, lambda s: "no worker on host host-b" in s.error, 60, "the upload to say it waits for host B"
        )
        assert waiting.state == "uploading" and waiting.parts_done < waiting.part_count, waiting
        start_host_worker(stack, HOST_B, root_b, "b-again", concurrency=2)
        status = handle.wait(timeout=120)
        assert status.state == "completed" and status.error == "", status
        assert stack.object_sha256(bucket, "wait.bin") == sha256_file(path)
    finally:
        client.close()


def test_a_host_local_directory_is_listed_and_sent_by_its_host(make_stack, sources_root: Path) -> None:  # type: ignore[no-untyped-def]
    """A batch of small files (grouped PutObjects) and a multipart one, with a page size that
    makes several listing pages: every page, group and part must reach host B's worker, since
    host A's (which reads the control queue and the lanes) cannot read the directory."""
    stack: Stack = make_stack()
    root_a, root_b = host_root(sources_root, HOST_A), host_root(sources_root, HOST_B)
    start_host_worker(stack, HOST_A, root_a, "a", concurrency=2)
    start_host_worker(stack, HOST_B, root_b, "b", concurrency=2, queues=contract.part_lanes(8)[-1])
    bucket = stack.new_bucket()
    directory = root_b / "dir"
    (directory / "sub").mkdir(parents=True)
    files = {f"small-{n}.txt": directory / f"small-{n}.txt" for n in range(5)}
    for n, path in enumerate(files.values()):
        path.write_bytes(f"file {n}\n".encode() * (n + 1))
    files["sub/big.bin"] = local_file(directory / "sub", 2 * PART + 7)
    client = client_on(stack, HOST_B)
    try:
        batch = client.submit_batch(str(directory), f"s3://{bucket}/p/", page_size=2, part_size=PART, locality="host")
        status = batch.wait(timeout=120)
        assert (status.state, status.files_done, status.files_failed) == ("completed", len(files), 0), status
        for relative, path in files.items():
            key = "p/" + (relative if relative != "sub/big.bin" else "sub/" + path.name)
            assert stack.object_sha256(bucket, key) == sha256_file(path), key
    finally:
        client.close()


# --- the request --------------------------------------------------------------------------

BASE = {"source": "/data/f.bin", "bucket": "bucket", "key": "k"}


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"locality": "host"}, "locality 'host' needs host"),
        ({"host": HOST_A}, "host is for host-local uploads only"),
        ({"locality": "host", "host": "bad host!"}, "not a usable host name"),
        ({"locality": "host", "host": "x" * 64}, "not a usable host name"),
        ({"locality": "host", "host": HOST_A, "source": "https://example.com/f"}, "not for URLs or S3 objects"),
        ({"locality": "nearby"}, "locality"),
    ],
)
def test_a_host_local_request_is_checked(fields: dict[str, str], problem: str) -> None:
    with pytest.raises(InvalidRequest, match=problem):
        parse_request({**BASE, **fields})


def test_a_host_local_request_keeps_its_host() -> None:
    request = parse_request({**BASE, "locality": "host", "host": HOST_B})
    assert request.local_host == HOST_B and request.to_message()["host"] == HOST_B
    assert parse_request(BASE).local_host == ""


def test_the_host_name_setting_is_checked() -> None:
    assert Settings(host_name="node-7.example").host_name == "node-7.example"
    with pytest.raises(ValueError, match="UPLOADER_HOST_NAME"):
        Settings(host_name="no/slashes")
