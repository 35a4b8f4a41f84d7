"""Retention: what Redis keeps for finished uploads, and what it costs the recovery leader.

Two measurements, each on a Redis database of its own:

*Reconcile cost.* ``--retained`` (default 10,000) finished uploads are created straight through
the :class:`~uploader.checkpoint.CheckpointStore` (a single-PUT record claimed and marked
completed: two script calls each, no S3, no worker), plus ``--active`` (default 5) uploads in
``uploading``. Then :func:`uploader.maintenance.reconcile` runs ``--runs`` times in this process
(no worker is running, so nothing else talks to this Redis): the median wall time of one run and
the Redis commands it ran (``INFO commandstats`` before and after, summed; a script's own
commands included). The same for one janitor plan (``uploader gc --dry-run``), which may walk old
records, and for the attention index's sweep (its one-time build, then once per janitor run).

*Keys a cancelled upload leaves.* One upload of ``--parts`` (default 10,000) 5 MiB parts of a
sparse file, on one worker throttled to 4 MiB/s (so almost every part is still queued when the
cancel comes), cancelled as soon as every part message is dispatched; then the parts queue
drains (each queued part finds its upload cancelled and returns at once) and the Celery result
keys left in the database are counted by kind, once they stop changing (the recovery leader
runs every 2 s here). Run it on ``main`` and on a branch to compare::

    python -m bench.retention                         # 10,000 retained, 10,000 parts
    python -m bench.retention --retained 5000 --parts 2000
    python -m bench --scenarios retention --merge     # into bench/results/latest.*
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import time
import uuid
from collections import Counter
from typing import Any

import redis

from bench.rig import Rig
from bench.stats import rnd

BUCKET = "bench-retention"
MiB = 1 << 20


def command_count(client: redis.Redis) -> int:
    """Commands the server has run so far (all databases; scripts count as one each, plus the
    commands they call)."""
    return sum(int(v["calls"]) for k, v in client.info("commandstats").items() if k.startswith("cmdstat_"))


def reconcile_cost(rig: Rig, *, retained: int, active: int, runs: int, log: Any) -> dict[str, Any]:
    from uploader import maintenance
    from uploader.context import UploaderContext

    redis_url = rig.new_database()
    settings = rig.settings_for(rig.uploader_env(redis_url))
    ctx = UploaderContext.from_settings(settings)
    store = ctx.checkpoint
    raw = redis.Redis.from_url(redis_url)
    t0 = time.perf_counter()
    fields = {"source": "/dev/null", "bucket": BUCKET, "key": "k", "size": 1, "mtime_ns": 0, "part_size": 1,
              "part_count": 1, "mode": "single", "metadata": {}, "content_type": None, "abort_on_failure": False}
    for n in range(retained):
        upload_id = f"done{n:06d}"
        token = uuid.uuid4().hex
        created, _ = store.claim_single(upload_id, fields, token, 300)
        assert created
        assert store.mark_completed(upload_id, token, settings.retention_seconds, {"final_etag": "x"}) == "ok"
    for n in range(active):
        upload_id = f"busy{n:06d}"
        assert store.claim(upload_id, {**fields, "mode": "multipart", "part_count": 2})[0]
        assert store.attach_multipart(upload_id, f"mpu-{n}") == "ok"
    setup_s = time.perf_counter() - t0
    log(f"  {retained} finished + {active} uploading uploads created in {setup_s:.1f} s")

    sent: list[Any] = []
    # The first run after an upgrade may index existing records once (a one-time migration); it
    # is reported apart, then the steady state.
    times, commands = [], []
    for _ in range(runs):
        before = command_count(raw)
        t = time.perf_counter()
        maintenance.reconcile(ctx, sent.append)
        times.append(time.perf_counter() - t)
        commands.append(command_count(raw) - before - 1)  # minus our own INFO
    before = command_count(raw)
    t = time.perf_counter()
    plan = maintenance.janitor_plan(ctx)
    janitor_s = time.perf_counter() - t
    janitor_commands = command_count(raw) - before - 1
    sweep_s = sweep_commands = None
    if hasattr(maintenance, "sweep_index"):  # the janitor's hourly walk (absent before the attention index)
        before = command_count(raw)
        t = time.perf_counter()
        maintenance.sweep_index(ctx)
        sweep_s = rnd(time.perf_counter() - t, 4)
        sweep_commands = command_count(raw) - before - 1
    result = {
        "retained_uploads": retained,
        "active_uploads": active,
        "setup_s": rnd(setup_s),
        "reconcile_runs": runs,
        "reconcile_s_median": rnd(statistics.median(times), 4),
        "reconcile_s_first": rnd(times[0], 4),
        "reconcile_redis_commands_median": statistics.median(commands),
        "reconcile_redis_commands_first": commands[0],
        "janitor_plan_s": rnd(janitor_s, 4),
        "janitor_plan_redis_commands": janitor_commands,
        "janitor_actions": len(plan),
        "index_sweep_s": sweep_s,
        "index_sweep_redis_commands": sweep_commands,
        "dispatched": len(sent),
    }
    log(f"  reconcile: {result['reconcile_s_median']} s per run (median of {runs}), "
        f"{result['reconcile_redis_commands_median']} Redis commands; janitor plan {result['janitor_plan_s']} s, "
        f"{janitor_commands} commands" + (f"; index sweep {sweep_s} s, {sweep_commands} commands" if sweep_s is not None else ""))
    raw.flushdb()
    raw.close()
    store.redis.close()
    return result


def celery_keys(client: redis.Redis) -> Counter[str]:
    """The database's keys by kind: task results, chord keys by suffix, everything else."""
    kinds: Counter[str] = Counter()
    for key in client.scan_iter(count=1000):
        name = key.decode()
        if name.startswith("celery-task-meta-"):
            kinds["task results (celery-task-meta-*)"] += 1
        elif name.startswith("celery-taskset-meta-"):
            suffix = name.rsplit(".", 1)[-1] if "." in name[-3:] else "group"
            kinds[f"chord .{suffix}"] += 1
        elif name.startswith("chord-unlock-"):
            kinds["chord-unlock"] += 1
        else:
            kinds["other"] += 1
    return kinds


def cancelled_keys(rig: Rig, *, parts: int, concurrency: int, timeout: float, log: Any) -> dict[str, Any]:
    from uploader import Uploader
    from uploader.contract import PARTS_QUEUE

    part_size = 5 * MiB
    s3 = rig.s3_client()
    try:
        s3.create_bucket(Bucket=BUCKET)
    except Exception as exc:  # SeaweedFS says BucketAlreadyExists for its own buckets
        if "BucketAlreadyExists" not in str(exc) and "BucketAlreadyOwnedByYou" not in str(exc):
            raise
    name = f"cancelled-{parts}.bin"
    path = rig.make_sparse_file(name, parts * part_size)
    redis_url = rig.new_database()
    env = rig.uploader_env(redis_url, UPLOADER_MAX_BANDWIDTH=str(4 * MiB), UPLOADER_RECONCILE_INTERVAL="2",
                           UPLOADER_LEADER_LEASE_SECONDS="3")
    worker = rig.start_worker(env, name="bench-retention", concurrency=concurrency)
    uploader = Uploader(rig.settings_for(env))
    raw = redis.Redis.from_url(redis_url)
    result: dict[str, Any] = {"parts": parts, "part_size": part_size}
    try:
        t0 = time.monotonic()
        handle = uploader.submit(str(path), f"s3://{BUCKET}/{name}", part_size=part_size)
        handle.start.get(timeout=timeout)
        assert uploader.cancel(handle.upload_id) == "cancelled"
        result["cancelled_after_s"] = rnd(time.monotonic() - t0)
        deadline = time.monotonic() + timeout
        while raw.llen(PARTS_QUEUE) or raw.hlen(uploader.checkpoint.inflight_key(handle.upload_id)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"parts queue not drained within {timeout:.0f} s")
            time.sleep(0.2)
        result["drained_after_s"] = rnd(time.monotonic() - t0)
        # Let the worker finish the last messages and the recovery leader run a few times; then
        # count once nothing changed for 6 s.
        previous: Counter[str] | None = None
        stable_since = time.monotonic()
        while True:
            kinds = celery_keys(raw)
            if kinds != previous:
                previous, stable_since = kinds, time.monotonic()
            elif time.monotonic() - stable_since > 6:
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert previous is not None
        result["keys"] = dict(sorted(previous.items()))
        result["celery_keys"] = sum(v for k, v in previous.items() if k != "other")
        result["celery_bytes"] = sum(
            raw.memory_usage(k) or 0 for k in raw.scan_iter(match="celery-*", count=1000)
        )
        result["counted_after_s"] = rnd(time.monotonic() - t0)
        log(f"  cancelled {parts}-part upload: {result['celery_keys']} Celery keys left "
            f"({result['celery_bytes'] / 1024:.0f} KiB): {json.dumps(result['keys'])}")
    finally:
        worker.kill(signal.SIGKILL)
        rig.stop_service(worker)
        raw.flushdb()
        raw.close()
        uploader.close()
        path.unlink(missing_ok=True)
    return result


def run(rig: Rig, *, retained: int, active: int, parts: int, concurrency: int, timeout: float, log: Any,
        runs: int = 5) -> dict[str, Any]:
    return {
        "reconcile": reconcile_cost(rig, retained=retained, active=active, runs=runs, log=log),
        "cancelled": cancelled_keys(rig, parts=parts, concurrency=concurrency, timeout=timeout, log=log),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.retention", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--retained", type=int, default=10_000)
    parser.add_argument("--active", type=int, default=5)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--parts", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--skip-cancel", action="store_true", help="only the reconcile cost")
    args = parser.parse_args(argv)
    with Rig(None, log=print) as rig:
        rig.start_s3()
        out: dict[str, Any] = {
            "reconcile": reconcile_cost(rig, retained=args.retained, active=args.active, runs=args.runs, log=print)
        }
        if not args.skip_cancel:
            out["cancelled"] = cancelled_keys(rig, parts=args.parts, concurrency=args.concurrency,
                                              timeout=args.timeout, log=print)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
