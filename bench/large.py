"""The core scenario: one large random file, every tool, interleaved runs, medians."""

from __future__ import annotations

import time
import traceback
from typing import Any

from bench import procstat
from bench.rig import Rig
from bench.stats import median, ratio, rnd
from bench.tools import ALL_TOOLS, OPTIONAL_TOOLS, MiB, Tool, UploaderTool

GiB = 1 << 30
BUCKET = "bench-large"


def verify(s3: Any, bucket: str, key: str, size: int) -> str | None:
    """``None`` when the object exists with the right size, else what is wrong."""
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except Exception as exc:
        return f"HeadObject failed: {exc}"
    if head["ContentLength"] != size:
        return f"stored size {head['ContentLength']} != {size}"
    return None


def warm_up(rig: Rig, s3: Any, bucket: str) -> None:
    """SeaweedFS creates its volumes on the first writes: do that before anything is timed."""
    body = b"\0" * (8 * MiB)
    for i in range(4):
        s3.put_object(Bucket=bucket, Key=f"warm-up/{i}", Body=body)
    warm_up_multipart(s3, bucket)
    for key in [f"warm-up/{i}" for i in range(4)]:
        s3.delete_object(Bucket=bucket, Key=key)


def warm_up_multipart(s3: Any, bucket: str) -> None:
    """One two-part multipart upload, completed and deleted (its first one is slow on SeaweedFS)."""
    body = b"\0" * (8 * MiB)
    mpu = s3.create_multipart_upload(Bucket=bucket, Key="warm-up/mpu")["UploadId"]
    parts = []
    for n in (1, 2):
        etag = s3.upload_part(Bucket=bucket, Key="warm-up/mpu", UploadId=mpu, PartNumber=n, Body=body)["ETag"]
        parts.append({"PartNumber": n, "ETag": etag})
    s3.complete_multipart_upload(Bucket=bucket, Key="warm-up/mpu", UploadId=mpu, MultipartUpload={"Parts": parts})
    s3.delete_object(Bucket=bucket, Key="warm-up/mpu")


def run(rig: Rig, *, size: int, repeats: int, part_size: int, concurrency: int, tools: list[str] | None,
        timeout: float, log: Any, settle: float = 1.0, keep_uploader: bool = True) -> tuple[dict[str, Any], UploaderTool | None]:
    """Returns the scenario's results and the prepared project tool (its worker still running,
    for the profile and the small-object scenario), if it ran."""
    seaweed = rig.start_s3()
    s3 = rig.s3_client()
    s3.create_bucket(Bucket=BUCKET)
    warm_up(rig, s3, BUCKET)

    chosen = [cls for cls in ALL_TOOLS + OPTIONAL_TOOLS if cls.key in tools] if tools else list(ALL_TOOLS)
    instances: list[Tool] = [cls(part_size, concurrency, timeout) for cls in chosen]
    info: dict[str, dict[str, Any]] = {}
    runnable: list[Tool] = []
    for tool in instances:
        reason = tool.missing()
        info[tool.key] = {"label": tool.label, "version": "" if reason else tool.version(), "rss_note": tool.rss_note}
        if reason:
            info[tool.key]["status"] = reason
            log(f"  {tool.key}: {reason}")
            continue
        try:
            tool.prepare(rig)
        except Exception as exc:
            info[tool.key]["status"] = f"failed to start: {exc}"
            log(f"  {tool.key}: failed to start: {exc}")
            continue
        info[tool.key]["status"] = "ran"
        runnable.append(tool)

    log(f"  writing a {size / MiB:.0f} MiB random file")
    path = rig.make_random_file("large.bin", size)

    samples: list[dict[str, Any]] = []
    for repeat in range(repeats):
        for tool in runnable:
            key = f"{tool.key}/{repeat}"
            sample: dict[str, Any] = {"tool": tool.key, "repeat": repeat, "ok": False}
            server0 = procstat.tree_cpu_seconds(seaweed.pid)
            try:
                cost = tool.upload(rig, path, BUCKET, key)
            except Exception as exc:
                sample["server_cpu_s"] = rnd(procstat.tree_cpu_seconds(seaweed.pid) - server0)
                sample["error"] = f"{type(exc).__name__}: {exc}"[:2000]
                log(f"  {tool.key} #{repeat + 1}: FAILED {sample['error'][:300]}")
                if not isinstance(exc, (RuntimeError, TimeoutError, OSError)):
                    log(traceback.format_exc(limit=5))
            else:
                server_cpu = procstat.tree_cpu_seconds(seaweed.pid) - server0
                problem = verify(s3, BUCKET, key, size)
                sample.update(
                    ok=problem is None,
                    wall_s=rnd(cost.wall_s),
                    mib_s=rnd(size / MiB / cost.wall_s, 1),
                    cpu_s=rnd(cost.cpu_s),
                    peak_rss_mib=rnd(cost.peak_rss_kib / 1024, 1) if cost.peak_rss_kib else None,
                    server_cpu_s=rnd(server_cpu),
                    **cost.detail,
                )
                if problem:
                    sample["error"] = problem
                log(
                    f"  {tool.key:10s} #{repeat + 1}: {sample['mib_s']:7.1f} MiB/s  wall {cost.wall_s:6.2f} s  "
                    f"client CPU {cost.cpu_s:5.2f} s  server CPU {server_cpu:5.2f} s"
                    + (f"  rss {sample['peak_rss_mib']:.0f} MiB" if sample.get("peak_rss_mib") else "")
                    + (f"  BAD: {problem}" if problem else "")
                )
            samples.append(sample)
            try:
                s3.delete_object(Bucket=BUCKET, Key=key)
            except Exception:
                pass
            time.sleep(settle)

    project = next((t for t in runnable if type(t) is UploaderTool), None)
    for tool in runnable:
        if tool is not project or not keep_uploader:
            tool.close()
    if project is not None:
        info[project.key]["worker_lifetime_peak_rss_mib"] = rnd(project.lifetime_peak_kib / 1024, 1)
        info[project.key]["peak_rss_is_per_run"] = project.rss_reset_works

    summary = summarize(samples, info, size)
    result = {
        "file_size": size,
        "part_size": part_size,
        "concurrency": concurrency,
        "repeats": repeats,
        "order": [t.key for t in runnable],
        "tools": info,
        "summary": summary,
        "samples": samples,
        "source": str(path),
    }
    return result, project


def summarize(samples: list[dict[str, Any]], info: dict[str, dict[str, Any]], size: int) -> dict[str, dict[str, Any]]:
    gib = size / GiB
    out: dict[str, dict[str, Any]] = {}
    for key in info:
        good = [s for s in samples if s["tool"] == key and s["ok"]]
        runs = [s for s in samples if s["tool"] == key]
        if not runs:
            continue
        row: dict[str, Any] = {"runs": len(runs), "ok_runs": len(good)}
        if good:
            walls = [s["wall_s"] for s in good]
            rates = [s["mib_s"] for s in good]
            row.update(
                wall_s=rnd(median(walls)),
                mib_s=rnd(median(rates), 1),
                mib_s_min=min(rates),
                mib_s_max=max(rates),
                cpu_s=rnd(median(s["cpu_s"] for s in good)),
                cpu_s_per_gib=rnd(median(s["cpu_s"] for s in good) / gib, 2),
                peak_rss_mib=rnd(median(s.get("peak_rss_mib") for s in good), 1),
                server_cpu_s=rnd(median(s["server_cpu_s"] for s in good)),
                server_cpu_s_per_gib=rnd(median(s["server_cpu_s"] for s in good) / gib, 2),
            )
            if key.startswith("uploader"):
                row["worker_cpu_s"] = rnd(median(s.get("worker_cpu_s") for s in good))
                row["client_cpu_s"] = rnd(median(s.get("client_cpu_s") for s in good))
                row["bytes_sent_ratio"] = rnd(median((s.get("bytes_sent") or 0) / size for s in good), 4)
                row["rss_before_run_mib"] = rnd(median(s.get("rss_before_run_mib") for s in good), 1)
        else:
            row["error"] = runs[-1].get("error", "failed")
        out[key] = row
    ref_wall = out.get("s5cmd", {}).get("wall_s")
    ref_s5 = out.get("s5cmd", {}).get("mib_s")
    ref_boto = out.get("boto3", {}).get("mib_s")
    for row in out.values():
        row["wall_vs_s5cmd"] = rnd(ratio(row.get("wall_s"), ref_wall), 2)
        row["throughput_vs_s5cmd"] = rnd(ratio(row.get("mib_s"), ref_s5), 2)
        row["throughput_vs_boto3"] = rnd(ratio(row.get("mib_s"), ref_boto), 2)
    return out
