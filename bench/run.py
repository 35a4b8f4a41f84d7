"""``python -m bench``: run the scenarios and write bench/results/latest.{json,md,png}."""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path
from typing import Any

from bench import (
    bandwidth,
    checksum,
    fairness,
    fanout,
    large,
    memory,
    profile,
    report,
    resume,
    retention,
    scaling,
    small,
    startup,
)
from bench.rig import Rig
from uploader.planner import MiB, parse_size

SCENARIOS = ("large", "profile", "small", "resume", "fanout", "memory", "scaling", "retention", "checksum", "fairness",
             "bandwidth", "startup")


def log(message: str) -> None:
    print(message, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--size", default=None, help="large-file size (default 1GiB; --quick: 128MiB)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per tool, interleaved (default 3; --quick: 1)")
    parser.add_argument("--quick", action="store_true", help="a small CI-sized run: 128 MiB, 1 repeat, fewer small objects")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="where latest.* go")
    parser.add_argument("--part-size", default="8MiB")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--tools", default="", help="comma-separated subset of: uploader,boto3,boto3-crt,s5cmd,rclone; also uploader-prefork (not run by default)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated subset of: {','.join(SCENARIOS)}")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a new temp dir, removed after)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (logs, data)")
    parser.add_argument("--merge", action="store_true",
                        help="replace only the scenarios run now in an existing latest.json (keep the others), then rewrite latest.md/png")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one upload may take")
    parser.add_argument("--small-count", type=int, default=None, help="small uploads submitted at once (default 1000; --quick: 200)")
    parser.add_argument("--latency-count", type=int, default=None, help="1 KiB uploads timed one by one (default 100; --quick: 30)")
    parser.add_argument("--resume-size", default=None, help="file size for the resume scenario (default 512MiB; --quick: 128MiB)")
    parser.add_argument("--fanout-parts", type=int, default=None, help="parts in the fan-out scenario (default 10000; --quick: 2000)")
    parser.add_argument("--retention-uploads", type=int, default=None,
                        help="finished uploads kept in the retention scenario (default 10000; --quick: 2000)")
    parser.add_argument("--retention-parts", type=int, default=None,
                        help="parts of the retention scenario's cancelled upload (default 10000; --quick: 2000)")
    parser.add_argument("--memory-size", default=None, help="file size for the memory scenario (default 4GiB; --quick: 512MiB)")
    parser.add_argument("--memory-part-size", default=None, help="part size of the memory scenario (default 512MiB; --quick: 128MiB)")
    parser.add_argument("--memory-budgets", default="default",
                        help="UPLOADER_PART_BUFFER_MAX of the memory scenario's worker, one run each: sizes or 'default' (default: default)")
    parser.add_argument("--scaling-size", default=None, help="file size for the scaling scenario (default 256MiB; --quick: 128MiB)")
    parser.add_argument("--scaling-hosts", default="1,2,4", help="host counts of the scaling scenario (default 1,2,4)")
    parser.add_argument("--scaling-rate", default="10MiB", help="egress cap of each simulated host, per second (default 10MiB)")
    parser.add_argument("--scaling-repeats", type=int, default=None, help="runs per host count, interleaved (default 3; --quick: 1)")
    parser.add_argument("--scaling-tcp-cc", default=None, help="TCP congestion control inside the host namespaces (default: the machine's)")
    args = parser.parse_args(argv)
    args.size = parse_size(args.size) if args.size else (128 * MiB if args.quick else 1 << 30)
    args.repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    args.part_size = parse_size(args.part_size)
    args.small_count = args.small_count or (200 if args.quick else 1000)
    args.latency_count = args.latency_count or (30 if args.quick else 100)
    args.resume_size = parse_size(args.resume_size) if args.resume_size else (128 * MiB if args.quick else 512 * MiB)
    args.fanout_parts = args.fanout_parts or (2000 if args.quick else 10_000)
    args.retention_uploads = args.retention_uploads or (2000 if args.quick else 10_000)
    args.retention_parts = args.retention_parts or (2000 if args.quick else 10_000)
    args.memory_size = parse_size(args.memory_size) if args.memory_size else (512 * MiB if args.quick else 4 << 30)
    args.memory_part_size = (
        parse_size(args.memory_part_size) if args.memory_part_size else (128 * MiB if args.quick else 512 * MiB)
    )
    args.memory_budgets = [None if b.strip() == "default" else parse_size(b) for b in args.memory_budgets.split(",") if b.strip()]
    args.scaling_size = parse_size(args.scaling_size) if args.scaling_size else (128 * MiB if args.quick else 256 * MiB)
    args.scaling_hosts = sorted({int(n) for n in args.scaling_hosts.split(",") if n.strip()})
    if not args.scaling_hosts or min(args.scaling_hosts) < 1 or max(args.scaling_hosts) > 16:
        parser.error("--scaling-hosts: host counts between 1 and 16")
    args.scaling_rate = parse_size(args.scaling_rate)
    args.scaling_repeats = args.scaling_repeats if args.scaling_repeats is not None else (1 if args.quick else 3)
    args.tools = [t for t in args.tools.split(",") if t] or None
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "options": {
            "size": args.size, "repeats": args.repeats, "quick": args.quick, "part_size": args.part_size,
            "concurrency": args.concurrency, "tools": args.tools, "scenarios": args.scenarios,
            "memory_size": args.memory_size, "memory_part_size": args.memory_part_size,
            "memory_budgets": args.memory_budgets,
            "scaling_size": args.scaling_size, "scaling_hosts": args.scaling_hosts,
            "scaling_rate": args.scaling_rate, "scaling_repeats": args.scaling_repeats, "scaling_tcp_cc": args.scaling_tcp_cc,
        },
        "scenarios": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    log(f"bench: {args.size / MiB:.0f} MiB file, {args.repeats} repeat(s), scenarios {', '.join(args.scenarios)}")
    project = None
    try:
        with Rig(args.workdir, keep=args.keep, log=log) as rig:
            log(f"scratch directory {rig.workdir}")
            if set(args.scenarios) - {"scaling"}:  # scaling runs its own servers in a namespace
                rig.start_s3()
                log(f"SeaweedFS S3 on {rig.endpoint_url}")
            if "large" in args.scenarios:
                log(f"large file ({args.size / MiB:.0f} MiB, {args.part_size / MiB:.0f} MiB parts, concurrency {args.concurrency}):")
                try:
                    res, project = large.run(
                        rig, size=args.size, repeats=args.repeats, part_size=args.part_size,
                        concurrency=args.concurrency, tools=args.tools, timeout=args.timeout, log=log,
                    )
                except Exception as exc:
                    log(f"  large FAILED: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}")
                    res = {"error": f"{type(exc).__name__}: {exc}"[:3000]}
                results["scenarios"]["large"] = res
                if "profile" in args.scenarios and project is not None:
                    log("profiling the worker (one more, untimed, upload under py-spy):")
                    worker_cpu = res["summary"].get("uploader", {}).get("worker_cpu_s")
                    per_gib = worker_cpu / (args.size / (1 << 30)) if worker_cpu else None
                    args.out.mkdir(parents=True, exist_ok=True)
                    _guard(results, "profile", lambda: profile.run(
                        rig, project, Path(res["source"]), args.size, large.BUCKET, args.out, per_gib, log
                    ))
                    log("the worker's part path without Celery, stage by stage:")
                    summary = res["summary"].get("uploader", {})
                    _guard(results, "breakdown", lambda: profile.breakdown(
                        rig, Path(res["source"]), args.size, large.BUCKET, args.part_size, args.concurrency,
                        args.timeout, summary.get("worker_cpu_s"), summary.get("client_cpu_s"), log,
                        repeats=min(args.repeats, 3),
                    ))
            if "small" in args.scenarios:
                log("small objects (1 KiB):")
                if project is None:
                    _guard(results, "small", lambda: _start_project(rig, args))
                    project = results["scenarios"].pop("small", None)
                    if not hasattr(project, "worker"):
                        results["scenarios"]["small"] = project  # the error
                        project = None
                if project is not None:
                    _guard(results, "small", lambda: small.run(
                        rig, project, latency_count=args.latency_count, batch=args.small_count,
                        concurrency=args.concurrency, timeout=args.timeout, log=log,
                        profile_dir=args.out if "profile" in args.scenarios else None,
                    ))
                    log(f"a directory of {args.small_count} small files (16 KiB):")
                    _guard(results, "small_many", lambda: small.run_many(
                        rig, project, count=args.small_count, timeout=args.timeout, log=log,
                    ))
            if project is not None:
                project.close()
                rig.stop_service(project.worker)
                project = None
            if "resume" in args.scenarios:
                log(f"resume after SIGKILL ({args.resume_size / MiB:.0f} MiB):")
                throttle = max(16 * MiB, args.resume_size // 8)
                _guard(results, "resume", lambda: resume.run(
                    rig, size=args.resume_size, part_size=args.part_size, concurrency=args.concurrency,
                    throttle=throttle, timeout=args.timeout, log=log,
                ))
            if "fanout" in args.scenarios:
                log(f"fan-out ({args.fanout_parts} parts):")
                _guard(results, "fanout", lambda: fanout.run(
                    rig, parts=args.fanout_parts, concurrency=args.concurrency, timeout=min(args.timeout, 300), log=log,
                ))
            if "retention" in args.scenarios:
                log(f"what Redis keeps ({args.retention_uploads} finished uploads; a cancelled {args.retention_parts}-part upload):")
                _guard(results, "retention", lambda: retention.run(
                    rig, retained=args.retention_uploads, active=5, parts=args.retention_parts,
                    concurrency=args.concurrency, timeout=min(args.timeout, 600), log=log,
                ))
            if "memory" in args.scenarios:
                log(f"worker memory with large parts ({args.memory_size / MiB:.0f} MiB, {args.memory_part_size / MiB:.0f} MiB "
                    f"parts, concurrency {args.concurrency}):")
                _guard(results, "memory", lambda: memory.run(
                    rig, size=args.memory_size, part_size=args.memory_part_size, concurrency=args.concurrency,
                    budgets=args.memory_budgets, timeout=args.timeout, log=log,
                ))
            if "scaling" in args.scenarios:
                log(f"scaling across simulated hosts ({args.scaling_size / MiB:.0f} MiB, hosts "
                    f"{','.join(map(str, args.scaling_hosts))}, {args.scaling_rate / MiB:g} MiB/s cap each):")
                _guard(results, "scaling", lambda: scaling.run(
                    rig, size=args.scaling_size, repeats=args.scaling_repeats, hosts=args.scaling_hosts,
                    part_size=args.part_size, concurrency=args.concurrency, rate=args.scaling_rate,
                    timeout=args.timeout, log=log, tcp_cc=args.scaling_tcp_cc,
                ))
            if "checksum" in args.scenarios:
                log(f"checksum algorithms: CPU per GiB; {args.size / MiB:.0f} MiB with FULL_OBJECT on and off:")
                _guard(results, "checksum", lambda: checksum.run(
                    rig, size=args.size, repeats=args.repeats, cpu_size=min(args.size, 1 << 30), timeout=args.timeout, log=log,
                ))
            if "fairness" in args.scenarios:
                log("fairness: small uploads while a 10,000-part upload is being sent; two uploads together:")
                _guard(results, "fairness", lambda: fairness.run(
                    rig, samples=3 if args.quick else 7, timeout=30, big_rate=fairness.BIG_RATE, log=log,
                ))
            if "startup" in args.scenarios:
                log("command-line start-up:")
                _guard(results, "startup", lambda: startup.run(rig, repeats=5 if args.quick else 15, log=log))
            if "bandwidth" in args.scenarios:
                log("fleet-wide max_bandwidth: one upload, 4 workers, 8 MiB/s:")
                _guard(results, "bandwidth", lambda: bandwidth.run(
                    rig, rate=8 * MiB, seconds=10 if args.quick else 30, workers=4, timeout=args.timeout, log=log,
                ))
            results["machine"] = report.machine_info(rig)
    except KeyboardInterrupt:
        log("interrupted: every process the benchmark started has been stopped")
        return 130
    results["duration_s"] = round(time.time() - started, 1)
    ran = dict(results["scenarios"])
    if args.merge:
        results = merge(results, args.out / "latest.json")
    written = report.write(results, args.out)
    log("wrote " + ", ".join(str(p) for p in written) + f" in {round(time.time() - started, 1)} s")
    print()
    print((args.out / "latest.md").read_text())
    failed = [name for name, res in ran.items() if isinstance(res, dict) and res.get("error")]
    return 1 if failed else 0


def merge(results: dict[str, Any], previous: Path) -> dict[str, Any]:
    """``previous`` with the scenarios of ``results`` replaced; the run that produced them is
    listed under ``merged_runs`` (the report names it beside those scenarios)."""
    try:
        old = json.loads(previous.read_text())
    except (OSError, ValueError):
        log(f"--merge: no readable {previous}; writing this run alone")
        return results
    replaced = set(results["scenarios"])
    old["merged_runs"] = [r for r in old.get("merged_runs", []) if not replaced & set(r["scenarios"])]
    old["scenarios"].update(results["scenarios"])
    old["merged_runs"].append({
        "started": results["started"], "options": results["options"], "duration_s": results["duration_s"],
        "scenarios": list(results["scenarios"]), "load_average_at_end": results.get("machine", {}).get("load_average_at_end"),
    })
    return old


def _guard(results: dict[str, Any], name: str, fn: Any) -> None:
    """Run one secondary scenario; a failure is recorded, not fatal to the others."""
    try:
        results["scenarios"][name] = fn()
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        log(f"  {name} FAILED: {type(exc).__name__}: {exc}")
        log(traceback.format_exc(limit=8))
        results["scenarios"][name] = {"error": f"{type(exc).__name__}: {exc}"[:3000]}


def _start_project(rig: Rig, args: argparse.Namespace) -> Any:
    from bench.tools import UploaderTool

    tool = UploaderTool(args.part_size, args.concurrency, args.timeout)
    tool.prepare(rig)
    return tool
