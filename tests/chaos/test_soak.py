"""The soak: continuous mixed uploads (0 B to 1 GiB) for ``UPLOADER_SOAK_MINUTES`` minutes through
a fleet of workers started exactly as the README says (``uploader worker -c 4``: every one is
``celery@<host>``), while workers are SIGKILLed and restarted on the same host at random, S3
answers with faults (503, 500, resets, slow answers) and Redis (with its AOF) is restarted.

Every upload must end completed with the stored object byte-identical to its source (SHA-256;
verified objects are deleted again and SeaweedFS vacuumed every minute, to bound the disk):
none stuck, none with wrong bytes, nothing orphaned (no multipart upload left in the bucket, no
lease left in a checkpoint). Skipped unless ``UPLOADER_SOAK_MINUTES`` is set::

    UPLOADER_SOAK_MINUTES=20 .venv/bin/pytest tests/chaos/test_soak.py -s

It prints ``CHAOS_SUMMARY {json}`` with the figures (``docs/reliability.md`` has the last run's).
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.chaos.conftest import SEED, Report, inflight_leases, open_uploads_for
from tests.conftest import Stack
from tests.faultproxy import FaultProxy
from uploader.client import UploadHandle
from uploader.dev.localstack import RedisServer, Worker
from uploader.errors import Unreachable
from uploader.planner import KiB, MiB

MINUTES = float(os.environ.get("UPLOADER_SOAK_MINUTES", "0"))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not MINUTES, reason="the soak runs only with UPLOADER_SOAK_MINUTES set"),
    pytest.mark.timeout(int(MINUTES * 60) + 3600),
]

GiB = 1024 * MiB
WORKERS = 3
CONCURRENCY = 4
IN_FLIGHT = 6
#: (size, weight): mostly small and medium, a 1 GiB upload now and then.
SIZES = [(0, 2), (1 * KiB, 3), (300 * KiB, 3), (7 * MiB, 2), (12 * MiB + 17, 3), (60 * MiB + 5, 2),
         (300 * MiB + 3, 1), (1 * GiB + 7, 0.25)]
#: Seconds between two kills (uniform).
KILL_EVERY = (15.0, 45.0)
#: An upload whose state and parts did not change for this long counts as stuck.
STUCK_AFTER = 600


@dataclass
class Running:
    handle: UploadHandle
    path: Path
    key: str
    size: int
    progress: tuple[str, int] = ("", -1)
    progress_at: float = field(default_factory=time.monotonic)


def test_soak(workdir: Path, seaweed, sources_root: Path) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(SEED)
    report = Report("soak", f"UPLOADER_SOAK_MINUTES={MINUTES:g} .venv/bin/pytest tests/chaos/test_soak.py -s")
    redis_dir = workdir / f"soak-redis-{uuid.uuid4().hex[:8]}"
    redis_dir.mkdir()
    server = RedisServer(redis_dir, appendonly=True)
    proxy = FaultProxy(seaweed.endpoint_url, fault=["503", "500", "reset", "slow"], rate=0.02, slow_seconds=3.0)
    stack = Stack(
        workdir, server.url, seaweed.endpoint_url, sources_root,
        {
            "UPLOADER_WORKER_HEARTBEAT_SECONDS": "5",
            "UPLOADER_RECONCILE_INTERVAL": "5",
            "UPLOADER_LEADER_LEASE_SECONDS": "5",
            "UPLOADER_STALL_SECONDS": "60",
            "UPLOADER_AUTO_RESUME_BACKOFF": "5",
            "UPLOADER_RETRY_BACKOFF_MAX": "5",
            "UPLOADER_COMPLETION_LEASE_SECONDS": "30",
        },
    )
    workers: list[Worker] = []
    lock = threading.Lock()
    stop = threading.Event()
    kills = restarts_of_redis = 0

    def start_worker(n: int) -> Worker:
        return stack.start_worker(f"soak{n}", concurrency=CONCURRENCY, default_name=True, UPLOADER_S3_ENDPOINT_URL=proxy.url)

    def chaos() -> None:
        nonlocal kills, restarts_of_redis, server
        redis_restart_at = time.monotonic() + MINUTES * 60 * 0.4
        n = WORKERS
        while not stop.wait(rng.uniform(*KILL_EVERY)):
            with lock:
                victim = rng.choice(workers)
                workers.remove(victim)
            victim.kill()
            victim.proc.wait(10)
            kills += 1
            n += 1
            replacement = start_worker(n)  # same host, same node name: a restart
            with lock:
                workers.append(replacement)
            if restarts_of_redis == 0 and time.monotonic() > redis_restart_at:
                port = server.port
                server.stop()  # SIGTERM: the AOF is written, then Redis exits
                time.sleep(5)
                server = RedisServer(redis_dir, port=port, appendonly=True)
                restarts_of_redis += 1

    def submit(source: str, destination: str) -> UploadHandle:
        """Submit, as a careful client does: while Redis restarts, send again under the same
        upload id (a duplicate start is harmless) until the broker takes it."""
        upload_id = uuid.uuid4().hex
        for _ in range(120):
            try:
                return stack.uploader.submit(source, destination, upload_id=upload_id)
            except Unreachable:
                time.sleep(1)
        raise AssertionError(f"the broker refused {upload_id} for two minutes")

    bucket = stack.new_bucket()
    running: list[Running] = []
    finished: list[tuple[Running, str, str]] = []  # (upload, state, error)
    started = vacuumed_at = time.monotonic()
    chaos_thread = threading.Thread(target=chaos, daemon=True)
    try:
        workers.extend(start_worker(n) for n in range(WORKERS))
        chaos_thread.start()
        deadline = started + MINUTES * 60
        while running or time.monotonic() < deadline:
            while time.monotonic() < deadline and len(running) < IN_FLIGHT:
                size = rng.choices([s for s, _ in SIZES], weights=[w for _, w in SIZES])[0]
                key = f"soak/{uuid.uuid4().hex}"
                path = stack.make_file(size)
                running.append(Running(submit(str(path), f"s3://{bucket}/{key}"), path, key, size))
            time.sleep(1)
            for upload in list(running):
                try:
                    status = stack.uploader.status(upload.handle.upload_id)
                except Exception:  # noqa: BLE001  (not accepted yet, or Redis restarting)
                    continue
                if status.terminal:
                    running.remove(upload)
                    finished.append((upload, status.state, status.error))
                    if status.state == "completed":
                        # A kill may land on a completer (or on a coordinator sending a small
                        # object): its lapsed lease is taken over, which is counted, not a fault.
                        report.check_completed(
                            stack, upload.handle.upload_id, upload.path, bucket, upload.key, takeovers=True
                        )
                        # Verified: give the space back (tens of GB go through in 20 minutes).
                        stack.s3.delete_object(Bucket=bucket, Key=upload.key)
                    else:
                        report.uploads += 1
                        report.objects_expected += 1
                        report.problem(f"{upload.handle.upload_id} ({upload.size} B) ended {status.state}: {status.error}")
                    upload.path.unlink(missing_ok=True)
                    continue
                now = time.monotonic()
                if (status.state, status.parts_done) != upload.progress:
                    upload.progress, upload.progress_at = (status.state, status.parts_done), now
                elif now - upload.progress_at > STUCK_AFTER:
                    running.remove(upload)
                    report.uploads += 1
                    report.objects_expected += 1
                    report.extra["stuck"] = report.extra.get("stuck", 0) + 1
                    report.problem(
                        f"{upload.handle.upload_id} stuck in {status.state} at {status.parts_done}/{status.part_count}: "
                        f"leases {inflight_leases(stack, upload.handle.upload_id)}"
                    )
            if time.monotonic() > deadline:
                stop.set()
            if time.monotonic() > vacuumed_at + 60:
                seaweed.vacuum()
                vacuumed_at = time.monotonic()
    finally:
        stop.set()
        chaos_thread.join(120)
        wrong = sum(1 for p in report.problems if "sha256" in p)
        report.fault("sigkill-and-restart", kills)
        report.fault("redis-restart", restarts_of_redis)
        report.fault("s3-fault", sum(n for what, n in proxy.counts.items() if what.startswith("injected-")))
        left = open_uploads_for(stack, bucket)
        report.extra.update(
            {
                "minutes": round((time.monotonic() - started) / 60, 1),
                "uploads_run": len(finished),
                "completed": sum(1 for _, state, _ in finished if state == "completed"),
                "stuck": report.extra.get("stuck", 0),
                "wrong_bytes": wrong,
                "sizes": sorted({u.size for u, _, _ in finished}),
                "largest_completed": max((u.size for u, s, _ in finished if s == "completed"), default=0),
                "multipart_uploads_left": len(left),
            }
        )
        try:
            report.finish(stack)
        finally:
            stack.close()
            proxy.close()
            server.stop()
