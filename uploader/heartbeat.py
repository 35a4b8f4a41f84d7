"""Worker liveness: a thread that keeps ``<prefix>:worker:<name>`` alive in Redis.

A part being sent is leased to its worker's name; the lease lasts exactly as long as the
heartbeat. A worker that is killed stops refreshing, its key expires after the TTL, and the
parts it held become eligible for dispatch again. A slow part on a live worker is never
duplicated, however long it takes.
"""

from __future__ import annotations

import logging
import threading

import redis

from uploader.checkpoint import CheckpointStore

log = logging.getLogger(__name__)


class Heartbeat(threading.Thread):
    """Refreshes ``owner``'s liveness key every ``ttl / 3`` seconds until :meth:`stop`, releasing
    first any part lease a task of this process could not release while Redis was away (they are
    kept in this process's memory: a prefork pool process runs a heartbeat of its own)."""

    def __init__(self, store: CheckpointStore, owner: str, ttl: int) -> None:
        super().__init__(name=f"uploader-heartbeat-{owner}", daemon=True)
        self.store = store
        self.owner = owner
        self.ttl = ttl
        self._stopped = threading.Event()

    def beat(self) -> None:
        # Leases whose release failed while Redis was away go first: once this worker looks
        # alive again, they would look held by it.
        if released := self.store.release_pending():
            log.warning("released %d part leases left over from a Redis outage", released)
        self.store.heartbeat(self.owner, self.ttl)

    def start(self) -> None:
        """Beat once now, so that the owner is alive before it takes its first lease, then every
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
            log.warning("heartbeat of %s failed: %s", self.owner, exc)

    def stop(self) -> None:
        self._stopped.set()
