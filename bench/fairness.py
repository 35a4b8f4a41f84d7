"""Fairness between uploads: small uploads submitted while a 10,000-part upload is being sent.

Two workers of concurrency 4 on SeaweedFS. A 10,000-part upload (5 MiB parts of a sparse file,
49 GiB) is started and cancelled after the measurements. It is paced (``--big-rate``, default
64 MiB/s: every worker slot stays busy, each part taking about 0.6 s): on this machine the S3
server shares the two cores with the workers, and unpaced (``--big-rate 0``) the figure would be
the server's CPU contention, which a fleet with its storage elsewhere does not have;
once it is sending, small uploads are submitted one after the other and their latency measured:
from ``submit`` to the completion stamp the worker writes (the same clock: one machine). The
same small uploads on the idle fleet first give the reference. Two kinds of small upload:

- 1 MiB: a single PUT, made by the start task itself (the control queue);
- 16 MiB in 5 MiB parts: a multipart upload, whose parts queue with the big one's.

Each is measured with the part lanes (``UPLOADER_PART_LANES``, default 8; workers/lanes.py) and,
for contrast, with one lane (one first-in-first-out parts queue, as before the lanes; a small
multipart upload then waits for the 10,000 parts: reported as the timeout). Then two 80 MiB
uploads submitted together: how far the second had got when the first completed::

    python -m bench.fairness                  # about 3 minutes
    python -m bench.fairness --samples 10

Results go to ``bench/results/fairness.json`` and ``fairness.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from bench.report import write_scenario
from bench.rig import Rig
from bench.stats import rnd

BUCKET = "bench-fairness"
MiB = 1 << 20
PART = 5 * MiB
BIG_PARTS = 10_000
#: The big upload's pace (see the module docstring).
BIG_RATE = 64 * MiB
SMALL_KINDS = {"1MiB": MiB, "16MiB": 16 * MiB}


def _latency(uploader: Any, path: Path, key: str, timeout: float) -> tuple[float, float] | None:
    """Seconds from submit to the worker's completion stamp, and of them the wait before the
    coordinator created the record (the start message queued); None past ``timeout`` (cancelled)."""
    started = time.time()
    handle = uploader.submit(str(path), f"s3://{BUCKET}/{key}", part_size=PART)
    status = _wait(uploader, handle, timeout)
    if status is None or status.state != "completed":
        uploader.cancel(handle.upload_id)
        return None
    record = uploader.checkpoint.get(handle.upload_id)
    assert record is not None and record.finished is not None
    return record.finished - started, record.created - started


def _wait(uploader: Any, handle: Any, timeout: float) -> Any:
    """The upload's terminal status, polled every 10 ms (``wait`` polls less often: its interval
    would be most of a small upload's latency); None past ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = uploader.status(handle.upload_id)
        except Exception:  # not created yet
            status = None
        if status is not None and status.terminal:
            return status
        time.sleep(0.01)
    return None


def _small_runs(uploader: Any, files: dict[str, Path], samples: int, timeout: float, tag: str) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    for kind, path in files.items():
        measured = [_latency(uploader, path, f"{tag}-{kind}-{i}", timeout) for i in range(samples)]
        done = [x for x in measured if x is not None]
        runs[kind] = {"samples": [rnd(x[0], 3) if x is not None else None for x in measured],
                      "median_s": rnd(statistics.median(x[0] for x in done), 3) if done else None,
                      "median_start_wait_s": rnd(statistics.median(x[1] for x in done), 3) if done else None,
                      "timed_out": len(measured) - len(done)}
    return runs


def _medians(runs: dict[str, Any]) -> str:
    return ", ".join(f"{kind} median {run['median_s']} s (start wait {run['median_start_wait_s']} s, "
                     f"{run['timed_out']} timed out)" for kind, run in runs.items())


def _busy(rig: Rig, uploader: Any, big: Path, files: dict[str, Path], samples: int, timeout: float, tag: str,
          big_rate: int, log: Any) -> dict[str, Any]:
    paced = {"max_bandwidth": big_rate} if big_rate else {}
    handle = uploader.submit(str(big), f"s3://{BUCKET}/{tag}-big.bin", part_size=PART, **paced)
    handle.accepted(120)
    deadline = time.monotonic() + 120
    while uploader.status(handle.upload_id).parts_done < 8:  # sending, with every slot taken
        if time.monotonic() > deadline:
            raise RuntimeError("the 10,000-part upload did not start sending")
        time.sleep(0.1)
    try:
        runs = _small_runs(uploader, files, samples, timeout, tag)
        big_status = uploader.status(handle.upload_id)
        log(f"  busy ({tag}): {_medians(runs)}; the big upload at {big_status.parts_done} of {big_status.part_count} parts")
        return runs
    finally:
        uploader.cancel(handle.upload_id)


def _pair(uploader: Any, paths: list[Path], timeout: float) -> dict[str, Any]:
    handles = [uploader.submit(str(p), f"s3://{BUCKET}/pair-{i}.bin", part_size=PART) for i, p in enumerate(paths)]
    for handle in handles:
        handle.accepted(60)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        statuses = [uploader.status(h.upload_id) for h in handles]
        if any(s.terminal for s in statuses):
            break
        time.sleep(0.02)
    first = next(s for s in statuses if s.terminal)
    other = next(s for s in statuses if s is not first)
    for handle in handles:
        handle.wait(timeout=timeout)
    return {"first_done_parts": first.parts_done, "other_done_parts": other.parts_done, "parts": other.part_count,
            "other_progress": rnd(other.parts_done / other.part_count, 3)}


def run(rig: Rig, *, samples: int, timeout: float, big_rate: int, log: Any) -> dict[str, Any]:
    from uploader import Uploader

    rig.start_s3()
    rig.s3_client().create_bucket(Bucket=BUCKET)
    big = rig.sources / "big-sparse.bin"
    big.parent.mkdir(parents=True, exist_ok=True)
    with open(big, "wb") as f:
        f.truncate(BIG_PARTS * PART)
    files = {kind: rig.make_random_file(f"small-{kind}.bin", size) for kind, size in SMALL_KINDS.items()}
    pair_files = [rig.make_random_file(f"pair-{i}.bin", 16 * PART) for i in range(2)]
    result: dict[str, Any] = {"workers": 2, "worker_concurrency": 4, "part_size": PART, "big_parts": BIG_PARTS,
                              "big_rate": big_rate, "samples": samples}
    for lanes in (8, 1):
        env = rig.uploader_env(rig.new_database(), UPLOADER_PART_LANES=str(lanes))
        workers = [rig.start_worker(env, name=f"bench-fair-{lanes}-{i}", concurrency=4) for i in range(2)]
        uploader = Uploader(rig.settings_for(env))
        try:
            section: dict[str, Any] = {}
            if lanes == 8:
                section["idle"] = _small_runs(uploader, files, samples, timeout, "idle")
                log(f"  idle: {_medians(section['idle'])}")
            section["busy"] = _busy(rig, uploader, big, files, samples if lanes == 8 else 1, timeout, f"lanes{lanes}",
                                    big_rate, log)
            section["pair"] = _pair(uploader, pair_files, 600)
            log(f"  two uploads together ({lanes} lanes): the second at {section['pair']['other_progress']:.0%} "
                "when the first completed")
            result[f"lanes_{lanes}"] = section
        finally:
            uploader.close()
            for worker in workers:
                rig.stop_service(worker)
    idle = result["lanes_8"]["idle"]
    for lanes in (8, 1):
        busy = result[f"lanes_{lanes}"]["busy"]
        result[f"lanes_{lanes}"]["ratio_to_idle"] = {
            kind: rnd(busy[kind]["median_s"] / idle[kind]["median_s"], 2) if busy[kind]["median_s"] else None for kind in busy
        }
    return result


def markdown(result: dict[str, Any]) -> str:
    idle = result["lanes_8"]["idle"]
    pace = f"paced to {result['big_rate'] / MiB:g} MiB/s" if result["big_rate"] else "unpaced"
    lines = [
        "# Fairness between uploads (`python -m bench.fairness`)",
        "",
        f"{result['workers']} workers x {result['worker_concurrency']} threads, SeaweedFS on loopback. Busy: while a "
        f"{result['big_parts']:,}-part upload ({result['part_size'] // MiB} MiB parts, {pace}) is being sent. Latency: submit to the worker's completion stamp, "
        f"median of {result['samples']} (one with one lane).",
        "",
        "| small upload | idle, s | busy, 8 lanes, s | ratio | busy, 1 lane (FIFO), s | ratio |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for kind in idle:
        cells = [kind, str(idle[kind]["median_s"])]
        for lanes in (8, 1):
            busy = result[f"lanes_{lanes}"]["busy"][kind]
            ratio = result[f"lanes_{lanes}"]["ratio_to_idle"][kind]
            cells += [str(busy["median_s"]) if busy["median_s"] is not None else "timed out",
                      f"{ratio}x" if ratio is not None else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Two 80 MiB uploads (16 parts) submitted together: parts the second had done when the first completed.", "",
              "| lanes | second upload's progress |", "| --- | --- |"]
    for lanes in (8, 1):
        pair = result[f"lanes_{lanes}"]["pair"]
        lines.append(f"| {lanes} | {pair['other_done_parts']} of {pair['parts']} ({pair['other_progress']:.0%}) |")
    return "\n".join(lines) + "\n"


def main() -> int:
    from uploader.planner import parse_size

    parser = argparse.ArgumentParser(prog="python -m bench.fairness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=30, help="seconds per small upload before it counts as timed out")
    parser.add_argument("--big-rate", type=parse_size, default=BIG_RATE, help="pace the big upload (max_bandwidth); 0: unpaced")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    with Rig() as rig:
        result = run(rig, samples=args.samples, timeout=args.timeout, big_rate=args.big_rate, log=print)
    write_scenario(args.out, "fairness", result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
