"""Limits of one upload across the whole fleet (the request's ``max_concurrency`` and
``max_bandwidth``), next to each worker's own (``UPLOADER_MAX_BANDWIDTH``, its thread count).

- Concurrency: ``begin_part.lua`` counts the upload's part leases that hold when a part task
  takes its own, and answers ``limited`` past the cap; the task goes back to the queue for a
  moment (:func:`wait_seconds`) without using one of its retries.
- Bandwidth: a token bucket per upload in Redis (:mod:`uploader.limits.bucket`), drawn from by
  every worker sending that upload's parts, a chunk at a time as the bytes go out.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from uploader.request import UploadRequest

#: How long a part over its upload's concurrency cap waits before it asks again (seconds, a
#: mean: each wait is drawn from half to one and a half times this, so that the waiting parts of
#: a fleet do not all come back at the same instant).
WAIT_SECONDS = 0.5


def limit_fields(request: UploadRequest) -> dict[str, int]:
    """The record fields of a request's limits (0: none): see ``UploadRecord.max_concurrency``
    and ``UploadRecord.max_bandwidth``."""
    return {
        "max_concurrency": request.max_concurrency or 0,
        "max_bandwidth": request.max_bandwidth or 0,
    }


def wait_seconds(mean: float = WAIT_SECONDS) -> float:
    """How long a part over its upload's concurrency cap waits before it asks again."""
    return mean * random.uniform(0.5, 1.5)  # noqa: S311 (spreading retries, not a secret)
