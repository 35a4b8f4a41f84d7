"""Scenario 6: cancel a busy upload (four parts in flight, many queued). Sending stops promptly,
the multipart upload is aborted (ListParts answers NoSuchUpload) and the status says cancelled.

"Promptly" is measured twice: in the checkpoint (``parts_sent`` grows each time a part is about
to be sent) and on the wire (UploadPart requests reaching a counting proxy in front of S3)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from tests.chaos.conftest import PART, TIMEOUT, GiB, Report, multipart_upload_exists, scaled
from tests.conftest import Stack
from tests.faultproxy import FaultProxy
from uploader import contract
from uploader.planner import MiB

pytestmark = [pytest.mark.slow, pytest.mark.timeout(TIMEOUT)]

CONCURRENCY = 4
SIZE = scaled(100 * MiB + 3, 1 * GiB + 3)
BANDWIDTH = scaled(12 * MiB, 48 * MiB)
#: Seconds watched after the cancel.
OBSERVE = scaled(6.0, 10.0)
#: "Promptly": the last part request reaches S3 at most this long after the cancel returned.
PROMPT = 5.0


@pytest.fixture
def counter(seaweed) -> Iterator[FaultProxy]:  # type: ignore[no-untyped-def]
    """Injects nothing; records when every UploadPart request arrives."""
    proxy = FaultProxy(seaweed.endpoint_url, rate=0.0)
    yield proxy
    proxy.close()


def test_cancel_during_a_busy_upload(make_stack, counter: FaultProxy, report: Report) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack()
    stack.start_worker("busy", concurrency=CONCURRENCY, UPLOADER_S3_ENDPOINT_URL=counter.url, UPLOADER_MAX_BANDWIDTH=str(BANDWIDTH))
    broker = redis.Redis.from_url(stack.redis_url)
    bucket = stack.new_bucket()
    key = "busy.bin"
    path = stack.make_file(SIZE)
    handle = stack.uploader.submit(str(path), f"s3://{bucket}/{key}", part_size=PART)
    handle.accepted(timeout=60)
    part_count = stack.uploader.status(handle.upload_id).part_count
    at_cancel = stack.wait_status(handle.upload_id, lambda s: s.parts_done >= part_count // 4, 120, "a quarter of the parts")
    mpu_id = stack.uploader.checkpoint.get(handle.upload_id).mpu_id  # type: ignore[union-attr]

    asked = time.monotonic()
    outcome = stack.uploader.cancel(handle.upload_id)
    cancelled = time.monotonic()

    # Watch: parts_sent (checkpoint), UploadPart requests (wire), queued part messages (broker).
    sent_at_cancel = stack.uploader.checkpoint.get(handle.upload_id).parts_sent  # type: ignore[union-attr]
    last_growth = 0.0
    drained_after = None
    sent = sent_at_cancel
    while time.monotonic() - cancelled < OBSERVE:
        now_sent = stack.uploader.checkpoint.get(handle.upload_id).parts_sent  # type: ignore[union-attr]
        if now_sent != sent:
            sent, last_growth = now_sent, time.monotonic() - cancelled
        if drained_after is None and broker.llen(contract.PARTS_QUEUE) == 0:
            drained_after = time.monotonic() - cancelled
        time.sleep(0.05)
    late = [t - cancelled for t, *_ in counter.events if t > cancelled]
    status = stack.uploader.status(handle.upload_id)

    report.fault("cancel")
    report.check_cancelled(stack, handle.upload_id, bucket, key)
    report.extra.update(
        {
            "parts": part_count,
            "parts_done_at_cancel": at_cancel.parts_done,
            "parts_sent_total": sent,
            "cancel_call_s": round(cancelled - asked, 2),
            "parts_sent_growth_after_cancel": sent - sent_at_cancel,
            "last_parts_sent_growth_s": round(last_growth, 2),
            "upload_part_requests_after_cancel": len(late),
            "last_upload_part_request_s": round(max(late), 2) if late else 0.0,
            "parts_queue_drained_s": round(drained_after, 2) if drained_after is not None else None,
        }
    )
    if outcome != "cancelled":
        report.problem(f"cancel answered {outcome!r}")
    if status.state != "cancelled":
        report.problem(f"status says {status.state}")
    if multipart_upload_exists(stack, bucket, key, mpu_id):
        report.problem(f"ListParts still answers for {mpu_id} after the cancel")
    if sent != sent_at_cancel:
        report.problem(f"parts_sent grew by {sent - sent_at_cancel} after the cancel returned")
    if len(late) > CONCURRENCY:
        report.problem(f"{len(late)} UploadPart requests after the cancel returned (at most {CONCURRENCY} were in flight)")
    if late and max(late) > PROMPT:
        report.problem(f"UploadPart requests went on for {max(late):.1f} s after the cancel")
    if drained_after is None:
        report.problem(f"{broker.llen(contract.PARTS_QUEUE)} part messages still queued {OBSERVE} s after the cancel")
    report.finish(stack)
