"""kombu's Redis transport, guarded against list items it cannot turn into a message.

kombu's ``Channel._brpop_read`` decodes each item it pops as JSON, and the ``_callback`` that
``basic_consume`` installs builds a ``Message`` from it (decoding the base64 body) before the
message is in the unacked hash. Either raising stops the worker (an unexpected error), or makes it
reconnect (a ``KeyError`` counts as a connection error), and the item, already popped, is lost.
Here those items are quarantined (:func:`workers.poison.quarantine`) and consuming goes on:

- the channel's Redis client remembers the last ``BRPOP`` reply, so the raw item of a failed
  ``_brpop_read`` can still be dead-lettered;
- the ``_callback`` kombu installs is wrapped, after ``basic_consume``, in a guard.

Nothing of kombu's reading is copied, so an upgrade of kombu keeps its fixes. The worker selects
these classes with :func:`broker_settings` (``workers/app.py``); clients never load them.
"""

from __future__ import annotations

import functools
import json
import logging
import ssl
import time
from queue import Empty
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str

from workers import poison

log = logging.getLogger(__name__)

#: What a blocking read may raise that the worker's consumer handles itself.
_READ_ERRORS: tuple[type[BaseException], ...] = (Empty, *poison.BROKER_ERRORS)


class _RemembersBRPOP:
    """Mixin for the channel's redis-py client class: keeps the last ``BRPOP`` reply."""

    last_brpop: Any = None

    def parse_response(self, connection: Any, command_name: Any, **options: Any) -> Any:
        response = super().parse_response(connection, command_name, **options)  # type: ignore[misc]
        if command_name == "BRPOP":
            self.last_brpop = response
        return response


@functools.cache
def _remembering(client_class: type) -> type:
    return type(f"Remembering{client_class.__name__}", (_RemembersBRPOP, client_class), {})


class _PoisonGuard:
    """Mixin for kombu's Redis ``Channel`` (and ``SentinelChannel``)."""

    #: The queue of the message being delivered (read by :class:`workers.consumer.QuarantiningConsumer`).
    poison_queue: str | None = None
    _poison_delivering = False

    def _get_client(self) -> Any:
        factory = super()._get_client()  # type: ignore[misc]
        if isinstance(factory, functools.partial):  # a global key prefix: PrefixedStrictRedis
            return functools.partial(_remembering(factory.func), *factory.args, **factory.keywords)
        return _remembering(factory)

    def basic_consume(self, queue: str, *args: Any, **kwargs: Any) -> Any:
        result = super().basic_consume(queue, *args, **kwargs)  # type: ignore[misc]
        callbacks = self.connection._callbacks  # type: ignore[attr-defined]
        callback = callbacks.get(queue)
        if callback is not None and not getattr(callback, "poison_guard", False):
            callbacks[queue] = self._guarded(queue, callback)
        return result

    def _guarded(self, queue: str, callback: Any) -> Any:
        def guarded_callback(raw_message: Any) -> Any:
            self._poison_delivering = True
            self.poison_queue = queue
            try:
                return callback(raw_message)
            except poison.BROKER_ERRORS:
                raise
            except Exception as exc:  # noqa: BLE001  (kombu could not make a message of it)
                self._quarantine_envelope(queue, raw_message, exc)
            finally:
                self.poison_queue = None

        guarded_callback.poison_guard = True  # type: ignore[attr-defined]
        return guarded_callback

    def _brpop_read(self, **options: Any) -> Any:
        client = self.client  # type: ignore[attr-defined]
        client.last_brpop = None
        self._poison_delivering = False
        try:
            return super()._brpop_read(**options)  # type: ignore[misc]
        except _READ_ERRORS:
            raise
        except Exception as exc:  # noqa: BLE001
            reply = client.last_brpop
            if not reply or self._poison_delivering:
                raise  # not an item kombu failed to decode
            self._quarantine_item(reply, exc)
            raise Empty() from None
        finally:
            client.last_brpop = None

    def _quarantine_item(self, reply: Any, exc: Exception) -> None:
        """A popped list item that is not a JSON envelope."""
        dest, item = reply
        queue = bytes_to_str(dest).rsplit(self.sep, 1)[0]  # type: ignore[attr-defined]
        poison.quarantine(queue=queue, reason=poison.item_problem(exc), body=item)

    def _quarantine_envelope(self, queue: str, raw: Any, exc: Exception) -> None:
        """An envelope kombu could not make a message of (or, once it was one, whatever else
        failed on the way to Celery's handler)."""
        envelope = raw if isinstance(raw, dict) else {}
        headers = envelope.get("headers")
        headers = headers if isinstance(headers, dict) else {}
        body = envelope.get("body")
        poison.quarantine(
            queue=queue, reason=poison.envelope_problem(raw, exc), task=headers.get("task"), task_id=headers.get("id"),
            headers=headers, body=body if isinstance(body, str) else json.dumps(raw, default=repr),
        )
        # If it got as far as the unacked hash, take it out again.
        properties = envelope.get("properties")
        tag = properties.get("delivery_tag") if isinstance(properties, dict) else None
        try:
            delivered = tag is not None and tag in getattr(self.qos, "_delivered", ())  # type: ignore[attr-defined]
        except TypeError:  # an unhashable tag never got there
            delivered = False
        if delivered:
            self.basic_ack(tag)  # type: ignore[attr-defined]


#: The worker incarnation (uploader/checkpoint/heartbeat.py) this process consumes as, set by
#: workers/app.py before the consumer starts; None: messages are not attributed.
holder: str | None = None
#: Sorted set of the incarnations that ever held a message, scored by when each first did; and
#: per incarnation, the set of the delivery tags it holds unacknowledged.
HOLDERS_KEY = "_uploader.holders"


def held_key(incarnation: str) -> str:
    return f"_uploader.held.{incarnation}"


class HeldQoS(kombu_redis.QoS):
    """kombu's Redis ack emulation, remembering which worker incarnation holds each message.

    kombu keeps a delivered, unacknowledged message in its ``unacked`` hash, without its
    consumer's name, and puts it back only after the visibility timeout (an hour by default). A
    worker killed while it held messages whose tasks had not yet taken a part lease (a retry or
    a part waiting for its countdown, one between the broker and the pool) so stranded them for
    an hour, or until the stall reconciler resumed the upload. Here every delivery tag is also
    filed under its holder (one ``SADD`` as the message arrives; the ``SREM`` rides in kombu's
    own acknowledgement pipeline), so the recovery leader can put a dead incarnation's messages
    back at once (:func:`restore_dead_holders`), with kombu's own ``restore_by_tag``."""

    def append(self, message: Any, delivery_tag: Any) -> None:
        super().append(message, delivery_tag)
        if holder is not None:
            with self.channel.conn_or_acquire() as client:
                pipe = client.pipeline()
                pipe.zadd(HOLDERS_KEY, {holder: time.time()}, nx=True)
                pipe.sadd(held_key(holder), delivery_tag)
                pipe.execute()

    def _remove_from_indices(self, delivery_tag: Any, pipe: Any = None) -> Any:
        pipe = super()._remove_from_indices(delivery_tag, pipe)
        return pipe.srem(held_key(holder), delivery_tag) if holder is not None else pipe


class Channel(_PoisonGuard, kombu_redis.Channel):
    QoS = HeldQoS


class SentinelChannel(_PoisonGuard, kombu_redis.SentinelChannel):
    QoS = HeldQoS


def restore_dead_holders(app: Any, live: set[str], *, grace: float) -> dict[str, int]:
    """Put back on their queues the messages held by worker incarnations not in ``live`` (their
    heartbeat lapsed) that first held a message more than ``grace`` seconds ago (so that a worker
    whose first heartbeat is still on its way is not taken for dead), and forget those
    incarnations. Returns the number of messages restored per incarnation (none on a broker
    other than Redis: RabbitMQ gives a dead consumer's messages back by itself)."""
    restored: dict[str, int] = {}
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        qos = getattr(channel, "qos", None)
        if not isinstance(qos, HeldQoS):
            return restored
        client = channel.client
        for raw in client.zrange(HOLDERS_KEY, 0, time.time() - grace, byscore=True):
            name = bytes_to_str(raw)
            if name in live:
                continue
            tags = [bytes_to_str(tag) for tag in client.smembers(held_key(name))]
            for tag in tags:
                qos.restore_by_tag(tag, leftmost=True)  # a no-op for a tag acknowledged meanwhile
            client.delete(held_key(name))
            client.zrem(HOLDERS_KEY, name)
            if tags:
                restored[name] = len(tags)
    return restored


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


TRANSPORTS = {
    "redis": "workers.transport:Transport",
    "rediss": "workers.transport:Transport",
    "sentinel": "workers.transport:SentinelTransport",
}


def broker_settings(broker_url: str | None, broker_use_ssl: Any = None) -> dict[str, Any]:
    """The Celery settings that give a worker on ``broker_url`` the guarded transport: none for
    a broker other than Redis (or ``redis+socket://``, which names its transport itself).

    An explicit transport keeps kombu's reading of the URL (host, port, db, password, the
    ``ssl_*`` query parameters of a ``rediss://`` URL, ``;``-separated sentinels), with one
    difference this makes up for: kombu turns on TLS for a ``rediss://`` URL that has no TLS
    options by the scheme's name (``ssl_cert_reqs=CERT_NONE``, with a warning), and an explicit
    transport has no such name.
    """
    first = (broker_url or "").split(";")[0].strip()
    scheme = urlsplit(first).scheme.lower()
    transport = TRANSPORTS.get(scheme)
    if transport is None:
        return {}
    settings: dict[str, Any] = {"broker_transport": transport}
    if scheme == "rediss" and not broker_use_ssl:
        query = dict(parse_qsl(urlsplit(first).query))
        if not any(key.startswith("ssl_") for key in query):
            log.warning("Secure redis scheme specified (rediss) with no ssl options, defaulting to insecure SSL behaviour.")
            settings["broker_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_NONE}
    return settings
