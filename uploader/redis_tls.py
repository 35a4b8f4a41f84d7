"""TLS for the three Redis connections: the broker, the result backend and the checkpoint.

A ``rediss://`` URL turns TLS on; four settings say how, the same for every ``rediss://`` URL
(``UPLOADER_BROKER_URL``, ``UPLOADER_RESULT_BACKEND``, ``UPLOADER_CHECKPOINT_URL``):

- ``UPLOADER_REDIS_TLS_CA_FILE``: the CA bundle (PEM) that signed the server's certificate
  (unset: the system's CAs);
- ``UPLOADER_REDIS_TLS_CERT_FILE`` / ``UPLOADER_REDIS_TLS_KEY_FILE``: a client certificate, for a
  server with ``tls-auth-clients yes``;
- ``UPLOADER_REDIS_TLS_VERIFY``: ``required`` (the default: the certificate must chain to the CA
  and name the host), ``optional`` or ``none`` (encrypted, but anyone can pose as the server).

kombu (``broker_use_ssl``), Celery's Redis backend (``redis_backend_use_ssl``) and redis-py (the
checkpoint and the dead-letter list) all take the same four ``ssl_*`` options, so one dict serves
the three. Without this, each library read a bare ``rediss://`` its own way (kombu: no
verification, with a warning; Celery's backend: a ValueError; redis-py: the system's CAs), and
TLS options could only be given in each URL's query string. The settings refuse ``ssl_*`` query
parameters (:func:`url_tls_parameters`) so that there is one way, and refuse TLS files next to a
plain ``redis://`` URL, which would silently ignore them.

A TLS failure (an unknown CA, a plain-text port) does not heal by waiting: :func:`tls_failure`
finds it in an exception's chain, so the checkpoint's reconnection loop gives up at once
(``uploader.checkpoint.connection.OutageRetry``) and the client names the setting to fix
(:func:`explain_connection_error`).
"""

from __future__ import annotations

import ssl
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit

#: The scheme that turns TLS on (kombu, Celery and redis-py agree on it).
TLS_SCHEME = "rediss"
PLAIN_SCHEME = "redis"

#: ``UPLOADER_REDIS_TLS_VERIFY`` values and what the ``ssl`` module calls them.
VERIFY_MODES = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}

#: The URL query parameters kombu, Celery and redis-py read as TLS options.
_URL_TLS_PARAMETERS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname")


class TlsSettings(Protocol):
    """The part of :class:`uploader.config.Settings` this module reads (read-only members:
    Settings are frozen, and its ``redis_tls_verify`` is a narrower Literal)."""

    @property
    def broker_url(self) -> str: ...

    @property
    def redis_tls_ca_file(self) -> Any: ...

    @property
    def redis_tls_cert_file(self) -> Any: ...

    @property
    def redis_tls_key_file(self) -> Any: ...

    @property
    def redis_tls_verify(self) -> str: ...

    @property
    def effective_result_backend(self) -> str: ...

    @property
    def effective_checkpoint_url(self) -> str: ...


def scheme(url: str) -> str:
    """The scheme of ``url`` (of its first entry, for ``;``-separated lists), lower-case."""
    return urlsplit(url.split(";", 1)[0].strip()).scheme.lower()


def uses_tls(url: str | None) -> bool:
    return bool(url) and scheme(url or "") == TLS_SCHEME


def url_tls_parameters(url: str) -> list[str]:
    """The TLS options given in ``url``'s query string (refused: see the module docstring)."""
    query = urlsplit(url.split(";", 1)[0].strip()).query
    return [name for name, _ in parse_qsl(query) if name.lower() in _URL_TLS_PARAMETERS]


def tls_options(settings: TlsSettings) -> dict[str, Any]:
    """The ``ssl_*`` options of every ``rediss://`` connection, as kombu, Celery's Redis backend
    and redis-py all take them."""
    options: dict[str, Any] = {"ssl_cert_reqs": VERIFY_MODES[settings.redis_tls_verify]}
    if settings.redis_tls_ca_file:
        options["ssl_ca_certs"] = str(settings.redis_tls_ca_file)
    if settings.redis_tls_cert_file:
        options["ssl_certfile"] = str(settings.redis_tls_cert_file)
    if settings.redis_tls_key_file:
        options["ssl_keyfile"] = str(settings.redis_tls_key_file)
    return options


def celery_tls_config(settings: TlsSettings) -> dict[str, Any]:
    """Celery's ``broker_use_ssl`` / ``redis_backend_use_ssl``, for the URLs that are ``rediss://``
    (both libraries turn TLS on for any URL once the option is set, so plain URLs get none)."""
    config: dict[str, Any] = {}
    if uses_tls(settings.broker_url):
        config["broker_use_ssl"] = tls_options(settings)
    if uses_tls(settings.effective_result_backend):
        config["redis_backend_use_ssl"] = tls_options(settings)
    return config


def tls_failure(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind ``exc`` (redis-py and kombu wrap it in their connection errors),
    or ``None``."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def explain_connection_error(exc: BaseException, url: str, settings: TlsSettings) -> str | None:
    """What went wrong and what to fix, in one line, when ``exc`` (a failed connection to ``url``)
    is a TLS failure or a plain-text client talking to a TLS-only port; ``None`` otherwise."""
    failure = tls_failure(exc)
    if failure is not None:
        ca = settings.redis_tls_ca_file or "unset: the system's CAs"
        if isinstance(failure, ssl.SSLCertVerificationError):
            return (
                f"TLS: the Redis server's certificate was not accepted ({failure.verify_message}): "
                f"UPLOADER_REDIS_TLS_CA_FILE must name the CA that signed it (now {ca}), and the URL's host must be "
                f"one the certificate names (UPLOADER_REDIS_TLS_VERIFY={settings.redis_tls_verify})"
            )
        reason = failure.reason or type(failure).__name__
        if reason == "WRONG_VERSION_NUMBER":
            return "TLS: the server did not answer with TLS: if that port is plain Redis, use a redis:// URL"
        return (
            f"TLS with the Redis server failed ({reason}): check UPLOADER_REDIS_TLS_CA_FILE (now {ca}), "
            "UPLOADER_REDIS_TLS_CERT_FILE and UPLOADER_REDIS_TLS_KEY_FILE (a client certificate, if the server asks for one)"
        )
    text = str(exc).strip()
    if scheme(url) == TLS_SCHEME and "Timeout connecting" in text:
        return f"{text.splitlines()[0]}: if that port is plain-text Redis (no TLS), use a redis:// URL"
    if scheme(url) == PLAIN_SCHEME and any(s in text for s in ("reset by peer", "Connection closed by server", "Broken pipe")):
        first = text.splitlines()[0]
        return f"{first}: the server closed a plain-text connection; if that Redis accepts only TLS, use a rediss:// URL"
    return None
