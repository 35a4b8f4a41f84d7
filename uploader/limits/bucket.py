"""The fleet-wide bandwidth limit of one upload: a token bucket in Redis (``bucket.lua``) that
every worker sending the upload's parts draws from, a chunk at a time as the bytes are read for
the socket (see :class:`~uploader.storage.bodies.PacedBody`), so a part is not one burst.

A part held to the rate may take far longer than its time limit (``UPLOADER_PART_TIME_BASE``
plus its length at ``UPLOADER_PART_MIN_THROUGHPUT``) or than ``UPLOADER_STALL_SECONDS``: each
draw also extends its lease and notes the upload as alive, in the same script (see
``bucket.lua``), so a slow, paced part is never taken for a hung one and sent a second time.
A single PUT (a source below the multipart threshold) draws from the same bucket, and its draws
extend the upload's completion lease (``UPLOADER_COMPLETION_LEASE_SECONDS``) the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import redis

from uploader.planner import MiB

#: Bytes taken from the bucket per draw: a sixteenth of a second's worth, between 64 KiB and
#: 1 MiB. Small enough that a part does not go out in one burst, large enough that the bucket
#: costs a few dozen Redis round trips a second per upload, whatever the number of workers.
MIN_CHUNK = 64 * 1024
MAX_CHUNK = 1 * MiB
#: Seconds an unused bucket is kept (a part that starts later finds it as full as a new one).
IDLE_SECONDS = 60


def chunk_size(rate: int) -> int:
    """Bytes drawn at a time from a bucket of ``rate`` bytes/s."""
    return max(MIN_CHUNK, min(MAX_CHUNK, rate // 16))


@dataclass(frozen=True)
class PartLease:
    """The part a bucket paces, as the checkpoint leased it: each draw extends the lease (it
    holds ``grace`` seconds past the draw's wait) and marks the upload alive."""

    record_key: str
    inflight_key: str
    part_number: int
    owner: str
    grace: float


@dataclass(frozen=True)
class CompletionLease:
    """The single PUT a bucket paces, under the completion lease its sender holds (``token``):
    each draw extends ``lease_until`` to ``grace`` seconds past the draw's wait and marks the
    upload alive, while the upload is still ``completing`` under that token."""

    record_key: str
    token: str
    grace: float


@lru_cache(maxsize=1)
def _source() -> str:
    # The lease format (parse_lease) lives with the checkpoint's scripts: shared, not copied.
    shared = (resources.files("uploader.checkpoint") / "lua" / "_shared.lua").read_text()
    return shared + (resources.files("uploader.limits") / "bucket.lua").read_text()


class FleetBucket:
    """``rate`` bytes per second shared by every process that uses the same Redis ``key``; its
    burst is one chunk (:func:`chunk_size`), so that a measured rate holds over seconds, not
    only over minutes."""

    def __init__(self, client: redis.Redis, key: str, rate: int, lease: PartLease | CompletionLease | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.key = key
        self.rate = rate
        self.chunk = chunk_size(rate)
        self.lease = lease
        self._script = client.register_script(_source())

    def acquire(self, amount: int) -> float:
        """Take ``amount`` bytes' worth of tokens, sleeping as long as the rate requires.
        Returns the seconds slept."""
        keys = [self.key]
        args: list[int | float | str] = [self.rate, self.chunk, amount, IDLE_SECONDS]
        lease = self.lease
        if isinstance(lease, PartLease):
            keys += [lease.record_key, lease.inflight_key]
            args += [lease.part_number, lease.owner, lease.grace, time.time()]
        elif isinstance(lease, CompletionLease):
            keys += [lease.record_key]  # no in-flight key: bucket.lua extends the completion lease
            args += [0, lease.token, lease.grace, time.time()]
        wait = float(self._script(keys=keys, args=args))
        if wait > 0:
            time.sleep(wait)  # the debt is booked already: later callers queue behind it
        return wait
