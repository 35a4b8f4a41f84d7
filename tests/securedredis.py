"""A ``redis-server`` locked down the way production runs it: TLS only (``--port 0``) with a CA made
here, and/or the shipped ACL users (``deploy/redis/users.acl``, rendered with passwords by
``deploy/redis/render-acl.sh`` exactly as the Compose file does), on a free loopback port."""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from uploader.dev.localstack import _Process, free_port, wait_until

ROOT = Path(__file__).resolve().parents[1]
ACL_TEMPLATE = ROOT / "deploy" / "redis" / "users.acl"
RENDER_ACL = ROOT / "deploy" / "redis" / "render-acl.sh"


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: a CA, the server's certificate (for 127.0.0.1 and localhost) and a client
    certificate signed by it, and an unrelated CA (a client configured with the wrong CA)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    path.chmod(0o600)
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _ca(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, name: str, usage: x509.ObjectIdentifier,
          sans: list[x509.GeneralName]) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def make_tls_files(directory: Path) -> TlsFiles:
    """A fresh self-signed CA with a server and a client certificate, and another CA."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _ca("uploader test CA")
    server, server_key = _leaf(ca, ca_key, "redis", ExtendedKeyUsageOID.SERVER_AUTH,
                               [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    client, client_key = _leaf(ca, ca_key, "uploader-client", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    other, _ = _ca("some other CA")
    return TlsFiles(
        ca=_write_cert(ca, directory / "ca.pem"),
        server_cert=_write_cert(server, directory / "server.pem"),
        server_key=_write_key(server_key, directory / "server.key"),
        client_cert=_write_cert(client, directory / "client.pem"),
        client_key=_write_key(client_key, directory / "client.key"),
        other_ca=_write_cert(other, directory / "other-ca.pem"),
    )


def render_acl(out: Path, passwords: dict[str, str]) -> Path:
    """``deploy/redis/users.acl`` with these passwords (``REDIS_CLIENT_PASSWORD``, ...), rendered
    by the shipped script (``--render-only``), as the Redis container does at start."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **passwords, "REDIS_ACL_TEMPLATE": str(ACL_TEMPLATE)}
    subprocess.run(["sh", str(RENDER_ACL), "--render-only", str(out)], env=env, check=True, capture_output=True, text=True)
    return out


class SecuredRedis(_Process):
    """``redis-server`` with TLS only (``tls``: no plain-text port at all; ``client_certs``:
    ``--tls-auth-clients yes``) and/or an ACL file; ``admin``: the (user, password) that may do
    anything, for the test's own checks (``None``: the default user, without a password)."""

    def __init__(
        self, workdir: Path, *, tls: TlsFiles | None = None, client_certs: bool = False, aclfile: Path | None = None,
        admin: tuple[str, str] | None = None,
    ):
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.port = free_port()
        self.tls = tls
        self.admin = admin
        argv = [binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--maxmemory-policy", "noeviction",
                "--dir", str(workdir), "--daemonize", "no"]
        if tls:
            argv += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(tls.server_cert),
                     "--tls-key-file", str(tls.server_key), "--tls-ca-cert-file", str(tls.ca),
                     "--tls-auth-clients", "yes" if client_certs else "no"]
        else:
            argv += ["--port", str(self.port)]
        if aclfile:
            argv += ["--aclfile", str(aclfile)]
        super().__init__(argv, workdir / f"redis-secured-{self.port}.log")
        wait_until(lambda: "Ready to accept connections" in self.log_text() or not self.alive(), 20, f"redis-server on {self.port}")
        if not self.alive():
            raise RuntimeError(f"redis-server exited: {self.log_text()[-2000:]}")

    def url(self, user: str | None = None, password: str | None = None, db: int = 0) -> str:
        """The URL clients use (``rediss://`` with TLS), credentials percent-encoded."""
        auth = ""
        if password is not None:
            auth = f"{quote(user or '', safe='')}:{quote(password, safe='')}@"
        return f"{'rediss' if self.tls else 'redis'}://{auth}127.0.0.1:{self.port}/{db}"

    def client(self, user: str | None = None, password: str | None = None, **options: object) -> redis.Redis:
        """A redis-py client as ``user`` (the admin when none is given)."""
        if user is None and self.admin:
            user, password = self.admin
        kwargs: dict[str, object] = {"host": "127.0.0.1", "port": self.port, "username": user, "password": password,
                                     "socket_timeout": 5, "decode_responses": True, **options}
        if self.tls:
            kwargs.update(ssl=True, ssl_ca_certs=str(self.tls.ca), ssl_certfile=str(self.tls.client_cert),
                          ssl_keyfile=str(self.tls.client_key))
        return redis.Redis(**kwargs)  # type: ignore[arg-type]
