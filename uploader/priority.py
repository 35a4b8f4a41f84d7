"""An upload's ``priority`` (0-9, 9 most urgent), as each broker ranks messages.

Our scale is RabbitMQ's: a higher number is served first. kombu's Redis transport ranks the
other way round: it keeps one list per priority step (``queue``, ``queue<sep>1``, ...
``queue<sep>9``) and its consumers BRPOP them in step order, so the plain list (step 0, where a
message without a priority goes) is read first (kombu/transport/redis.py: ``_brpop_start``,
``_q_for_pri``; ``_get_message_priority(reverse=False)``). On a Redis broker the message
priority is therefore ``9 - priority``: our 9 goes on the plain list, our 0 on ``queue<sep>9``.

A message sent without a priority keeps each broker's default: on Redis the plain list (served
like our 9), on RabbitMQ priority 0. The queues' layout of existing deployments is unchanged:
the separator stays kombu's, and messages without a priority stay on the plain list.
"""

from __future__ import annotations

from urllib.parse import urlsplit

#: The least and the most urgent priority of a request.
LOWEST = 0
HIGHEST = 9

#: Broker URL schemes served by kombu's Redis transport.
REDIS_SCHEMES = frozenset({"redis", "rediss", "redis+socket", "sentinel"})

#: kombu's Redis transport priority steps: one list per priority (kombu's default, [0, 3, 6, 9],
#: would merge 7 and 8 into 6, and so on). Lists of other steps are read by every worker with
#: this setting, and kombu's default steps' lists are among them: a client still on kombu's
#: default steps (or any Celery client in another language) sends to lists the workers read.
PRIORITY_STEPS = list(range(LOWEST, HIGHEST + 1))


def is_redis(broker_url: str) -> bool:
    """Whether ``broker_url`` (its first URL, for a failover list) is served by kombu's Redis transport."""
    first = broker_url.split(";")[0]
    return urlsplit(first).scheme.lower() in REDIS_SCHEMES


def message_priority(priority: int | None, broker_url: str) -> int | None:
    """The priority to send a message of an upload of ``priority`` with on ``broker_url``
    (``None``: send it without one, at the broker's default)."""
    if priority is None:
        return None
    return HIGHEST - priority if is_redis(broker_url) else priority


def transport_options() -> dict[str, object]:
    """The broker transport options that rank messages by priority (ignored by brokers other than Redis)."""
    return {"priority_steps": list(PRIORITY_STEPS)}
