"""The project's own per-part path (read, checksum, UploadPart) without Celery or the
checkpoint, in a process of its own, so that its CPU can be set against the worker's.

    python -m bench.breakdown_child --stage read|checksum|upload --file F --bucket B --endpoint URL

Prints one JSON line with the wall and CPU seconds of the transfer (imports excluded).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", choices=["read", "checksum", "upload"], required=True)
    parser.add_argument("--file", required=True)
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--key", default="breakdown")
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--part-size", type=int, default=8 << 20)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)

    from uploader.checksums import crc32_b64, md5_b64
    from uploader.config import Settings
    from uploader.planner import plan_parts
    from uploader.sources import open_source
    from uploader.storage.adapter import ObjectStore

    path = Path(args.file)
    settings = Settings(
        s3_endpoint_url=args.endpoint, source_roots=(path.parent,), worker_concurrency=args.concurrency,
        broker_url="redis://127.0.0.1:1/0",  # unused
    )
    checksum = crc32_b64 if settings.part_checksum == "crc32" else md5_b64
    source = open_source(str(path), settings.source_roots)
    fingerprint = source.fingerprint()
    plan = plan_parts(fingerprint.size, args.part_size)

    cpu0, t0 = _cpu(), time.perf_counter()
    store = ObjectStore(settings) if args.stage == "upload" else None
    mpu = store.create_multipart_upload(args.bucket, args.key, metadata=None, content_type=None) if store else ""

    def part(number: int):
        offset, length = plan.part_range(number)
        data = source.read_range(offset, length, fingerprint)
        if args.stage == "checksum":
            checksum(data)
        elif store is not None:
            return number, store.upload_part(args.bucket, args.key, mpu, number, data)
        return None

    with ThreadPoolExecutor(args.concurrency) as pool:
        done = [r for r in pool.map(part, range(1, plan.count + 1)) if r]
    if store is not None:
        store.complete_multipart_upload(args.bucket, args.key, mpu, done)
    wall = time.perf_counter() - t0
    user, sys_ = (b - a for a, b in zip(cpu0, _cpu(), strict=True))
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"wall_s": wall, "cpu_s": user + sys_, "sys_s": sys_, "vmhwm_kib": peak, "checksum": settings.part_checksum}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
