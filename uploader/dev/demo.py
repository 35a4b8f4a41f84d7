"""``uploader demo``: the whole system on one machine, end to end, then cleaned up.

Uses the Redis at ``UPLOADER_BROKER_URL`` if one answers there (checkpoints under a key prefix
of its own), otherwise starts its own redis-server; always starts
its own SeaweedFS S3 server and workers; uploads a generated file with a live progress bar;
downloads the stored object and compares its SHA-256 with the source; prints a summary.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid

import boto3
from botocore.config import Config
from rich.console import Console
from rich.table import Table

from uploader.auth import new_fleet_key
from uploader.client import Uploader
from uploader.config import Settings, get_settings, redact_url
from uploader.dev.localstack import RedisServer, SeaweedS3, Worker, object_sha256, redis_answers, scratch_dir, write_random_file
from uploader.planner import format_size
from uploader.progress import show_progress

console = Console()
BUCKET = "uploader-demo"


def run_demo(*, size: int, part_size: int, workers: int, concurrency: int) -> int:
    """Run the demo; returns the process exit status (0 when the object verified)."""
    workdir = scratch_dir("uploader-demo-")
    started: list = []
    try:
        base = get_settings()
        broker = base.broker_url
        if redis_answers(broker):
            console.print(f"Redis: using the server at {redact_url(broker)}")
        else:
            server = RedisServer(workdir)
            started.append(server)
            broker = server.url
            console.print(f"Redis: none at {redact_url(base.broker_url)}; started redis-server on port {server.port}")
        s3 = SeaweedS3(workdir)
        started.append(s3)
        console.print(f"S3: started SeaweedFS (weed mini) at {s3.endpoint_url}")

        prefix = f"uploader-demo-{uuid.uuid4().hex[:8]}"
        env = {
            "UPLOADER_BROKER_URL": broker,
            "UPLOADER_RESULT_BACKEND": broker,
            "UPLOADER_CHECKPOINT_URL": broker,
            "UPLOADER_KEY_PREFIX": prefix,
            "UPLOADER_S3_ENDPOINT_URL": s3.endpoint_url,
            "UPLOADER_SOURCE_ROOTS": str(workdir),
            # This demo's own fleet: a key made for it (the client below holds none).
            "UPLOADER_FLEET_KEY": new_fleet_key(),
            "UPLOADER_WORKER_CONCURRENCY": str(concurrency),
            # SeaweedFS in this mode accepts any credentials; real deployments use boto3's chain.
            "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "demo"),
            "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "demo-secret"),
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        for i in range(workers):
            started.append(Worker(workdir, env, name=f"demo-{i}", concurrency=concurrency))
        console.print(f"Workers: {workers} process(es) x {concurrency} threads, logs in {workdir}")

        source = workdir / "demo-source.bin"
        console.print(f"Generating {format_size(size)} of random data ...")
        source_sha = write_random_file(source, size)

        settings = Settings(
            broker_url=broker, checkpoint_url=broker, result_backend=broker, key_prefix=prefix,
            s3_endpoint_url=s3.endpoint_url, source_roots=(workdir,),
        )
        client = boto3.client(
            "s3", endpoint_url=s3.endpoint_url, region_name="us-east-1",
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            config=Config(request_checksum_calculation="when_required", response_checksum_validation="when_required"),
        )
        client.create_bucket(Bucket=BUCKET)
        up = Uploader(settings)
        began = time.monotonic()
        handle = up.submit(str(source), f"s3://{BUCKET}/demo-source.bin", part_size=part_size)
        console.print(f"Submitted upload {handle.upload_id}")
        last = show_progress(handle.watch(timeout=3600))
        elapsed = time.monotonic() - began
        if last is None or last.state != "completed":
            console.print(f"[red]upload ended {last.state if last else 'unknown'}: {last.error if last else ''}")
            return 1

        console.print("Verifying: downloading the stored object and hashing it ...")
        stored_sha = object_sha256(client, BUCKET, "demo-source.bin")
        ok = stored_sha == source_sha
        table = Table(title="uploader demo", show_header=False)
        for name, value in [
            ("object", f"s3://{BUCKET}/demo-source.bin"),
            ("size", f"{format_size(size)} ({size} bytes)"),
            ("parts", f"{last.part_count} x {format_size(last.part_size)}"),
            ("time", f"{elapsed:.2f} s (submit to completed)"),
            ("throughput", f"{size / (1 << 20) / elapsed:.1f} MiB/s"),
            ("ETag", f"{last.final_etag} (server check: {last.verified})"),
            ("sha256", f"{stored_sha} {'matches the source' if ok else 'DIFFERS from the source ' + source_sha}"),
        ]:
            table.add_row(f"[bold]{name}", value)
        console.print(table)
        up.close()
        return 0 if ok else 1
    finally:
        for process in reversed(started):
            process.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        console.print("Cleaned up the processes and files the demo started.")


