"""Scenario 1: a SIGKILL storm. Workers die at random during a multi-part upload and are restarted
at once on the same host, as systemd's ``Restart=always`` or a container runtime would: every
worker is started as the README says (``uploader worker``), so all of them, the dead and their
replacements, share one node name (``celery@<host>``). Nobody calls ``resume``: only the workers'
own recovery (one leads at a time) sends again the parts a killed incarnation held, once its
heartbeat lapses, and puts back on their queues the messages it had received but not started
(workers/transport.py). The stall reconciler (``UPLOADER_STALL_SECONDS``, shortened here) is the
last resort; how often it was needed is reported (``stall_resumes``)."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.chaos.conftest import (
    PART,
    SEED,
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
from uploader.dev.localstack import Worker
from uploader.planner import MiB

pytestmark = [pytest.mark.slow, pytest.mark.timeout(TIMEOUT)]

SIZE = scaled(80 * MiB + 12345, 1 * GiB + 12345)
#: Per worker process: keeps the upload running through every kill round.
BANDWIDTH = scaled(2 * MiB, 4 * MiB)
KILLS = scaled(5, 40)
WORKERS = 3


def test_sigkill_storm(make_stack, report: Report) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(SEED)
    stack: Stack = make_stack(
        UPLOADER_WORKER_HEARTBEAT_SECONDS="2",
        # Below stuck_after: a message lost with a killed worker before its task took a lease
        # (CI once saw the upload stop at 13 parts with no lease held) is sent again by a resume.
        UPLOADER_STALL_SECONDS="20",
        UPLOADER_RECONCILE_INTERVAL="1",
        UPLOADER_LEADER_LEASE_SECONDS="3",
        # Only a completer killed mid-way would hold this lease; keep recovery quick if one is.
        UPLOADER_COMPLETION_LEASE_SECONDS="10",
    )
    live: list[Worker] = []
    concurrency: dict[int, int] = {}  # by worker process id: every worker has the same node name
    lock = threading.Lock()

    def spawn(n: int, c: int) -> Worker:
        worker = stack.start_worker(
            f"storm{n}", concurrency=c, default_name=True, UPLOADER_MAX_BANDWIDTH=str(BANDWIDTH)
        )
        with lock:
            concurrency[worker.pid] = c
            live.append(worker)
        return worker

    pool = ThreadPoolExecutor(WORKERS + 1)
    try:
        # The first workers start side by side (each takes seconds on a busy machine).
        for f in [pool.submit(spawn, n, rng.choice([2, 3, 4])) for n in range(1, WORKERS + 1)]:
            f.result()
        started = WORKERS
        bucket = stack.new_bucket()
        path = stack.make_file(SIZE)
        handle = stack.uploader.submit(str(path), f"s3://{bucket}/storm.bin", part_size=PART)
        handle.accepted(timeout=60)
        stack.wait_status(handle.upload_id, lambda s: s.parts_done >= 1, 60, "a first part")

        killed: list[tuple[str, int, int]] = []  # (worker, its concurrency, parts done at the kill)
        replacements = []
        while len(killed) < KILLS:
            time.sleep(rng.uniform(1.5, 2.5))
            status = stack.uploader.status(handle.upload_id)
            # Kill only while parts are moving: a completer killed mid-Complete would (rightly)
            # be taken over, which is another scenario than this one.
            if status.state != "uploading" or status.parts_done >= status.part_count - 1:
                break
            with lock:
                if not live:  # every worker died and none of the replacements is ready yet
                    continue
                victim = rng.choice(live)
                live.remove(victim)
            victim.kill()
            victim.proc.wait(10)
            killed.append((victim.name, concurrency[victim.pid], status.parts_done))
            # The replacement (same host, same node name) starts in the background: the next kill
            # does not wait for it.
            started += 1
            replacements.append(pool.submit(spawn, started, rng.choice([2, 3, 4])))
        for f in replacements:
            f.result()

        try:
            final = wait_terminal(stack, handle.upload_id, timeout=scaled(200, 1800), stuck_after=scaled(60, 300))
        except Stuck as exc:
            final = exc.status or stack.uploader.status(handle.upload_id)
            report.problem(
                f"{exc}; in-flight leases {inflight_leases(stack, handle.upload_id)}\n"
                + "\n".join(worker_log_lines(stack, rf"{handle.upload_id}.*(ERROR|WARNING)|Traceback|reconcile"))
            )
    finally:
        pool.shutdown(wait=True)

    report.fault("sigkill", len(killed))
    report.check_completed(stack, handle.upload_id, path, bucket, "storm.bin")
    record = stack.uploader.checkpoint.get(handle.upload_id)
    assert record is not None
    resent = final.bytes_sent - final.size if final.state == "completed" else final.bytes_sent - final.bytes_done
    bound = sum(c for _, c, _ in killed) * PART
    reconciled = worker_log_lines(stack, rf"reconcile: upload {handle.upload_id}", limit=10_000)
    reclaimed = [line for line in reconciled if "sending parts" in line]
    resumed = [line for line in reconciled if "stalled in" in line]
    report.extra.update(
        {
            "kills": len(killed),
            "workers_started": started,
            "parts": final.part_count,
            "bytes_resent": resent,
            "resent_bound": bound,
            "generations": record.generation,
            "reconciler_redispatches": len(reconciled),
            "dead_incarnation_reclaims": len(reclaimed),
            "stall_resumes": len(resumed),
        }
    )
    if len(killed) < 2:
        report.problem(f"only {len(killed)} kills happened before the upload finished: the scenario proved little")
    elif not reclaimed:
        # Every killed worker was sending parts (each is throttled): their leases must have been
        # taken back from the dead incarnations, not left to the stall reconciler.
        report.problem(f"{len(killed)} kills, but no part lease was taken back from a dead incarnation")
    if not 0 <= resent <= bound:
        report.problem(f"re-sent {resent} bytes, more than kills x concurrency x part size = {bound}")
    if final.state not in ("completed", "uploading"):
        report.problem(f"ended {final.state}: {final.error}\n" + "\n".join(worker_log_lines(stack, rf"{handle.upload_id}.*(ERROR|WARNING)|Traceback")))
    report.finish(stack)
