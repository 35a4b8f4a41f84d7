"""Where the project's worker spends its CPU: py-spy attached to the worker during one extra
(untimed) large upload, its samples grouped by what the code was doing."""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.rig import Rig
from bench.stats import rnd
from bench.tools import find_binary

GiB = 1 << 30

#: (category, pattern searched in the whole stack). The first category whose pattern matches
#: any frame of a sample gets the sample, so specific activities come before the layers that
#: call them (a Redis call made by the checkpoint is "checkpoint", not "celery/kombu").
CATEGORIES: tuple[tuple[str, str], ...] = (
    # Leaf frames where a thread waits; py-spy (which cannot always tell a waiting thread from a
    # running one) still reports some of them. "LEAF:" patterns are tried on the leaf frame only.
    ("waiting (thread pool queue, event-loop epoll, socket poll)",
     r"LEAF:^(_worker \(concurrent/futures/thread\.py|_epoll\.poll \(kombu|poll_wait_for_socket\.<locals>\.do_poll|Condition\.wait|Event\.wait|_wait_for_tstate_lock)"),
    ("logging", r"\((logging/|celery/utils/log\.py)"),
    ("part checksum (uploader/checksums.py)", r"\(uploader/checksums\.py"),
    ("reading the source (uploader/sources.py)", r"\(uploader/sources\.py"),
    ("bandwidth throttle", r"\(uploader/bandwidth\.py"),
    ("checkpoint in Redis (uploader/checkpoint)", r"\(uploader/checkpoint/"),
    ("worker heartbeat", r"\(uploader/heartbeat\.py"),
    ("S3: Expect 100-continue handshake", r"_handle_expect_response|^wait_for_read .*<- AWSConnection\._send_output"),
    ("S3: socket send of headers + part body", r"^(HTTPConnection|AWSConnection)\.send \((http/client|botocore/awsrequest)\.py"),
    ("S3: reading + parsing the response", r"getresponse \(|\(botocore/parsers\.py"),
    ("S3: request signing", r"\(botocore/(auth|signers)\.py"),
    ("S3: other botocore/urllib3 (serialize, hooks, retries, pool)", r"\((botocore|urllib3|s3transfer|boto3)/"),
    ("celery: storing task results (result backend)", r"\(celery/backends/"),
    ("celery/kombu: messages, acks, events, event loop", r"\((celery|kombu|billiard|vine|amqp|redis)/"),
)


def _short(frame: str) -> str:
    """``func (/…/site-packages/pkg/mod.py:12)`` -> ``func (pkg/mod.py:12)`` (py-spy usually
    prints paths relative to sys.path already)."""
    func, sep, rest = frame.partition(" (")
    if not sep or not rest.startswith("/"):
        return frame
    for marker in ("/site-packages/", "/dist-packages/"):
        if marker in rest:
            return f"{func} ({rest.split(marker, 1)[1]}"
    match = re.search(r"/lib/python3\.\d+/(.*)$", rest)
    return f"{func} ({match.group(1)}" if match else frame


def parse_raw(text: str) -> list[tuple[list[str], int]]:
    """py-spy ``--format raw`` (collapsed stacks, root first): ``frame;frame;... count``."""
    out = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        out.append(([_short(f) for f in stack.split(";")], int(count)))
    return out


def categorize(stacks: list[tuple[list[str], int]]) -> tuple[Counter, Counter, int]:
    by_category: Counter = Counter()
    by_leaf: Counter = Counter()
    total = 0
    compiled = [(name, pattern.startswith("LEAF:"), re.compile(pattern.removeprefix("LEAF:"))) for name, pattern in CATEGORIES]
    for frames, count in stacks:
        total += count
        by_leaf[frames[-1]] += count
        chain = [" <- ".join(frames[i::-1][:2]) for i in range(len(frames) - 1, -1, -1)]  # leaf first
        for name, leaf_only, pattern in compiled:
            if any(pattern.search(f) for f in (chain[:1] if leaf_only else chain)):
                by_category[name] += count
                break
        else:
            by_category["other (Python runtime, threading, ...)"] += count
    return by_category, by_leaf, total


def record(rig: Rig, pid: int, raw_path: Path, action: Any, rate: int = 100) -> tuple[Any, list[tuple[list[str], int]] | str]:
    """Run ``action()`` with py-spy sampling process ``pid``; returns what ``action`` returned and
    the parsed stacks, or a string saying why there are none."""
    pyspy = find_binary("py-spy")
    if pyspy is None:
        return action(), "py-spy not installed (pip install py-spy)"
    log_path = rig.workdir / f"py-spy-{raw_path.stem}.log"
    raw_path.unlink(missing_ok=True)
    with open(log_path, "wb") as spy_log:
        spy = rig.spawn(
            [pyspy, "record", "-p", str(pid), "-o", str(raw_path), "--format", "raw", "-r", str(rate), "--nonblocking"],
            env=rig.tool_env(), stdout=spy_log, stderr=subprocess.STDOUT,
        )
        try:
            time.sleep(1.5)  # attached and sampling
            if spy.poll() is not None:
                return action(), f"py-spy could not attach: {log_path.read_text()[-500:]}"
            value = action()
            time.sleep(0.3)
        finally:
            if spy.poll() is None:
                spy.send_signal(signal.SIGINT)
            try:
                spy.wait(60)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait(5)
            rig.reaped(spy, spy.returncode)
    if not raw_path.exists():
        return value, f"py-spy wrote nothing: {log_path.read_text()[-500:]}"
    return value, parse_raw(raw_path.read_text())


def summarize(stacks: list[tuple[list[str], int]], rate: int, scale: float | None, unit: str) -> dict[str, Any]:
    """Shares of samples per category and per leaf frame; ``scale`` (measured CPU per ``unit``)
    turns shares into CPU per unit."""
    by_category, by_leaf, total = categorize(stacks)
    if not total:
        return {"samples": 0, "categories": [], "top_leaf_functions": []}

    def rows(counter: Counter, key: str, limit: int | None = None) -> list[dict[str, Any]]:
        return [
            {key: name, "samples": n, "share": rnd(n / total, 3), f"cpu_{unit}": rnd(n / total * scale, 2) if scale else None}
            for name, n in counter.most_common(limit)
        ]

    return {
        "samples": total,
        "rate_hz": rate,
        "sampled_thread_s": rnd(total / rate, 2),
        "categories": rows(by_category, "category"),
        "top_leaf_functions": rows(by_leaf, "function", 20),
    }


def run(rig: Rig, project: Any, path: Path, size: int, bucket: str, out_dir: Path, worker_cpu_per_gib: float | None,
        log: Any, rate: int = 100) -> dict[str, Any]:
    """py-spy on the worker during one extra large upload."""
    raw_path = out_dir / "latest-worker-profile.txt"
    cost, stacks = record(rig, project.worker.pid, raw_path, lambda: project.upload(rig, path, bucket, "profile/0"), rate)
    if isinstance(stacks, str):
        return {"status": stacks}
    gib = size / GiB
    # Shares are scaled by the worker CPU measured without the profiler.
    per_gib = worker_cpu_per_gib if worker_cpu_per_gib is not None else cost.detail["worker_cpu_s"] / gib
    out = summarize(stacks, rate, per_gib, "s_per_gib")
    log(f"  py-spy: {out['samples']} samples ({out.get('sampled_thread_s')} thread-s not idle) for a worker that used "
        f"{cost.detail['worker_cpu_s']:.2f} CPU s in this run")
    for row in out["categories"]:
        log(f"    {row['share'] * 100:5.1f}%  {_fmt2(row['cpu_s_per_gib'])} s/GiB  {row['category']}")
    return {
        "status": "ran",
        **out,
        "profiled_run_worker_cpu_s": cost.detail["worker_cpu_s"],
        "profiled_run_wall_s": rnd(cost.wall_s),
        "worker_cpu_s_per_gib": rnd(per_gib, 2),
        "raw_profile": str(raw_path),
    }


def _fmt2(value: float | None) -> str:
    return "    -" if value is None else f"{value:5.2f}"


def breakdown(rig: Rig, path: Path, size: int, bucket: str, part_size: int, concurrency: int, timeout: float,
              worker_cpu_s: float | None, client_cpu_s: float | None, log: Any, repeats: int = 1) -> dict[str, Any]:
    """CPU per GiB of the project's part path run bare (no Celery, no checkpoint), stage by
    stage, set against the worker's measured CPU: the difference is what Celery, Redis and the
    checkpoint cost."""
    from bench.tools import run_measured

    gib = size / GiB
    env = rig.tool_env(PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH")])))
    samples: dict[str, list[tuple[float, float]]] = {"read": [], "checksum": [], "upload": []}
    for _ in range(repeats):
        for stage in samples:
            argv = [
                sys.executable, "-m", "bench.breakdown_child", "--stage", stage, "--file", str(path), "--bucket", bucket,
                "--key", f"breakdown/{stage}", "--endpoint", rig.endpoint_url, "--part-size", str(part_size),
                "--concurrency", str(concurrency),
            ]
            _, stdout = run_measured(rig, argv, env, timeout, f"breakdown-{stage}")
            report = json.loads(stdout.strip().splitlines()[-1])
            samples[stage].append((report["cpu_s"] / gib, report["sys_s"] / gib))
            time.sleep(0.5)
    stages = {k: statistics.median(c for c, _ in v) for k, v in samples.items()}
    kernel = {k: statistics.median(s for _, s in v) for k, v in samples.items()}
    rows = [
        {"step": "read each part with one pread (uploader/sources.py)", "cpu_s_per_gib": stages["read"]},
        {"step": "+ the part checksum (uploader/checksums.py)", "cpu_s_per_gib": stages["checksum"] - stages["read"]},
        {"step": "+ boto3 UploadPart through ObjectStore (HTTP, headers, response), Create/Complete",
         "cpu_s_per_gib": stages["upload"] - stages["checksum"]},
    ]
    out: dict[str, Any] = {
        "repeats": repeats,
        "bare_path_cpu_s_per_gib": rnd(stages["upload"], 2),
        "stage_totals": {k: {"cpu_s_per_gib": rnd(stages[k], 3), "sys_s_per_gib": rnd(kernel[k], 3)} for k in stages},
    }
    if worker_cpu_s is not None:
        worker = worker_cpu_s / gib
        rows.append({"step": "+ Celery, Redis and the checkpoint (the worker minus the bare path)",
                     "cpu_s_per_gib": worker - stages["upload"]})
        out["worker_cpu_s_per_gib"] = rnd(worker, 2)
    if client_cpu_s is not None:
        rows.append({"step": "(the submitting client, outside the worker)", "cpu_s_per_gib": client_cpu_s / gib})
    for row in rows:
        row["cpu_s_per_gib"] = rnd(row["cpu_s_per_gib"], 2)
        log(f"    {row['cpu_s_per_gib']:5.2f} s/GiB  {row['step']}")
    out["steps"] = rows
    return out
