"""Scenarios 12-14: what a real fleet throws at a running upload, besides dying.

- 12, poison messages mid-upload: every malformed shape of ``tests/test_poison.py`` pushed onto
  both queues while parts are moving; the workers quarantine each, keep going, and the upload
  completes.
- 13, a worker without credentials joins the fleet mid-upload: its first part fails with a
  permanent error, so the upload ends ``failed`` with the reason within seconds (not retried for
  ever, not silent); the operator removes the worker and runs ``resume``: it completes.
- 14, a FIFO swapped in for the source mid-upload: no worker thread blocks (sources are opened
  ``O_NONBLOCK`` and must be regular files); the upload fails with the reason; the file put back
  (same size and mtime), ``resume`` completes it.

Every workers here is started as the README says (``uploader worker``, default node name).
"""

from __future__ import annotations

import os
import time
import uuid

import pytest
import redis

from tests.chaos.conftest import PART, TIMEOUT, Report, scaled, wait_terminal, worker_log_lines
from tests.conftest import Stack
from tests.test_poison import MALFORMED, client_app, malformed  # noqa: F401  (client_app: a fixture)
from uploader.checkpoint.deadletter import DeadLetters
from uploader.contract import CONTROL_QUEUE, PARTS_QUEUE
from uploader.dev.localstack import wait_until
from uploader.planner import MiB

pytestmark = [pytest.mark.slow, pytest.mark.timeout(TIMEOUT)]

SIZE = scaled(40 * MiB + 999, 1024 * MiB + 999)
BANDWIDTH = scaled(4 * MiB, 30 * MiB)
FAST = {"UPLOADER_WORKER_HEARTBEAT_SECONDS": "3", "UPLOADER_RECONCILE_INTERVAL": "2", "UPLOADER_LEADER_LEASE_SECONDS": "3"}


def test_poison_messages_mid_upload(make_stack, client_app, report: Report) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    stack: Stack = make_stack(**FAST)
    workers = [
        stack.start_worker(f"poisoned{n}", concurrency=3, default_name=True, UPLOADER_MAX_BANDWIDTH=str(BANDWIDTH))
        for n in range(2)
    ]
    bucket = stack.new_bucket()
    path = stack.make_file(SIZE)
    handle = stack.uploader.submit(str(path), f"s3://{bucket}/poisoned.bin", part_size=PART)
    handle.accepted(timeout=60)
    stack.wait_parts_done(handle.upload_id, 1)
    raw = redis.Redis.from_url(stack.redis_url)
    dead = DeadLetters(raw, prefix=stack.settings.key_prefix)
    pushed = 0
    for name in MALFORMED:
        for queue in (PARTS_QUEUE, CONTROL_QUEUE):
            raw.lpush(queue, malformed(client_app, queue, name))
            pushed += 1
    report.fault("poison-message", pushed)
    wait_until(lambda: dead.count() >= pushed, 120, "every poison message quarantined")
    final = wait_terminal(stack, handle.upload_id, timeout=scaled(200, 1800), stuck_after=scaled(60, 300))
    report.check_completed(stack, handle.upload_id, path, bucket, "poisoned.bin")
    dead_workers = [w.name for w in workers if not w.alive()]
    if dead_workers:
        report.problem(f"workers died: {dead_workers}")
    if dead.count() != pushed:
        report.problem(f"{dead.count()} dead letters for {pushed} poison messages (ours taken for poison?)")
    if raw.hlen("unacked"):
        report.problem(f"{raw.hlen('unacked')} messages left unacknowledged")
    report.extra.update({"poison_messages": pushed, "dead_letters": dead.count(), "final_state": final.state})
    report.finish(stack)


def test_a_worker_without_credentials_joins_mid_upload(make_stack, report: Report) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack(**FAST)
    # Slow enough that parts are still queued when the third worker is ready (it takes seconds
    # to start on a busy machine): it must get some.
    for n in range(2):
        stack.start_worker(f"good{n}", concurrency=2, default_name=True, UPLOADER_MAX_BANDWIDTH=str(BANDWIDTH // 4))
    bucket = stack.new_bucket()
    path = stack.make_file(SIZE)
    handle = stack.uploader.submit(str(path), f"s3://{bucket}/creds.bin", part_size=PART)
    handle.accepted(timeout=60)
    stack.wait_parts_done(handle.upload_id, 1)
    joined = time.monotonic()
    bad = stack.start_worker(
        "nocreds", concurrency=2, default_name=True,
        AWS_ACCESS_KEY_ID="", AWS_SECRET_ACCESS_KEY="", AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
        AWS_CONFIG_FILE="/nonexistent", AWS_EC2_METADATA_DISABLED="true",
    )
    report.fault("worker-without-credentials")
    failed = wait_terminal(stack, handle.upload_id, timeout=120)
    failed_after = time.monotonic() - joined
    if failed.state != "failed" or "NoCredentialsError" not in failed.error:
        report.problem(f"expected a failure naming the missing credentials, got {failed.state}: {failed.error!r}")
    # The operator removes the misconfigured worker and resumes: only missing parts are sent.
    bad.kill()
    bad.proc.wait(10)
    stack.uploader.resume(handle.upload_id)
    final = wait_terminal(stack, handle.upload_id, timeout=scaled(200, 1800), stuck_after=scaled(60, 300))
    report.check_completed(stack, handle.upload_id, path, bucket, "creds.bin")
    report.extra.update(
        {"failed_after_s": round(failed_after, 1), "reason": failed.error[:120], "final_state": final.state}
    )
    report.finish(stack)


def test_a_fifo_swapped_in_for_the_source(make_stack, report: Report) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack(**FAST)
    workers = [
        stack.start_worker(f"fifo{n}", concurrency=3, default_name=True, UPLOADER_MAX_BANDWIDTH=str(BANDWIDTH))
        for n in range(2)
    ]
    bucket = stack.new_bucket()
    path = stack.make_file(SIZE)
    handle = stack.uploader.submit(str(path), f"s3://{bucket}/fifo.bin", part_size=PART)
    handle.accepted(timeout=60)
    stack.wait_parts_done(handle.upload_id, 1)
    aside = path.with_name(f"aside-{uuid.uuid4().hex}")
    os.rename(path, aside)
    os.mkfifo(path)
    swapped = time.monotonic()
    report.fault("fifo-swap")
    failed = wait_terminal(stack, handle.upload_id, timeout=60)
    failed_after = time.monotonic() - swapped
    if failed.state != "failed" or "FIFO" not in failed.error:
        report.problem(f"expected a failure naming the FIFO, got {failed.state}: {failed.error!r}")
    # No thread is stuck in open(): the same workers finish a fresh upload at once.
    other = stack.make_file(3 * PART)
    fresh = stack.uploader.submit(str(other), f"s3://{bucket}/other.bin", part_size=PART)
    fresh.wait(timeout=60)
    report.check_completed(stack, fresh.upload_id, other, bucket, "other.bin")
    # The file back in place, as it was (rename keeps its size and mtime): resume finishes it.
    os.unlink(path)
    os.rename(aside, path)
    stack.uploader.resume(handle.upload_id)
    final = wait_terminal(stack, handle.upload_id, timeout=scaled(200, 1800), stuck_after=scaled(60, 300))
    report.check_completed(stack, handle.upload_id, path, bucket, "fifo.bin")
    if not all(w.alive() for w in workers):
        report.problem("a worker died")
    blocked = worker_log_lines(stack, r"Hard time limit|blocked|Traceback")
    report.extra.update(
        {"failed_after_s": round(failed_after, 1), "reason": failed.error[:120], "final_state": final.state,
         "suspicious_log_lines": len(blocked)}
    )
    report.finish(stack)
