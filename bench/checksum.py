"""Checksum cost: CPU seconds per GiB of each part checksum algorithm, and the upload
throughput of one file with the whole-object checksum (FULL_OBJECT) on and off.

*CPU per GiB.* :func:`uploader.checksums.checksums_b64` (what a worker runs over each part) over
``--cpu-size`` of random bytes in 8 MiB chunks, for each algorithm (and OSS's CRC-64/ECMA, alone
and with MD5 in one pass, as the ``oss`` profile computes them), the process's CPU time
(``time.process_time``) scaled to a GiB; best of ``--repeats``. Then the combine of 10,000 part
checksums into the whole object's, which is all FULL_OBJECT adds at completion.

*Throughput.* One random file (``--size``, default 1 GiB), 8 MiB parts, one worker
(concurrency 8) on SeaweedFS, interleaved variants, ``--repeats`` each, medians:
``baseline`` (CRC32 without a checksum type: composite, what ``main`` does), ``crc32-full``,
``crc32c-full``, ``crc64nvme-full`` (FULL_OBJECT, the combined value verified by the server on
Complete) and ``crc32c-composite`` (``UPLOADER_FULL_OBJECT_CHECKSUM=false``)::

    python -m bench.checksum                      # 1 GiB, 3 repeats
    python -m bench.checksum --size 256MiB --repeats 1
    python -m bench --scenarios checksum --merge  # into bench/results/latest.*
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

from bench.procstat import tree_cpu_seconds
from bench.rig import Rig
from bench.stats import rnd

BUCKET = "bench-checksum"
MiB = 1 << 20
GiB = 1 << 30

#: (name, request checksum_algorithm, UPLOADER_FULL_OBJECT_CHECKSUM)
VARIANTS = (
    ("baseline", None, "false"),
    ("crc32-full", "CRC32", "true"),
    ("crc32c-full", "CRC32C", "true"),
    ("crc64nvme-full", "CRC64NVME", "true"),
    ("crc32c-composite", "CRC32C", "false"),
)


def cpu_per_gib(size: int, repeats: int) -> dict[str, Any]:
    from uploader.checksums import CRC64ECMA, ChecksumAlgorithm, checksums_b64, combine_crc

    chunk = os.urandom(8 * MiB)
    chunks = max(1, size // len(chunk))
    out: dict[str, Any] = {}
    # Each part checksum; then OSS's CRC-64/ECMA alone, and what the oss profile runs over each
    # part (Content-MD5 and the CRC-64/ECMA in the same pass).
    variants: list[tuple[str, tuple[Any, ...]]] = [(a.value, (a,)) for a in ChecksumAlgorithm]
    variants += [("CRC64ECMA", (CRC64ECMA,)), ("MD5+CRC64ECMA", (ChecksumAlgorithm.MD5, CRC64ECMA))]
    for name, algorithms in variants:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.process_time()
            checksums_b64((chunk for _ in range(chunks)), algorithms)
            best = min(best, time.process_time() - t0)
        out[name] = rnd(best * GiB / (chunks * len(chunk)), 3)
    parts = [("AAAAAA==", 8 * MiB)] * 10_000
    t0 = time.process_time()
    combine_crc(ChecksumAlgorithm.CRC32C, parts)
    out["combine_10000_parts_ms"] = rnd((time.process_time() - t0) * 1000, 2)
    return out


def throughput(rig: Rig, *, size: int, repeats: int, timeout: float, log: Any) -> dict[str, Any]:
    from uploader import Uploader

    rig.start_s3()
    s3 = rig.s3_client()
    s3.create_bucket(Bucket=BUCKET)
    path = rig.make_random_file("checksum.bin", size)
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in VARIANTS}
    workers = {}
    for name, _, full in VARIANTS:
        env = rig.uploader_env(rig.new_database(), UPLOADER_FULL_OBJECT_CHECKSUM=full)
        workers[name] = (rig.start_worker(env, name=f"bench-{name}", concurrency=8), Uploader(rig.settings_for(env)))
    try:
        for repeat in range(repeats):
            for name, algorithm, _ in VARIANTS:
                worker, uploader = workers[name]
                options = {"checksum_algorithm": algorithm} if algorithm else {}
                cpu0 = tree_cpu_seconds(worker.pid)
                t0 = time.perf_counter()
                status = uploader.submit(str(path), f"s3://{BUCKET}/{name}", part_size=8 * MiB, **options).wait(timeout=timeout)
                wall = time.perf_counter() - t0
                cpu = tree_cpu_seconds(worker.pid) - cpu0
                sample = {
                    "seconds": rnd(wall, 2), "mib_per_s": rnd(size / MiB / wall, 1),
                    "worker_cpu_s_per_gib": rnd(cpu * GiB / size, 2),
                    "state": status.state, "verified": status.verified, "checksum_type": status.checksum_type,
                }
                samples[name].append(sample)
                log(f"  {name:18} run {repeat + 1}: {sample['mib_per_s']} MiB/s, worker {sample['worker_cpu_s_per_gib']} "
                    f"CPU s/GiB, {status.state} ({status.verified})")
                s3.delete_object(Bucket=BUCKET, Key=name)
    finally:
        for worker, uploader in workers.values():
            uploader.close()
            rig.stop_service(worker)
    medians = {
        name: {
            "mib_per_s": rnd(statistics.median(s["mib_per_s"] for s in runs), 1),
            "worker_cpu_s_per_gib": rnd(statistics.median(s["worker_cpu_s_per_gib"] for s in runs), 2),
            "verified": runs[-1]["verified"],
        }
        for name, runs in samples.items()
    }
    base = medians["baseline"]["mib_per_s"]
    for m in medians.values():
        m["vs_baseline"] = rnd(m["mib_per_s"] / base, 3) if base else None
    return {"file_size": size, "part_size": 8 * MiB, "repeats": repeats, "medians": medians, "samples": samples}


def run(rig: Rig, *, size: int, repeats: int, cpu_size: int, timeout: float, log: Any) -> dict[str, Any]:
    cpu = cpu_per_gib(cpu_size, repeats)
    log("  CPU s/GiB: " + ", ".join(f"{k} {v}" for k, v in cpu.items()))
    return {"cpu_s_per_gib": cpu, "throughput": throughput(rig, size=size, repeats=repeats, timeout=timeout, log=log)}


def main() -> int:
    from uploader.planner import parse_size

    parser = argparse.ArgumentParser(prog="python -m bench.checksum", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=GiB)
    parser.add_argument("--cpu-size", type=parse_size, default=GiB)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    with Rig() as rig:
        result = run(rig, size=args.size, repeats=args.repeats, cpu_size=args.cpu_size, timeout=args.timeout, log=print)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
