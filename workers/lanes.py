"""Part lanes: uploads interleaved instead of sent one after the other.

One parts queue is first in, first out: a 10,000-part upload's messages are all queued before a
later upload's first, so the later upload waits for the whole earlier one (a 1 MiB multipart
upload behind a terabyte). The parts queue is therefore split into ``UPLOADER_PART_LANES``
lanes (``uploader.parts``, ``uploader.parts.1``, ...; ``uploader.contract.part_lanes``), and:

- each dispatch sends its parts to one lane: a free one (nothing queued, and no other dispatch
  took it in the last :data:`HOLD_SECONDS`), else the one with the fewest queued messages (the
  checkpoint's ``claim_lane``, atomic, so that uploads dispatched together get lanes of their own);
- every worker reads every lane, and kombu's Redis transport reads its queues round robin (its
  ``_queue_cycle``: the queue a message came from goes to the back of the order), so each free
  slot takes the next part of the next lane in turn. Two large uploads progress at the same
  rate; a small upload submitted behind a large one waits for one part of it, not all of them.
  RabbitMQ delivers to a consumer of several queues in turn as well.

Priorities still come first: kombu orders its BRPOP keys by priority, then by queue, so a more
urgent part in any lane goes before a less urgent one in every lane (uploader/priority.py).

A retried part, or one that comes back under its upload's concurrency cap, stays in its lane:
Celery re-sends it to the queue it came from (``Task.signature_from_request``: a message sent to
a queue's name is sent to that name again). Uploads beyond the number of lanes share lanes, each
sharing one first in, first out, so the choice goes to the emptiest lane.
"""

from __future__ import annotations

import logging

from celery import Celery
from kombu.exceptions import ChannelError

from uploader.checkpoint.store import CheckpointStore
from uploader.contract import PARTS_QUEUE, part_lanes

log = logging.getLogger(__name__)

#: How long a lane chosen by a dispatch counts as taken, whatever its length: long enough for
#: the dispatch's first messages to be queued (the fan-out's first batch goes out within
#: milliseconds); after that the lane's length speaks for it. (A lane whose queue workers have
#: drained looks free even while its upload's last parts are being sent: sharing it then costs
#: nothing, no backlog of it is ahead of the newcomer's parts.)
HOLD_SECONDS = 2.0


def queued(app: Celery, names: tuple[str, ...]) -> list[int]:
    """The messages waiting in each of the queues ``names`` (every priority's list on Redis), as
    the broker reports them to a passive declare; 0 for a queue the broker does not have yet."""
    sizes = []
    opened = []
    with app.pool.acquire(block=True) as connection:
        # The pooled connection's own channel: on Redis a new channel is a new connection pool.
        channel = connection.default_channel
        try:
            for name in names:
                try:
                    sizes.append(channel.queue_declare(queue=name, passive=True).message_count)
                except ChannelError:  # not there yet (on Redis: no list of it holds a message)
                    sizes.append(0)
                    if getattr(channel, "is_open", True) is False:  # AMQP closes a channel on a failed passive declare
                        channel = connection.channel()
                        opened.append(channel)
        finally:
            for extra in opened:
                extra.close()
    return sizes


def choose(app: Celery, checkpoint: CheckpointStore, lanes: int) -> str:
    """The lane the next dispatch of parts goes to (see the module docstring); with one lane, or
    when the broker cannot say how long its queues are, the first."""
    if lanes <= 1:
        return PARTS_QUEUE
    names = part_lanes(lanes)
    try:
        sizes = queued(app, names)
    except Exception as exc:  # the lengths are a hint: the dispatch itself will meet a real outage
        log.warning("cannot read the part lanes' lengths (%s); sending to %s", exc, PARTS_QUEUE)
        return PARTS_QUEUE
    return names[checkpoint.claim_lane(sizes, HOLD_SECONDS)]
