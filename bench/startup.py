"""How long the command line takes to start: ``uploader --help`` and ``uploader status <id>``
(one Redis read, the answer "no upload") against the interpreter's own start (``python -c
pass``) and the peers' equivalents (``s5cmd version``, ``rclone version``), each the median of
``repeats`` runs, interleaved so that all see the same moments of a noisy machine."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.rig import Rig
from bench.stats import median, rnd
from bench.tools import find_binary, s5cmd_binary

#: An upload id nothing has: ``status`` reads Redis and answers "no upload" (exit status 3).
MISSING_ID = "0123456789abcdef0123456789abcdef"


def run(rig: Rig, *, repeats: int, log: Any) -> dict[str, Any]:
    uploader = str(Path(sys.executable).parent / "uploader")
    env = rig.tool_env(UPLOADER_BROKER_URL=rig.new_database())
    commands: dict[str, list[str]] = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "uploader --help": [uploader, "--help"],
        "uploader status <id>": [uploader, "status", MISSING_ID],
    }
    s5cmd = s5cmd_binary()
    if s5cmd:
        commands["s5cmd version"] = [s5cmd, "version"]
    rclone = find_binary("rclone")
    if rclone:
        commands["rclone version"] = [rclone, "version"]
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, argv in commands.items():
            t0 = time.perf_counter()
            subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                           timeout=60, check=False)
            times[name].append(time.perf_counter() - t0)
    floor = median(times["python -c pass"])
    result: dict[str, Any] = {"repeats": repeats, "commands": {}}
    for name, samples in times.items():
        wall = median(samples)
        result["commands"][name] = {"median_s": rnd(wall, 4), "max_s": rnd(max(samples), 4),
                                    "vs_python": rnd(wall / floor, 2)}
        log(f"  {name}: {wall * 1000:.0f} ms median of {repeats} ({wall / floor:.1f}x the interpreter's start)")
    return result


def markdown(startup: dict[str, Any] | None, add: Any) -> None:
    if not startup:
        return
    if "error" in startup:
        add(f"## Command-line start-up: FAILED\n\n{startup['error']}\n")
        return
    add("## Command-line start-up")
    add("")
    add(f"Median of {startup['repeats']} runs each, interleaved. `status` reads one Redis database (an unknown id).")
    add("")
    add("| command | median | slowest | vs `python -c pass` |")
    add("| --- | --- | --- | --- |")
    for name, row in startup["commands"].items():
        add(f"| `{name}` | {row['median_s'] * 1000:.0f} ms | {row['max_s'] * 1000:.0f} ms | {row['vs_python']:.2f}x |")
    add("")
