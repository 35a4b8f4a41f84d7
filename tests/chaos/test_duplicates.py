"""Scenario 5: duplicate everything. The same ``start_upload`` sent ten times at once by ten
clients (same upload id) creates one multipart upload and completes once; ``resume`` and
``cancel`` racing each other (threads released by one barrier) end in one consistent state:
completed with a correct object, or cancelled with nothing left on the server, never a mix."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.chaos.conftest import (
    PART,
    SEED,
    TIMEOUT,
    GiB,
    Report,
    Stuck,
    open_uploads_for,
    scaled,
    wait_terminal,
)
from tests.conftest import Stack
from tests.faultproxy import FaultProxy
from uploader import Uploader
from uploader.auth import Capability
from uploader.capabilities import CapabilityStore
from uploader.planner import MiB

pytestmark = [pytest.mark.slow, pytest.mark.timeout(TIMEOUT)]

DUPLICATES = 10
DUP_SIZE = scaled(48 * MiB + 1, 1 * GiB + 1)
DUP_BANDWIDTH = scaled(8 * MiB, 48 * MiB)

RACE_ROUNDS = scaled(4, 16)
RACE_SIZE = scaled(6 * PART + 17, 20 * PART + 17)
RACE_BANDWIDTH = scaled(12 * MiB, 24 * MiB)


def is_create_multipart_upload(method: str, path: str) -> bool:
    query = parse_qs(urlsplit(path).query, keep_blank_values=True)
    return method == "POST" and "uploads" in query and "uploadId" not in query


@pytest.fixture
def create_counter(seaweed) -> Iterator[FaultProxy]:  # type: ignore[no-untyped-def]
    """A proxy that injects nothing and records every CreateMultipartUpload it forwards."""
    proxy = FaultProxy(seaweed.endpoint_url, rate=0.0, targets=is_create_multipart_upload)
    yield proxy
    proxy.close()


def test_start_upload_sent_ten_times_at_once(make_stack, create_counter: FaultProxy, report: Report) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack()
    # Two workers with four slots each: several coordinators run the duplicates concurrently.
    for name in ("dup-1", "dup-2"):
        stack.start_worker(name, concurrency=4, UPLOADER_S3_ENDPOINT_URL=create_counter.url, UPLOADER_MAX_BANDWIDTH=str(DUP_BANDWIDTH))
    bucket = stack.new_bucket()
    key = "dup.bin"
    path = stack.make_file(DUP_SIZE)
    upload_id = f"dup-{uuid.uuid4().hex[:12]}"
    # One submission sent ten times (a client's retries, a redelivered message): the same upload
    # id and the same capability, from ten clients at once. (A start with another capability is
    # another submitter's, refused: tests/test_authority.py.)
    kept = CapabilityStore()
    kept.save(upload_id, Capability.new().token)
    clients = [Uploader(stack.settings, capabilities=kept) for _ in range(DUPLICATES)]
    handles: list[Any] = [None] * DUPLICATES
    barrier = threading.Barrier(DUPLICATES)

    def send(i: int) -> None:
        barrier.wait()
        handles[i] = clients[i].submit(str(path), f"s3://{bucket}/{key}", part_size=PART, upload_id=upload_id)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(DUPLICATES)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        # While it uploads, the server never holds more than one multipart upload for the key.
        max_open, samples = 0, 0
        deadline = time.monotonic() + scaled(150, 1800)
        while time.monotonic() < deadline:
            max_open = max(max_open, len(open_uploads_for(stack, bucket, key)))
            samples += 1
            record = stack.uploader.checkpoint.get(upload_id)
            if record is not None and record.terminal:
                break
            time.sleep(0.1)
        answers = [h.accepted(timeout=60) for h in handles]
        final = wait_terminal(stack, upload_id, timeout=30)
    finally:
        for client in clients:
            client.close()

    report.fault("duplicate-start_upload", DUPLICATES - 1)
    report.check_completed(stack, upload_id, path, bucket, key)
    creates = len(create_counter.events)
    report.extra.update(
        {
            "create_multipart_calls": creates,
            "max_open_multipart_uploads": max_open,
            "list_samples": samples,
            "bytes_resent": final.bytes_sent - final.size,
        }
    )
    if answers != [upload_id] * DUPLICATES:
        report.problem(f"start_upload answers: {answers}")
    if creates != 1:
        report.problem(f"{creates} CreateMultipartUpload calls for one upload id")
    if max_open > 1:
        report.problem(f"{max_open} multipart uploads open at once for the key")
    if final.bytes_sent != final.size:
        report.problem(f"duplicates sent {final.bytes_sent - final.size} bytes twice")
    report.finish(stack)


def test_resume_and_cancel_race(make_stack, report: Report) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(SEED)
    stack: Stack = make_stack(UPLOADER_WORKER_HEARTBEAT_SECONDS="2")
    stack.start_worker("race", concurrency=4, UPLOADER_MAX_BANDWIDTH=str(RACE_BANDWIDTH))
    bucket = stack.new_bucket()
    path = stack.make_file(RACE_SIZE)
    resumer, canceller = Uploader(stack.settings), Uploader(stack.settings)
    endings: Counter[str] = Counter()
    rounds: list[dict[str, Any]] = []
    try:
        for n in range(RACE_ROUNDS):
            key = f"race-{n}.bin"
            handle = stack.uploader.submit(str(path), f"s3://{bucket}/{key}", part_size=PART)
            handle.accepted(timeout=60)
            part_count = stack.uploader.status(handle.upload_id).part_count
            # Every other round races the completion (right when the last part is recorded);
            # the others race at a random point of the upload.
            at = part_count if n % 2 else rng.randint(1, part_count - 1)
            stack.wait_status(handle.upload_id, lambda s, at=at: s.parts_done >= at or s.terminal, 120, f"{at} parts")
            outcomes: dict[str, str] = {}
            barrier = threading.Barrier(2)

            # This round's barrier, outcomes and upload bound now: a thread that outlives its
            # join timeout must not race on the next round's.
            def call(
                name: str, fn: Any, barrier: threading.Barrier = barrier, outcomes: dict[str, str] = outcomes,
                upload_id: str = handle.upload_id,
            ) -> None:
                barrier.wait()
                try:
                    outcomes[name] = repr(fn(upload_id))[:120]
                except Exception as exc:  # noqa: BLE001 - the loser's refusal is part of the outcome
                    outcomes[name] = f"{type(exc).__name__}: {exc}"[:160]

            threads = [
                threading.Thread(target=call, args=("resume", resumer.resume)),
                threading.Thread(target=call, args=("cancel", canceller.cancel)),
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(90)
            try:
                final = wait_terminal(stack, handle.upload_id, timeout=120, stuck_after=30)
            except Stuck as exc:
                report.problem(f"round {n}: {exc}")
                final = exc.status
            time.sleep(scaled(3, 5))  # parts still in flight at the cancel end meanwhile
            settled = stack.uploader.status(handle.upload_id)
            if final is not None and settled.state != final.state:
                report.problem(f"round {n}: state flipped from {final.state} to {settled.state}")
            endings[settled.state] += 1
            rounds.append({"race_at_part": at, "of": part_count, "ended": settled.state, **outcomes})
            report.fault("resume-cancel-race")
            if settled.state == "completed":
                report.check_completed(stack, handle.upload_id, path, bucket, key)
            elif settled.state == "cancelled":
                report.check_cancelled(stack, handle.upload_id, bucket, key)
            else:
                report.uploads += 1
                report.problem(f"round {n}: ended {settled.state} ({settled.error}), neither completed nor cancelled")
    finally:
        resumer.close()
        canceller.close()

    report.extra.update({"endings": dict(endings), "rounds": rounds})
    report.finish(stack)
