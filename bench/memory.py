"""A worker's memory against the part size a request asks for: one large file uploaded with
parts far larger than the worker's part buffer budget (``UPLOADER_PART_BUFFER_MAX``), through one
worker whose threads all send such a part at once. The worker's peak RSS must stay near its
base plus concurrency x its own buffer (a part larger than the budget is checksummed and sent in
chunks), not grow with the part size."""

from __future__ import annotations

import threading
import time
from typing import Any

from bench import procstat
from bench.large import warm_up_multipart
from bench.rig import Rig
from bench.stats import rnd

BUCKET = "bench-memory"
MiB = 1 << 20
GiB = 1 << 30


def run(rig: Rig, *, size: int, part_size: int, concurrency: int, budgets: list[int | None], timeout: float,
        log: Any) -> dict[str, Any]:
    """``budgets``: the workers' ``UPLOADER_PART_BUFFER_MAX`` for each run (``None``: the default)."""
    from uploader import Uploader
    from uploader.transfer import stream_chunk_size

    seaweed = rig.start_s3()
    s3 = rig.s3_client()
    s3.create_bucket(Bucket=BUCKET)
    warm_up_multipart(s3, BUCKET)
    log(f"  writing a {size / MiB:.0f} MiB random file")
    path = rig.make_random_file("memory.bin", size)
    runs = []
    try:
        for budget in budgets:
            extra = {"UPLOADER_PART_BUFFER_MAX": str(budget)} if budget else {}
            env = rig.uploader_env(rig.new_database(), **extra)
            settings = rig.settings_for(env)
            worker = rig.start_worker(env, name="bench-memory", concurrency=concurrency)
            uploader = Uploader(settings)
            try:
                idle_kib = procstat.status_kib(worker.pid, "VmRSS") or 0
                # Warm-up without touching the part path: the S3 client and its connection exist.
                small = rig.make_random_file("memory-warm.bin", 1024)
                uploader.submit(str(small), f"s3://{BUCKET}/warm").wait(timeout=60)
                small.unlink()
                base_kib = procstat.status_kib(worker.pid, "VmRSS") or 0
                reset = procstat.reset_peak_rss(worker.pid)
                sampler = _RssSampler(worker.pid)
                sampler.start()
                worker0, server0 = procstat.tree_cpu_seconds(worker.pid), procstat.tree_cpu_seconds(seaweed.pid)
                epoch0, t0 = time.time(), time.perf_counter()
                status = uploader.submit(str(path), f"s3://{BUCKET}/big", part_size=part_size).wait(timeout=timeout)
                waited = time.perf_counter() - t0
                worker_cpu = procstat.tree_cpu_seconds(worker.pid) - worker0
                server_cpu = procstat.tree_cpu_seconds(seaweed.pid) - server0
                sampler.stop()
                peak_kib = procstat.status_kib(worker.pid, "VmHWM") or 0
            finally:
                uploader.close()
                rig.stop_service(worker)
            head = s3.head_object(Bucket=BUCKET, Key="big")
            s3.delete_object(Bucket=BUCKET, Key="big")
            finished = getattr(status, "finished", None)
            wall = finished - epoch0 if finished and 0 < finished - epoch0 <= waited + 0.01 else waited
            effective = settings.part_buffer_max
            streamed = part_size > effective
            held = stream_chunk_size(effective) if streamed else part_size
            growth_kib = peak_kib - base_kib
            in_flight = min(concurrency, -(-size // part_size))
            row = {
                "part_buffer_max": effective,
                "budget_is_default": budget is None,
                "parts_streamed": streamed,
                "buffer_per_thread_mib": held / MiB,
                "concurrency_x_budget_mib": concurrency * effective / MiB,
                "parts_in_flight": in_flight,
                "in_flight_x_part_size_mib": in_flight * part_size / MiB,
                "idle_rss_mib": rnd(idle_kib / 1024, 1),
                "base_rss_mib": rnd(base_kib / 1024, 1),
                "peak_rss_mib": rnd(peak_kib / 1024, 1),
                "peak_rss_sampled_mib": rnd(sampler.peak_kib / 1024, 1),
                "peak_is_this_run": reset,
                "growth_mib": rnd(growth_kib / 1024, 1),
                "within_budget": growth_kib / 1024 <= concurrency * effective / MiB,
                "wall_s": rnd(wall, 2),
                "mib_s": rnd(size / MiB / wall, 1),
                "worker_cpu_s": rnd(worker_cpu, 2),
                "worker_cpu_s_per_gib": rnd(worker_cpu / (size / GiB), 2),
                "server_cpu_s": rnd(server_cpu, 2),
                "state": status.state,
                "verified": status.verified,
                "bytes_sent": status.bytes_sent,
                "stored_size_ok": head["ContentLength"] == size,
                "rss_timeline_mib": sampler.timeline,
            }
            runs.append(row)
            log(f"  budget {effective / MiB:.0f} MiB{' (default)' if budget is None else ''}: {row['mib_s']} MiB/s, "
                f"worker RSS {row['base_rss_mib']:.0f} MiB before -> peak {row['peak_rss_mib']:.0f} MiB "
                f"(+{row['growth_mib']:.0f}; concurrency x budget {row['concurrency_x_budget_mib']:.0f}, "
                f"parts in flight x part size {row['in_flight_x_part_size_mib']:.0f}), worker CPU {row['worker_cpu_s']} s, "
                f"{status.state}, verified {status.verified}")
    finally:
        path.unlink(missing_ok=True)
    return {
        "file_size": size,
        "part_size": part_size,
        "part_count": -(-size // part_size),
        "concurrency": concurrency,
        "runs": runs,
    }


class _RssSampler:
    """The worker's VmRSS every 50 ms while it runs (a timeline, twice a second, for the JSON)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kib = 0
        self.timeline: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        t0 = time.perf_counter()
        last = -1.0
        while not self._stop.is_set():
            kib = procstat.status_kib(self.pid, "VmRSS") or 0
            self.peak_kib = max(self.peak_kib, kib)
            now = time.perf_counter() - t0
            if now - last >= 0.5:
                self.timeline.append((round(now, 2), round(kib / 1024, 1)))
                last = now
            self._stop.wait(0.05)
