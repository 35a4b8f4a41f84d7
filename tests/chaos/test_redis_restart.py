"""Scenario 3: Redis (broker, results and checkpoints) restarts mid-upload. It runs with an
append-only file, as production should: SIGTERM makes it write the AOF and exit, and a new
``redis-server`` on the same port and directory loads it. Workers and the client reconnect;
the upload must complete by itself, with the documented production setup (plain workers, whose
recovery leader runs the stall reconciler)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from tests.chaos.conftest import (
    PART,
    TIMEOUT,
    GiB,
    Report,
    Stuck,
    inflight_leases,
    scaled,
    wait_terminal,
    worker_log_lines,
)
from tests.conftest import Stack
from uploader.checkpoint.store import Lease
from uploader.dev.localstack import RedisServer
from uploader.planner import MiB

pytestmark = [pytest.mark.slow, pytest.mark.timeout(TIMEOUT)]

SIZE = scaled(60 * MiB + 5, 1 * GiB + 5)
BANDWIDTH = scaled(5 * MiB, 24 * MiB)
RESTARTS = scaled(1, 3)
#: Seconds Redis stays down.
DOWNTIME = 2.0
#: Without progress for this long (the reconciler runs every second and a lease lapses after
#: 2 s), the upload is declared stuck.
STUCK_AFTER = scaled(20, 120)

@pytest.mark.parametrize(
    ("downtime", "reconnect_attempts", "pool"),
    [
        pytest.param(DOWNTIME, None, "threads", id="restart"),
        # Down for longer than the workers' Redis retries last (2 attempts: a fraction of a
        # second) and than their heartbeat lives: tasks in hand fail, and what they leave behind
        # (leases they could not release, unacknowledged messages) must not block the upload.
        pytest.param(scaled(8.0, 20.0), "2", "threads", id="outage"),
        # The same with the prefork pool: a task's leases are kept in its pool process, apart
        # from the heartbeat in the main process.
        pytest.param(scaled(8.0, 20.0), "2", "prefork", id="outage-prefork"),
    ],
)
def test_redis_restart_with_aof(  # type: ignore[no-untyped-def]
    workdir: Path, seaweed, sources_root: Path, report: Report, downtime: float, reconnect_attempts: str | None,
    pool: str,
) -> None:
    redis_dir = workdir / f"redis-aof-{uuid.uuid4().hex[:8]}"
    redis_dir.mkdir()
    server = RedisServer(redis_dir, appendonly=True)
    port = server.port
    stack = Stack(
        workdir,
        server.url,
        seaweed.endpoint_url,
        sources_root,
        {
            "UPLOADER_WORKER_HEARTBEAT_SECONDS": "2",
            "UPLOADER_STALL_SECONDS": "3",
            "UPLOADER_RECONCILE_INTERVAL": "1",
            **({"UPLOADER_REDIS_RECONNECT_ATTEMPTS": reconnect_attempts} if reconnect_attempts else {}),
        },
    )
    handle = None
    restarts: list[dict[str, object]] = []
    try:
        stack.start_worker("aof", concurrency=2, pool=pool, UPLOADER_MAX_BANDWIDTH=str(BANDWIDTH))
        bucket = stack.new_bucket()
        path = stack.make_file(SIZE)
        handle = stack.uploader.submit(str(path), f"s3://{bucket}/aof.bin", part_size=PART)
        handle.accepted(timeout=60)
        upload_id = handle.upload_id
        part_count = stack.uploader.status(upload_id).part_count
        down_at = time.monotonic()
        for n in range(RESTARTS):
            threshold = max((n + 1) * part_count // (RESTARTS + 2), 2)
            before = stack.wait_status(upload_id, lambda s, threshold=threshold: s.parts_done >= threshold, 120, f"{threshold} parts")
            server.stop()  # SIGTERM: Redis fsyncs the AOF, then exits
            down_at = time.monotonic()
            time.sleep(downtime)
            server = RedisServer(redis_dir, port=port, appendonly=True)
            after = stack.uploader.status(upload_id)  # the client reconnects by itself
            restarts.append(
                {
                    "parts_done_before": before.parts_done,
                    "parts_done_after": after.parts_done,
                    "downtime_s": round(time.monotonic() - down_at, 1),
                }
            )
            report.fault("redis-restart")
            if after.parts_done < before.parts_done:
                report.problem(f"the AOF lost recorded parts: {before.parts_done} before the restart, {after.parts_done} after")

        try:
            final = wait_terminal(stack, upload_id, timeout=scaled(150, 1800), stuck_after=STUCK_AFTER)
        except Stuck as exc:
            final = exc.status
            leases = inflight_leases(stack, upload_id)
            owners = {Lease.parse(value).holder for value in leases.values()}
            live = stack.uploader.checkpoint.live_owners(owners)
            report.problem(
                f"{exc}; in-flight leases {leases}, of which held by live workers: {sorted(live)}\n"
                + "\n".join(
                    worker_log_lines(
                        stack,
                        r"Failed to cancel|cannot be acknowledged|Restoring|Exception raised outside body"
                        r"|in (record_part|release_part)|reconcile: upload|complete_upload.*(retry|succeeded)",
                        limit=25,
                    )
                )
            )
        recovered_in = round(time.monotonic() - down_at, 1)

        report.check_completed(stack, upload_id, path, bucket, "aof.bin")
        record = stack.uploader.checkpoint.get(upload_id)
        reconciled = worker_log_lines(stack, rf"reconcile: upload {upload_id}", limit=10_000)
        report.extra.update(
            {
                "restarts": restarts,
                "final_state": final.state if final else "unknown",
                "parts": part_count,
                "parts_done": final.parts_done if final else None,
                "bytes_resent": (final.bytes_sent - final.size) if final and final.state == "completed" else None,
                "generations": record.generation if record else None,
                "needed_reconciler": bool(reconciled),
                "reconciler_redispatches": len(reconciled),
                "seconds_after_last_restart": recovered_in,
            }
        )
        report.finish(stack)
    finally:
        if handle is not None:
            try:  # a stuck upload: abort its multipart upload rather than leave it behind
                if not stack.uploader.status(handle.upload_id).terminal:
                    stack.uploader.cancel(handle.upload_id, timeout=30)
            except Exception:  # noqa: BLE001 - best-effort cleanup
                pass
        stack.close()
        server.stop()
