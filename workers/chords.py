"""Deleting a settled upload's Celery chord keys from the Redis result backend.

Celery's Redis backend keeps, per chord (``celery-taskset-meta-<group id>`` plus a suffix):
``.s`` the chord size, ``.j`` every header task's result as it returns (a sorted set with
``result_chord_ordered``), ``.d`` the header task ids counted, ``.t`` a size correction, ``.c``
the claim of the worker that publishes the body (``"done"`` once it has), and, for nested
headers only, the group result itself. They go when the body is published (Celery's cleanup
leaves ``.c = "done"`` for a few minutes) or after ``result_chord_expires`` (``result_expires``
here: the retention period). A chord that never fires (its upload was cancelled, failed, or
resumed with a chord of its own) kept up to one ``.j`` entry per part for that long.

:func:`forget` deletes them once the upload settles (``uploader.maintenance.release_settled``)
and leaves ``.c = "done"`` in their place, for as long as the backend keeps results: Celery 5.7's
chord counting ignores a header task that returns after that (a part message still in the
queue of a cancelled upload), so it can neither recreate the keys nor fire the body. (With an
older Celery, which has no such marker, a late part would recreate its ``.j``/``.d`` keys, with
one entry, until ``result_chord_expires``; the body still never fires, its size being gone.)
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.backends.redis import RedisBackend

#: Deletes the keys of each chord that is still counting and leaves its done marker (a chord
#: whose body was published is left alone: Celery cleaned it up itself). KEYS: per chord
#: ``.j .t .s .d <group result> .c``; ARGV[1] the marker's lifetime in seconds.
_FORGET_LUA = """
local forgotten = 0
for i = 1, #KEYS, 6 do
  if redis.call("EXISTS", KEYS[i], KEYS[i + 1], KEYS[i + 2], KEYS[i + 3], KEYS[i + 4]) > 0 then
    redis.call("DEL", KEYS[i], KEYS[i + 1], KEYS[i + 2], KEYS[i + 3], KEYS[i + 4])
    redis.call("SET", KEYS[i + 5], "done", "EX", ARGV[1])
    forgotten = forgotten + 1
  end
end
return forgotten
"""

#: Chords per script call (six keys each).
BATCH = 200


def chord_keys(backend: Any, group_id: str) -> list[Any]:
    """The keys Celery's Redis backend keeps for the chord of ``group_id``, in ``_FORGET_LUA``'s order."""
    return [*(backend.get_key_for_group(group_id, s) for s in (".j", ".t", ".s", ".d")),
            backend.get_key_for_group(group_id), backend.get_key_for_group(group_id, ".c")]


def forget(app: Celery, group_ids: list[str]) -> int:
    """Delete the result-backend keys of these chords (a no-op for a backend other than Redis's,
    whose chords are not counted in keys like these); returns how many chords still had keys.
    A Redis error propagates: the caller keeps the group ids and tries again later."""
    backend = app.backend
    if not group_ids or not isinstance(backend, RedisBackend):
        return 0
    marker_seconds = int(backend.expires or 0) or 24 * 3600
    script = backend.client.register_script(_FORGET_LUA)
    forgotten = 0
    for first in range(0, len(group_ids), BATCH):
        keys = [k for group_id in group_ids[first:first + BATCH] for k in chord_keys(backend, group_id)]
        forgotten += int(script(keys=keys, args=[marker_seconds]))
    return forgotten
