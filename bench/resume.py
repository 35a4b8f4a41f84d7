"""Resume cost: SIGKILL the worker half-way through a multipart upload, start a new one,
``resume``, and count the bytes sent in all against the file's size."""

from __future__ import annotations

import signal
import time
from typing import Any

from bench.rig import Rig
from bench.stats import rnd

BUCKET = "bench-resume"
MiB = 1 << 20


def run(rig: Rig, *, size: int, part_size: int, concurrency: int, throttle: int, timeout: float, log: Any) -> dict[str, Any]:
    from uploader import Uploader

    s3 = rig.s3_client()
    s3.create_bucket(Bucket=BUCKET)
    path = rig.make_random_file("resume.bin", size)
    env = rig.uploader_env(rig.new_database())
    # Throttled so that "half-way" is a moment the poll below can hit, not a blur.
    first = rig.start_worker({**env, "UPLOADER_MAX_BANDWIDTH": str(throttle)}, name="bench-resume-a", concurrency=concurrency)
    uploader = Uploader(rig.settings_for(env))
    try:
        t0 = time.perf_counter()
        handle = uploader.submit(str(path), f"s3://{BUCKET}/resume.bin", part_size=part_size)
        deadline = time.monotonic() + timeout
        while True:
            status = handle.status() if _exists(uploader, handle.upload_id) else None
            if status is not None and status.part_count and status.parts_done * 2 >= status.part_count:
                break
            if status is not None and status.terminal:
                raise RuntimeError(f"upload ended ({status.state}) before it could be interrupted")
            if time.monotonic() > deadline:
                raise TimeoutError("the upload never reached half-way")
            time.sleep(0.01)
        first.kill(signal.SIGKILL)
        killed_at = time.perf_counter()
        at_kill = uploader.checkpoint.get(handle.upload_id)
        rig.stop_service(first)
        log(f"  SIGKILLed the worker at {at_kill.parts_done}/{at_kill.part_count} parts recorded, "
            f"{at_kill.bytes_sent / MiB:.0f} MiB sent")
        second = rig.start_worker(env, name="bench-resume-b", concurrency=concurrency)
        restarted = time.perf_counter()
        outcome = uploader.resume(handle.upload_id)
        final = uploader.wait(handle.upload_id, timeout=timeout)
        finished = time.perf_counter()
        head = s3.head_object(Bucket=BUCKET, Key="resume.bin")
        rig.stop_service(second)
    finally:
        uploader.close()
    part_count = final.part_count
    inflight_parts = min(concurrency, part_count)
    sent_ratio = final.bytes_sent / size
    bound = 1 + inflight_parts * part_size / size
    result = {
        "file_size": size,
        "part_size": part_size,
        "part_count": part_count,
        "concurrency": concurrency,
        "throttle_bytes_per_s": throttle,
        "worker_heartbeat_seconds": getattr(rig.settings_for(env), "worker_heartbeat_seconds", None),
        "killed_at_parts_done": at_kill.parts_done,
        "killed_at_bytes_sent": at_kill.bytes_sent,
        "killed_at_parts_sent": at_kill.parts_sent,
        "killed_at_parts_in_flight": at_kill.parts_sent - at_kill.parts_done,
        "resume_outcome": outcome,
        "final_state": final.state,
        "verified": final.verified,
        "stored_size_ok": head["ContentLength"] == size,
        "bytes_sent": final.bytes_sent,
        "bytes_sent_ratio": rnd(sent_ratio, 4),
        "bound_ratio": rnd(bound, 4),
        "within_bound": sent_ratio <= bound + 1e-9,
        "seconds_to_kill": rnd(killed_at - t0, 2),
        "seconds_new_worker_ready": rnd(restarted - killed_at, 2),
        "seconds_resume_to_completed": rnd(finished - restarted, 2),
    }
    log(f"  resumed and completed in {result['seconds_resume_to_completed']} s: bytes sent / size = "
        f"{result['bytes_sent_ratio']} (bound 1 + {inflight_parts} in flight / {part_count} parts = {result['bound_ratio']})")
    return result


def _exists(uploader: Any, upload_id: str) -> bool:
    return uploader.checkpoint.get(upload_id) is not None
