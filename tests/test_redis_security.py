"""Encrypted and authenticated Redis (issue 10, items 4 and 5): TLS for the broker, the result
backend and the checkpoint with one set of settings, tested against a TLS-only ``redis-server``
with a CA made here; the shipped ACL users (``deploy/redis/users.acl``) tested against a real
Redis: what a client may do, what it is refused, and where passwords never appear."""

from __future__ import annotations

import base64
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from tests.conftest import FLEET_KEY, Stack, sha256_file
from tests.securedredis import SecuredRedis, TlsFiles, make_tls_files, render_acl
from uploader import Uploader
from uploader.checkpoint import CheckpointStore
from uploader.config import Settings
from uploader.contract import CONTROL_QUEUE, PARTS_QUEUE, UPLOAD_PART, celery_config
from uploader.dev.localstack import SeaweedS3, Worker, free_port, wait_until
from uploader.errors import Unreachable
from uploader.planner import MiB

PASSWORDS = {
    "REDIS_CLIENT_PASSWORD": "client-canary-7f3a9Q",
    "REDIS_WORKER_PASSWORD": "worker-canary-2b8e4W",
    "REDIS_ADMIN_PASSWORD": "admin-canary-9d1c6A",
}
CLIENT = ("uploader-client", PASSWORDS["REDIS_CLIENT_PASSWORD"])
WORKER = ("uploader-worker", PASSWORDS["REDIS_WORKER_PASSWORD"])
ADMIN = ("uploader-admin", PASSWORDS["REDIS_ADMIN_PASSWORD"])


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(workdir: Path) -> TlsFiles:
    return make_tls_files(workdir / "tls")


@pytest.fixture(scope="module")
def tls_redis(workdir: Path, tls_files: TlsFiles) -> Iterator[SecuredRedis]:
    """TLS only (no plain-text port), and every client must present a certificate of the CA."""
    server = SecuredRedis(workdir, tls=tls_files, client_certs=True)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def acl_redis(workdir: Path) -> Iterator[SecuredRedis]:
    """Plain text, with the shipped users (rendered by the shipped script)."""
    server = SecuredRedis(workdir, aclfile=render_acl(workdir / "users.acl", PASSWORDS), admin=ADMIN)
    yield server
    server.stop()


def tls_env(files: TlsFiles, *, ca: Path | None = None) -> dict[str, str]:
    return {
        "UPLOADER_REDIS_TLS_CA_FILE": str(ca or files.ca),
        "UPLOADER_REDIS_TLS_CERT_FILE": str(files.client_cert),
        "UPLOADER_REDIS_TLS_KEY_FILE": str(files.client_key),
    }


def cli(env: dict[str, str], *args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess[str], float]:
    """``uploader ARGS`` with exactly these ``UPLOADER_*`` settings; also how long it took."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("UPLOADER_")}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "uploader.cli", *args], capture_output=True, text=True, timeout=timeout, env={**base, **env}
    )
    return result, time.monotonic() - started


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


# --- TLS: settings --------------------------------------------------------------------------


def test_one_set_of_tls_settings_reaches_broker_results_and_checkpoint(tls_files: TlsFiles) -> None:
    settings = Settings(
        broker_url="rediss://redis.internal:6380/0", redis_tls_ca_file=tls_files.ca,
        redis_tls_cert_file=tls_files.client_cert, redis_tls_key_file=tls_files.client_key,
    )
    expected = {
        "ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(tls_files.ca),
        "ssl_certfile": str(tls_files.client_cert), "ssl_keyfile": str(tls_files.client_key),
    }
    config = celery_config(settings)
    assert config["broker_use_ssl"] == expected
    assert config["redis_backend_use_ssl"] == expected
    store = CheckpointStore.from_settings(settings)
    kwargs = store.redis.connection_pool.connection_kwargs
    assert {key: kwargs[key] for key in expected} == {**expected, "ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert store.redis.connection_pool.connection_class is redis.SSLConnection

    # A bare rediss:// verifies against the system's CAs, the same way for all three (on
    # main: kombu did not verify at all, Celery's backend raised a ValueError).
    bare = Settings(broker_url="rediss://redis.internal:6380/0")
    assert celery_config(bare)["broker_use_ssl"] == celery_config(bare)["redis_backend_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert CheckpointStore.from_settings(bare).redis.connection_pool.connection_kwargs["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    # Plain URLs get no TLS options (kombu and Celery would turn TLS on for any URL given them).
    assert not {"broker_use_ssl", "redis_backend_use_ssl"} & set(celery_config(Settings()))


def test_tls_settings_are_the_only_way_and_never_silently_ignored(tls_files: TlsFiles) -> None:
    with pytest.raises(ValueError, match="UPLOADER_REDIS_TLS_CA_FILE"):
        Settings(broker_url=f"rediss://h:6380/0?ssl_cert_reqs=required&ssl_ca_certs={tls_files.ca}")
    with pytest.raises(ValueError, match="UPLOADER_CHECKPOINT_URL is a plain-text redis://"):
        Settings(broker_url="rediss://h:6380/0", checkpoint_url="redis://h:6379/0", redis_tls_ca_file=tls_files.ca)
    with pytest.raises(ValueError, match="Path does not point to a file"):
        Settings(broker_url="rediss://h:6380/0", redis_tls_ca_file="/nonexistent/ca.pem")


def test_settings_never_show_a_redis_password() -> None:
    settings = Settings(
        broker_url="redis://uploader-worker:hunter2-broker@h:6379/0",
        result_backend="rediss://:hunter2-results@h:6380/1",
        checkpoint_url="sentinel://:hunter2-sentinel@s1:26379;sentinel://s2:26379",
        redis_sentinel_master="primary",
    )
    for text in (repr(settings), str(settings)):
        assert "hunter2" not in text, text
        assert "uploader-worker:***@h:6379" in text
    with pytest.raises(ValueError) as raised:
        Settings(broker_url="redis://u:hunter2-invalid@h:6379/0?ssl_ca_certs=/x")
    assert "hunter2" not in str(raised.value)


# --- TLS: a real server ---------------------------------------------------------------------


def test_an_upload_completes_over_tls_for_broker_results_and_checkpoint(
    workdir: Path, seaweed: SeaweedS3, sources_root: Path, tls_redis: SecuredRedis, tls_files: TlsFiles
) -> None:
    # The server has no plain-text port and asks every client for a certificate of its CA: the
    # upload can only complete if the broker, the result backend and the checkpoint (workers and
    # client alike) all speak TLS with the settings' CA, certificate and key.
    stack = Stack(workdir, tls_redis.url(db=1), seaweed.endpoint_url, sources_root, tls_env(tls_files))
    try:
        worker = stack.start_worker("tls", concurrency=2)
        bucket = stack.new_bucket()
        big = stack.make_file(12 * MiB)
        small = stack.make_file(100_000)
        handle = stack.uploader.submit(str(big), f"s3://{bucket}/big", part_size=5 * MiB)
        assert handle.accepted(60) == handle.upload_id  # the result backend, over TLS
        status = handle.wait(timeout=120)
        assert (status.state, status.parts_done) == ("completed", 3)
        assert stack.object_sha256(bucket, "big") == sha256_file(big)
        assert stack.uploader.submit(str(small), f"s3://{bucket}/small").wait(timeout=60).state == "completed"
        assert stack.object_sha256(bucket, "small") == sha256_file(small)
        log = worker.log_text()
        assert "insecure" not in log.lower() and "CERT_NONE" not in log, log[-3000:]
        result, _ = cli(stack.env, "status", handle.upload_id)
        assert result.returncode == 0 and "completed" in result.stdout, result.stderr
    finally:
        stack.close()


def test_a_client_with_the_wrong_ca_fails_at_once_naming_the_setting(tls_redis: SecuredRedis, tls_files: TlsFiles, sources_root: Path) -> None:
    env = {"UPLOADER_BROKER_URL": tls_redis.url(), "UPLOADER_SOURCE_ROOTS": str(sources_root),
           **tls_env(tls_files, ca=tls_files.other_ca)}
    for args in (["status", "some-upload"], ["submit", str(sources_root / "x.bin"), "s3://bucket-x/key"]):
        result, took = cli(env, *args)
        line = one_line_error(result)
        assert result.returncode == 5, result.stderr
        assert "UPLOADER_REDIS_TLS_CA_FILE" in line and "certificate" in line, line
        assert took < 10, f"{args[0]} took {took:.1f} s"
    # The library client (no interactive timeouts, 30 reconnection attempts): on main it
    # retried the handshake for about a minute before failing.
    settings = Settings(broker_url=tls_redis.url(), redis_tls_ca_file=tls_files.other_ca,
                        redis_tls_cert_file=tls_files.client_cert, redis_tls_key_file=tls_files.client_key)
    uploader = Uploader(settings)
    try:
        started = time.monotonic()
        with pytest.raises(Unreachable, match="UPLOADER_REDIS_TLS_CA_FILE"):
            uploader.status("some-upload")
        assert time.monotonic() - started < 5
    finally:
        uploader.close()


def test_a_plain_text_client_against_the_tls_port_fails_clearly(tls_redis: SecuredRedis) -> None:
    env = {"UPLOADER_BROKER_URL": tls_redis.url().replace("rediss://", "redis://")}
    result, took = cli(env, "status", "some-upload")
    line = one_line_error(result)
    assert result.returncode == 5 and "use a rediss:// URL" in line, line
    assert took < 15


# --- ACL users ------------------------------------------------------------------------------


def acl_denials(server: SecuredRedis, user: str) -> list[dict[str, str]]:
    admin = server.client()
    entries = [dict(zip(e[::2], e[1::2], strict=True)) for e in admin.execute_command("ACL", "LOG")]
    return [e for e in entries if e.get("username") == user]


def test_a_client_user_submits_watches_and_waits_for_what_a_worker_user_completes(
    workdir: Path, seaweed: SeaweedS3, sources_root: Path, acl_redis: SecuredRedis
) -> None:
    acl_redis.client().execute_command("ACL", "LOG", "RESET")
    stack = Stack(workdir, acl_redis.url(*WORKER, db=2), seaweed.endpoint_url, sources_root)
    client_env = {**stack.env, "UPLOADER_BROKER_URL": acl_redis.url(*CLIENT, db=2)}
    client = Uploader(Settings(broker_url=client_env["UPLOADER_BROKER_URL"], source_roots=str(sources_root)))
    try:
        worker = stack.start_worker("acl", concurrency=2)
        bucket = stack.new_bucket()
        big = stack.make_file(11 * MiB)
        handle = client.submit(str(big), f"s3://{bucket}/big", part_size=5 * MiB)
        assert handle.accepted(60) == handle.upload_id
        assert client.wait(handle.upload_id, timeout=120).state == "completed"
        assert stack.object_sha256(bucket, "big") == sha256_file(big)
        assert handle.upload_id in [s.upload_id for s in client.list()]
        for args in (["status", handle.upload_id], ["list"], ["watch", handle.upload_id], ["status", handle.upload_id[:10]],
                     ["list", "--state", "completed"]):
            result, _ = cli(client_env, *args)
            assert result.returncode == 0, (args, result.stderr)
            assert CLIENT[1] not in result.stdout + result.stderr
        # Cancel of a running upload goes through the control queue too; a start with a priority
        # goes on one of the control queue's priority lists (kombu's "uploader.control\x06\x166").
        other = client.submit(str(big), f"s3://{bucket}/other", part_size=5 * MiB, priority=3)
        other.accepted(60)
        assert client.cancel(other.upload_id) in ("cancelled", "completed")
        # A host-local upload (uploader/locality.py): the client checks the host's liveness
        # (uploader:hosts) and sends to the host's queue ("uploader.host.<host>").
        local = client.submit(str(big), f"s3://{bucket}/local", part_size=5 * MiB, locality="host")
        assert client.wait(local.upload_id, timeout=120).state == "completed"
        # A directory batch: submitted, waited for and shown by the client user (uploader:batch:*).
        directory = sources_root / f"acl-batch-{os.getpid()}-{time.monotonic_ns()}"
        (directory / "sub").mkdir(parents=True)
        (directory / "a.bin").write_bytes(b"a" * 10)
        (directory / "sub" / "b.bin").write_bytes(b"b" * 20)
        batch = client.submit_batch(str(directory), f"s3://{bucket}/batch/")
        assert batch.wait(timeout=120).files_done == 2
        result, _ = cli(client_env, "status", batch.batch_id, "--json")
        assert result.returncode == 0 and '"files_done": 2' in result.stdout, result.stderr
        assert acl_denials(acl_redis, CLIENT[0]) == [], "the client user lacks a permission it uses"
        assert acl_denials(acl_redis, WORKER[0]) == [], "the worker user lacks a permission it uses"
        # doctor as the client user: what it may not read is a "skip", never a traceback.
        done, _ = cli(client_env, "doctor")
        assert "Traceback" not in done.stderr and "skip redis persistence" in done.stdout, done.stdout + done.stderr
        assert "ok   workers: 1 alive" in done.stdout, done.stdout
        for password in PASSWORDS.values():
            assert password not in worker.log_text()
    finally:
        client.close()
        stack.close()


ATTACKS = {
    "push a part message": ("LPUSH", PARTS_QUEUE, '{"forged": true}'),
    # (The control queue's priority lists, step 1-9, are the clients': see the README's "Priorities".)
    "push a priority variant of the parts queue": ("LPUSH", f"{PARTS_QUEUE}\x06\x163", "{}"),
    "push a list named like a control priority list": ("LPUSH", f"{CONTROL_QUEUE}\x06\x160", "{}"),
    "push a list named like the control queue": ("LPUSH", f"{CONTROL_QUEUE}ler", "{}"),
    "write a checkpoint record": ("HSET", "uploader:upload:victim", "state", "completed"),
    "delete a checkpoint record": ("DEL", "uploader:upload:victim"),
    "drop an upload from the index": ("ZREM", "uploader:uploads", "victim"),
    "fake a worker heartbeat": ("SET", "uploader:worker:fake", "1"),
    "fake a live host": ("ZADD", "uploader:hosts", "99999999999", "elsewhere"),
    "steal a host's message": ("RPOP", "uploader.host.elsewhere"),
    "take the recovery lease": ("SET", "uploader:leader:recovery", "me"),
    "delete a queue": ("DEL", CONTROL_QUEUE),
    "read the control queue": ("LRANGE", CONTROL_QUEUE, "0", "-1"),
    "steal a control message": ("RPOP", CONTROL_QUEUE),
    "read the dead-letter list": ("LRANGE", "uploader:deadletter", "0", "-1"),
    "read the leases": ("HGETALL", "uploader:leader:recovery"),
    "rebind an exchange": ("SADD", f"_kombu.binding.{CONTROL_QUEUE}", f"{CONTROL_QUEUE}\x06\x16\x06\x16uploader:upload:victim"),
    "forge a task result": ("SET", "celery-task-meta-victim", '{"status": "SUCCESS"}'),
    "forge a task-succeeded event": ("PUBLISH", "/0.celeryev/task.succeeded", "{}"),
    # (Clients send no task events: Flower would list each as a worker.)
    "forge a task-sent event": ("PUBLISH", "/0.celeryev/task.sent", "{}"),
    "list every key": ("KEYS", "*"),
    "scan every key": ("SCAN", "0"),
    "flush the database": ("FLUSHDB",),
    "reconfigure Redis": ("CONFIG", "SET", "appendonly", "no"),
    "run a script": ("EVAL", "return redis.call('del', KEYS[1])", "1", CONTROL_QUEUE),
}


@pytest.mark.parametrize("attack", ATTACKS, ids=list(ATTACKS))
def test_the_client_user_is_refused(acl_redis: SecuredRedis, attack: str) -> None:
    client = acl_redis.client(*CLIENT)
    admin = acl_redis.client()
    admin.rpush(CONTROL_QUEUE, "sentinel-message")
    try:
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command(*ATTACKS[attack])
        assert admin.lrange(CONTROL_QUEUE, 0, -1)[-1] == "sentinel-message"
    finally:
        admin.delete(CONTROL_QUEUE)
        client.close()


def test_a_client_cannot_send_to_the_parts_queue_through_celery(acl_redis: SecuredRedis) -> None:
    app = Celery("attacker", set_as_current=False)
    app.conf.update(celery_config(Settings(broker_url=acl_redis.url(*CLIENT))), broker_connection_retry=False,
                    task_publish_retry=False)
    with pytest.raises(Exception, match="NOPERM|no permissions"):
        app.send_task(UPLOAD_PART, kwargs={"upload_id": "victim", "part_number": 1, "generation": 1}, queue=PARTS_QUEUE)
    assert acl_redis.client().llen(PARTS_QUEUE) == 0
    app.close()


def test_unauthenticated_connections_may_only_ping(acl_redis: SecuredRedis) -> None:
    anonymous = redis.Redis(host="127.0.0.1", port=acl_redis.port, socket_timeout=5)
    assert anonymous.ping()
    with pytest.raises(redis.exceptions.NoPermissionError):
        anonymous.lpush(CONTROL_QUEUE, "x")


def test_a_wrong_password_is_one_line_without_the_password(acl_redis: SecuredRedis) -> None:
    result, _ = cli({"UPLOADER_BROKER_URL": acl_redis.url(CLIENT[0], "wrong-canary-5e5e")}, "status", "x")
    line = one_line_error(result)
    assert result.returncode == 5 and "invalid username-password pair" in line, line
    assert "wrong-canary-5e5e" not in result.stdout + result.stderr


# --- Flower ---------------------------------------------------------------------------------


def _http(port: int, path: str, auth: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def test_flower_as_shipped_asks_for_basic_auth_and_never_shows_a_password(
    workdir: Path, sources_root: Path, acl_redis: SecuredRedis
) -> None:
    """Flower started as the deployments start it (``celery -A workers.app flower``, credentials
    in ``FLOWER_BASIC_AUTH``), on the workers' Redis user, next to a worker: every page and API
    wants the credentials; ``/healthcheck`` (the probes) and ``/metrics`` do not (Flower 2.2 serves
    them to anyone: deploy/README.md keeps Flower's port on a private network)."""
    flower_auth = "ops:flower-canary-4c4c"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("UPLOADER_", "FLOWER_"))},
           "UPLOADER_BROKER_URL": acl_redis.url(*WORKER, db=3), "UPLOADER_SOURCE_ROOTS": str(sources_root),
           "FLOWER_BASIC_AUTH": flower_auth, "UPLOADER_FLEET_KEY": FLEET_KEY}
    worker = Worker(workdir, env, name="flower-worker", concurrency=1)
    port = free_port()
    log = open(workdir / f"flower-{port}.log", "wb")
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "workers.app", "flower", f"--port={port}", "--address=127.0.0.1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        def up() -> bool:
            try:
                return _http(port, "/healthcheck")[0] == 200
            except OSError:
                assert flower.poll() is None, (workdir / f"flower-{port}.log").read_text()
                return False

        wait_until(up, 60, "Flower")
        wait_until(lambda: worker.name in _http(port, "/api/workers?refresh=1", flower_auth)[1], 30, "Flower to see the worker")
        for path in ("/", "/workers", "/tasks", "/api/workers", "/api/tasks", f"/worker/{worker.name}"):
            assert _http(port, path)[0] == 401, path
            assert _http(port, path, "ops:wrong")[0] == 401, path
            status, body = _http(port, path, flower_auth)
            assert status == 200, path
            for secret in (WORKER[1], "flower-canary-4c4c"):
                assert secret not in body, f"{path} shows {secret}"
        assert _http(port, "/healthcheck") == (200, "OK")
        status, metrics = _http(port, "/metrics")
        assert status == 200 and WORKER[1] not in metrics
        flower_log = (workdir / f"flower-{port}.log").read_text()
        assert WORKER[1] not in flower_log and "flower-canary-4c4c" not in flower_log
    finally:
        os.killpg(flower.pid, signal.SIGTERM)
        flower.wait(15)
        log.close()
        worker.stop()
