"""``uploader doctor`` against real deployments: a healthy one, one without workers, one where a
client sent a task to Celery's default queue, one with quarantined messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from celery import Celery

from tests.conftest import Stack
from uploader.checkpoint.deadletter import DeadLetters
from uploader.cli import ExitCode
from uploader.dev.localstack import wait_until


def doctor(stack: Stack, *args: str) -> tuple[int, dict[str, dict[str, str]], str]:
    done = subprocess.run([sys.executable, "-m", "uploader.cli", "doctor", "--json", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **stack.env})
    checks: dict[str, dict[str, str]] = {}
    for check in json.loads(done.stdout or "[]"):
        checks.setdefault(check["name"], check)  # (a check may give several lines: the first)
    return done.returncode, checks, done.stderr


def test_a_healthy_deployment_is_ok_and_names_what_it_runs(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack(UPLOADER_RECONCILE_INTERVAL="1")
    stack.start_worker("doctored", concurrency=2)
    bucket = stack.new_bucket()
    wait_until(lambda: stack.uploader.checkpoint.recovery().reconciled_at is not None, 30, "a recovery run")
    code, checks, stderr = doctor(stack, "--bucket", bucket)
    assert code == 0, (checks, stderr)
    for name in ("broker", "checkpoint", "s3", "workers", "recovery", "queues", "stray messages", "dead letters"):
        assert checks[name]["verdict"] == "ok", checks[name]
    assert checks["workers"]["detail"].startswith("1 alive (0.1.0")
    assert checks["redis eviction"]["verdict"] in ("ok", "fail") and checks["redis persistence"]["verdict"] in ("ok", "warn")
    missing = doctor(stack, "--bucket", "no-such-bucket-here")[1]["s3"]
    assert missing["verdict"] == "fail" and "does not exist" in missing["detail"]


def test_no_workers_and_a_task_on_celerys_default_queue_fail_with_what_to_do(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack()
    # A client that sends by task name without routing (a service in another language, say).
    Celery(broker=stack.redis_url).send_task("uploader.start_upload", kwargs={"source": "/x", "bucket": "b", "key": "k"})
    DeadLetters(stack.uploader.checkpoint.redis, prefix=stack.settings.key_prefix).push({"reason": "test", "body": "{}"})
    code, checks, _ = doctor(stack)
    assert code == ExitCode.FAILED
    assert checks["workers"]["verdict"] == "fail" and "uploader worker" in checks["workers"]["advice"]
    assert checks["recovery"]["verdict"] == "fail"
    stray = checks["stray messages"]
    assert stray["verdict"] == "fail" and "'celery'" in stray["detail"] and "uploader.control" in stray["advice"]
    assert checks["dead letters"]["verdict"] == "warn" and "1 malformed" in checks["dead letters"]["detail"]
    assert checks["broker"]["verdict"] == "ok"
    text = subprocess.run([sys.executable, "-m", "uploader.cli", "doctor"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **stack.env})
    assert text.returncode == ExitCode.FAILED and text.stdout.count("\n") >= 10 and "Traceback" not in text.stderr


def test_unreachable_redis_is_one_failing_line_per_check(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack()
    stack.env["UPLOADER_BROKER_URL"] = "redis://127.0.0.1:1/0"
    code, checks, stderr = doctor(stack)
    assert code == ExitCode.FAILED and "Traceback" not in stderr
    assert checks["broker"]["verdict"] == "fail" and "Redis did not answer" in checks["broker"]["detail"]
