"""``uploader probe live|ready`` (uploader/probe.py): from the file a real worker's heartbeat
writes; live while the heartbeat runs, ready while it reaches Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import Stack
from uploader.dev.localstack import wait_until
from uploader.probe import SLACK_SECONDS, ProbeFile, ProbeKind, check


def probe(kind: str, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "uploader.cli", "probe", kind], capture_output=True, text=True,
                          timeout=30, env={**os.environ, "UPLOADER_PROBE_FILE": str(path)})


def test_live_and_ready_follow_the_heartbeat_file(tmp_path: Path) -> None:
    path = tmp_path / "probe.json"
    assert not check(path, ProbeKind.LIVE).ok  # no worker yet
    beats = ProbeFile(path, ttl=15)
    beats.record(reached=False, now=1000)  # running, Redis away
    assert check(path, ProbeKind.LIVE, now=1001).ok
    assert "not reached Redis" in check(path, ProbeKind.READY, now=1001).reason
    beats.record(reached=True, now=1010)
    assert check(path, ProbeKind.READY, now=1011).ok
    beats.record(reached=False, now=1020)  # Redis went away: still live, ready for one lifetime more
    assert check(path, ProbeKind.READY, now=1021).ok
    late = 1010 + 15 + SLACK_SECONDS + 1
    assert not check(path, ProbeKind.READY, now=late).ok and check(path, ProbeKind.LIVE, now=late).ok
    stuck = 1020 + 15 + SLACK_SECONDS + 1
    assert "stuck" in check(path, ProbeKind.LIVE, now=stuck).reason
    path.write_text("{not json")
    assert not check(path, ProbeKind.LIVE).ok


def test_a_real_worker_is_ready_then_not_live_when_frozen(make_stack, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack()
    path = tmp_path / "worker-probe.json"
    worker = stack.start_worker("probed", concurrency=1, UPLOADER_PROBE_FILE=str(path),
                                UPLOADER_WORKER_HEARTBEAT_SECONDS="2")
    wait_until(lambda: probe("ready", path).returncode == 0, 30, "the worker ready")
    assert probe("ready", path).stdout.strip() == "ready"
    assert json.loads(path.read_text())["pid"] == worker.pid
    os.kill(worker.pid, signal.SIGSTOP)  # a stuck process: nothing of it runs
    try:
        wait_until(lambda: probe("live", path).returncode == 1, 30, "the frozen worker not live")
        assert "stuck" in probe("live", path).stderr
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    wait_until(lambda: probe("live", path).returncode == 0, 30, "the worker live again")
    missing = probe("live", tmp_path / "nothing.json")
    assert missing.returncode == 1 and "no probe file" in missing.stderr
