"""Fan-out: how long the coordinator takes to dispatch a many-part upload.

Sending thousands of real 5 MiB parts would take longer than the whole benchmark (and as much
disk), so the source is a sparse file and the worker is throttled to a trickle: what is timed
is submit -> first part started and submit -> every part message dispatched, not the transfer.
The upload is then abandoned: the worker is killed, its Redis database flushed and the
multipart upload aborted.

``python -m bench --scenarios fanout`` runs it once, with the worker's default dispatch. Run as a
module it compares dispatch modes (``UPLOADER_FANOUT``, see ``workers/fanout.py``) interleaved on
one rig, and can attach py-spy to the worker::

    python -m bench.fanout                                   # 10,000 parts: chord vs fast, 2 rounds
    python -m bench.fanout --modes chord,fast,fast-sent --repeats 3
    python -m bench.fanout --modes fast --profile /tmp/fanout-prof   # raw py-spy stacks + a summary
"""

from __future__ import annotations

import argparse
import signal
import statistics
import time
from pathlib import Path
from typing import Any

from bench import procstat
from bench.rig import Rig
from bench.stats import rnd

BUCKET = "bench-fanout"
MiB = 1 << 20


def run(rig: Rig, *, parts: int, concurrency: int, timeout: float, log: Any, mode: str | None = None,
        profile_path: Path | None = None, name: str = "fanout.bin") -> dict[str, Any]:
    """One upload of ``parts`` parts on a fresh worker. ``mode`` sets ``UPLOADER_FANOUT`` in the
    worker (None: the worker's default); ``profile_path`` records the worker with py-spy (raw
    stacks) from before the submit until every part is dispatched."""
    from uploader import Uploader
    from uploader.contract import PARTS_QUEUE

    part_size = 5 * MiB
    size = parts * part_size
    s3 = rig.s3_client()
    try:
        s3.create_bucket(Bucket=BUCKET)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    except Exception as exc:  # SeaweedFS says BucketAlreadyExists for its own buckets
        if "BucketAlreadyExists" not in str(exc):
            raise
    path = rig.make_sparse_file(name, size)
    redis_url = rig.new_database()
    extra = {"UPLOADER_MAX_BANDWIDTH": str(1 * MiB)}
    if mode is not None:
        extra["UPLOADER_FANOUT"] = mode
    env = rig.uploader_env(redis_url, **extra)
    worker = rig.start_worker(env, name="bench-fanout", concurrency=concurrency)
    uploader = Uploader(rig.settings_for(env))
    store = uploader.checkpoint
    result: dict[str, Any] = {"parts": parts, "part_size": part_size, "logical_size": size, "concurrency": concurrency,
                              "mode": mode or "default"}

    started: dict[str, Any] = {}

    def dispatch_once() -> Any:
        worker0 = procstat.tree_cpu_seconds(worker.pid)
        t0 = time.perf_counter()
        handle = started["handle"] = uploader.submit(str(path), f"s3://{BUCKET}/{name}", part_size=part_size)
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
                cpu = procstat.tree_cpu_seconds(worker.pid) - worker0
                result["worker_cpu_s_to_dispatched"] = rnd(cpu)
                result["worker_cpu_ms_per_part"] = rnd(1000 * cpu / parts)
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
        return handle

    try:
        if profile_path is not None:
            from bench import profile

            _, stacks = profile.record(rig, worker.pid, profile_path, dispatch_once, rate=200)
            result["profile"] = str(profile_path) if not isinstance(stacks, str) else stacks
        else:
            dispatch_once()
        log(f"  {parts} parts of 5 MiB ({result['mode']}): first part started after {result['seconds_to_first_part_started']} s, "
            f"all dispatched after {result['seconds_to_all_dispatched']} s"
            + (f" ({result['dispatch_messages_per_s']:.0f} parts/s, worker CPU {result['worker_cpu_s_to_dispatched']} s, "
               f"{result['worker_cpu_ms_per_part']} ms/part)" if result.get("seconds_to_all_dispatched") else ""))
    finally:
        worker.kill(signal.SIGKILL)
        rig.stop_service(worker)
        record = store.get(started["handle"].upload_id) if "handle" in started else None
        store.redis.flushdb()
        uploader.close()
        if record is not None and record.mpu_id:
            try:
                s3.abort_multipart_upload(Bucket=BUCKET, Key=name, UploadId=record.mpu_id)
            except Exception:
                pass
        path.unlink(missing_ok=True)
    return result


def summarize_profile(raw_path: Path, focus: str = "dispatch (workers/tasks.py", top: int = 40) -> str:
    """Inclusive shares of the functions under ``focus`` (the coordinator's dispatch), from a
    py-spy raw file: what the dispatching thread spent its samples on."""
    import re
    from collections import Counter

    inclusive: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = everything = 0
    for line in raw_path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        everything += n
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        if not any(focus in f for f in frames):
            continue
        total += n
        for f in set(frames):
            inclusive[f] += n
        leaves[frames[-1]] += n
    lines = [f"{total} of {everything} worker samples under {focus!r}", "", "inclusive:"]
    lines += [f"{100 * v / total:5.1f}% {k}" for k, v in inclusive.most_common(top)] if total else []
    lines += ["", "leaf:"]
    lines += [f"{100 * v / total:5.1f}% {k}" for k, v in leaves.most_common(top // 2)] if total else []
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", type=int, default=10_000)
    parser.add_argument("--modes", default="chord,fast",
                        help="comma-separated UPLOADER_FANOUT values: chord (Celery's plain chord), fast "
                             "(batched; what 'auto' picks on Redis), fast-sent (batched, task-sent event per part)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds; the modes are interleaved within each")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--profile", type=Path, default=None, help="directory for py-spy raw stacks (one run per mode)")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    samples: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    with Rig(None, log=print) as rig:
        rig.start_s3()
        print(f"SeaweedFS S3 on {rig.endpoint_url}; {args.parts} parts, modes {', '.join(modes)}, {args.repeats} round(s)")
        for round_ in range(args.repeats):
            for m in modes:
                worker_mode = "auto" if m == "fast" else m
                prof = None
                if args.profile is not None and round_ == args.repeats - 1:
                    args.profile.mkdir(parents=True, exist_ok=True)
                    prof = args.profile / f"fanout-{m}.txt"
                res = run(rig, parts=args.parts, concurrency=args.concurrency, timeout=args.timeout, log=print,
                          mode=worker_mode, profile_path=prof, name=f"fanout-{m}-{round_}.bin")
                samples[m].append(res)
                if prof is not None and prof.exists():
                    summary = summarize_profile(prof)
                    (args.profile / f"fanout-{m}-summary.txt").write_text(summary)
    print()
    print("| mode | runs | submit -> all dispatched (s) | parts/s | worker CPU (s) | worker CPU per part (ms) |")
    print("| --- | --- | --- | --- | --- | --- |")
    failed = False
    for m, runs in samples.items():
        ok = [r for r in runs if r.get("seconds_to_all_dispatched")]
        failed |= len(ok) != len(runs)
        if not ok:
            print(f"| {m} | {len(runs)} | failed | | | |")
            continue

        def med(key: str, ok: list[dict] = ok) -> float:
            return statistics.median(r[key] for r in ok)

        print(f"| {m} | {len(ok)} | {med('seconds_to_all_dispatched'):.2f} | {med('dispatch_messages_per_s'):.0f} "
              f"| {med('worker_cpu_s_to_dispatched'):.2f} | {med('worker_cpu_ms_per_part'):.3f} |")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
