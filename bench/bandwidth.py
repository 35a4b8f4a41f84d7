"""Fleet-wide bandwidth limit (``max_bandwidth``): one upload sent by 4 workers held to its rate.

One random file sized for ``--seconds`` (default 30) at ``--rate`` (default 8 MiB/s), 8 MiB
parts, ``--workers`` (default 4) workers of concurrency 4 on SeaweedFS, all drawing from the
upload's token bucket in Redis. The report gives the rate over the whole upload
(size / (completed - created), CreateMultipartUpload and Complete included), and the rate in
each 5-second window, from the bytes drawn from the bucket (its ``drawn`` counter, sampled every
0.2 s: bytes are drawn a chunk at a time as they are read for the socket); then the same file
without the limit, for contrast::

    python -m bench.bandwidth                       # 4 workers, 8 MiB/s, 30 s
    python -m bench.bandwidth --rate 16MiB --seconds 20

Results go to ``bench/results/bandwidth.json`` and ``bandwidth.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from bench.report import write_scenario
from bench.rig import Rig
from bench.stats import rnd

BUCKET = "bench-bandwidth"
MiB = 1 << 20
PART = 8 * MiB
WINDOW = 5.0


def _upload(rig: Rig, uploader: Any, path: Path, key: str, timeout: float, **options: Any) -> dict[str, Any]:
    handle = uploader.submit(str(path), f"s3://{BUCKET}/{key}", part_size=PART, **options)
    handle.accepted(60)
    store = uploader.checkpoint
    samples: list[tuple[float, int]] = []
    deadline = time.monotonic() + timeout
    while True:
        status = uploader.status(handle.upload_id)
        samples.append((time.monotonic(), int(store.redis.hget(store.rate_key(handle.upload_id), "drawn") or 0)))
        if status.terminal or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    record = store.get(handle.upload_id)
    assert record is not None and record.finished is not None, f"{key}: {status.state} {status.error}"
    windows = []
    first = next((t for t, drawn in samples if drawn), None)  # the first draw
    while first is not None and first + WINDOW <= samples[-1][0]:
        at_start = max(d for t, d in samples if t <= first)
        at_end = max(d for t, d in samples if t <= first + WINDOW)
        windows.append(rnd((at_end - at_start) / MiB / WINDOW, 2))
        first += WINDOW
    whole = record.size / (record.finished - record.created)
    return {
        "state": record.state.value, "size": record.size, "seconds": rnd(record.finished - record.created, 2),
        "mib_per_s": rnd(whole / MiB, 2), "windows_mib_per_s": windows, "bytes_sent": record.bytes_sent,
    }


def run(rig: Rig, *, rate: int, seconds: float, workers: int, timeout: float, log: Any) -> dict[str, Any]:
    from uploader import Uploader

    rig.start_s3()
    s3 = rig.s3_client()
    s3.create_bucket(Bucket=BUCKET)
    size = int(rate * seconds) // PART * PART
    path = rig.make_random_file("bandwidth.bin", size)
    env = rig.uploader_env(rig.new_database())
    started = [rig.start_worker(env, name=f"bench-bw-{i}", concurrency=4) for i in range(workers)]
    uploader = Uploader(rig.settings_for(env))
    try:
        limited = _upload(rig, uploader, path, "limited.bin", timeout, max_bandwidth=rate)
        limited["error_vs_limit"] = rnd(limited["mib_per_s"] / (rate / MiB) - 1, 4)
        log(f"  limited to {rate / MiB:g} MiB/s: {limited['mib_per_s']} MiB/s over {limited['seconds']} s "
            f"({limited['error_vs_limit']:+.1%}); 5 s windows {limited['windows_mib_per_s']}")
        free = _upload(rig, uploader, path, "free.bin", timeout)
        log(f"  unlimited: {free['mib_per_s']} MiB/s over {free['seconds']} s")
    finally:
        uploader.close()
        for worker in started:
            rig.stop_service(worker)
    return {"rate": rate, "workers": workers, "worker_concurrency": 4, "part_size": PART, "file_size": size,
            "limited": limited, "unlimited": free}


def markdown(result: dict[str, Any]) -> str:
    lim, free = result["limited"], result["unlimited"]
    return "\n".join([
        "# Fleet-wide bandwidth limit (`python -m bench.bandwidth`)",
        "",
        f"{result['workers']} workers x {result['worker_concurrency']} threads, one {result['file_size'] / MiB:.0f} MiB upload "
        f"in {result['part_size'] / MiB:.0f} MiB parts, `max_bandwidth` = {result['rate'] / MiB:g} MiB/s, SeaweedFS on loopback.",
        "",
        "| run | seconds | MiB/s (whole upload) | vs the limit | 5 s windows from the first draw, MiB/s drawn from the bucket |",
        "| --- | --- | --- | --- | --- |",
        f"| limited | {lim['seconds']} | {lim['mib_per_s']} | {lim['error_vs_limit']:+.1%} | "
        f"{', '.join(map(str, lim['windows_mib_per_s']))} |",
        f"| unlimited | {free['seconds']} | {free['mib_per_s']} | | (no bucket) |",
        "",
    ])


def main() -> int:
    from uploader.planner import parse_size

    parser = argparse.ArgumentParser(prog="python -m bench.bandwidth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=parse_size, default=8 * MiB)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    with Rig() as rig:
        result = run(rig, rate=args.rate, seconds=args.seconds, workers=args.workers, timeout=args.timeout, log=print)
    write_scenario(args.out, "bandwidth", result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
