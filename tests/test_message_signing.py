"""Celery message signing (issue 10, item 4): with ``UPLOADER_MESSAGE_SIGNING_*`` set, clients and
workers sign every task message (Celery's ``auth`` serializer) and workers run only messages
signed by a certificate in their store; unsigned, untrusted and altered messages are quarantined.

The keys and self-signed certificates (no CA: Celery's store is a flat list of trusted
certificates) are made here with ``cryptography``, once per module. The attacks are sent as a
broker client would: a plain Celery client, or kombu publishing an envelope whose body Celery's
own ``SecureSerializer`` signed.
"""

from __future__ import annotations

import datetime
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.security.certificate import Certificate
from celery.security.key import PrivateKey
from celery.security.serialization import SecureSerializer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from kombu.serialization import registry

from tests.conftest import Stack, sha256_file, signed
from uploader import Uploader, contract, signing
from uploader.auth import Capability
from uploader.checkpoint.deadletter import DeadLetters
from uploader.config import Settings
from uploader.dev.localstack import wait_until
from uploader.errors import MessageQuarantined
from uploader.planner import MiB
from uploader.request import parse_request
from workers import poison

PART = 5 * MiB
QUARANTINED = "quarantined a message from queue"


@dataclass(frozen=True)
class Identity:
    """A private key file and its self-signed certificate."""

    key: Path
    cert: Path

    def serializer(self) -> SecureSerializer:
        """Celery's own signing serializer with this identity (outside kombu's registry)."""
        return SecureSerializer(PrivateKey(self.key.read_text()), Certificate(self.cert.read_text()), None, "sha256")

    def env(self, store: Path) -> dict[str, str]:
        return {"UPLOADER_MESSAGE_SIGNING_KEY": str(self.key), "UPLOADER_MESSAGE_SIGNING_CERT": str(self.cert),
                "UPLOADER_MESSAGE_SIGNING_CERT_STORE": str(store)}


def make_identity(directory: Path, name: str, *, days: float = 1, key: Any = None) -> Identity:
    """An RSA key (0600) and a self-signed certificate for it, valid until ``days`` from now."""
    directory.mkdir(parents=True, exist_ok=True)
    key = key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=2)).not_valid_after(now + datetime.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.pem"
    key_path.touch(mode=0o600)
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption(),
    ))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Identity(key_path, cert_path)


@dataclass(frozen=True)
class PKI:
    """The fleet's trusted store (the workers' and the clients' certificates), and an identity
    outside it."""

    store: Path
    worker: Identity
    client: Identity
    stranger: Identity


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    root = tmp_path_factory.mktemp("pki")
    worker, client = make_identity(root / "keys", "uploader-worker"), make_identity(root / "keys", "uploader-client")
    store = root / "trusted"
    store.mkdir()
    for identity in (worker, client):
        (store / identity.cert.name).write_bytes(identity.cert.read_bytes())
    return PKI(store, worker, client, make_identity(root / "stranger", "uploader-client"))


@pytest.fixture(scope="module", autouse=True)
def serializers_restored() -> Iterator[None]:
    """Celery's setup_security changes kombu's process-wide serializer registry (it registers
    ``auth`` with this process's key and makes it the default): the signing clients made here
    must not change what the rest of the session's tests send."""
    saved = (dict(registry._encoders), dict(registry._decoders), dict(registry.type_to_name),
             dict(registry.name_to_type), set(registry._disabled_content_types),
             registry._default_content_type, registry._default_content_encoding, registry._default_encode)
    yield
    (encoders, decoders, type_to_name, name_to_type, disabled, registry._default_content_type,
     registry._default_content_encoding, registry._default_encode) = saved
    for mine, kept in ((registry._encoders, encoders), (registry._decoders, decoders),
                       (registry.type_to_name, type_to_name), (registry.name_to_type, name_to_type)):
        mine.clear()
        mine.update(kept)
    registry._disabled_content_types.clear()
    registry._disabled_content_types.update(disabled)


def publish(app: Celery, task: str, body: bytes, *, content_type: str = signing.SIGNED_CONTENT_TYPE) -> str:
    """Put a task message with ``body`` (already serialized) on the control queue, with the
    headers Celery would give it; returns its task id."""
    task_id = str(uuid.uuid4())
    message = app.amqp.as_task_v2(task_id, task, kwargs={})
    queues = contract.task_queues()
    with app.producer_or_acquire() as producer:
        producer.publish(
            body, exchange=contract.CONTROL_QUEUE, routing_key=contract.CONTROL_QUEUE, declare=list(queues),
            content_type=content_type, content_encoding="utf-8", headers=message.headers,
            correlation_id=task_id, retry=True,
        )
    return task_id


def start_request(bucket: str, key: str, source: Path) -> dict[str, Any]:
    """The kwargs of a start_upload message, as ``submit`` makes them."""
    request = parse_request({"source": str(source), "bucket": bucket, "key": key, "capability": Capability.new().digest})
    return request.model_dump(exclude_none=True)


def altered(serializer: SecureSerializer, payload: Any, old: bytes, new: bytes) -> bytes:
    """``payload`` signed, then its signed JSON edited (``old`` -> ``new``), signature kept."""
    fields = serializer._unpack(serializer.serialize(payload))
    assert old in fields["body"]
    return serializer._pack(fields["body"].replace(old, new), fields["content_type"], fields["content_encoding"],
                            signer=fields["signer"], signature=fields["signature"])


def test_a_signing_fleet_completes_uploads_and_quarantines_unsigned_untrusted_and_altered_messages(make_stack, pki: PKI) -> None:  # type: ignore[no-untyped-def]
    """A signing client's uploads complete byte-identical; unsigned (even with a fleet key proof),
    untrusted, altered and relabelled messages, and unsigned remote-control commands, are each
    quarantined with one log line and a dead-letter entry, create nothing, and leave the worker
    up and working."""
    stack: Stack = make_stack(**pki.worker.env(pki.store))
    worker = stack.start_worker("signing", concurrency=4)
    client = Uploader(stack.settings.model_copy(update={
        "fleet_key": None, "message_signing_key": pki.client.key, "message_signing_cert": pki.client.cert,
    }))
    deadletters = DeadLetters(stack.uploader.checkpoint.redis, prefix=stack.settings.key_prefix)
    plain = Celery("plain", set_as_current=False)
    plain.conf.update(broker_url=stack.redis_url, result_backend=stack.redis_url, task_serializer="json")
    try:
        bucket = stack.new_bucket()
        path = stack.make_file(3 * PART + 7)
        first = client.submit(str(path), f"s3://{bucket}/signed.bin", part_size=PART)
        assert first.wait(timeout=180).state == "completed"
        assert stack.object_sha256(bucket, "signed.bin") == sha256_file(path)
        assert deadletters.count() == 0

        attacks: list[tuple[str, str, str]] = []  # (what, task id, words of the reason)
        # (a) Unsigned JSON by task name, as any Celery client (or one in another language) sends.
        unsigned = plain.send_task(contract.START_UPLOAD, kwargs=start_request(bucket, "a.bin", path), queue=contract.CONTROL_QUEUE)
        attacks.append(("unsigned", unsigned.id, "unsigned message"))
        # ... even with the fleet key's proof: the proof no longer suffices on its own.
        record = stack.uploader.checkpoint.get(first.upload_id)
        assert record is not None
        proven = plain.send_task(contract.COMPLETE_UPLOAD, kwargs=signed(
            contract.COMPLETE_UPLOAD, upload_id=first.upload_id, generation=record.generation), queue=contract.CONTROL_QUEUE)
        attacks.append(("unsigned with a proof", proven.id, "unsigned message"))
        # (b) Signed with a key whose certificate the workers do not hold (its subject is the
        # trusted client's; its serial number is not).
        body = pki.stranger.serializer().serialize(((), start_request(bucket, "b.bin", path), {}))
        attacks.append(("untrusted", publish(client.celery, contract.START_UPLOAD, body), "Unknown certificate"))
        # (c) Signed by the trusted client, then its body altered (another destination key).
        body = altered(pki.client.serializer(), ((), start_request(bucket, "victim.bin", path), {}), b"victim.bin", b"thief.bin")
        attacks.append(("altered", publish(client.celery, contract.START_UPLOAD, body), "does not match its body"))
        # (d) A genuine signed body (completion, with its valid proof) under another task name:
        # the signature covers the body only, the fleet key's proof binds the task name.
        kwargs = signed(contract.COMPLETE_UPLOAD, upload_id=first.upload_id, generation=record.generation)
        body = pki.client.serializer().serialize(((), kwargs, {}))
        attacks.append(("relabelled", publish(client.celery, contract.PUT_OBJECT, body), "no valid proof"))

        for _, task_id, words in attacks:
            with pytest.raises(MessageQuarantined, match=words):
                client.celery.AsyncResult(task_id).get(timeout=60)
        wait_until(lambda: deadletters.count() == len(attacks), 30, "every attack dead-lettered")
        reasons = [entry["reason"] for entry in deadletters.list()]
        for what, _, words in attacks:
            assert sum(words in reason for reason in reasons) >= 1, (what, reasons)
        log = worker.log_text()
        assert log.count(QUARANTINED) == len(attacks), log[-3000:]
        for what, task_id, _ in attacks:
            assert sum(task_id in line for line in log.splitlines() if QUARANTINED in line) == 1, what
        # Nothing was created for them.
        listed = stack.s3.list_objects_v2(Bucket=bucket).get("Contents", [])
        assert [o["Key"] for o in listed] == ["signed.bin"]
        assert stack.open_multipart_uploads(bucket) == []

        # Celery's remote control too: without signing, any broker client shuts every worker down
        # with one broadcast; with it, an unsigned command is refused (and a signed ping answered).
        assert plain.control.ping(timeout=1) == []
        plain.control.broadcast("shutdown")
        wait_until(lambda: worker.log_text().count(QUARANTINED) == len(attacks) + 2, 30, "the control messages refused")
        assert stack.uploader.celery.control.ping(destination=[worker.name], timeout=5) == [{worker.name: {"ok": "pong"}}]

        # The worker is still up and still completes uploads; none of them came back.
        assert worker.alive()
        second = client.submit(str(path), f"s3://{bucket}/after.bin", part_size=PART)
        assert second.wait(timeout=180).state == "completed"
        assert stack.object_sha256(bucket, "after.bin") == sha256_file(path)
        assert deadletters.count() == len(attacks) + 2
        assert stack.uploader.checkpoint.redis.llen(contract.CONTROL_QUEUE) == 0

        # No private key material in the worker's log.
        log = worker.log_text()
        assert "PRIVATE KEY" not in log
        for identity in (pki.worker, pki.client):
            for line in identity.key.read_text().splitlines()[1:-1]:
                assert line not in log
    finally:
        plain.close()
        client.close()


def test_a_worker_whose_certificate_the_store_does_not_hold_stops_at_once_saying_why(make_stack, pki: PKI, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from uploader.dev.localstack import Worker

    stack: Stack = make_stack()
    env = {**stack.env, **pki.stranger.env(pki.store)}
    with pytest.raises(RuntimeError, match="this worker's certificate .* is not in UPLOADER_MESSAGE_SIGNING_CERT_STORE") as caught:
        Worker(stack.workdir, env, name="stranger", concurrency=1)
    assert "Traceback" not in str(caught.value) and "PRIVATE KEY" not in str(caught.value)
    # The CLI's clients say what is wrong with their own settings the same way (exit status 7).
    cli = str(Path(sys.executable).parent / "uploader")
    bad = {**stack.env, **pki.client.env(pki.store), "UPLOADER_MESSAGE_SIGNING_KEY": str(pki.client.cert),
           "HOME": str(tmp_path)}
    run = subprocess.run([cli, "status", "no-such-upload"], env=bad, capture_output=True, text=True, timeout=60)
    assert run.returncode == 7, run.stderr
    assert "UPLOADER_MESSAGE_SIGNING_KEY" in run.stderr and "not an unencrypted PEM RSA private key" in run.stderr


@pytest.mark.parametrize("case", ["missing key", "key is a certificate", "not its certificate", "expired", "empty store", "key in the store", "not RSA"])
def test_unusable_signing_files_are_refused_naming_the_setting(case: str, pki: PKI, tmp_path: Path) -> None:
    identity, store = pki.client, pki.store
    if case == "missing key":
        identity, words = Identity(tmp_path / "nope.key", identity.cert), "UPLOADER_MESSAGE_SIGNING_KEY .*No such file"
    elif case == "key is a certificate":
        identity, words = Identity(identity.cert, identity.cert), "UPLOADER_MESSAGE_SIGNING_KEY .* not an unencrypted PEM RSA"
    elif case == "not its certificate":
        identity, words = Identity(identity.key, pki.worker.cert), "is not the certificate of UPLOADER_MESSAGE_SIGNING_KEY"
    elif case == "expired":
        identity, words = make_identity(tmp_path, "old", days=-1), "UPLOADER_MESSAGE_SIGNING_CERT .* has expired"
    elif case == "empty store":
        store, words = tmp_path / "empty", "UPLOADER_MESSAGE_SIGNING_CERT_STORE .* holds no certificate"
        store.mkdir()
    elif case == "key in the store":
        store, words = tmp_path / "mixed", "must hold only valid PEM certificates"
        store.mkdir()
        (store / "a.pem").write_bytes(identity.cert.read_bytes())
        (store / "a.key").write_bytes(identity.key.read_bytes())
    else:
        identity = make_identity(tmp_path, "ec", key=ec.generate_private_key(ec.SECP256R1()))
        words = "UPLOADER_MESSAGE_SIGNING_KEY .* not an unencrypted PEM RSA"
    settings = Settings(**{k.removeprefix("UPLOADER_").lower(): v for k, v in identity.env(store).items()})
    app = Celery("refused", set_as_current=False)
    app.conf.update(contract.celery_config(settings))
    before = registry.name_to_type.get("auth")
    with pytest.raises(signing.SigningMisconfigured, match=words) as caught:
        signing.enable(app, settings)
    assert "PRIVATE KEY" not in str(caught.value)
    assert registry.name_to_type.get("auth") == before  # nothing registered


def test_signing_settings_come_together() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="UPLOADER_MESSAGE_SIGNING_CERT, UPLOADER_MESSAGE_SIGNING_CERT_STORE not set"):
        Settings(message_signing_key="/etc/uploader/key.pem")
    assert not Settings().message_signing
    config = contract.celery_config(Settings(
        message_signing_key="/k", message_signing_cert="/c", message_signing_cert_store="/s/*.pem",
    ))
    assert (config["task_serializer"], config["accept_content"], config["result_serializer"]) == ("auth", ["auth"], "json")
    assert (config["security_key"], config["security_certificate"], config["security_cert_store"]) == ("/k", "/c", "/s/*.pem")
    assert contract.celery_config(Settings())["accept_content"] == ["json"]


def test_inspect_message_takes_only_signed_json_when_signing_and_only_json_otherwise(pki: PKI) -> None:
    """The worker's check, pure: ``decode`` is what kombu's registry calls for signed content."""
    trusted = SecureSerializer(None, None, _store(pki.store), "sha256")
    payload = ((), {"upload_id": "u-1", "generation": 3, "proof": "0" * 64}, {})
    good = pki.client.serializer().serialize(payload)
    headers = {"task": contract.COMPLETE_UPLOAD, "id": str(uuid.uuid4()), "retries": 0}

    def check(body: bytes, content_type: str, *, signing_on: bool = True) -> str | None:
        return poison.inspect_message(
            headers, content_type, "utf-8", body, tasks=contract.TASK_ARGUMENTS, visibility_timeout=3600,
            decode=(lambda: trusted.deserialize(body)) if content_type == signing.SIGNED_CONTENT_TYPE else None,
            signed=signing_on,
        ).problem

    assert check(good, signing.SIGNED_CONTENT_TYPE) is None
    unsigned = b'[[], {"upload_id": "u-1", "generation": 3}, {}]'
    assert "unsigned message (content type 'application/json')" in (check(unsigned, "application/json") or "")
    assert check(unsigned, "application/json", signing_on=False) is None
    assert "is not application/json" in (check(good, signing.SIGNED_CONTENT_TYPE, signing_on=False) or "")
    # Not Celery's framing at all, an untrusted signer, an altered body.
    assert "not a signed message" in (check(b"bm90IHNpZ25lZA==", signing.SIGNED_CONTENT_TYPE) or "")
    assert "Unknown certificate" in (check(pki.stranger.serializer().serialize(payload), signing.SIGNED_CONTENT_TYPE) or "")
    assert "does not match its body" in (check(altered(pki.client.serializer(), payload, b'"u-1"', b'"u-2"'), signing.SIGNED_CONTENT_TYPE) or "")
    # The inner content type is outside the signature: a genuine body relabelled as pickle (which
    # Celery decodes with force=True) is refused before it is decoded.
    fields = pki.client.serializer()._unpack(good)
    pickled = pki.client.serializer()._pack(fields["body"], "application/x-python-serialize", "binary",
                                            signer=fields["signer"], signature=fields["signature"])
    assert "not application/json" in (check(pickled, signing.SIGNED_CONTENT_TYPE) or "")


def _store(path: Path) -> Any:
    from celery.security.certificate import FSCertStore

    return FSCertStore(str(path))
