"""Scenario 11: Redis fails over under Sentinel mid-upload. Broker, results and checkpoint all go
through ``sentinel://`` URLs (kombu's Sentinel transport, Celery's Sentinel backend, redis-py's
Sentinel for the checkpoint). A primary, one replica and three sentinels run on loopback; the
primary is SIGKILLed while parts are being sent, the sentinels promote the replica, and the
upload must complete by itself, byte-identical, with nothing orphaned.

Replication is asynchronous: writes the primary acknowledged but had not yet sent to the replica
are lost in the failover (a recorded part, a queued part message, a lease release). What is lost
is redone: a part whose record is gone is missing at completion and sent again, a lost message is
found by the stall reconciler, and ListParts on resume is the truth about what the server holds.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from tests.chaos.conftest import PART, TIMEOUT, Report, Stuck, scaled, wait_terminal, worker_log_lines
from tests.conftest import Stack
from uploader.dev.localstack import RedisSentinel, RedisServer, wait_until
from uploader.planner import MiB

pytestmark = [pytest.mark.slow, pytest.mark.timeout(TIMEOUT)]

PRIMARY = "uploader-primary"
SIZE = scaled(60 * MiB + 4321, 1024 * MiB + 4321)
BANDWIDTH = scaled(6 * MiB, 40 * MiB)


def _role(port: int) -> str:
    try:
        return str(redis.Redis(port=port, socket_timeout=1).info("replication").get("role"))
    except (redis.RedisError, OSError):
        return "down"


def test_sentinel_failover_mid_upload(workdir: Path, seaweed, sources_root: Path, report: Report) -> None:  # type: ignore[no-untyped-def]
    directory = workdir / f"sentinel-{time.monotonic_ns()}"
    directory.mkdir()
    primary = RedisServer(directory, appendonly=True)
    replica = RedisServer(directory, appendonly=True, replica_of=primary.port)
    wait_until(
        lambda: redis.Redis(port=replica.port).info("replication").get("master_link_status") == "up", 30,
        "the replica to sync",
    )
    sentinels = [RedisSentinel(directory, primary.port, name=PRIMARY) for _ in range(3)]
    urls = ";".join(f"{s.url}/0" for s in sentinels)
    wait_until(
        lambda: all(
            len(redis.Redis(port=s.port).sentinel_slaves(PRIMARY)) == 1 and
            len(redis.Redis(port=s.port).sentinel_sentinels(PRIMARY)) == 2
            for s in sentinels
        ),
        30, "the sentinels to know the replica and each other",
    )
    stack = Stack(
        workdir, urls, seaweed.endpoint_url, sources_root,
        {
            "UPLOADER_REDIS_SENTINEL_MASTER": PRIMARY,
            "UPLOADER_WORKER_HEARTBEAT_SECONDS": "3",
            "UPLOADER_STALL_SECONDS": "10",
            "UPLOADER_RECONCILE_INTERVAL": "2",
            "UPLOADER_LEADER_LEASE_SECONDS": "3",
        },
    )
    handle = None
    try:
        for n in range(2):
            stack.start_worker(f"sentinel{n}", concurrency=3, UPLOADER_MAX_BANDWIDTH=str(BANDWIDTH))
        bucket = stack.new_bucket()
        path = stack.make_file(SIZE)
        handle = stack.uploader.submit(str(path), f"s3://{bucket}/failover.bin", part_size=PART)
        handle.accepted(timeout=60)
        part_count = stack.uploader.status(handle.upload_id).part_count
        before = stack.wait_status(handle.upload_id, lambda s: s.parts_done >= part_count // 3, 120, "a third of the parts")

        primary.kill()
        primary.proc.wait(10)
        killed_at = time.monotonic()
        report.fault("primary-sigkill")
        wait_until(lambda: _role(replica.port) == "master", 60, "the sentinels to promote the replica")
        promoted_after = time.monotonic() - killed_at

        try:
            final = wait_terminal(stack, handle.upload_id, timeout=scaled(200, 1800), stuck_after=scaled(90, 300))
        except Stuck as exc:
            final = exc.status
            report.problem(
                f"{exc}\n" + "\n".join(worker_log_lines(stack, rf"{handle.upload_id}.*(ERROR|WARNING)|Traceback|reconcile", limit=30))
            )
        report.check_completed(stack, handle.upload_id, path, bucket, "failover.bin")
        report.extra.update(
            {
                "parts": part_count,
                "parts_done_at_kill": before.parts_done,
                "promoted_after_s": round(promoted_after, 1),
                "final_state": final.state if final else "unknown",
                "bytes_resent": (final.bytes_sent - final.size) if final and final.state == "completed" else None,
                "seconds_after_kill": round(time.monotonic() - killed_at, 1),
            }
        )
        report.finish(stack)
    finally:
        if handle is not None:
            try:
                if not stack.uploader.status(handle.upload_id).terminal:
                    stack.uploader.cancel(handle.upload_id, timeout=30)
            except Exception:  # noqa: BLE001 - best-effort cleanup
                pass
        stack.close()
        for process in (*sentinels, replica, primary):
            process.stop()
