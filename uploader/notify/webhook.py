"""The webhook channel: one signed POST of the result to the request's ``callback_url``.

Outcomes: 2xx delivered; 5xx, 408, 429, timeouts and refused or reset connections are retried;
any other 4xx is final, and so is a 3xx (redirects are **not followed**: a redirect target
would be a second URL, and the receiver should be configured with its real address); an address
the outbound guard refuses (:mod:`uploader.outbound`) is final, with the guard's reason.
"""

from __future__ import annotations

import http.client
import json
import ssl
from typing import Any
from urllib.parse import urlsplit

from uploader.checkpoint.outbox import Settlement
from uploader.notify import signature
from uploader.notify.attempt import Attempt
from uploader.outbound import OutboundPolicy, OutboundRefused, connect

#: Statuses worth another attempt besides 5xx: Request Timeout and Too Many Requests.
RETRIED_4XX = frozenset({408, 429})
USER_AGENT = "uploader-notify/1"


class _GuardedHTTPConnection(http.client.HTTPConnection):
    """Connects through :func:`uploader.outbound.connect`: to an address the policy allows."""

    def __init__(self, host: str, port: int | None, *, policy: OutboundPolicy, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.policy = policy

    def connect(self) -> None:
        self.sock = connect(self.host, self.port, self.policy, float(self.timeout or 10))


class _GuardedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int | None, *, policy: OutboundPolicy, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.policy = policy

    def connect(self) -> None:
        sock = connect(self.host, self.port, self.policy, float(self.timeout or 10))
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def body_of(payload: dict[str, Any]) -> bytes:
    """The POST body: compact JSON, keys sorted (the signature is over these very bytes)."""
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


def post(
    url: str, payload: dict[str, Any], *, secret: bytes, policy: OutboundPolicy, timeout: float,
    body: bytes | None = None, content_type: str = "application/json",
) -> Attempt:
    """POST ``payload`` to ``url`` as JSON (or ``body`` as ``content_type``: a rendered
    ``callback_body``), signed with ``secret``; never raises for a network problem."""
    parts = urlsplit(url)
    body = body_of(payload) if body is None else body
    cls = _GuardedHTTPSConnection if parts.scheme == "https" else _GuardedHTTPConnection
    conn = cls(parts.hostname or "", parts.port, policy=policy, timeout=timeout)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    headers = {"Content-Type": content_type, "User-Agent": USER_AGENT, **signature.headers(secret, body)}
    try:
        conn.request("POST", target, body=body, headers=headers)
        response = conn.getresponse()
        response.read(64 * 1024)
        status = response.status
    except OutboundRefused as exc:
        return Attempt(Settlement.FAILED, error=f"refused: {exc}")
    except ssl.SSLCertVerificationError as exc:
        return Attempt(Settlement.RETRY, error=f"TLS certificate not trusted: {exc.verify_message}")
    except (OSError, http.client.HTTPException) as exc:  # timeouts, refused or reset connections
        return Attempt(Settlement.RETRY, error=f"{type(exc).__name__}: {exc}"[:500])
    finally:
        conn.close()
    if 200 <= status < 300:
        return Attempt(Settlement.DELIVERED, str(status))
    if status >= 500 or status in RETRIED_4XX:
        return Attempt(Settlement.RETRY, str(status), f"HTTP {status}")
    if 300 <= status < 400:
        return Attempt(Settlement.FAILED, str(status), f"HTTP {status}: redirects are not followed")
    return Attempt(Settlement.FAILED, str(status), f"HTTP {status}")
