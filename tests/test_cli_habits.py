"""The command line with the habits of ``aws s3 cp``, s5cmd and rclone users, run as a user runs
it (``uploader ...`` in a fresh process, against real workers): relative paths, a destination
prefix that keeps the file's name, ``--json``, ``--quiet``, ``--dry-run``, id prefixes,
``list --state`` with whole ids and times, and progress lines in a log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import Stack, sha256_file
from uploader.cli import ExitCode
from uploader.errors import SourceError
from uploader.planner import MiB


def cli(stack: Stack, *args: str, cwd: Path | None = None, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "uploader.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
        env={**os.environ, **stack.env, **env}, stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def worker_stack(make_stack) -> Stack:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack()
    stack.start_worker("habits", concurrency=4)
    return stack


def test_relative_source_and_a_prefix_destination_keep_the_name(worker_stack: Stack) -> None:
    stack = worker_stack
    bucket = stack.new_bucket()
    path = stack.make_file(2000, name=f"rel-{uuid.uuid4().hex[:8]}.bin")
    done = cli(stack, "submit", path.name, f"s3://{bucket}/in/", "--wait", "--json", cwd=path.parent)
    assert done.returncode == 0, done.stderr
    final = json.loads(done.stdout[done.stdout.index("{", 1):])  # the id object, then the final status
    assert final["state"] == "completed" and final["key"] == f"in/{path.name}" and final["source"] == str(path)
    assert stack.object_sha256(bucket, f"in/{path.name}") == sha256_file(path)
    # The bucket alone as the destination: the object is named after the file, as with aws s3 cp.
    handle = stack.uploader.submit(str(path), f"s3://{bucket}")
    assert handle.wait(timeout=60).key == path.name


def test_json_quiet_and_no_progress_print_what_they_say(worker_stack: Stack) -> None:
    stack = worker_stack
    bucket = stack.new_bucket()
    path = stack.make_file(3 * 5 * MiB)
    done = cli(stack, "submit", str(path), f"s3://{bucket}/j.bin", "--json")
    assert done.returncode == 0, done.stderr
    upload_id = json.loads(done.stdout)["upload_id"]
    quiet = cli(stack, "watch", upload_id, "--quiet")
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")
    status = cli(stack, "status", upload_id, "--json")
    assert json.loads(status.stdout)["state"] == "completed"
    plain = cli(stack, "submit", str(path), f"s3://{bucket}/p.bin", "--wait", "--no-progress")
    assert plain.returncode == 0 and "completed s3://" in plain.stderr and "MiB" not in plain.stderr, plain.stderr
    both = cli(stack, "status", upload_id, "--json", "--quiet")
    assert both.returncode == ExitCode.REFUSED and "do not go together" in both.stderr
    # Failures still say why on stderr, with the exit status, whatever --quiet asks.
    missing = cli(stack, "submit", str(path.parent / "nope.bin"), f"s3://{bucket}/n.bin", "--quiet", "--wait")
    assert missing.returncode == ExitCode.REFUSED and missing.stdout == "" and "nope.bin" in missing.stderr


def test_dry_run_checks_and_shows_but_sends_nothing(worker_stack: Stack, tmp_path: Path) -> None:
    stack = worker_stack
    bucket = stack.new_bucket()
    path = stack.make_file(1000)
    done = cli(stack, "submit", str(path), f"s3://{bucket}/d/", "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert (plan["source"], plan["bucket"], plan["key"]) == (str(path), bucket, f"d/{path.name}")
    assert "capability" not in plan
    text = cli(stack, "submit", str(path), f"s3://{bucket}/d/", "--dry-run")
    assert text.stdout.strip() == f"would upload {path} to s3://{bucket}/d/{path.name}"
    bad = cli(stack, "submit", str(path), f"s3://{bucket}/d/", "--dry-run", "--part-size", "1KiB")
    assert bad.returncode == ExitCode.REFUSED and "part" in bad.stderr.lower()
    # A directory: the files the batch would take, with --include/--exclude applied.
    directory = stack.sources_root / f"dry-{uuid.uuid4().hex[:8]}"
    (directory / "sub").mkdir(parents=True)
    for name, size in {"a.log": 10, "b.txt": 20, "sub/c.log": 30}.items():
        (directory / name).write_bytes(b"x" * size)
    listed = cli(stack, "submit", "-r", str(directory), f"s3://{bucket}/tree/", "--include", "*.log", "--dry-run", "--json")
    assert listed.returncode == 0, listed.stderr
    batch = json.loads(listed.stdout)
    assert [f["key"] for f in batch["files"]] == ["tree/a.log", "tree/sub/c.log"] and batch["bytes"] == 40
    # Nothing was sent: no upload, no object, no batch.
    assert stack.uploader.list() == []
    assert stack.s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def test_id_prefixes_and_list_by_state_with_whole_ids_and_times(worker_stack: Stack) -> None:
    stack = worker_stack
    bucket = stack.new_bucket()
    path = stack.make_file(1000)
    stem = uuid.uuid4().hex[:10]
    first, second = f"{stem}a{uuid.uuid4().hex}", f"{stem}b{uuid.uuid4().hex}"
    for upload_id in (first, second):
        stack.uploader.submit(str(path), f"s3://{bucket}/{upload_id}", upload_id=upload_id).wait(timeout=60)
    one = cli(stack, "status", first[:12], "--json")
    assert one.returncode == 0 and json.loads(one.stdout)["upload_id"] == first, one.stderr
    ambiguous = cli(stack, "status", stem)
    assert ambiguous.returncode == ExitCode.REFUSED and "several upload ids" in ambiguous.stderr
    unknown = cli(stack, "status", "ffff" + uuid.uuid4().hex[:8])
    assert unknown.returncode == ExitCode.NOT_FOUND
    failed = stack.uploader.submit(str(path.parent / "vanished.bin"), f"s3://{bucket}/x")
    with pytest.raises(SourceError):
        failed.wait(timeout=60)
    listed = cli(stack, "list", "--state", "completed", COLUMNS="60")
    assert listed.returncode == 0, listed.stderr
    rows = [line for line in listed.stdout.splitlines() if first in line or second in line]
    assert len(rows) == 2, listed.stdout  # whole ids, one row each, however narrow COLUMNS says
    assert all(f"s3://{bucket}/" in row and "completed" in row for row in rows)
    assert failed.upload_id not in listed.stdout
    assert "created" in listed.stdout and all(row.count(":") >= 4 for row in rows)  # both times shown
    rows = json.loads(cli(stack, "list", "--state", "completed", "--json").stdout)
    assert {r["upload_id"] for r in rows} == {first, second}


def test_progress_is_printed_as_lines_when_the_output_is_a_log(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack()
    stack.start_worker("slow", concurrency=2, UPLOADER_MAX_BANDWIDTH=str(4 * MiB))
    bucket = stack.new_bucket()
    path = stack.make_file(4 * 5 * MiB)
    done = cli(stack, "submit", str(path), f"s3://{bucket}/slow.bin", "--wait", UPLOADER_PROGRESS_INTERVAL="0.5")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "uploading" in line and " of 20.0 MiB" in line]
    assert len(lines) >= 3, done.stderr  # progress before the end, not only a final line
    assert all("MB" not in line for line in done.stderr.splitlines())  # one unit system


def test_status_moves_within_a_part_as_its_bytes_are_sent(make_stack) -> None:  # type: ignore[no-untyped-def]
    """A part reports how far it got every few MiB (uploader/storage/bodies.py ReportedBody), so
    ``bytes_done + bytes_sending`` grows before the part is recorded; nothing is left behind."""
    stack: Stack = make_stack()
    stack.start_worker("inpart", concurrency=1, UPLOADER_MAX_BANDWIDTH=str(4 * MiB))
    bucket = stack.new_bucket()
    handle = stack.uploader.submit(str(stack.make_file(2 * 16 * MiB)), f"s3://{bucket}/big.bin", part_size=16 * MiB)
    seen = stack.wait_status(handle.upload_id, lambda s: s.bytes_sending > 0 and s.bytes_done == 0, 60,
                             "bytes reported before the first part is recorded")
    assert seen.bytes_sending % (4 * MiB) == 0 and seen.bytes_sending < 16 * MiB
    final = handle.wait(timeout=120)
    assert final.bytes_sending == 0 and final.bytes_done == 32 * MiB
    assert not stack.uploader.checkpoint.redis.exists(stack.uploader.checkpoint.sending_key(handle.upload_id))
