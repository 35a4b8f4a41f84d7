"""Fan-out: how long the coordinator takes to dispatch a many-part upload.

Sending thousands of real 5 MiB parts would take longer than the whole benchmark (and as much
disk), so the source is a sparse file and the worker is throttled to a trickle: what is timed
is submit -> first part started and submit -> every part message dispatched, not the transfer.
The upload is then abandoned: the worker is killed, its Redis database flushed and the
multipart upload aborted.
"""

from __future__ import annotations

import signal
import time
from typing import Any

from bench import procstat
from bench.rig import Rig
from bench.stats import rnd

BUCKET = "bench-fanout"
MiB = 1 << 20


def run(rig: Rig, *, parts: int, concurrency: int, timeout: float, log: Any) -> dict[str, Any]:
    from uploader import Uploader
    from uploader.contract import PARTS_QUEUE

    part_size = 5 * MiB
    size = parts * part_size
    s3 = rig.s3_client()
    s3.create_bucket(Bucket=BUCKET)
    path = rig.make_sparse_file("fanout.bin", size)
    redis_url = rig.new_database()
    env = rig.uploader_env(redis_url, UPLOADER_MAX_BANDWIDTH=str(1 * MiB))
    worker = rig.start_worker(env, name="bench-fanout", concurrency=concurrency)
    uploader = Uploader(rig.settings_for(env))
    store = uploader.checkpoint
    result: dict[str, Any] = {"parts": parts, "part_size": part_size, "logical_size": size, "concurrency": concurrency}
    try:
        worker0 = procstat.tree_cpu_seconds(worker.pid)
        t0 = time.perf_counter()
        handle = uploader.submit(str(path), f"s3://{BUCKET}/fanout.bin", part_size=part_size)
        result["submit_call_s"] = rnd(time.perf_counter() - t0)
        first = dispatched = None
        deadline = time.monotonic() + timeout
        while first is None or dispatched is None:
            now = time.perf_counter() - t0
            if first is None:
                sent = store.redis.hget(store.record_key(handle.upload_id), "parts_sent")
                if sent and int(sent) > 0:
                    first = now
            if dispatched is None and handle.start.ready():
                dispatched = time.perf_counter() - t0
                result["worker_cpu_s_to_dispatched"] = rnd(procstat.tree_cpu_seconds(worker.pid) - worker0)
                result["parts_queue_length_at_dispatched"] = store.redis.llen(PARTS_QUEUE)
                if handle.start.failed():
                    raise RuntimeError(f"start_upload failed: {handle.start.result!r}")
            if time.monotonic() > deadline:
                break
            time.sleep(0.005)
        result["seconds_to_first_part_started"] = rnd(first)
        result["seconds_to_all_dispatched"] = rnd(dispatched)
        if dispatched:
            result["dispatch_messages_per_s"] = rnd(parts / dispatched, 0)
        if first is None or dispatched is None:
            result["error"] = f"not finished within {timeout:.0f} s"
        log(f"  {parts} parts of 5 MiB: first part started after {result['seconds_to_first_part_started']} s, "
            f"all dispatched after {result['seconds_to_all_dispatched']} s"
            + (f" ({result['dispatch_messages_per_s']:.0f} parts/s, worker CPU {result['worker_cpu_s_to_dispatched']} s)" if dispatched else ""))
    finally:
        worker.kill(signal.SIGKILL)
        rig.stop_service(worker)
        record = store.get(handle.upload_id) if "handle" in locals() else None
        store.redis.flushdb()
        uploader.close()
        if record is not None and record.mpu_id:
            try:
                s3.abort_multipart_upload(Bucket=BUCKET, Key="fanout.bin", UploadId=record.mpu_id)
            except Exception:
                pass
        path.unlink(missing_ok=True)
    return result
