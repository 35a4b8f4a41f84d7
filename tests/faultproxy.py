"""A fault-injecting HTTP proxy on loopback, between workers and the S3 server.

It forwards every request to the upstream S3 endpoint and, for requests the ``targets``
predicate selects, injects a fault instead with probability ``rate``: ``503`` (S3's SlowDown),
``500`` (InternalError), ``reset`` (close the connection after reading part of the body) or
``forbidden`` (403 AccessDenied, a permanent error). Counts of what it did are kept for asserts.

Three faults still forward the request, so the upstream does handle it:

* ``slow``: wait ``slow_seconds`` before forwarding (a slow server or a congested path);
* ``truncated``: send the upstream's status line and headers with a ``Content-Length`` for the
  whole body (at least 1 KiB: an UploadPart answer has an empty body, so one is announced that
  never arrives), then only half of the body, then close the connection. The request took effect
  on the server although its answer was cut short. (botocore reads bodies with
  ``enforce_content_length=False``, so it accepts a short body whose headers are complete.)
* ``lost``: close the connection before sending any answer: the request took effect, but the
  client sees a connection error and sends it again.
* ``corrupt``: forward the body with its first byte inverted (damage in transit, or a tampered
  part): a server that checks the part's checksum refuses it, one that does not stores it.

``body_rate`` (bytes per second, 0 = unlimited) reads the body of every targeted request that
is forwarded no faster than that, through a small receive buffer, so the client's send of the body
is slow (a slow or congested uplink). ``bodies`` records ``(method, path, bytes received,
Content-Length, seconds spent receiving)`` for each such body; a client that gives up in the
middle of sending leaves an entry with fewer bytes than announced (counted as ``body-cut``), and
nothing is forwarded for it.

``add_headers`` (optional) is called for every forwarded request that the upstream answered with
a 2xx, as ``add_headers(method, path, request body, upstream response headers)``, and returns
headers to add to the answer: a provider's extra response headers emulated in front of SeaweedFS
(tests/osscrc64.py adds Alibaba OSS's ``x-oss-hash-crc64ecma``).

``answer`` (optional) is called for every forwarded request that the upstream answered with a
2xx, as ``answer(method, path, request headers (lower-cased names), upstream body)``, and returns
``None`` (the upstream's answer goes back) or ``(status, body)`` to send instead, with the
upstream's headers: a provider that answers other than SeaweedFS does, emulated (Alibaba OSS
answers a Complete that carried ``x-oss-callback`` with its callback server's body).

``fault`` is one kind, or a sequence of kinds: each injected fault then picks one of them at
random (seeded). ``events`` records ``(monotonic time, method, path, what)`` for every targeted
request, ``what`` being ``forwarded`` or the fault injected.

``peak`` counts, per multipart upload id (the ``uploadId`` of the query), the most targeted
requests that were in the proxy at the same moment (from the arrival of their headers to the end
of the answer); ``spans`` records ``(upload id, start, end, bytes of body)`` (monotonic times)
of each targeted request, for rates measured on the wire.
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

_ERRORS = {
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "forbidden": (403, "AccessDenied", "Access Denied"),
}


#: Every kind of fault the proxy can inject.
FAULT_KINDS = ("503", "500", "forbidden", "reset", "slow", "truncated", "lost", "corrupt")


def is_upload_part(method: str, path: str) -> bool:
    return method == "PUT" and "partNumber=" in path and "uploadId=" in path


class FaultProxy:
    def __init__(
        self,
        upstream: str,
        *,
        fault: str | Sequence[str] = "503",
        rate: float = 0.0,
        targets: Callable[[str, str], bool] = is_upload_part,
        seed: int = 1234,
        slow_seconds: float = 2.0,
        body_rate: int = 0,
        add_headers: Callable[[str, str, bytes, dict[str, str]], dict[str, str]] | None = None,
        answer: Callable[[str, str, dict[str, str], bytes], tuple[int, bytes] | None] | None = None,
    ) -> None:
        self.upstream = urlsplit(upstream)
        self.fault = fault
        self.rate = rate
        self.targets = targets
        self.slow_seconds = slow_seconds
        self.body_rate = body_rate
        self.add_headers = add_headers
        self.answer = answer
        self.bodies: list[tuple[str, str, int, int, float]] = []
        self.counts: Counter[str] = Counter()
        self.events: list[tuple[float, str, str, str]] = []
        #: Every request received, targeted or not: ``(method, path with query, headers)``
        #: (header names lower-cased), for asserts on what the client put on the wire.
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.peak: Counter[str] = Counter()
        self.spans: list[tuple[str, float, float, int]] = []
        self._inflight: Counter[str] = Counter()
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                # ``targets`` is asked once per request: a test's predicate may count its calls.
                targeted = proxy.targets(self.command, self.path)
                if not targeted:
                    self._serve(targeted)
                    return
                upload = (parse_qs(urlsplit(self.path).query).get("uploadId") or [""])[0]
                started = time.monotonic()
                with proxy._lock:
                    proxy._inflight[upload] += 1
                    proxy.peak[upload] = max(proxy.peak[upload], proxy._inflight[upload])
                try:
                    self._serve(targeted)
                finally:
                    with proxy._lock:
                        proxy._inflight[upload] -= 1
                        proxy.spans.append(
                            (upload, started, time.monotonic(), int(self.headers.get("Content-Length") or 0))
                        )

            def _serve(self, targeted: bool) -> None:
                with proxy._lock:
                    proxy.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
                length = int(self.headers.get("Content-Length") or 0)
                fault = proxy._pick() if targeted else None
                if fault is not None:
                    proxy._count(f"injected-{fault}")
                if targeted:
                    proxy._event(self.command, self.path, fault or "forwarded")
                if fault == "reset":
                    self.rfile.read(min(length, 64 * 1024))
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.connection.close()
                    self.close_connection = True
                    return
                if fault in _ERRORS:
                    self.rfile.read(length)
                    status, code, message = _ERRORS[fault]
                    body = (
                        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                        f"<Message>{message}</Message></Error>"
                    ).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if targeted and proxy.body_rate and length:
                    body = self._read_paced(length)
                    if body is None:
                        return
                else:
                    body = self.rfile.read(length) if length else None
                if fault == "slow":
                    time.sleep(proxy.slow_seconds)
                if fault == "corrupt" and body:
                    body = bytes([body[0] ^ 0xFF]) + body[1:]
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=120)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    payload = response.read()
                finally:
                    conn.close()
                proxy._count("forwarded")
                if fault == "truncated":
                    self._send_truncated(response, payload)
                    return
                if fault == "lost":
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                status, reason, payload = self._answered(response, payload)
                self._send_head(status, reason, response)
                if proxy.add_headers is not None and 200 <= response.status < 300:
                    upstream_headers = {k.lower(): v for k, v in response.getheaders()}
                    for name, value in proxy.add_headers(self.command, self.path, body or b"", upstream_headers).items():
                        self.send_header(name, value)
                # A HEAD response's Content-Length is the object's, not the (empty) payload's.
                length_header = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length_header or str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            def _read_paced(self, length: int) -> bytes | None:
                """The body read at ``body_rate`` bytes/s, or ``None`` (and the connection
                closed) if the client stopped sending before all of it arrived."""
                # A small receive buffer, so the kernel does not take in megabytes on our behalf.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
                chunks, got, started = [], 0, time.monotonic()
                while got < length:
                    try:
                        chunk = self.rfile.read1(min(16 * 1024, length - got))
                    except OSError:  # reset by the client
                        chunk = b""
                    if not chunk:
                        break
                    chunks.append(chunk)
                    got += len(chunk)
                    ahead = started + got / proxy.body_rate - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
                proxy._body(self.command, self.path, got, length, time.monotonic() - started)
                if got < length:
                    proxy._count("body-cut")
                    self.close_connection = True
                    return None
                return b"".join(chunks)

            def _answered(self, response: http.client.HTTPResponse, payload: bytes) -> tuple[int, str, bytes]:
                """``(status, reason, body)`` to send back: the upstream's, or what ``answer``
                replaces a 2xx with (its reason then left to the status)."""
                if proxy.answer is not None and 200 <= response.status < 300:
                    request_headers = {k.lower(): v for k, v in self.headers.items()}
                    replaced = proxy.answer(self.command, self.path, request_headers, payload)
                    if replaced is not None:
                        status, body = replaced
                        return status, "", body
                return response.status, response.reason, payload

            def _send_head(self, status: int, reason: str, response: http.client.HTTPResponse) -> None:
                """The status line and the upstream's headers, but for those of its own framing."""
                self.send_response(status, reason or None)
                for name, value in response.getheaders():
                    if name.lower() not in {"connection", "transfer-encoding", "content-length"}:
                        self.send_header(name, value)

            def _send_truncated(self, response: http.client.HTTPResponse, payload: bytes) -> None:
                status, reason, payload = self._answered(response, payload)
                self._send_head(status, reason, response)
                self.send_header("Content-Length", str(max(len(payload), 1024)))
                self.end_headers()
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _roll(self) -> bool:
        with self._lock:
            return self._random.random() < self.rate

    def _pick(self) -> str | None:
        """The fault to inject into this request, or ``None`` to forward it untouched."""
        with self._lock:
            if not self._random.random() < self.rate:
                return None
            if isinstance(self.fault, str):
                return self.fault
            return self._random.choice(list(self.fault))

    def _event(self, method: str, path: str, what: str) -> None:
        with self._lock:
            self.events.append((time.monotonic(), method, path, what))

    def _body(self, method: str, path: str, got: int, length: int, seconds: float) -> None:
        with self._lock:
            self.bodies.append((method, path, got, length, seconds))

    def injected(self) -> int:
        """How many faults were injected, of every kind."""
        with self._lock:
            return sum(n for what, n in self.counts.items() if what.startswith("injected-"))

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
