"""Redis connections from the URLs in the settings: a plain server (``redis://``, ``rediss://``,
``unix://``) or a primary found through Redis Sentinel (``sentinel://``).

A Sentinel URL lists the sentinels, as kombu and Celery take it for the broker and the result
backend: ``sentinel://[:password@]host:26379[/db];sentinel://host2:26379;...``. The password and
database number of the first entry are the *primary's*; the primary's name is
``UPLOADER_REDIS_SENTINEL_MASTER`` and the sentinels' own password, if they have one,
``UPLOADER_REDIS_SENTINEL_PASSWORD``. After a failover every connection finds the new primary by
asking the sentinels again (redis-py's ``SentinelConnectionPool``), so a command retried across
the failover (see ``CheckpointStore.from_url``) lands on the promoted replica.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.retry import Retry
from redis.sentinel import Sentinel

from uploader.redis_tls import tls_failure, uses_tls

SENTINEL_SCHEME = "sentinel"


def is_sentinel_url(url: str) -> bool:
    return urlsplit(url.split(";", 1)[0].strip()).scheme.lower() == SENTINEL_SCHEME


def sentinel_hosts(url: str) -> tuple[list[tuple[str, int]], str | None, int]:
    """``([(host, port), ...], primary password, db)`` of a ``sentinel://`` URL list."""
    hosts: list[tuple[str, int]] = []
    password: str | None = None
    db = 0
    for index, entry in enumerate(part.strip() for part in url.split(";") if part.strip()):
        parts = urlsplit(entry)
        if parts.scheme.lower() != SENTINEL_SCHEME or not parts.hostname:
            raise ValueError(f"{entry!r} is not a sentinel://host:port URL")
        hosts.append((parts.hostname, parts.port or 26379))
        if index == 0:
            password = unquote(parts.password) if parts.password else None
            path = parts.path.strip("/")
            db = int(path) if path else 0
    if not hosts:
        raise ValueError("a sentinel:// URL names no sentinel")
    return hosts, password, db


class OutageRetry(Retry):
    """redis-py's retry, except for a TLS failure (an unknown CA, a plain-text port, a refused
    client certificate): waiting does not fix those, so the first one is raised at once instead
    of after every reconnection attempt (about a minute with the workers' 30)."""

    def call_with_retry(self, do: Any, fail: Any, is_retryable: Any = None, with_failure_count: bool = False) -> Any:
        def retryable(error: Exception) -> bool:
            return tls_failure(error) is None and (is_retryable is None or is_retryable(error))

        return super().call_with_retry(do, fail, retryable, with_failure_count)


def redis_client(
    url: str,
    *,
    sentinel_master: str | None = None,
    sentinel_password: str | None = None,
    timeout: float | None = None,
    tls: Mapping[str, Any] | None = None,
    **options: Any,
) -> redis.Redis:
    """A client for the Redis at ``url`` (a primary found through the sentinels for a
    ``sentinel://`` URL, whose primary is named ``sentinel_master``). ``timeout``: seconds to
    connect and per command; ``tls``: the ``ssl_*`` options of a ``rediss://`` URL
    (:func:`uploader.redis_tls.tls_options`; ignored for other URLs); ``options``: the rest of
    redis-py's client options (retry, decode_responses, ...)."""
    if not is_sentinel_url(url):
        if tls and uses_tls(url):
            options = {**tls, **options}
        return redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout, **options)
    if not sentinel_master:
        raise ValueError(
            "a sentinel:// Redis URL needs the primary's name: set UPLOADER_REDIS_SENTINEL_MASTER "
            "(the name in the sentinels' `sentinel monitor <name> ...`)"
        )
    hosts, password, db = sentinel_hosts(url)
    sentinel_kwargs: dict[str, Any] = {"socket_timeout": timeout or 5, "socket_connect_timeout": timeout or 5}
    if sentinel_password:
        sentinel_kwargs["password"] = sentinel_password
    sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_kwargs, socket_timeout=timeout, socket_connect_timeout=timeout)
    return sentinel.master_for(sentinel_master, redis_class=redis.Redis, password=password, db=db, **options)
