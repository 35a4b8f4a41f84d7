"""Worker probes for Kubernetes, Compose and anything else that asks a process whether it is well
(``uploader probe live|ready``), from a small file the worker's heartbeat rewrites at each beat
(``UPLOADER_PROBE_FILE``; none when unset). Standard library only: a probe runs every few seconds
and must start fast.

- **live**: the heartbeat thread is running (it wrote the file within a heartbeat's lifetime,
  whether or not Redis answered). A worker that fails it is stuck or dead: restart it. A Redis
  outage does not fail it, so an outage never restarts the whole fleet.
- **ready**: its last beat reached Redis within the heartbeat's lifetime: the worker is counted
  alive by the fleet (its leases hold, recovery sees it). Not ready during a Redis outage.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

#: Seconds of slack on top of the heartbeat's lifetime (a beat that is a little late is not dead).
SLACK_SECONDS = 5.0


class ProbeKind(StrEnum):
    LIVE = "live"
    READY = "ready"


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    reason: str


class ProbeFile:
    """The file a worker's heartbeat writes: when it last ran, when it last reached Redis, and
    the heartbeat's lifetime (what "recent" means)."""

    def __init__(self, path: str | Path, ttl: float) -> None:
        self.path = Path(path)
        self.ttl = ttl
        self.reached_at: float | None = None

    def record(self, reached: bool, *, now: float | None = None) -> None:
        """One heartbeat ran (``reached``: and Redis answered). Written whole (a rename), so a
        probe never reads half a file; a failure to write is the probe's answer, not the worker's."""
        now = time.time() if now is None else now
        if reached:
            self.reached_at = now
        body = json.dumps({"ran_at": now, "reached_at": self.reached_at, "ttl": self.ttl, "pid": os.getpid()})
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".probe-")
            with os.fdopen(fd, "w") as out:
                out.write(body)
            os.replace(temporary, self.path)
        except OSError:
            pass


def check(path: str | Path, kind: ProbeKind, *, now: float | None = None) -> ProbeResult:
    """Whether the worker that writes ``path`` is live (or ready), and why not."""
    now = time.time() if now is None else now
    try:
        state = json.loads(Path(path).read_text())
        ran_at, reached_at, ttl = float(state["ran_at"]), state.get("reached_at"), float(state["ttl"])
    except FileNotFoundError:
        return ProbeResult(False, f"no probe file {path}: the worker has not started its heartbeat (or UPLOADER_PROBE_FILE differs)")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return ProbeResult(False, f"probe file {path} unreadable: {exc}")
    limit = ttl + SLACK_SECONDS
    if now - ran_at > limit:
        return ProbeResult(False, f"the heartbeat has not run for {now - ran_at:.0f} s (limit {limit:.0f} s): the worker is stuck")
    if kind is ProbeKind.READY:
        if reached_at is None:
            return ProbeResult(False, "the heartbeat has not reached Redis yet")
        if now - float(reached_at) > limit:
            return ProbeResult(False, f"the heartbeat has not reached Redis for {now - float(reached_at):.0f} s")
    return ProbeResult(True, "ok")
