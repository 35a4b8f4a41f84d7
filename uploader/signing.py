"""Celery message signing: an optional, stronger mode a deployment turns on.

With ``UPLOADER_MESSAGE_SIGNING_KEY``, ``..._CERT`` and ``..._CERT_STORE`` set, every process of
the system (clients and workers) serializes task messages with Celery's ``auth`` serializer
(``celery.security``): the JSON body is signed with the process's RSA private key (PSS,
``UPLOADER_MESSAGE_SIGNING_DIGEST``) and names its certificate (issuer and serial number).
Workers accept only ``auth`` content, and run a message only if the certificate it names is in
their store and the signature verifies (``workers/poison.py``): an unsigned message, one signed
by a key the store does not hold, or one whose body was altered after signing is quarantined.
Results and events stay JSON.

What it costs and what it does not do (measured figures in the README):

- every client then needs a key and a certificate the workers trust; clients in other languages
  that cannot produce Celery's ``auth`` format are locked out;
- an RSA signature per message sent (the coordinator signs one per part) and a verification
  per message received (twice: the consumer checks it, the pool decodes again);
- the signature covers the body only, not the headers: a reader of the queues can replay a
  signed body verbatim, or under another task name. The fleet key's proof (``uploader/auth.py``)
  binds the task name and stays required on internal tasks: signing replaces nothing of it.
- the certificate store is a flat list of trusted certificates (no chains, no revocation); an
  expired certificate stops a worker at start-up and its messages are refused afterwards.

Celery keeps the serializer in kombu's process-wide registry: one signing identity per process.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

from uploader.config import Settings
from uploader.errors import Misconfigured

#: The serializer name Celery's message signing registers.
SERIALIZER = "auth"
#: The content type of a signed message (kombu's generic "data" type, which Celery's ``auth``
#: serializer registers under).
SIGNED_CONTENT_TYPE = "application/data"
#: What a signed message of ours must wrap. Celery's signature does not cover this inner content
#: type, and decodes it with ``force=True`` (even a disabled serializer such as pickle): checked
#: before decoding (:func:`inner_content_problem`).
INNER_CONTENT_TYPE = "application/json"
INNER_CONTENT_ENCODING = "utf-8"


class SigningMisconfigured(Misconfigured):
    """A message signing setting names a file that is missing, unreadable or not what it must be.
    The message names the setting and the path, never the key's contents."""


def celery_settings(settings: Settings) -> dict[str, Any]:
    """Celery settings for message signing (empty when it is off): ``auth`` task messages only,
    results and events in JSON."""
    if not settings.message_signing:
        return {}
    return {
        "task_serializer": SERIALIZER,
        # Exactly ["auth"]: Celery's setup_security refuses anything else.
        "accept_content": [SERIALIZER],
        "result_serializer": "json",
        "result_accept_content": ["json"],
        "event_serializer": "json",
        "security_key": str(settings.message_signing_key),
        "security_certificate": str(settings.message_signing_cert),
        "security_cert_store": settings.message_signing_cert_store,
        "security_digest": settings.message_signing_digest,
    }


def enable(app: Any, settings: Settings, *, worker: bool = False) -> None:
    """Register the ``auth`` serializer with this process's key and certificate (Celery's
    ``app.setup_security``), if signing is on; nothing otherwise. ``app`` must be configured
    with :func:`uploader.contract.celery_config` first.

    Checks first, and raises :class:`SigningMisconfigured` naming the setting: the key is an
    unencrypted PEM RSA key, the certificate a PEM RSA certificate of that key and not expired,
    the store holds at least one certificate and only certificates; for a ``worker``, its own
    certificate is in the store (the other workers would refuse its messages otherwise)."""
    if not settings.message_signing:
        return
    try:
        from celery.exceptions import SecurityError
        from celery.security.certificate import Certificate, FSCertStore
        from cryptography.exceptions import UnsupportedAlgorithm
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.hazmat.primitives.serialization import load_pem_private_key
    except Exception as exc:  # noqa: BLE001  (ImproperlyConfigured without cryptography)
        raise SigningMisconfigured(
            "message signing needs the 'cryptography' package: install uploader[signing]"
        ) from exc

    assert settings.message_signing_key is not None and settings.message_signing_cert is not None
    store_setting = settings.message_signing_cert_store or ""
    key_text = _read(settings.message_signing_key, "UPLOADER_MESSAGE_SIGNING_KEY")
    cert_text = _read(settings.message_signing_cert, "UPLOADER_MESSAGE_SIGNING_CERT")
    try:
        key = load_pem_private_key(key_text.encode("ascii"), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # (Never the error's text: nothing of a key is worth the risk of a log line.)
        key = None
    if not isinstance(key, rsa.RSAPrivateKey):  # Celery signs with RSA-PSS only
        raise SigningMisconfigured(
            f"UPLOADER_MESSAGE_SIGNING_KEY ({settings.message_signing_key}) is not an unencrypted PEM RSA private key"
        )
    try:
        cert = Certificate(cert_text)
    except SecurityError:
        raise SigningMisconfigured(
            f"UPLOADER_MESSAGE_SIGNING_CERT ({settings.message_signing_cert}) is not a PEM certificate of an RSA key"
        ) from None
    if cert.has_expired():
        raise SigningMisconfigured(f"UPLOADER_MESSAGE_SIGNING_CERT ({settings.message_signing_cert}) has expired")
    if cert.get_pubkey().public_numbers() != key.public_key().public_numbers():
        raise SigningMisconfigured(
            f"UPLOADER_MESSAGE_SIGNING_CERT ({settings.message_signing_cert}) is not the certificate of "
            "UPLOADER_MESSAGE_SIGNING_KEY: every message this process signed would be refused"
        )
    pattern = os.path.join(store_setting, "*") if os.path.isdir(store_setting) else store_setting
    if not glob.glob(pattern):
        raise SigningMisconfigured(f"UPLOADER_MESSAGE_SIGNING_CERT_STORE ({store_setting}) holds no certificate")
    try:
        store = FSCertStore(store_setting)
    except SecurityError as exc:
        # "Invalid certificate", "Expired certificate: <issuer serial>", "Duplicate certificate".
        raise SigningMisconfigured(
            f"UPLOADER_MESSAGE_SIGNING_CERT_STORE ({store_setting}) must hold only valid PEM certificates, "
            f"one file each (keep private keys elsewhere): {str(exc)[:200]}"
        ) from None
    except OSError as exc:
        raise SigningMisconfigured(
            f"UPLOADER_MESSAGE_SIGNING_CERT_STORE ({store_setting}): {exc.strerror or exc}"
        ) from None
    if worker:
        try:
            held = store[cert.get_id()].get_pubkey().public_numbers() == cert.get_pubkey().public_numbers()
        except SecurityError:
            held = False
        if not held:
            raise SigningMisconfigured(
                f"this worker's certificate (UPLOADER_MESSAGE_SIGNING_CERT, {cert.get_id()!r}) is not in "
                f"UPLOADER_MESSAGE_SIGNING_CERT_STORE ({store_setting}): the other workers would refuse its messages"
            )
    # JSON stays enabled for whatever decodes without an accept list (results, events).
    app.setup_security(allowed_serializers=["json"])


def _read(path: Path, setting: str) -> str:
    try:
        return path.read_text("ascii")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not a PEM file"
        raise SigningMisconfigured(f"{setting} ({path}): {reason}") from None


def inner_content_problem(body: Any) -> str | None:
    """Why the signed message ``body`` does not wrap JSON (see :data:`INNER_CONTENT_TYPE`), or
    ``None``. Reads Celery's framing with its own unpacker; verifies nothing."""
    from celery.security.serialization import SecureSerializer

    try:
        # (Private, but the framing is Celery's: reading it with Celery's own code keeps this in
        # step with an upgrade; tests/test_message_signing.py fails loudly if it moves.)
        unpacked = SecureSerializer()._unpack(body)
        content_type, encoding = unpacked["content_type"], unpacked["content_encoding"]
    except Exception:  # noqa: BLE001  (not base64, too few fields, not text)
        return "body is not a signed message (Celery's auth serializer)"
    if content_type != INNER_CONTENT_TYPE or encoding.lower() != INNER_CONTENT_ENCODING:
        return (f"the signed body is {content_type[:40]!r} in {encoding[:20]!r}, not {INNER_CONTENT_TYPE} "
                f"in {INNER_CONTENT_ENCODING} (the signature does not cover the inner content type)")
    return None


def verification_problem(exc: BaseException) -> str | None:
    """Why decoding a signed message raised ``exc``, if its signature was refused (``None`` for
    any other failure). Celery reports a signature that does not match its body as
    ``TypeError: catching classes that do not inherit from BaseException`` (its
    ``reraise_errors`` catches the module ``cryptography.exceptions``: celery/celery#5692), so
    the chain of causes is searched for what really happened."""
    from celery.exceptions import SecurityError
    from cryptography.exceptions import InvalidSignature

    security: BaseException | None = None
    seen: BaseException | None = exc
    for _ in range(8):  # the chain is short: kombu's DecodeError, Celery's SecurityError(s)
        if seen is None:
            break
        if isinstance(seen, InvalidSignature):
            return "its signature does not match its body (altered after signing, or not signed with its certificate's key)"
        if isinstance(seen, SecurityError):
            security = seen  # the innermost says most ("Unknown certificate: ...")
        seen = seen.__cause__ or seen.__context__
    if security is None:
        return None
    return f"its signature is not accepted ({security})"
