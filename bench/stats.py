"""Small statistics helpers."""

from __future__ import annotations

import statistics
from collections.abc import Iterable


def median(values: Iterable[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def percentile(values: Iterable[float], q: float) -> float | None:
    got = sorted(values)
    if not got:
        return None
    k = (len(got) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(got) - 1)
    return got[lo] + (got[hi] - got[lo]) * (k - lo)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def rnd(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)
