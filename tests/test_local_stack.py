"""``uploader local up|env|down`` as a newcomer uses it: the stack started and left running, its
settings evaluated by a shell, an upload of one's own, and everything stopped and removed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import sha256_file
from uploader.dev.localstack import write_random_file


def uploader(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("UPLOADER_", "AWS_"))}
    return subprocess.run([str(Path(sys.executable).parent / "uploader"), *args], capture_output=True, text=True,
                          timeout=180, env={**clean, **(env or {})}, cwd=cwd, stdin=subprocess.DEVNULL)


def test_up_env_submit_down(tmp_path: Path) -> None:
    state, sources = tmp_path / "state", tmp_path / "files"
    sources.mkdir()
    digest = write_random_file(sources / "first.bin", 12 << 20)
    started = uploader("local", "up", "--dir", str(state), "--sources", str(sources))
    assert started.returncode == 0, started.stderr
    assert "started" in started.stderr and "eval" in started.stderr
    try:
        again = uploader("local", "up", "--dir", str(state), "--sources", str(sources))
        assert again.returncode == 0 and "already up" in again.stderr
        exported = uploader("local", "env", "--dir", str(state))
        assert exported.returncode == 0, exported.stderr
        # What eval "$(uploader local env)" sets in a POSIX shell.
        shell = subprocess.run(["sh", "-c", f"{exported.stdout}\nenv"], capture_output=True, text=True, check=True)
        env = dict(line.split("=", 1) for line in shell.stdout.splitlines() if line.startswith(("UPLOADER_", "AWS_")))
        assert env["UPLOADER_SOURCE_ROOTS"] == str(sources) and env["UPLOADER_FLEET_KEY"]
        done = uploader("submit", "first.bin", "s3://uploads/", "--wait", "--json", env=env, cwd=sources)
        assert done.returncode == 0, done.stderr
        check = subprocess.run(
            [sys.executable, "-c", "import boto3, hashlib, os; c = boto3.client('s3', endpoint_url=os.environ['UPLOADER_S3_ENDPOINT_URL']);"
             " print(hashlib.sha256(c.get_object(Bucket='uploads', Key='first.bin')['Body'].read()).hexdigest())"],
            capture_output=True, text=True, env={**os.environ, **env}, check=True,
        )
        assert check.stdout.strip() == digest == sha256_file(sources / "first.bin")
        assert (state / "stack.json").stat().st_mode & 0o077 == 0  # the fleet key is in it
    finally:
        stopped = uploader("local", "down", "--dir", str(state))
    assert stopped.returncode == 0 and "worker1" in stopped.stderr, stopped.stderr
    assert not state.exists()
    gone = uploader("local", "env", "--dir", str(state))
    assert gone.returncode != 0 and "uploader local up" in gone.stderr
