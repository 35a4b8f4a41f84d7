"""``uploader local up|env|down``: the embedded local stack for your own uploads, left running.

``up`` starts, on free loopback ports, a redis-server, SeaweedFS's S3 gateway (``weed mini``, from
the ``uploader[local]`` extra) and workers (which run recovery themselves), creates a bucket,
and writes the settings a shell needs (``env``: ``eval "$(uploader local env)"``). The processes
outlive the command (each in a session of its own); their pids, ports and settings are kept in
``<dir>/stack.json``, their logs and data beside it. ``down`` stops them all (SIGTERM, then
SIGKILL) and removes the directory. Nothing here is for production (see ``deploy/``).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from uploader.auth import new_fleet_key
from uploader.dev.localstack import RedisServer, SeaweedS3, Worker, redis_answers

#: The bucket ``up`` creates.
DEFAULT_BUCKET = "uploads"
#: SeaweedFS's gateway accepts any credentials; clients and workers still need some to sign with.
LOCAL_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "local-access-key", "AWS_SECRET_ACCESS_KEY": "local-secret-key",
                     "AWS_DEFAULT_REGION": "us-east-1"}
STATE_FILE = "stack.json"


def default_directory() -> Path:
    """``$XDG_STATE_HOME/uploader/local`` (``~/.local/state/uploader/local``)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "uploader" / "local"


@dataclass
class LocalStack:
    """What ``up`` started: the settings to use it and the process groups to stop."""

    directory: str
    bucket: str
    env: dict[str, str]
    pids: dict[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls, directory: Path) -> LocalStack | None:
        try:
            return cls(**json.loads((directory / STATE_FILE).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def save(self) -> None:
        path = Path(self.directory) / STATE_FILE
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(asdict(self), indent=2))
        temporary.replace(path)
        path.chmod(0o600)  # the fleet key is in it

    def alive(self) -> bool:
        return bool(self.pids) and all(_alive(pid) for pid in self.pids.values()) and redis_answers(
            self.env["UPLOADER_BROKER_URL"]
        )

    def shell(self) -> str:
        """``export NAME=value`` lines for a POSIX shell."""
        return "\n".join(f"export {name}={shlex.quote(value)}" for name, value in sorted(self.env.items()))


def up(directory: Path, *, sources: Path, bucket: str = DEFAULT_BUCKET, workers: int = 1, concurrency: int = 8) -> tuple[LocalStack, bool]:
    """Start the stack in ``directory`` (reading sources beneath ``sources``), unless one is up
    there already; returns it and whether this call started it."""
    running = LocalStack.load(directory)
    if running is not None and running.alive():
        return running, False
    if running is not None:
        down(directory)  # what is left of a stack that died: stop it all, start afresh
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    started: list = []
    try:
        redis_server = RedisServer(directory)
        started.append(redis_server)
        s3 = SeaweedS3(directory)
        started.append(s3)
        env = {
            "UPLOADER_BROKER_URL": redis_server.url,
            "UPLOADER_S3_ENDPOINT_URL": s3.endpoint_url,
            "UPLOADER_S3_ADDRESSING_STYLE": "path",
            "UPLOADER_SOURCE_ROOTS": str(sources.resolve()),
            "UPLOADER_FLEET_KEY": new_fleet_key(),
            **LOCAL_CREDENTIALS,
        }
        _create_bucket(s3.endpoint_url, bucket)
        for index in range(workers):
            worker = Worker(directory, env, name=f"local{index + 1}", concurrency=concurrency)
            started.append(worker)
        stack = LocalStack(
            str(directory), bucket, env,
            {"redis": redis_server.pid, "seaweedfs": s3.pid, **{f"worker{i + 1}": w.pid for i, w in enumerate(started[2:])}},
        )
        stack.save()
        return stack, True
    except BaseException:
        for process in reversed(started):
            process.stop()
        raise


def down(directory: Path, *, timeout: float = 30) -> list[str]:
    """Stop every process of the stack in ``directory`` and remove it; the names stopped."""
    import shutil

    stack = LocalStack.load(directory)
    stopped: list[str] = []
    if stack is not None:
        # Workers first (a warm shutdown finishes their parts), then the servers they use.
        order = sorted(stack.pids, key=lambda name: (not name.startswith("worker"), name))
        for name in order:
            if _stop_group(stack.pids[name], timeout):
                stopped.append(name)
    shutil.rmtree(directory, ignore_errors=True)
    return stopped


def _create_bucket(endpoint: str, bucket: str) -> None:
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=LOCAL_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=LOCAL_CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region_name=LOCAL_CREDENTIALS["AWS_DEFAULT_REGION"],
        config=Config(s3={"addressing_style": "path"}),
    )
    client.create_bucket(Bucket=bucket)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop_group(pid: int, timeout: float) -> bool:
    """SIGTERM the process group ``pid`` leads, SIGKILL it after ``timeout``; whether it was running."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        try:  # reap it if it is our child (it is not after `up` exited: then init reaps it)
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    if _alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return True
