"""Webhook signatures: ``X-Uploader-Signature`` = hex HMAC-SHA256(secret, ``"<timestamp>.<body>"``),
``X-Uploader-Timestamp`` = unix seconds. A receiver recomputes it over the raw body, compares in
constant time, and refuses a timestamp outside its replay window (:func:`verify`)."""

from __future__ import annotations

import hashlib
import hmac
import time

TIMESTAMP_HEADER = "X-Uploader-Timestamp"
SIGNATURE_HEADER = "X-Uploader-Signature"
#: The replay window :func:`verify` allows by default (seconds either side of now).
REPLAY_WINDOW = 300


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    return hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def headers(secret: bytes, body: bytes, *, now: float | None = None) -> dict[str, str]:
    """The two headers a POST of ``body`` carries."""
    timestamp = int(time.time() if now is None else now)
    return {TIMESTAMP_HEADER: str(timestamp), SIGNATURE_HEADER: sign(secret, timestamp, body)}


def verify(secret: bytes, timestamp: str, signature: str, body: bytes, *, window: float = REPLAY_WINDOW,
           now: float | None = None) -> bool:
    """Whether a received POST is genuine and fresh (what a receiver does; see the README)."""
    try:
        stamp = int(timestamp)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - stamp) > window:
        return False
    return hmac.compare_digest(sign(secret, stamp, body), signature)
