"""Worker liveness: incarnation names and the heartbeat that keeps them alive in Redis.

A part being sent is leased to a *holder*: a worker incarnation (one start of one worker
process) or, with the prefork pool, one pool process of it. Never to a node name: node names
repeat (``celery@<host>`` restarted by systemd on the same host, two containers with the same
hostname), and a restarted worker's heartbeat under the old name would keep the dead one's leases
looking held. The lease lasts as long as its holder's heartbeat (``<prefix>:worker:<holder>``):
a holder that is killed stops refreshing, its key expires after the TTL, and the parts it held
become eligible for dispatch again (the recovery loop sends them within one more interval).
A slow part on a live holder is never duplicated before its time limit.
"""

from __future__ import annotations

import logging
import secrets
import threading

import redis

from uploader.checkpoint.store import CheckpointStore
from uploader.probe import ProbeFile

log = logging.getLogger(__name__)


def incarnation_name(node_name: str) -> str:
    """A holder name for one start of worker ``node_name``: the node name (for people) and a
    random suffix (unique per start). ``|`` separates a lease's fields, so it is replaced."""
    return f"{node_name.replace('|', '_')}#{secrets.token_hex(6)}"


def pool_process_name(incarnation: str, pid: int) -> str:
    """The holder name of prefork pool process ``pid`` of ``incarnation``."""
    return f"{incarnation}/pool-{pid}"


class Heartbeat(threading.Thread):
    """Refreshes ``holder``'s liveness key every ``ttl / 3`` seconds until :meth:`stop`, releasing
    first any part lease a task of this process could not release while Redis was away (they are
    kept in this process's memory: a prefork pool process runs a heartbeat of its own).
    ``worker``: the holder is a worker incarnation (counted as a live worker, and keeping its
    ``host`` alive for host-local uploads), not a pool process."""

    def __init__(
        self, store: CheckpointStore, holder: str, ttl: int, *, worker: bool = False, host: str = "",
        probe: ProbeFile | None = None, version: str = "",
    ) -> None:
        super().__init__(name=f"uploader-heartbeat-{holder}", daemon=True)
        self.store = store
        self.holder = holder
        self.ttl = ttl
        self.worker = worker
        self.host = host
        #: Where each beat is noted for ``uploader probe`` (uploader/probe.py), if anywhere.
        self.probe = probe
        #: What a worker notes it runs (``uploader doctor`` shows it).
        self.version = version
        self._stopped = threading.Event()

    def beat(self) -> None:
        # Leases whose release failed while Redis was away go first: once this holder looks
        # alive again, they would look held by it.
        if released := self.store.release_pending():
            log.warning("released %d part leases left over from a Redis outage", released)
        self.store.heartbeat(self.holder, self.ttl, worker=self.worker, host=self.host, version=self.version)

    def start(self) -> None:
        """Beat once now, so that the holder is alive before it takes its first lease, then every
        ``ttl / 3`` seconds in the background."""
        self._beat_or_warn()
        super().start()

    def run(self) -> None:
        while not self._stopped.wait(self.ttl / 3):
            self._beat_or_warn()

    def _beat_or_warn(self) -> None:
        try:
            self.beat()
        except (redis.RedisError, OSError) as exc:  # Redis away: keep trying, it comes back
            log.warning("heartbeat of %s failed: %s", self.holder, exc)
            reached = False
        else:
            reached = True
        if self.probe is not None:
            self.probe.record(reached)

    def stop(self, *, retire: bool = False) -> None:
        """Stop beating; with ``retire`` also drop the liveness key now (a clean shutdown, once
        no task of the holder runs any more)."""
        self._stopped.set()
        if retire:
            try:
                self.store.retire(self.holder)
            except (redis.RedisError, OSError) as exc:
                log.warning("could not retire %s: %s", self.holder, exc)
