"""The submitting client of the scaling scenario, run by ``bench/scaling.py`` inside the
server network namespace (``ip netns exec <server> python -m bench.scaling_client``), where
Redis and the S3 server listen: the benchmark's own process stays in the root namespace and has
no route there.

One JSON request per line on stdin, one JSON answer per line on stdout:

- ``{"op": "ready", "bucket": B, "timeout": s}``: wait for Redis and the S3 server to answer,
  create the bucket and warm SeaweedFS up (it creates its volumes on the first writes).
- ``{"op": "upload", "path": P, "bucket": B, "key": K, "part_size": n, "timeout": s, "sha256": hex}``:
  ``submit`` + ``wait``; wall = submit -> the worker's completion stamp; then the object is read
  back (size and SHA-256 against the source) and deleted.

Settings come from the ``UPLOADER_*`` and ``AWS_*`` environment the benchmark passes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import traceback
from typing import Any


def main() -> int:
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr  # nothing a library prints may corrupt the answers

    from bench.large import warm_up_multipart
    from uploader import Uploader
    from uploader.config import Settings
    from uploader.storage.adapter import ObjectStore

    settings = Settings()
    uploader = Uploader(settings)
    s3 = ObjectStore(settings).client  # the workers' own client configuration

    def ready(req: dict[str, Any]) -> dict[str, Any]:
        deadline = time.monotonic() + req.get("timeout", 60)
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                uploader.checkpoint.redis.ping()
                s3.list_buckets()
                break
            except Exception as exc:  # not up yet
                last = exc
                time.sleep(0.2)
        else:
            raise TimeoutError(f"Redis or S3 did not answer in the server namespace: {last}")
        bucket = req["bucket"]
        s3.create_bucket(Bucket=bucket)
        warm_up_multipart(s3, bucket)
        return {"ok": True}

    def upload(req: dict[str, Any]) -> dict[str, Any]:
        bucket, key, size = req["bucket"], req["key"], os.path.getsize(req["path"])
        epoch0, t0 = time.time(), time.perf_counter()
        handle = uploader.submit(req["path"], f"s3://{bucket}/{key}", part_size=req["part_size"])
        status = handle.wait(timeout=req["timeout"])
        waited = time.perf_counter() - t0
        finished = status.finished
        wall = finished - epoch0 if finished and 0 < finished - epoch0 <= waited + 0.01 else waited
        result: dict[str, Any] = {
            "ok": True,
            "submitted_epoch": epoch0,
            "finished_epoch": finished,
            "wall_s": wall,
            "waited_s": waited,
            "state": status.state,
            "verified": status.verified,
            "part_count": status.part_count,
            "bytes_sent": status.bytes_sent,
            "upload_id": handle.upload_id,
        }
        head = s3.head_object(Bucket=bucket, Key=key)
        result["stored_size"] = head["ContentLength"]
        problems = []
        if head["ContentLength"] != size:
            problems.append(f"stored size {head['ContentLength']} != {size}")
        if req.get("sha256"):
            t1 = time.perf_counter()
            digest = hashlib.sha256()
            body = s3.get_object(Bucket=bucket, Key=key)["Body"]
            for chunk in body.iter_chunks(1 << 20):
                digest.update(chunk)
            result["sha256_s"] = time.perf_counter() - t1
            result["sha256_ok"] = digest.hexdigest() == req["sha256"]
            if not result["sha256_ok"]:
                problems.append("SHA-256 of the stored object differs from the source")
        if problems:
            result.update(ok=False, error="; ".join(problems))
        s3.delete_object(Bucket=bucket, Key=key)
        return result

    handlers = {"ready": ready, "upload": upload}
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            answer = handlers[req["op"]](req)
        except Exception as exc:
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:3000], "trace": traceback.format_exc(limit=6)}
        out.write(json.dumps(answer) + "\n")
    uploader.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
