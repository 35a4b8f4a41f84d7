"""How one delivery attempt ended, and when to try again."""

from __future__ import annotations

import random
from dataclasses import dataclass

from uploader.checkpoint.outbox import Settlement


@dataclass(frozen=True)
class Attempt:
    """One attempt's end: its settlement, the HTTP status if any, and why it failed."""

    outcome: Settlement
    status: str = ""
    error: str = ""


def retry_delay(attempt: int, first: float, longest: float, *, rng: random.Random | None = None) -> float:
    """Seconds before the attempt after ``attempt`` (1-based): ``first`` doubled per attempt made,
    at most ``longest``, times a random factor in [0.5, 1] (jitter, so that a receiver that comes
    back is not hit by every waiting notification at the same instant)."""
    base = min(longest, first * 2 ** (attempt - 1))
    return base * (rng or random).uniform(0.5, 1.0)
