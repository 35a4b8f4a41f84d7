"""The benchmark's private deployment: a scratch directory, one SeaweedFS S3 server, a Redis
server and the celery workers the scenarios start, all on loopback, all stopped by
:meth:`Rig.close` (also on Ctrl-C and exceptions: use the rig as a context manager)."""

from __future__ import annotations

import gc
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from bench import procstat
from uploader.config import Settings
from uploader.dev.localstack import RedisServer, SeaweedS3, Worker, write_random_file

ACCESS_KEY = "bench-access-key"
SECRET_KEY = "bench-secret-key"
REGION = "us-east-1"
#: The benchmark fleet's key (workers need one; see uploader/auth.py).
BENCH_FLEET_KEY = "bench-fleet-key-0123456789abcdefghijklmnop"


class Rig:
    def __init__(self, workdir: Path | None = None, *, keep: bool = False, log: Any = print) -> None:
        self.own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="uploader-bench-")) if workdir is None else workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.sources = self.workdir / "sources"
        self.sources.mkdir(exist_ok=True)
        self.keep = keep
        self.log = log
        self.s3_server: SeaweedS3 | None = None
        self.redis: RedisServer | None = None
        self._services: list[Any] = []  # localstack processes, stopped in reverse order
        self._children: set[subprocess.Popen] = set()  # tool processes running right now
        self._databases = itertools.count(1)
        # Every process we start (and boto3 in this one) sees these credentials and nothing from
        # the user's ~/.aws: SeaweedFS accepts any credentials.
        self.aws_env = {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "AWS_CONFIG_FILE": str(self.workdir / "aws-config-none"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.workdir / "aws-credentials-none"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    # -- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> Rig:
        self._old_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)
        # Ctrl-C must stop the benchmark and its servers even when started from a shell that
        # made SIGINT ignored (background jobs of non-interactive shells).
        self._old_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        signal.signal(signal.SIGTERM, self._old_sigterm)
        signal.signal(signal.SIGINT, self._old_sigint)

    def close(self) -> None:
        # Celery AsyncResults left for the garbage collector unsubscribe from the result backend
        # when collected; collect them while Redis still answers, or that blocks on retries.
        gc.collect()
        for proc in list(self._children):
            kill_tree(proc)
        self._children.clear()
        while self._services:
            service = self._services.pop()
            try:
                service.stop(timeout=10)
            except Exception as exc:  # keep stopping the others
                self.log(f"warning: stopping {service.argv[0]} failed: {exc}")
        reap_children()
        if self.own_workdir and not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- services ------------------------------------------------------------------------------------
    def start_s3(self) -> SeaweedS3:
        if self.s3_server is None:
            # weed mini turns S3 authentication on for the key pair it finds in AWS_ACCESS_KEY_ID /
            # AWS_SECRET_ACCESS_KEY. The benchmark wants it on: the AWS CRT signs every chunk of
            # its streaming uploads, and SeaweedFS without credentials rejects those chunks.
            saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("AWS_")}
            os.environ.update({k: self.aws_env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")})
            try:
                self.s3_server = AuthSeaweedS3(self.workdir)
            finally:
                for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                    os.environ.pop(k, None)
                os.environ.update(saved)
            self._services.append(self.s3_server)
        return self.s3_server

    @property
    def endpoint_url(self) -> str:
        assert self.s3_server is not None
        return self.s3_server.endpoint_url

    def start_redis(self) -> RedisServer:
        if self.redis is None:
            self.redis = RedisServer(self.workdir)
            self._services.append(self.redis)
        return self.redis

    def new_database(self) -> str:
        """The URL of a Redis database no other scenario uses (an isolated deployment)."""
        redis = self.start_redis()
        db = next(self._databases)
        if db >= 64:
            raise RuntimeError("out of Redis databases")
        return redis.url.rsplit("/", 1)[0] + f"/{db}"

    def uploader_env(self, redis_url: str, **extra: str) -> dict[str, str]:
        return {
            "UPLOADER_BROKER_URL": redis_url,
            "UPLOADER_S3_ENDPOINT_URL": self.endpoint_url,
            "UPLOADER_SOURCE_ROOTS": str(self.sources),
            "UPLOADER_FLEET_KEY": BENCH_FLEET_KEY,
            "UPLOADER_RETRY_BACKOFF_MAX": "2",
            **self.aws_env,
            **extra,
        }

    @staticmethod
    def settings_for(env: dict[str, str]) -> Settings:
        return Settings(**{k.removeprefix("UPLOADER_").lower(): v for k, v in env.items() if k.startswith("UPLOADER_")})

    def start_worker(
        self, env: dict[str, str], *, name: str = "bench-worker", concurrency: int = 8, pool: str = "threads"
    ) -> Worker:
        worker = Worker(self.workdir, env, name=name, concurrency=concurrency, pool=pool)
        self._services.append(worker)
        return worker

    def stop_service(self, service: Any, *, kill: bool = False) -> None:
        if kill:
            service.kill(signal.SIGKILL)
        service.stop(timeout=10)
        if service in self._services:
            self._services.remove(service)

    # -- tool processes ---------------------------------------------------------------------------
    def spawn(self, argv: list[str], *, env: dict[str, str], stdout: Any, stderr: Any) -> subprocess.Popen:
        proc = subprocess.Popen(argv, env=env, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL)
        self._children.add(proc)
        return proc

    def reaped(self, proc: subprocess.Popen, returncode: int) -> None:
        proc.returncode = returncode  # reaped with os.wait4, so Popen must not wait again
        self._children.discard(proc)

    def tool_env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RCLONE_", "UPLOADER_"))}
        env.update(self.aws_env)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.update(extra)
        return env

    # -- S3 helpers -----------------------------------------------------------------------------------
    def s3_client(self, **config: Any) -> Any:
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                max_pool_connections=16,
                **config,
            ),
        )

    def make_random_file(self, name: str, size: int) -> Path:
        path = self.sources / name
        write_random_file(path, size)
        return path

    def make_sparse_file(self, name: str, size: int) -> Path:
        path = self.sources / name
        with open(path, "wb") as f:
            f.truncate(size)
        return path


def kill_tree(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            proc.kill()
            proc.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            pass


class AuthSeaweedS3(SeaweedS3):
    """SeaweedS3 that counts any HTTP answer as ready: with authentication on, an anonymous
    ``GET /`` is refused with 403 instead of listing buckets."""

    def _ready(self) -> bool:
        if not self.alive():
            raise RuntimeError(f"weed mini exited: {self.log_text()[-2000:]}")
        try:
            with urllib.request.urlopen(self.endpoint_url + "/", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False


def reap_children(grace: float = 5.0) -> None:
    """Stop every child process this process still has: a service whose constructor failed
    (never registered), or a tool interrupted mid-run. Services run in sessions of their own,
    so their whole process group is signalled."""
    children = [pid for pid in procstat.children(os.getpid())]
    if not children:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in children:
            try:
                os.killpg(pid, sig) if os.getpgid(pid) == pid else os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            children = [pid for pid in children if _alive(pid)]
            if not children:
                return
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return done == 0


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
