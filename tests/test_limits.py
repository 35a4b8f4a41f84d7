"""Limits of one upload across the fleet (the README's "Limits"): ``max_concurrency`` parts of an
upload on the wire at once, whichever workers send them; the parts over the cap wait without
failing, retrying or making the upload look stalled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Stack, sha256_file
from tests.faultproxy import FaultProxy
from uploader.checkpoint import CheckpointStore
from uploader.errors import InvalidRequest
from uploader.maintenance import stalled
from uploader.model import PartStart
from uploader.planner import MiB
from uploader.request import parse_request

PART = 5 * MiB
PARTS = 12
#: Part bodies reach the server at this rate (each part is about a quarter of a second on the
#: wire), so that parts sent by eight threads at once overlap at the proxy when nothing caps them.
BODY_RATE = 20 * MiB


def _fleet(make_stack, proxy: FaultProxy, **env: str) -> Stack:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack(**env)
    for name in ("limits-a", "limits-b"):
        stack.start_worker(name, concurrency=4, UPLOADER_S3_ENDPOINT_URL=proxy.url)
    return stack


def _upload(stack: Stack, bucket: str, name: str, **options: object):  # type: ignore[no-untyped-def]
    path: Path = stack.make_file(PARTS * PART)
    handle = stack.uploader.submit(str(path), f"s3://{bucket}/{name}", part_size=PART, **options)
    status = handle.wait(timeout=240)
    assert status.state == "completed", status
    assert stack.object_sha256(bucket, name) == sha256_file(path)
    record = stack.uploader.checkpoint.get(handle.upload_id)
    assert record is not None
    return status, record


def test_max_concurrency_caps_the_parts_on_the_wire_across_the_fleet(make_stack, seaweed) -> None:  # type: ignore[no-untyped-def]
    proxy = FaultProxy(seaweed.endpoint_url, body_rate=BODY_RATE)
    try:
        # No retries: a part that waited its turn as if it had failed would fail the upload.
        stack = _fleet(make_stack, proxy, UPLOADER_PART_MAX_RETRIES="0", UPLOADER_AUTO_RESUME_LIMIT="0")
        bucket = stack.new_bucket()

        status, record = _upload(stack, bucket, "capped.bin", max_concurrency=2)
        assert record.max_concurrency == 2
        assert proxy.peak[record.mpu_id] == 2, f"peak of concurrent UploadPart requests: {proxy.peak[record.mpu_id]}"
        # Waiting is not sending: every part was counted as sent once, and sent once.
        assert status.bytes_sent == status.size and record.parts_sent == PARTS
        assert sum(1 for span in proxy.spans if span[0] == record.mpu_id) == PARTS
        assert record.throttled > 0, "parts over the cap waited (the cap was reached)"

        # The same fleet without the option: the proxy does see more parts of one upload at once.
        _, free = _upload(stack, bucket, "free.bin")
        assert free.max_concurrency == 0
        assert proxy.peak[free.mpu_id] > 2, f"peak without a cap: {proxy.peak[free.mpu_id]}"
    finally:
        proxy.close()


def _uploading(store: CheckpointStore, upload_id: str, cap: int, parts: int = 4) -> None:
    fields = {
        "source": "/data/src.bin", "bucket": "bucket", "key": "key", "size": parts * PART, "mtime_ns": 1,
        "part_size": PART, "part_count": parts, "mode": "multipart", "max_concurrency": cap,
    }
    assert store.claim(upload_id, fields) == (True, "creating")
    assert store.attach_multipart(upload_id, "mpu-1") == "ok"


def test_the_cap_counts_only_leases_that_hold(store: CheckpointStore) -> None:
    _uploading(store, "capped", cap=2)
    store.heartbeat("w1", 60)
    store.heartbeat("w2", 60)
    now = time.time()
    assert store.begin_part("capped", 1, 1, "w1|t1", now=now)[0] is PartStart.SEND
    assert store.begin_part("capped", 2, 1, "w2|t2", now=now)[0] is PartStart.SEND
    verdict, live = store.begin_part("capped", 3, 1, "w1|t3", now=now)
    assert (verdict, live) == (PartStart.LIMITED, "2")
    record = store.get("capped")
    assert record is not None
    assert record.parts_sent == 2 and record.throttled == pytest.approx(now), "a waiting part is not counted as sent"
    assert 3 not in store.leases("capped"), "nothing leased to a waiting part"
    # A redelivered message of a part that holds its lease is not counted against itself.
    assert store.begin_part("capped", 2, 1, "w2|t2", now=now)[0] is PartStart.SEND
    # A dead holder's lease takes no place.
    store.retire("w2")
    assert store.begin_part("capped", 3, 1, "w1|t3", now=now)[0] is PartStart.SEND
    # Nor does a lease past its deadline (a hung task), though its holder lives.
    later = now + 10_000
    store.heartbeat("w1", 60)
    assert store.begin_part("capped", 4, 1, "w1|t4", now=later)[0] is PartStart.SEND


def test_a_waiting_part_keeps_the_upload_from_looking_stalled(store: CheckpointStore) -> None:
    _uploading(store, "waiting", cap=1)
    store.heartbeat("w1", 60)
    start = time.time()
    assert store.begin_part("waiting", 1, 1, "w1|t1", now=start)[0] is PartStart.SEND
    record = store.get("waiting")
    assert record is not None
    assert stalled(record, start + 200, 120), "no part recorded or waiting for 200 s: stalled"
    assert store.begin_part("waiting", 2, 1, "w1|t2", now=start + 50)[0] is PartStart.LIMITED
    record = store.get("waiting")
    assert record is not None
    assert not stalled(record, start + 160, 120), "a part waited its turn 110 s ago: alive"
    assert stalled(record, start + 200, 120)


@pytest.mark.parametrize("value", [0, -1, "2", 10_001])
def test_max_concurrency_must_be_a_positive_int(value: object) -> None:
    with pytest.raises(InvalidRequest, match="max_concurrency"):
        parse_request({"source": "/data/x", "bucket": "bucket", "key": "k", "max_concurrency": value})


#: The fleet-wide rate asked for, and the upload it is measured over (about five seconds' worth).
RATE = 8 * MiB
RATE_PARTS = 8


def _wire_rate(proxy: FaultProxy, mpu_id: str) -> tuple[float, int, float]:
    """(bytes/s, bytes, seconds) of this multipart upload's UploadPart bodies at the proxy, from
    the first one's arrival to the last one's answer."""
    spans = [span for span in proxy.spans if span[0] == mpu_id]
    sent = sum(span[3] for span in spans)
    seconds = max(span[2] for span in spans) - min(span[1] for span in spans)
    return sent / seconds, sent, seconds


def test_max_bandwidth_holds_one_upload_to_its_rate_across_the_fleet(make_stack, seaweed) -> None:  # type: ignore[no-untyped-def]
    proxy = FaultProxy(seaweed.endpoint_url)
    try:
        stack = _fleet(make_stack, proxy)
        bucket = stack.new_bucket()
        path: Path = stack.make_file(RATE_PARTS * PART)

        status = stack.uploader.submit(
            str(path), f"s3://{bucket}/paced.bin", part_size=PART, max_bandwidth=RATE
        ).wait(timeout=120)
        assert status.state == "completed", status
        assert stack.object_sha256(bucket, "paced.bin") == sha256_file(path)
        record = stack.uploader.checkpoint.get(status.upload_id)
        assert record is not None and record.max_bandwidth == RATE
        rate, sent, seconds = _wire_rate(proxy, record.mpu_id)
        assert sent == RATE_PARTS * PART
        assert abs(rate - RATE) <= 0.15 * RATE, f"{rate / MiB:.2f} MiB/s over {seconds:.2f} s; asked for {RATE / MiB} MiB/s"

        # The same fleet without the limit is much faster: the limit, not the fleet, set the pace.
        free = stack.uploader.submit(str(path), f"s3://{bucket}/free.bin", part_size=PART).wait(timeout=120)
        assert free.state == "completed", free
        free_record = stack.uploader.checkpoint.get(free.upload_id)
        assert free_record is not None
        free_rate, _, _ = _wire_rate(proxy, free_record.mpu_id)
        assert free_rate > 2 * RATE, f"without the limit: {free_rate / MiB:.1f} MiB/s"
        print(f"limited: {rate / MiB:.2f} MiB/s over {seconds:.2f} s; unlimited: {free_rate / MiB:.1f} MiB/s")
    finally:
        proxy.close()



def test_a_part_slowed_by_the_limit_is_not_taken_for_a_hung_or_stalled_one(make_stack, seaweed) -> None:  # type: ignore[no-untyped-def]
    """Each part takes about 5 s at its share of the rate: well past its time limit (2.5 s plus
    its length at 10 MiB/s: 3 s) and the stall rule (2 s), both checked twice a second. Its draws
    from the bucket keep its lease and the upload alive: no part is sent twice. (The limit leaves
    a loaded machine time to read and checksum a part before its first draw: with 1.5 s, a CI run
    on two cores at load 9 once sent a part twice, most likely a lease that lapsed before it.)"""
    proxy = FaultProxy(seaweed.endpoint_url)
    try:
        stack = _fleet(
            make_stack, proxy, UPLOADER_PART_TIME_BASE="2.5", UPLOADER_PART_MIN_THROUGHPUT=str(10 * MiB),
            UPLOADER_STALL_SECONDS="2", UPLOADER_RECONCILE_INTERVAL="0.5",
        )
        bucket = stack.new_bucket()
        path: Path = stack.make_file(4 * PART)
        status = stack.uploader.submit(
            str(path), f"s3://{bucket}/slow.bin", part_size=PART, max_bandwidth=4 * MiB
        ).wait(timeout=120)
        assert status.state == "completed", status
        assert stack.object_sha256(bucket, "slow.bin") == sha256_file(path)
        record = stack.uploader.checkpoint.get(status.upload_id)
        assert record is not None
        _, _, seconds = _wire_rate(proxy, record.mpu_id)
        assert seconds > 4, f"the parts were slow ({seconds:.1f} s in all)"
        assert record.parts_sent == 4 and status.bytes_sent == status.size, "no part was sent again"
        assert sum(1 for span in proxy.spans if span[0] == record.mpu_id) == 4
        assert record.generation == 1, "no resume"
    finally:
        proxy.close()

def _puts(proxy: FaultProxy, key: str) -> int:
    """PutObject requests for ``key`` that reached the proxy."""
    return sum(1 for method, path, _ in proxy.requests if method == "PUT" and path.split("?")[0].endswith(f"/{key}"))


def test_a_single_put_draws_from_the_same_bucket(make_stack, seaweed) -> None:  # type: ignore[no-untyped-def]
    """A source below the multipart threshold goes in one PutObject: held to ``max_bandwidth``
    like parts are (3 MiB at 1 MiB/s: about 3 s, the bucket's burst being a sixteenth of that)."""
    proxy = FaultProxy(seaweed.endpoint_url)
    try:
        stack = _fleet(make_stack, proxy)
        bucket = stack.new_bucket()
        path: Path = stack.make_file(3 * MiB)
        started = time.monotonic()
        status = stack.uploader.submit(str(path), f"s3://{bucket}/single.bin", max_bandwidth=1 * MiB).wait(timeout=60)
        seconds = time.monotonic() - started
        assert status.state == "completed", status
        assert stack.object_sha256(bucket, "single.bin") == sha256_file(path)
        record = stack.uploader.checkpoint.get(status.upload_id)
        assert record is not None and record.mode == "single" and record.max_bandwidth == 1 * MiB
        assert seconds >= 2.5, f"3 MiB at 1 MiB/s took {seconds:.2f} s"
        drawn = stack.uploader.checkpoint.redis.hget(stack.uploader.checkpoint.rate_key(status.upload_id), "drawn")
        assert int(drawn or 0) == 3 * MiB, "every byte of the PUT was drawn from the upload's bucket"
        assert record.throttled > 0 and _puts(proxy, "single.bin") == 1
        print(f"single PUT of 3 MiB at 1 MiB/s: {seconds:.2f} s")
    finally:
        proxy.close()


def test_a_single_put_slowed_by_the_limit_keeps_its_completion_lease(make_stack, seaweed) -> None:  # type: ignore[no-untyped-def]
    """A paced single PUT that takes longer than the completion lease (5 s) and the stall rule
    (2 s, checked twice a second): its draws extend the lease and mark the upload alive, so no
    other completer or resume sends the object a second time."""
    proxy = FaultProxy(seaweed.endpoint_url)
    try:
        stack = _fleet(
            make_stack, proxy, UPLOADER_COMPLETION_LEASE_SECONDS="5", UPLOADER_STALL_SECONDS="2",
            UPLOADER_RECONCILE_INTERVAL="0.5",
        )
        bucket = stack.new_bucket()
        path: Path = stack.make_file(4 * MiB)
        started = time.monotonic()
        status = stack.uploader.submit(str(path), f"s3://{bucket}/slow-single.bin", max_bandwidth=512 * 1024).wait(timeout=60)
        seconds = time.monotonic() - started
        assert status.state == "completed", status
        assert seconds > 7, f"the PUT outlasted its completion lease ({seconds:.1f} s)"
        assert stack.object_sha256(bucket, "slow-single.bin") == sha256_file(path)
        record = stack.uploader.checkpoint.get(status.upload_id)
        assert record is not None and record.mode == "single"
        assert _puts(proxy, "slow-single.bin") == 1, "sent once"
        assert record.generation == 1 and record.complete_calls == 1, "no resume, no second completer"
    finally:
        proxy.close()


def test_under_the_oss_profile_each_part_asks_for_the_rate_with_x_oss_traffic_limit(oss_stack: Stack, proxy: FaultProxy) -> None:
    stack = oss_stack
    bucket = stack.new_bucket()
    path: Path = stack.make_file(2 * PART + 4321)
    limited = stack.uploader.submit(str(path), f"s3://{bucket}/paced.bin", part_size=PART, max_bandwidth=4 * MiB)
    assert limited.wait(timeout=120).state == "completed"
    free = stack.uploader.submit(str(path), f"s3://{bucket}/free.bin", part_size=PART)
    assert free.wait(timeout=120).state == "completed"
    assert stack.object_sha256(bucket, "paced.bin") == sha256_file(path)

    def limits(key: str) -> list[tuple[str, str | None]]:
        """(request kind, its x-oss-traffic-limit) of every request for this key."""
        return [
            ("UploadPart" if "partNumber=" in p else m + " " + p.split("?")[-1][:20], h.get("x-oss-traffic-limit"))
            for m, p, h in proxy.requests if p.split("?")[0].endswith(f"/{key}")
        ]

    paced = limits("paced.bin")
    assert [v for kind, v in paced if kind == "UploadPart"] == [str(4 * MiB * 8)] * 3, paced
    assert all(v is None for kind, v in paced if kind != "UploadPart"), "only the parts carry it"
    assert all(v is None for _, v in limits("free.bin")), "no limit asked, none sent"


def _cli(stack: Stack, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "uploader.cli", *argv], env={**os.environ, **stack.env}, capture_output=True, text=True,
        timeout=60, check=True,
    )


def test_status_shows_the_limits_and_the_priority_asked_for(stack: Stack) -> None:
    stack.start_worker("limits-status", concurrency=2)
    bucket = stack.new_bucket()
    path = stack.make_file(2 * PART + 99)
    limited = stack.uploader.submit(
        str(path), f"s3://{bucket}/limited.bin", part_size=PART, max_concurrency=1, max_bandwidth=64 * MiB, priority=7
    )
    assert limited.wait(timeout=120).state == "completed"
    shown = _cli(stack, "status", limited.upload_id).stdout
    assert "at most 1 part at once, 64.0 MiB/s" in shown, shown
    assert "priority" in shown and "7 (0-9, 9 most urgent)" in shown, shown
    as_json = json.loads(_cli(stack, "status", "--json", limited.upload_id).stdout)
    assert (as_json["max_concurrency"], as_json["max_bandwidth"], as_json["priority"]) == (1, 64 * MiB, 7)
    status = stack.uploader.status(limited.upload_id)
    assert (status.max_concurrency, status.max_bandwidth, status.priority) == (1, 64 * MiB, 7)

    # An upload that asked for none shows none.
    free = stack.uploader.submit(str(path), f"s3://{bucket}/free.bin", part_size=PART)
    assert free.wait(timeout=120).state == "completed"
    shown = _cli(stack, "status", free.upload_id).stdout
    assert "limits" not in shown and "priority" not in shown, shown
    as_json = json.loads(_cli(stack, "status", "--json", free.upload_id).stdout)
    assert (as_json["max_concurrency"], as_json["max_bandwidth"], as_json["priority"]) == (0, 0, None)


@pytest.mark.parametrize(
    ("rate", "bits"),
    [(4 * MiB, 4 * MiB * 8), (1024, 819_200), (100 * MiB, 838_860_800), (100 * MiB + 1, None), (0, None)],
)
def test_the_oss_traffic_limit_stays_in_the_range_oss_accepts(rate: int, bits: int | None) -> None:
    from uploader.storage.adapter import oss_traffic_limit

    assert oss_traffic_limit(rate) == bits
