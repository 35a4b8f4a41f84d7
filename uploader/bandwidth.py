"""Per-process bandwidth limit: a token bucket shared by the process's upload threads.

Throttling is applied before a part is sent, invisible to the code that uploads (the idea of
s3transfer's bandwidth module, at part granularity).
"""

from __future__ import annotations

import threading
import time


class TokenBucket:
    """Allows ``rate`` bytes per second on average, with bursts of up to one second's worth."""

    def __init__(self, rate: int) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self._tokens = float(rate)
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self, amount: int) -> float:
        """Take ``amount`` bytes' worth of tokens, sleeping as long as the rate requires.
        Returns the seconds slept."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(float(self.rate), self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= amount
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)  # the debt is already booked, so other threads queue behind it
        return wait
