"""What operators see: task events for Flower carry ids and numbers only, and no secret reaches
events, task messages, logs or the checkpoint. Also the CLI a person types."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

from celery import Celery

from tests.conftest import ACCESS_KEY, SECRET_KEY, Stack, listen_for_events, sha256_file
from uploader.cli import ExitCode
from uploader.dev.localstack import wait_until
from uploader.planner import MiB


def test_task_events_show_ids_and_numbers_only_and_no_secrets(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack()
    worker = stack.start_worker("observed", concurrency=4)
    events: list[dict] = []
    thread = listen_for_events(Celery(broker=stack.redis_url), events)
    bucket = stack.new_bucket()
    path = stack.make_file(3 * 5 * MiB)
    handle = stack.uploader.submit(str(path), f"s3://{bucket}/seen.bin", part_size=5 * MiB, metadata={"a": "b"})
    handle.wait(timeout=120)

    def saw_part_events() -> bool:
        return sum(1 for e in events if e.get("type") == "task-succeeded") >= 5

    wait_until(saw_part_events, 30, "task events from the worker")
    received = [e for e in events if e.get("type") == "task-received"]
    parts = [e for e in received if e.get("name") == "uploader.upload_part"]
    assert len(parts) == 3
    for event in parts:
        kwargs = ast.literal_eval(event["kwargs"])
        # Ids and numbers, and the proof that a worker sent it, redacted (uploader/auth.py).
        assert set(kwargs) == {"upload_id", "part_number", "generation", "proof"} and kwargs["proof"] == "***"
        assert kwargs["upload_id"] == handle.upload_id
        assert isinstance(kwargs["part_number"], int) and isinstance(kwargs["generation"], int)
    assert {e["name"] for e in received} >= {"uploader.start_upload", "uploader.upload_part", "uploader.complete_upload"}
    # Each part's result, as Flower shows it on the task's row and page: its upload, its part,
    # how it ended and the bytes it sent (searching Flower for the upload id finds them).
    part_ids = {e["uuid"] for e in parts}
    results = [ast.literal_eval(e["result"]) for e in events if e.get("type") == "task-succeeded" and e["uuid"] in part_ids]
    assert sorted(r["part"] for r in results) == [1, 2, 3]
    assert all(r["upload_id"] == handle.upload_id and r["bytes_sent"] == 5 * MiB and r["outcome"] in ("recorded", "last")
               for r in results), results

    everything = json.dumps(events, default=str)
    assert SECRET_KEY not in everything and ACCESS_KEY not in everything
    assert SECRET_KEY not in worker.log_text()
    record = stack.uploader.checkpoint.redis.hgetall(stack.uploader.checkpoint.record_key(handle.upload_id))
    assert SECRET_KEY not in json.dumps(record)
    thread.join(1)


def _cli(stack: Stack, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **stack.env}
    return subprocess.run(
        [sys.executable, "-m", "uploader.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_cli_submit_wait_status_and_clear_errors(stack: Stack) -> None:
    bucket = stack.new_bucket()
    path = stack.make_file(12 * MiB)
    out = _cli(stack, "submit", str(path), f"s3://{bucket}/cli.bin", "--part-size", "5MiB", "-m", "who=cli", "--wait")
    assert out.returncode == 0, out.stderr
    upload_id = out.stdout.strip().splitlines()[0]
    assert "completed" in out.stderr and "parts 3/3" in out.stderr
    assert stack.object_sha256(bucket, "cli.bin") == sha256_file(path)

    status = _cli(stack, "status", upload_id, "--json")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert (data["state"], data["parts_done"], data["part_count"], data["bytes_done"]) == ("completed", 3, 3, 12 * MiB)

    human = _cli(stack, "status", upload_id)
    assert "completed" in human.stdout and "3/3" in human.stdout

    listed = _cli(stack, "list", "--json", "--limit", "1000")
    assert upload_id in [u["upload_id"] for u in json.loads(listed.stdout)]

    for args, words, code in [
        (["submit", str(path), f"s3://{bucket}/x", "--part-size", "1MiB"], "5 MiB..5 GiB", ExitCode.REFUSED),
        (["submit", str(path), "s3://Bad_Bucket/x"], "invalid bucket name", ExitCode.REFUSED),
        (["submit", str(stack.sources_root / "missing.bin"), f"s3://{bucket}/x", "--wait", "--timeout", "60"], "does not exist", ExitCode.REFUSED),
        (["status", "no-such-upload"], "no upload 'no-such-upload'", ExitCode.NOT_FOUND),
        (["cancel", upload_id], "too late to cancel", ExitCode.REFUSED),
    ]:
        result = _cli(stack, *args)
        assert result.returncode == code, (args, result.stdout, result.stderr)
        assert words in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


HEAVY = ("boto3", "botocore", "s3transfer", "celery", "kombu", "awscrt", "urllib3")


def _modules_after(stack: Stack, *args: str) -> set[str]:
    """The top-level packages loaded by ``uploader <args>`` run in a fresh interpreter."""
    script = (
        "import sys\n"
        f"sys.argv = ['uploader', *{list(args)!r}]\n"
        "from uploader.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **stack.env})
    return set(done.stdout.split())


def test_the_cli_loads_only_what_a_command_needs(stack: Stack) -> None:
    """``--help`` and a usage error load click and little else; ``status`` reads Redis without
    Celery, kombu, boto3 or the CRT (the start-up times are measured by ``python -m bench
    --scenarios startup``)."""
    for args in (["--help"], ["status", "--help"], ["status", "not an id!"]):
        loaded = _modules_after(stack, *args)
        assert "click" in loaded and "uploader" in loaded
        assert not loaded & {*HEAVY, "redis", "pydantic", "pydantic_settings", "rich"}, (args, loaded)
    loaded = _modules_after(stack, "status", "0123456789abcdef0123")
    assert "redis" in loaded  # it did read Redis
    assert not loaded & set(HEAVY), loaded
