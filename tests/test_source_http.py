"""HTTP(S) URL sources (uploader/sources/http.py) against a real HTTP server on loopback: one that
honours Range and ETag, one that ignores Range, one whose file changes mid-upload, one that
redirects (to an allowed address, and to one the outbound guard refuses), one that needs
credentials; real workers and SeaweedFS, objects compared byte for byte."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import Stack
from uploader.config import Settings, parse_source_credentials
from uploader.errors import InvalidRequest, SourceChanged, SourceError, TransientStoreError
from uploader.logsafe import secrets_from_environment
from uploader.outbound import OutboundPolicy
from uploader.planner import MiB
from uploader.request import parse_request
from uploader.sources import Fingerprint, HttpAccess, HttpSource, open_source

PART = 5 * MiB
SECRET = "Bearer s3cret-token-8c1f2e"
ALLOW = OutboundPolicy.parse("127.0.0.1")


@dataclass
class Served:
    """One file the server holds: its bytes and validators."""

    data: bytes
    etag: str
    modified: float = 1_700_000_000.0

    @classmethod
    def of(cls, data: bytes, *, weak: bool = False) -> Served:
        tag = f'"{hashlib.md5(data).hexdigest()}"'
        return cls(data, f"W/{tag}" if weak else tag)


@dataclass
class Behaviour:
    """How the server answers; every request is logged as (method, path, headers)."""

    files: dict[str, Served] = field(default_factory=dict)
    ranges: bool = True
    head: bool = True
    redirects: dict[str, str] = field(default_factory=dict)
    #: Requests for paths under this prefix need this Authorization header (else 401).
    auth: tuple[str, str] | None = None
    #: After this many ranged GETs, the file at ``change_path`` is replaced by ``change_to``.
    change_after: int | None = None
    change_path: str = ""
    change_to: Served | None = None
    fail_status: dict[str, int] = field(default_factory=dict)
    log: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    ranged_gets: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the stdlib's name)
        pass

    def _answer(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self._serve()

    def do_GET(self) -> None:
        self._serve()

    def _serve(self) -> None:
        b = self.server.behaviour
        with b.lock:
            b.log.append((self.command, self.path, dict(self.headers.items())))
        if self.path in b.fail_status:
            return self._answer(b.fail_status[self.path], {})
        if self.path in b.redirects:
            return self._answer(302, {"Location": b.redirects[self.path]})
        if b.auth is not None and self.headers.get(b.auth[0]) != b.auth[1]:
            return self._answer(401, {"WWW-Authenticate": "Bearer"})
        if self.command == "HEAD" and not b.head:
            return self._answer(405, {"Allow": "GET"})
        with b.lock:
            served = b.files.get(self.path)
            wants_range = self.command == "GET" and "Range" in self.headers and b.ranges
            if wants_range:
                b.ranged_gets += 1
                if b.change_after is not None and b.ranged_gets > b.change_after and b.change_to is not None:
                    b.files[b.change_path] = b.change_to
                    served = b.files.get(self.path)
        if served is None:
            return self._answer(404, {})
        validators = {"ETag": served.etag, "Last-Modified": formatdate(served.modified, usegmt=True)}
        if b.ranges:
            validators["Accept-Ranges"] = "bytes"
        if_match = self.headers.get("If-Match")
        if if_match is not None and (if_match != served.etag or served.etag.startswith("W/")):
            return self._answer(412, {})
        if not wants_range:
            return self._answer(200, validators, served.data)
        if_range = self.headers.get("If-Range")
        if if_range is not None and if_range not in (served.etag, validators["Last-Modified"]):
            return self._answer(200, validators, served.data)  # changed: the whole new version
        first, _, last = self.headers["Range"].removeprefix("bytes=").partition("-")
        start, end = int(first), min(int(last), len(served.data) - 1)
        if start >= len(served.data):
            return self._answer(416, {"Content-Range": f"bytes */{len(served.data)}"})
        self._answer(
            206, {**validators, "Content-Range": f"bytes {start}-{end}/{len(served.data)}"}, served.data[start : end + 1]
        )


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that closes mid-body (a read that stopped early, on purpose): nothing to report

    def __init__(self, behaviour: Behaviour, host: str = "127.0.0.1") -> None:
        super().__init__((host, 0), _Handler)
        self.behaviour = behaviour

    @property
    def base(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"


@pytest.fixture
def http() -> Iterator[_Server]:
    server = _Server(Behaviour())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _serve(server: _Server, path: str, size: int, **kwargs: bool) -> bytes:
    data = os.urandom(size)
    server.behaviour.files[path] = Served.of(data, **kwargs)
    return data


def _access(**kwargs: object) -> HttpAccess:
    return HttpAccess(**{"policy": ALLOW, "timeout": 5.0, "multipart_threshold": PART, **kwargs})  # type: ignore[arg-type]


# -- the source on its own (no workers) -----------------------------------------------------------


def test_fingerprint_and_conditional_ranged_reads(http: _Server) -> None:
    data = _serve(http, "/f.bin", 3 * MiB)
    source = open_source(f"{http.base}/f.bin", (), _access())
    assert isinstance(source, HttpSource)
    fingerprint = source.fingerprint()
    assert fingerprint.size == len(data) and fingerprint.etag == http.behaviour.files["/f.bin"].etag
    assert fingerprint.mtime_ns == 1_700_000_000 * 10**9
    # Stored and read back as the checkpoint keeps it.
    assert Fingerprint.from_record(**fingerprint.to_record()) == fingerprint  # type: ignore[arg-type]
    assert source.read_range(1000, 5000, fingerprint) == data[1000:6000]
    buffer = bytearray(64 * 1024)
    with source.open_range(MiB, 2 * MiB, fingerprint) as part:  # read twice in chunks, as a streamed part is
        first = b"".join(bytes(c) for c in part.chunks(buffer))
        second = b"".join(bytes(c) for c in part.chunks(buffer))
    assert first == second == data[MiB : 3 * MiB]
    ranged = [h for m, _, h in http.behaviour.log if m == "GET" and "Range" in h]
    assert ranged and all(h.get("If-Match") == fingerprint.etag and h.get("If-Range") == fingerprint.etag for h in ranged)
    # The whole source is one plain GET, still conditional.
    assert source.read_range(0, len(data), fingerprint) == data
    assert "Range" not in http.behaviour.log[-1][2] and http.behaviour.log[-1][2]["If-Match"] == fingerprint.etag


def test_a_weak_etag_pins_by_date(http: _Server) -> None:
    data = _serve(http, "/w.bin", 100_000, weak=True)
    source = HttpSource(f"{http.base}/w.bin", _access())
    fingerprint = source.fingerprint()
    assert source.read_range(10, 100, fingerprint) == data[10:110]
    headers = http.behaviour.log[-1][2]
    assert "If-Match" not in headers and headers["If-Unmodified-Since"] == headers["If-Range"]


def test_a_change_is_source_changed(http: _Server) -> None:
    _serve(http, "/c.bin", 100_000)
    source = HttpSource(f"{http.base}/c.bin", _access())
    fingerprint = source.fingerprint()
    _serve(http, "/c.bin", 100_000)
    with pytest.raises(SourceChanged, match="changed since the upload began"):
        source.read_range(0, 10, fingerprint)
    with pytest.raises(SourceChanged, match="changed since the upload began"):
        source.read_range(0, 100_000, fingerprint)
    _serve(http, "/c.bin", 90_000)
    assert fingerprint.difference(source.fingerprint()) == "size 100000 -> 90000"


def test_head_refused_falls_back_to_a_ranged_get(http: _Server) -> None:
    data = _serve(http, "/h.bin", 10_000)
    http.behaviour.head = False
    fingerprint = HttpSource(f"{http.base}/h.bin", _access()).fingerprint()
    assert fingerprint.size == len(data)
    assert [m for m, _, _ in http.behaviour.log] == ["HEAD", "GET"]
    assert http.behaviour.log[-1][2]["Range"] == "bytes=0-0"


def test_a_server_without_range_is_refused_above_the_threshold_only(http: _Server) -> None:
    http.behaviour.ranges = False
    small = _serve(http, "/small.bin", PART - 1)
    _serve(http, "/big.bin", PART)
    source = HttpSource(f"{http.base}/small.bin", _access())
    assert source.read_range(0, len(small), source.fingerprint()) == small
    with pytest.raises(SourceError, match=r"does not support Range requests; a source of 5242880 bytes \(at least the multipart threshold"):
        HttpSource(f"{http.base}/big.bin", _access()).fingerprint()


def test_the_outbound_guard_and_redirects(http: _Server) -> None:
    data = _serve(http, "/real.bin", 1000)
    port = http.server_address[1]
    http.behaviour.redirects = {
        "/moved": "/real.bin",
        "/away": f"http://127.0.0.2:{port}/real.bin",
        "/meta": "http://169.254.169.254/latest/meta-data/",
        "/ftp": "ftp://127.0.0.1/real.bin",
        "/loop": "/loop",
    }
    moved = HttpSource(f"{http.base}/moved", _access())
    assert moved.read_range(0, 1000, moved.fingerprint()) == data
    for path, reason in (
        ("/away", "refused: 127.0.0.2 resolves to 127.0.0.2, a loopback address"),
        ("/meta", "refused: 169.254.169.254 resolves to 169.254.169.254, a metadata service address"),
        ("/ftp", "redirected to ftp://127.0.0.1/real.bin: only http:// and https:// URLs are read"),
        ("/loop", "more than 5 redirects"),
    ):
        with pytest.raises(SourceError, match=reason):
            HttpSource(f"{http.base}{path}", _access()).fingerprint()
    # Loopback itself, without the allowlist.
    with pytest.raises(SourceError, match="a loopback address; allow it in UPLOADER_OUTBOUND_ALLOW"):
        HttpSource(f"{http.base}/real.bin", HttpAccess()).fingerprint()
    assert not any(path.startswith("/latest") for _, path, _ in http.behaviour.log)


def test_statuses(http: _Server) -> None:
    _serve(http, "/f.bin", 1000)
    http.behaviour.fail_status = {"/busy": 503, "/slow": 429, "/gone": 410, "/teapot": 418}
    for path, error, reason in (
        ("/busy", TransientStoreError, "HTTP 503"),
        ("/slow", TransientStoreError, "HTTP 429"),
        ("/gone", SourceError, r"does not exist \(HTTP 410\)"),
        ("/missing", SourceError, r"does not exist \(HTTP 404\)"),
        ("/teapot", SourceError, "HTTP 418"),
    ):
        with pytest.raises(error, match=reason):
            HttpSource(f"{http.base}{path}", _access()).fingerprint()
    source = HttpSource(f"{http.base}/f.bin", _access())
    fingerprint = source.fingerprint()
    del http.behaviour.files["/f.bin"]
    with pytest.raises(SourceChanged, match="disappeared during the upload"):
        source.read_range(0, 10, fingerprint)
    # Nothing listens: a network error, retried.
    with pytest.raises(TransientStoreError):
        HttpSource("http://127.0.0.1:9/x", _access()).fingerprint()


def test_credentials_go_to_the_origin_only(http: _Server) -> None:
    data = _serve(http, "/private.bin", 1000)
    http.behaviour.auth = ("Authorization", SECRET)
    credential = parse_source_credentials(json.dumps({"origin": {"header": f"Authorization: {SECRET}"}}))["origin"]
    assert SECRET not in repr(credential)
    with pytest.raises(SourceError, match="name the workers' credentials for it with source_credentials"):
        HttpSource(f"{http.base}/private.bin", _access()).fingerprint()
    source = HttpSource(f"{http.base}/private.bin", _access(credential=credential))
    assert source.read_range(0, 1000, source.fingerprint()) == data
    # Another origin a redirect points to never sees the secret.
    other = _Server(Behaviour(files={"/x.bin": Served.of(b"x" * 10)}))
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        http.behaviour.redirects = {"/hop": f"{other.base}/x.bin"}
        http.behaviour.auth = None
        assert HttpSource(f"{http.base}/hop", _access(credential=credential)).fingerprint().size == 10
        assert other.behaviour.log and all("Authorization" not in h for _, _, h in other.behaviour.log)
        assert http.behaviour.log[-1][2]["Authorization"] == SECRET
    finally:
        other.shutdown()
        other.server_close()


def test_credentials_settings_and_requests() -> None:
    basic = parse_source_credentials('{"b": {"basic": "user:pa55word"}}')["b"]
    assert basic.header == "Authorization" and basic.value == "Basic dXNlcjpwYTU1d29yZA=="
    for text, problem in (
        ("not json", "is not valid JSON"),
        ('{"b": {"basic": "no-colon-pa55word"}}', 'basic is "user:password"'),
        ('{"b": {"header": "Bad Name: pa55word"}}', 'header is "Name: value"'),
        ('{"b": {"token": "pa55word"}}', 'give "header" or "basic"'),
        ('{"b c": {"basic": "u:pa55word"}}', "a credential name must be"),
    ):
        with pytest.raises(ValueError, match=problem) as caught:
            Settings(source_credentials=text)
        assert "pa55word" not in str(caught.value)
    # Workers mask the values in every log line, the token alone too.
    env = {"UPLOADER_SOURCE_CREDENTIALS": json.dumps({"t": {"header": f"Authorization: {SECRET}"}})}
    assert {SECRET, SECRET.split()[1]} <= set(secrets_from_environment(env))
    settings = Settings(source_credentials='{"b": {"basic": "u:pa55word"}}')
    assert "pa55word" not in repr(settings)
    with pytest.raises(SourceError, match="no source credentials named 'other'"):
        HttpAccess.of(settings, "other")
    with pytest.raises(SourceError, match="apply to http:// and https:// sources only"):
        open_source("/data/file", (), HttpAccess.of(settings, "b"))
    with pytest.raises(InvalidRequest, match="source_credentials"):
        parse_request({"source": "https://example.com/x", "bucket": "bucket", "key": "k", "source_credentials": "a b"})
    with pytest.raises(SourceError, match="carries a user name or password"):
        HttpSource("https://user:pa55word@example.com/x")


# -- through the workers --------------------------------------------------------------------------


def _stack(make_stack, **env: str) -> Stack:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack(UPLOADER_OUTBOUND_ALLOW="127.0.0.1", **env)
    stack.start_worker("http-a", concurrency=3)
    stack.start_worker("http-b", concurrency=3)
    return stack


def _object(stack: Stack, bucket: str, key: str) -> bytes:
    return stack.s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def test_uploads_from_a_server_with_ranges(make_stack, http: _Server) -> None:  # type: ignore[no-untyped-def]
    # A 2 MiB part buffer: the 5 MiB parts are streamed in chunks (two GETs each), not held whole.
    stack = _stack(make_stack, UPLOADER_PART_BUFFER_MAX=str(2 * MiB))
    bucket = stack.new_bucket()
    big = _serve(http, "/big.bin", 3 * PART + 12345)
    small = _serve(http, "/small.bin", 300_000)
    handle = stack.uploader.submit(f"{http.base}/big.bin", f"s3://{bucket}/big.bin", part_size=PART)
    status = handle.wait(timeout=180)
    assert status.state == "completed" and status.part_count == 4, status
    assert _object(stack, bucket, "big.bin") == big
    single = stack.uploader.submit(f"{http.base}/small.bin", f"s3://{bucket}/small.bin")
    assert single.wait(timeout=120).state == "completed"
    assert _object(stack, bucket, "small.bin") == small
    etag = http.behaviour.files["/big.bin"].etag
    gets = [h for m, p, h in http.behaviour.log if m == "GET" and p == "/big.bin"]
    assert gets and all(h.get("If-Match") == etag and h.get("If-Range") == etag and "Range" in h for h in gets)


def test_a_server_ignoring_range(make_stack, http: _Server) -> None:  # type: ignore[no-untyped-def]
    stack = _stack(make_stack)
    bucket = stack.new_bucket()
    http.behaviour.ranges = False
    small = _serve(http, "/small.bin", PART - 1)
    _serve(http, "/big.bin", 2 * PART)
    handle = stack.uploader.submit(f"{http.base}/small.bin", f"s3://{bucket}/small.bin")
    assert handle.wait(timeout=120).state == "completed"
    assert _object(stack, bucket, "small.bin") == small
    refused = stack.uploader.submit(f"{http.base}/big.bin", f"s3://{bucket}/big.bin", part_size=PART)
    with pytest.raises(SourceError, match=f"the server at {http.base}/big.bin does not support Range requests"):
        refused.accepted(timeout=60)
    assert not stack.open_multipart_uploads(bucket)


def test_a_source_changed_mid_upload_fails_as_changed(make_stack, http: _Server) -> None:  # type: ignore[no-untyped-def]
    stack = _stack(make_stack, UPLOADER_AUTO_RESUME_LIMIT="0")
    bucket = stack.new_bucket()
    _serve(http, "/moving.bin", 4 * PART)
    http.behaviour.change_after, http.behaviour.change_path = 1, "/moving.bin"
    http.behaviour.change_to = Served.of(os.urandom(4 * PART))
    handle = stack.uploader.submit(f"{http.base}/moving.bin", f"s3://{bucket}/moving.bin", part_size=PART)
    status = stack.wait_status(handle.upload_id, lambda s: s.state == "failed", 120, "the upload to fail")
    assert "changed since the upload began" in status.error, status.error
    with pytest.raises(SourceChanged, match="changed since upload"):
        handle.resume()
    # Restarted, it uploads the new version whole.
    http.behaviour.change_after = None
    handle.resume(restart=True)
    assert handle.wait(timeout=180).state == "completed"
    assert _object(stack, bucket, "moving.bin") == http.behaviour.files["/moving.bin"].data


def test_redirects_and_the_outbound_guard(make_stack, http: _Server) -> None:  # type: ignore[no-untyped-def]
    stack = _stack(make_stack)
    bucket = stack.new_bucket()
    data = _serve(http, "/real.bin", 2 * PART + 1000)
    port = http.server_address[1]
    http.behaviour.redirects = {"/moved": "/real.bin", "/away": f"http://127.0.0.2:{port}/real.bin"}
    handle = stack.uploader.submit(f"{http.base}/moved", f"s3://{bucket}/moved.bin", part_size=PART)
    assert handle.wait(timeout=120).state == "completed"
    assert _object(stack, bucket, "moved.bin") == data
    refused = stack.uploader.submit(f"{http.base}/away", f"s3://{bucket}/away.bin")
    with pytest.raises(SourceError, match="refused: 127.0.0.2 resolves to 127.0.0.2, a loopback address"):
        refused.accepted(timeout=60)


def test_credentials_stay_with_the_workers(make_stack, http: _Server) -> None:  # type: ignore[no-untyped-def]
    stack = _stack(
        make_stack, UPLOADER_SOURCE_CREDENTIALS=json.dumps({"origin": {"header": f"Authorization: {SECRET}"}}),
    )
    bucket = stack.new_bucket()
    data = _serve(http, "/private.bin", 2 * PART + 5)
    http.behaviour.auth = ("Authorization", SECRET)
    handle = stack.uploader.submit(
        f"{http.base}/private.bin", f"s3://{bucket}/private.bin", part_size=PART, source_credentials="origin"
    )
    status = handle.wait(timeout=120)
    assert status.state == "completed"
    assert _object(stack, bucket, "private.bin") == data
    # Without credentials, refused with a reason that says how; an unknown name too.
    refused = stack.uploader.submit(f"{http.base}/private.bin", f"s3://{bucket}/no.bin")
    with pytest.raises(SourceError, match="HTTP 401"):
        refused.accepted(timeout=60)
    unknown = stack.uploader.submit(f"{http.base}/private.bin", f"s3://{bucket}/no.bin", source_credentials="nope")
    with pytest.raises(SourceError, match="no source credentials named 'nope'"):
        unknown.accepted(timeout=60)
    record = stack.uploader.checkpoint.get(handle.upload_id)
    assert record is not None and record.source_credentials == "origin"
    token = SECRET.split()[-1]
    shown = json.dumps(dataclasses.asdict(stack.uploader.status(handle.upload_id)), default=str)
    assert token not in shown and token not in repr(record)
    assert all(token not in worker.log_text() for worker in stack.workers)
    assert all(h.get("Authorization") == SECRET for _, p, h in http.behaviour.log if p == "/private.bin" and "Range" in h)
