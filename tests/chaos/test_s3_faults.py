"""Scenario 2: S3 misbehaving under the workers. A fault-injecting proxy between the workers and
SeaweedFS answers a share of UploadPart requests with 503 SlowDown or 500 InternalError, resets
the connection mid-body, answers slowly, cuts its answer short after the headers, or handles the
request and then drops the answer. Uploads complete correctly regardless."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.chaos.conftest import PART, SCALE, SEED, TIMEOUT, GiB, Report, scaled, wait_terminal
from tests.conftest import Stack
from tests.faultproxy import FaultProxy
from uploader.planner import MiB

pytestmark = [pytest.mark.slow, pytest.mark.timeout(TIMEOUT)]

FAULTS = ("503", "500", "reset", "slow", "truncated", "lost")
RATE = scaled(0.4, 0.55)
#: (name, size): sizes that do not fall on a part boundary.
UPLOADS = scaled(
    [("faulty-a.bin", 40 * MiB + 7), ("faulty-b.bin", 32 * MiB + 4099), ("faulty-c.bin", 24 * MiB + 1)],
    [("faulty-a.bin", 1 * GiB + 7), ("faulty-b.bin", 256 * MiB + 4099)],
)


@pytest.fixture
def proxy(seaweed) -> Iterator[FaultProxy]:  # type: ignore[no-untyped-def]
    fault_proxy = FaultProxy(seaweed.endpoint_url, fault=FAULTS, rate=0.0, seed=SEED, slow_seconds=1.0)
    yield fault_proxy
    fault_proxy.close()


def test_s3_faults_on_upload_part(make_stack, proxy: FaultProxy, report: Report) -> None:  # type: ignore[no-untyped-def]
    # Retries are cheap and many: at a 50 % fault rate a part can meet several faults in a row
    # (botocore itself tries each request 3 times before the task retries it).
    stack: Stack = make_stack(UPLOADER_PART_MAX_RETRIES="30", UPLOADER_RETRY_BACKOFF_MAX="1")
    for name in ("faulty-1", "faulty-2"):
        stack.start_worker(name, concurrency=4, UPLOADER_S3_ENDPOINT_URL=proxy.url)
    bucket = stack.new_bucket()
    paths = {key: stack.make_file(size) for key, size in UPLOADS}
    proxy.rate = RATE
    handles = {key: stack.uploader.submit(str(path), f"s3://{bucket}/{key}", part_size=PART) for key, path in paths.items()}
    for handle in handles.values():
        handle.accepted(timeout=60)
    finals = {key: wait_terminal(stack, h.upload_id, timeout=scaled(200, 3000)) for key, h in handles.items()}
    proxy.rate = 0.0

    for kind in FAULTS:
        if proxy.counts[f"injected-{kind}"]:
            report.fault(kind, proxy.counts[f"injected-{kind}"])
    for key, handle in handles.items():
        report.check_completed(stack, handle.upload_id, paths[key], bucket, key)
    attempts = sum(1 for *_, what in proxy.events)
    parts = sum(f.part_count for f in finals.values())
    report.extra.update(
        {
            "fault_rate": RATE,
            "parts": parts,
            "upload_part_requests": attempts,
            "bytes_resent": sum(f.bytes_sent - f.size for f in finals.values()),
        }
    )
    if proxy.injected() == 0:
        report.problem("the proxy injected no fault: the scenario proved nothing")
    if SCALE == "full":
        missing = [kind for kind in FAULTS if not proxy.counts[f"injected-{kind}"]]
        if missing:
            report.problem(f"fault kinds never injected at full size: {missing}")
    report.finish(stack)
