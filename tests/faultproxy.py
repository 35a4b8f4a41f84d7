"""A fault-injecting HTTP proxy on loopback, between workers and the S3 server.

It forwards every request to the upstream S3 endpoint and, for requests the ``targets``
predicate selects, injects a fault instead with probability ``rate``: ``503`` (S3's SlowDown),
``500`` (InternalError), ``reset`` (close the connection after reading part of the body) or
``forbidden`` (403 AccessDenied, a permanent error). Counts of what it did are kept for asserts.
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_ERRORS = {
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "forbidden": (403, "AccessDenied", "Access Denied"),
}


def is_upload_part(method: str, path: str) -> bool:
    return method == "PUT" and "partNumber=" in path and "uploadId=" in path


class FaultProxy:
    def __init__(
        self,
        upstream: str,
        *,
        fault: str = "503",
        rate: float = 0.0,
        targets: Callable[[str, str], bool] = is_upload_part,
        seed: int = 1234,
    ) -> None:
        self.upstream = urlsplit(upstream)
        self.fault = fault
        self.rate = rate
        self.targets = targets
        self.counts: Counter[str] = Counter()
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if proxy.targets(self.command, self.path) and proxy._roll():
                    proxy._count(f"injected-{proxy.fault}")
                    if proxy.fault == "reset":
                        self.rfile.read(min(length, 64 * 1024))
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                        self.connection.close()
                        self.close_connection = True
                        return
                    self.rfile.read(length)
                    status, code, message = _ERRORS[proxy.fault]
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
                body = self.rfile.read(length) if length else None
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=120)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    payload = response.read()
                finally:
                    conn.close()
                proxy._count("forwarded")
                self.send_response(response.status, response.reason)
                for name, value in response.getheaders():
                    if name.lower() not in {"connection", "transfer-encoding", "content-length"}:
                        self.send_header(name, value)
                # A HEAD response's Content-Length is the object's, not the (empty) payload's.
                length_header = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length_header or str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _roll(self) -> bool:
        with self._lock:
            return self._random.random() < self.rate

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
