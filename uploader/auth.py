"""Who may send what: proofs on messages only the fleet can send, and upload capabilities.

Two secrets, two kinds of authority:

- The **fleet key** (``UPLOADER_FLEET_KEY``) is held by the workers and by operators. A message of
  an internal task (parts, completion, failure, maintenance) carries a *proof*: an HMAC-SHA256
  with that key over the task's name and its named arguments. Workers quarantine an internal
  message without a valid proof before it runs (``workers/consumer.py``), so a client that can
  only push to the control queue cannot forge one. An operator's ``cancel``/``resume`` carries a
  proof the same way and may act on any upload.
- An upload's **capability** is a random token its submitter keeps. ``submit`` sends only its
  SHA-256 digest; the worker stores ``HMAC(fleet key, digest)`` in the record (readable by
  clients for ``status``, useless without the key). ``cancel``/``resume`` then carry the token
  itself, which the worker hashes and compares.

A proof binds the task and its arguments, not the moment: a message replayed verbatim is a
duplicate, which the protocol tolerates by design (every task is idempotent, and a stale
generation is a no-op). Whoever can *read* the queues can replay; the Redis ACL users in
``deploy/redis`` give clients no read access to them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

#: The argument carrying a proof (internal tasks: required; cancel/resume: an operator's).
PROOF = "proof"
#: The argument of cancel/resume carrying an upload's capability token.
TOKEN = "token"
#: The request field of start_upload carrying the capability's digest (SHA-256, hex).
CAPABILITY = "capability"
#: Arguments a proof does not cover: itself, the capability token, and the failed task's id
#: Celery prepends to a chord's error callback (unknown when the callback is signed).
UNSIGNED = frozenset({PROOF, TOKEN, "failed_task_id"})

_DIGEST_HEX = 64

#: What a worker started without a fleet key says (the CLI and the worker itself).
FLEET_KEY_MISSING = (
    "UPLOADER_FLEET_KEY is not set: workers sign the messages they send each other with it and refuse "
    "internal messages without its proof. Make one with `uploader keygen` and give the same key to every "
    "worker (and to operators, never to ordinary clients); see docs/security.md"
)


def new_fleet_key() -> str:
    """A new fleet key: 256 random bits, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


class Authority(Enum):
    """Why a cancel or resume may act on an upload."""

    OWNER = "owner"  # it carries the upload's capability token
    OPERATOR = "operator"  # it carries a proof made with the fleet key
    OPEN = "open"  # the deployment does not require capabilities (UPLOADER_REQUIRE_CAPABILITY=false)


@dataclass(frozen=True)
class Capability:
    """A new upload capability: ``token`` stays with the submitter, ``digest`` is sent."""

    token: str
    digest: str

    @classmethod
    def new(cls) -> Capability:
        return cls.of(secrets.token_urlsafe(32))

    @classmethod
    def of(cls, token: str) -> Capability:
        return cls(token, capability_digest(token))


def capability_digest(token: str) -> str:
    """The SHA-256 (hex) of a capability token: what ``submit`` sends."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def valid_digest(value: Any) -> bool:
    """Whether ``value`` has the shape of a capability digest (64 lower-case hex digits)."""
    return (
        type(value) is str and len(value) == _DIGEST_HEX and all(c in "0123456789abcdef" for c in value)
    )


def owner_seal(key: bytes, digest: str) -> str:
    """What the record keeps of a capability: ``HMAC(fleet key, digest)``. Reading it (clients
    may read records) tells nothing about the token, and no digest can be forged to match it
    without the key."""
    return hmac.new(key, b"owner\n" + digest.encode("ascii"), hashlib.sha256).hexdigest()


def token_opens(key: bytes, token: Any, seal: str) -> bool:
    """Whether ``token`` is the capability whose seal the record keeps."""
    if type(token) is not str or not seal or len(token) > 256:
        return False
    return hmac.compare_digest(owner_seal(key, capability_digest(token)), seal)


def canonical(task: str, arguments: Mapping[str, Any]) -> bytes:
    """The bytes a proof covers: the task name and its named arguments but :data:`UNSIGNED`,
    as sorted, compact JSON (the same on every side, whatever the order of the kwargs)."""
    signed = {name: value for name, value in arguments.items() if name not in UNSIGNED}
    return task.encode("utf-8") + b"\n" + json.dumps(
        signed, sort_keys=True, separators=(",", ":"), ensure_ascii=True
    ).encode("ascii")


def prove(key: bytes, task: str, arguments: Mapping[str, Any]) -> str:
    """The proof (HMAC-SHA256, hex) for a message of ``task`` with ``arguments``."""
    return hmac.new(key, canonical(task, arguments), hashlib.sha256).hexdigest()


def signed(key: bytes, task: str, arguments: Mapping[str, Any]) -> dict[str, Any]:
    """``arguments`` with their proof added."""
    return {**arguments, PROOF: prove(key, task, arguments)}


def proven(key: bytes | None, task: str, arguments: Mapping[str, Any]) -> bool:
    """Whether ``arguments`` carry a valid proof for ``task`` (never without a key)."""
    proof = arguments.get(PROOF)
    if key is None or type(proof) is not str or len(proof) != _DIGEST_HEX:
        return False
    try:
        expected = prove(key, task, arguments)
    except (TypeError, ValueError):  # not JSON-serialisable: not a message we sent
        return False
    return hmac.compare_digest(expected, proof)


def redacted(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """``arguments`` as they may be shown (logs, Flower, dead letters): proofs and tokens
    replaced by ``'***'``."""
    return {name: ("***" if name in (PROOF, TOKEN) else value) for name, value in arguments.items()}
