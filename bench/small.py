"""Small objects: the latency of one 1 KiB upload through the queue against a direct PutObject,
and the throughput of many small uploads submitted at once."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import procstat
from bench.rig import Rig
from bench.stats import median, percentile, rnd

BUCKET = "bench-small"


def _wait_all(uploader: Any, ids: list[str], timeout: float, interval: float, window: int = 32) -> dict[str, tuple[str, float | None]]:
    """Poll the checkpoints until every upload is terminal. Uploads finish roughly in the order
    they were submitted, so each poll reads only the oldest ``window`` unfinished ones (one
    pipelined round trip), keeping the benchmark's own load on Redis and the CPU small."""
    store = uploader.checkpoint
    pending = list(ids)
    done: dict[str, tuple[str, float | None]] = {}
    deadline = time.monotonic() + timeout
    while pending:
        head = pending[:window]
        pipe = store.redis.pipeline(transaction=False)
        for upload_id in head:
            pipe.hmget(store.record_key(upload_id), "state", "finished")
        still = []
        for upload_id, (state, finished) in zip(head, pipe.execute()):
            if state in ("completed", "failed", "cancelled"):
                done[upload_id] = (state, float(finished) if finished else None)
            else:
                still.append(upload_id)
        pending = still + pending[window:]
        if still:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} of {len(ids)} small uploads unfinished after {timeout:.0f} s")
            time.sleep(interval)
    return done


def run(rig: Rig, project: Any, *, latency_count: int, batch: int, concurrency: int, timeout: float, log: Any,
        profile_dir: Path | None = None) -> dict[str, Any]:
    """``project``: a prepared :class:`~bench.tools.UploaderTool` (its worker is reused)."""
    s3 = rig.s3_client(s3={"addressing_style": "path", "payload_signing_enabled": False})
    s3.create_bucket(Bucket=BUCKET)
    src = rig.make_random_file("small-1k.bin", 1024)
    body = src.read_bytes()
    up = project.uploader
    worker_pid = project.worker.pid
    result: dict[str, Any] = {"object_size": 1024}

    # -- latency, one at a time, interleaved with the direct PutObject (A B A B ...) so that both
    # see the same moments of a noisy machine --------------------------------------------------------
    warm = 5
    queue_lat, queue_seen, direct_lat = [], [], []
    for i in range(warm + latency_count):
        epoch0, t0 = time.time(), time.perf_counter()
        handle = up.submit(str(src), f"s3://{BUCKET}/lat/{i}")
        # A small source is sent by its start task, which returns once the upload is completed:
        # wait for that result (pub/sub, no polling to compete with the worker for the CPU; the
        # latency itself is the worker's completion stamp), then read the checkpoint once. The
        # worker has then also finished the task, so the direct PutObject below does not run
        # against its tail of work (the result, events and ack that follow the stamp).
        handle.accepted(timeout)
        done = _wait_all(up, [handle.upload_id], timeout, 0.002)
        seen = time.perf_counter() - t0
        state, finished = done[handle.upload_id]
        if state != "completed":
            raise RuntimeError(f"small upload {handle.upload_id} ended {state}: {up.status(handle.upload_id).error}")
        t1 = time.perf_counter()
        s3.put_object(Bucket=BUCKET, Key=f"direct/{i}", Body=body)
        direct = time.perf_counter() - t1
        if i >= warm:
            queue_seen.append(seen)
            queue_lat.append(finished - epoch0 if finished else seen)
            direct_lat.append(direct)
    # For reference, PutObject back to back (hot caches everywhere, nothing in between): faster
    # than the same call between two uploads, so the ratio against it is reported too.
    warm_lat = []
    for i in range(warm + latency_count):
        t1 = time.perf_counter()
        s3.put_object(Bucket=BUCKET, Key=f"direct-hot/{i}", Body=body)
        if i >= warm:
            warm_lat.append(time.perf_counter() - t1)
    result["latency"] = {
        "count": latency_count,
        "put_object_back_to_back_median_ms": rnd(median(warm_lat) * 1000, 2),
        "uploader_median_ms": rnd(median(queue_lat) * 1000, 1),
        "uploader_p90_ms": rnd(percentile(queue_lat, 0.9) * 1000, 1),
        "uploader_client_observed_median_ms": rnd(median(queue_seen) * 1000, 1),
        "put_object_median_ms": rnd(median(direct_lat) * 1000, 2),
        "put_object_p90_ms": rnd(percentile(direct_lat, 0.9) * 1000, 2),
    }
    lat = result["latency"]
    lat["ratio"] = rnd(lat["uploader_median_ms"] / lat["put_object_median_ms"], 2)
    lat["ratio_vs_back_to_back"] = rnd(lat["uploader_median_ms"] / lat["put_object_back_to_back_median_ms"], 2)
    log(f"  1 KiB latency: uploader {result['latency']['uploader_median_ms']} ms median "
        f"(p90 {result['latency']['uploader_p90_ms']}), put_object {result['latency']['put_object_median_ms']} ms "
        f"({lat['ratio']}x; back to back {lat['put_object_back_to_back_median_ms']} ms, {lat['ratio_vs_back_to_back']}x)")

    # -- throughput: a batch submitted at once ---------------------------------------------------------
    worker0, client0 = procstat.tree_cpu_seconds(worker_pid), procstat.self_cpu_seconds()
    epoch0, t0 = time.time(), time.perf_counter()
    ids = [up.submit(str(src), f"s3://{BUCKET}/batch/{i}").upload_id for i in range(batch)]
    submitted = time.perf_counter() - t0
    client_cpu = procstat.self_cpu_seconds() - client0  # submitting only: the polling below is ours
    done = _wait_all(up, ids, timeout, 0.05)
    seen = time.perf_counter() - t0
    worker_cpu = procstat.tree_cpu_seconds(worker_pid) - worker0
    failed = [i for i, (state, _) in done.items() if state != "completed"]
    last = max((f for _, f in done.values() if f), default=None)
    elapsed = last - epoch0 if last else seen

    def direct(i: int) -> None:
        s3.put_object(Bucket=BUCKET, Key=f"direct-batch/{i}", Body=body)

    with ThreadPoolExecutor(concurrency) as pool:
        t1 = time.perf_counter()
        list(pool.map(direct, range(batch)))
        direct_elapsed = time.perf_counter() - t1
    result["batch"] = {
        "count": batch,
        "failed": len(failed),
        "submit_s": rnd(submitted),
        "submit_per_s": rnd(batch / submitted, 0),
        "uploader_s": rnd(elapsed),
        "uploader_per_s": rnd(batch / elapsed, 1),
        "uploader_worker_cpu_ms_per_object": rnd(worker_cpu / batch * 1000, 2),
        "uploader_client_cpu_ms_per_submit": rnd(client_cpu / batch * 1000, 2),
        "put_object_threads": concurrency,
        "put_object_s": rnd(direct_elapsed),
        "put_object_per_s": rnd(batch / direct_elapsed, 1),
    }
    if profile_dir is not None:
        from bench import profile

        count = max(100, batch // 2)

        def profiled_batch() -> None:
            ids = [up.submit(str(src), f"s3://{BUCKET}/profiled/{i}").upload_id for i in range(count)]
            _wait_all(up, ids, timeout, 0.05)

        _, stacks = profile.record(rig, worker_pid, profile_dir / "latest-worker-profile-small.txt", profiled_batch)
        if isinstance(stacks, str):
            result["profile"] = {"status": stacks}
        else:
            result["profile"] = {
                "status": "ran", "uploads": count,
                **profile.summarize(stacks, 100, result["batch"]["uploader_worker_cpu_ms_per_object"], "ms_per_object"),
            }
            log(f"  py-spy over {count} more small uploads (worker CPU ms per upload, scaled from the measured batch):")
            for row in result["profile"]["categories"][:8]:
                log(f"    {row['share'] * 100:5.1f}%  {row['cpu_ms_per_object']:6.2f} ms  {row['category']}")
    log(f"  {batch} x 1 KiB at once: uploader {result['batch']['uploader_per_s']}/s "
        f"(submitting {result['batch']['submit_per_s']:.0f}/s, worker {result['batch']['uploader_worker_cpu_ms_per_object']} "
        f"CPU ms each), put_object x{concurrency} threads {result['batch']['put_object_per_s']}/s"
        + (f", {len(failed)} FAILED" if failed else ""))
    return result
