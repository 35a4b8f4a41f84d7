"""Directory batches: one request, one upload per file, listed by the workers a page at a time
(uploader/batch.py, uploader/sources/directory.py), through real workers, Redis and SeaweedFS."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from celery import Celery

from tests.conftest import Stack, listen_for_events, sha256_file
from uploader import contract
from uploader.batch import FINGERPRINT_METADATA, BatchProgress, file_upload_id, parse_batch_request
from uploader.batch.coordinator import AHEAD_FILES
from uploader.checkpoint.batches import BatchStore
from uploader.cli import ExitCode
from uploader.contract import celery_config
from uploader.dev.localstack import wait_until
from uploader.errors import InvalidRequest, SourceError
from uploader.sources.directory import Selector, list_page, locate_directory


def make_tree(root: Path, layout: dict[str, int]) -> dict[str, Path]:
    """Files at these relative paths with these sizes (random bytes); returns them by relative path."""
    out = {}
    for relative, size in layout.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
        out[relative] = path
    return out


def keys_under(stack: Stack, bucket: str, prefix: str) -> set[str]:
    keys = set()
    for page in stack.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.update(o["Key"] for o in page.get("Contents", []))
    return keys


# -- the listing, without workers ------------------------------------------------------------------


def test_pages_list_every_file_once_in_order(tmp_path: Path) -> None:
    layout = {f"d{i % 4}/s{i % 3}/f{i:03}.bin": 1 for i in range(120)} | {"top.txt": 1, "d0/a": 1}
    make_tree(tmp_path / "tree", layout)
    located = locate_directory(str(tmp_path / "tree"), [tmp_path])
    seen: list[str] = []
    cursor, pages = None, 0
    while True:
        page = list_page(located, str(tmp_path / "tree"), cursor, 7, Selector())
        pages += 1
        assert len(page.files) <= 7
        seen += [f.relative for f in page.files]
        cursor = page.cursor or cursor
        if page.done:
            break
    assert seen == sorted(layout, key=lambda p: tuple(p.split("/")))
    assert pages == len(layout) // 7 + 1


def test_include_exclude_match_the_whole_relative_path() -> None:
    selector = Selector(include=("*.bin", "docs/*"), exclude=("*/tmp/*", "*.skip.bin"))
    assert selector.takes("a/b/c.bin") and selector.takes("docs/x/readme")
    assert not selector.takes("a/tmp/c.bin") and not selector.takes("c.skip.bin") and not selector.takes("a/c.txt")
    assert Selector().takes("anything/at/all")


def test_the_listing_refuses_links_to_directories_and_special_files(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    make_tree(tree, {"ok.bin": 3, "sub/inner.bin": 2})
    (tree / "loop").symlink_to(tree)
    os.mkfifo(tree / "pipe")
    page = list_page(locate_directory(str(tree), [tmp_path]), str(tree), None, 100, Selector())
    assert [f.relative for f in page.files] == ["ok.bin", "sub/inner.bin"]
    refused = {r.relative: r.reason for r in page.refused}
    assert "symbolic link to a directory" in refused["loop"] and "FIFO" in refused["pipe"]


def test_a_directory_outside_the_roots_or_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "root" / "file").write_bytes(b"x")
    with pytest.raises(SourceError, match="outside the allowed source roots"):
        locate_directory(str(tmp_path / "elsewhere"), [tmp_path / "root"])
    with pytest.raises(SourceError, match="not a directory"):
        locate_directory(str(tmp_path / "root" / "file"), [tmp_path / "root"])


def test_batch_requests_are_validated_before_anything_is_sent() -> None:
    request = parse_batch_request({"source": "/data/dir", "bucket": "bucket-a", "prefix": "p"})
    assert request.prefix == "p/" and request.batch_id
    for bad, words in [
        ({"options": {"key": "k"}}, "may not set key"),
        ({"page_size": 0}, "page_size"),
        ({"options": {"part_size": 1}}, "part_size"),
        ({"bucket": "Not_A_Bucket"}, "bucket"),
        ({"surprise": 1}, "surprise"),
    ]:
        with pytest.raises(InvalidRequest, match=words):
            parse_batch_request({"source": "/data/dir", "bucket": "bucket-a", **bad})
    # The contract: the listing's messages carry a batch id and a page number, nothing else.
    assert contract.task_arguments_problem(contract.LIST_BATCH, [], {"batch_id": "b1", "page": 3, "proof": "0" * 64}) is None
    assert "unknown" in (contract.task_arguments_problem(contract.LIST_BATCH, [], {"batch_id": "b1", "page": 3, "files": []}) or "")
    assert contract.LIST_BATCH in contract.INTERNAL_TASKS


# -- through the workers ---------------------------------------------------------------------------


def test_a_nested_directory_with_filters_arrives_byte_identical(stack: Stack) -> None:
    root = stack.sources_root / f"batch-{uuid.uuid4().hex[:8]}"
    layout = {f"level{i % 3}/sub{i % 5}/file{i:02}.bin": 1000 + i * 37 for i in range(44)}
    layout |= {"readme.txt": 10, "level0/notes.txt": 20, "level1/tmp/scratch.bin": 30, "level2/x.log": 40}
    files = make_tree(root, layout)
    layout["empty.bin"] = 0
    files["empty.bin"] = root / "empty.bin"
    files["empty.bin"].write_bytes(b"")
    bucket = stack.new_bucket()
    handle = stack.uploader.submit_batch(
        str(root), f"s3://{bucket}/backup/", include=["*.bin", "*.txt"], exclude=["*/tmp/*"], page_size=8,
        metadata={"team": "data"},
    )
    handle.accepted(60)
    status = handle.wait(timeout=180)
    wanted = {rel for rel in layout if (rel.endswith((".bin", ".txt"))) and "/tmp/" not in rel}
    assert status.state is BatchProgress.COMPLETED, status.failures
    assert (status.files_total, status.files_done, status.files_failed, status.files_skipped) == (len(wanted), len(wanted), 0, 0)
    assert status.bytes_done == status.bytes_total == sum(layout[r] for r in wanted)
    assert keys_under(stack, bucket, "") == {f"backup/{rel}" for rel in wanted}
    for rel in wanted:
        assert stack.object_sha256(bucket, f"backup/{rel}") == sha256_file(files[rel]), rel
    head = stack.s3.head_object(Bucket=bucket, Key="backup/readme.txt")
    assert head["Metadata"]["team"] == "data" and head["Metadata"][FINGERPRINT_METADATA].startswith("10-")
    # Each file is an upload of its own, named after the batch.
    upload = stack.uploader.status(file_upload_id(handle.batch_id, "readme.txt"))
    assert upload.state == "completed" and upload.key == "backup/readme.txt"
    # A poller's second read skips what it saw completed: with one record gone meanwhile (the
    # janitor's, say), a fresh read counts that file as not started, the poller's still as done.
    completed: dict[str, int] = {}
    assert stack.uploader.find_batch(handle.batch_id, completed=completed) == status
    assert len(completed) == len(wanted) and sum(completed.values()) == status.bytes_done
    store = stack.uploader.checkpoint
    store.redis.delete(store.record_key(file_upload_id(handle.batch_id, "readme.txt")))
    assert stack.uploader.find_batch(handle.batch_id, completed=completed) == status
    fresh = stack.uploader.find_batch(handle.batch_id)
    assert fresh is not None and (fresh.files_done, fresh.files_active) == (len(wanted) - 1, 1)


def test_a_file_that_cannot_be_read_fails_alone_and_resume_retries_it(stack: Stack) -> None:
    root = stack.sources_root / f"batch-{uuid.uuid4().hex[:8]}"
    files = make_tree(root, {f"ok{i}.bin": 500 + i for i in range(5)})
    outside = stack.workdir / f"outside-{uuid.uuid4().hex[:8]}"
    outside.write_bytes(b"not for upload")
    (root / "escape.bin").symlink_to(outside)  # leads out of the source roots
    os.mkfifo(root / "pipe")
    bucket = stack.new_bucket()
    handle = stack.uploader.submit_batch(str(root), f"s3://{bucket}/p")
    status = handle.wait(timeout=120)
    assert status.state is BatchProgress.FAILED
    assert (status.files_total, status.files_done, status.files_failed) == (7, 5, 2)
    reasons = {f.path: f.reason for f in status.failures}
    assert "outside the allowed source roots" in reasons["escape.bin"] and "FIFO" in reasons["pipe"]
    assert keys_under(stack, bucket, "") == {f"p/ok{i}.bin" for i in range(5)}
    for i in range(5):
        assert stack.object_sha256(bucket, f"p/ok{i}.bin") == sha256_file(files[f"ok{i}.bin"])

    # Fixed in place: resuming the batch starts that file again (the FIFO stays refused).
    (root / "escape.bin").unlink()
    (root / "escape.bin").write_bytes(b"now a regular file")
    outcome = handle.resume()
    assert outcome["files_restarted"] == 1
    status = handle.wait(timeout=120)
    assert (status.files_done, status.files_failed) == (6, 1)
    assert stack.s3.get_object(Bucket=bucket, Key="p/escape.bin")["Body"].read() == b"now a regular file"


def test_skip_unchanged_sends_only_changed_and_new_files(stack: Stack) -> None:
    root = stack.sources_root / f"batch-{uuid.uuid4().hex[:8]}"
    files = make_tree(root, {f"d{i % 2}/f{i}.bin": 2000 + i for i in range(10)})
    bucket = stack.new_bucket()
    first = stack.uploader.submit_batch(str(root), f"s3://{bucket}/sync/", skip_unchanged=True).wait(timeout=120)
    assert (first.state, first.files_done, first.files_skipped) == (BatchProgress.COMPLETED, 10, 0)

    files["d0/f0.bin"].write_bytes(os.urandom(2000))  # same size, new bytes and time
    os.utime(files["d0/f0.bin"], ns=(1, 1))
    files["new.bin"] = root / "new.bin"
    files["new.bin"].write_bytes(b"fresh")
    handle = stack.uploader.submit_batch(str(root), f"s3://{bucket}/sync/", skip_unchanged=True)
    second = handle.wait(timeout=120)
    assert (second.state, second.files_total, second.files_done, second.files_skipped) == (BatchProgress.COMPLETED, 11, 2, 9)
    assert second.bytes_skipped == sum(2000 + i for i in range(1, 10))
    uploaded = set(BatchStore(stack.uploader.checkpoint).upload_ids(handle.batch_id))
    assert uploaded == {file_upload_id(handle.batch_id, rel) for rel in ("d0/f0.bin", "new.bin")}
    for rel, path in files.items():
        assert stack.object_sha256(bucket, f"sync/{rel}") == sha256_file(path), rel


def test_cancelling_a_batch_stops_its_listing_and_its_uploads(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack()
    stack.start_worker("batch-cancel", concurrency=2)
    root = stack.sources_root / f"batch-{uuid.uuid4().hex[:8]}"
    count = 1000
    make_tree(root, {f"f{i:04}.bin": 64 for i in range(count)})
    bucket = stack.new_bucket()
    # One file a page: the listing is a chain of a thousand tasks, caught early.
    handle = stack.uploader.submit_batch(str(root), f"s3://{bucket}/c/", page_size=1)

    def some_done() -> bool:
        status = stack.uploader.find_batch(handle.batch_id)
        return status is not None and status.files_done >= 1

    wait_until(some_done, 60, "a first file")
    outcome = handle.cancel()
    assert outcome["outcome"] == "cancelled"
    assert handle.wait(timeout=60).state is BatchProgress.CANCELLED
    wait_until(lambda: stack.uploader.batch_status(handle.batch_id).files_active == 0, 60, "every upload ended")
    status = stack.uploader.batch_status(handle.batch_id)
    assert status.files_total < count  # the listing stopped
    assert status.files_done + status.files_cancelled == status.files_total
    assert len(keys_under(stack, bucket, "")) == status.files_done
    assert stack.open_multipart_uploads(bucket) == []
    assert handle.cancel()["outcome"] == "already"
    # The chain ended where the cancel found it: each page moved the cursor past one file (the
    # page being listed then started its file, but could not move on).
    record = BatchStore(stack.uploader.checkpoint).get(handle.batch_id)
    assert record is not None and status.files_total in (record.page, record.page + 1)


def test_thousands_of_tiny_files_are_listed_a_small_page_at_a_time(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack()
    stack.start_worker("batch-many", concurrency=4)
    app = Celery("batch-events", set_as_current=False)
    app.conf.update(celery_config(stack.settings))
    events: list[dict] = []
    listener = listen_for_events(app, events)
    root = stack.sources_root / f"batch-{uuid.uuid4().hex[:8]}"
    count, page_size = 3000, 50
    make_tree(root, {f"dir{i % 30:02}/file-with-a-longish-name-{i:05}.txt": 8 for i in range(count)})
    bucket = stack.new_bucket()
    handle = stack.uploader.submit_batch(str(root), f"s3://{bucket}/many/", page_size=page_size)
    handle.accepted(60)
    # The listing runs ahead of the uploads by about AHEAD_FILES files, not by the whole batch.
    most_active, deadline = 0, time.monotonic() + 600
    while not (status := stack.uploader.batch_status(handle.batch_id)).terminal:
        most_active = max(most_active, status.files_active)
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    assert 0 < most_active <= AHEAD_FILES + 2 * page_size, f"{most_active} uploads were on their way at once"
    assert (status.state, status.files_done, status.files_total) == (BatchProgress.COMPLETED, count, count)
    assert len(keys_under(stack, bucket, "many/")) == count
    record = BatchStore(stack.uploader.checkpoint).get(handle.batch_id)
    assert record is not None and record.page == count // page_size + 1  # the last page found nothing more

    def listing_tasks() -> dict[str, dict]:
        # One task per page; a page that waited for its predecessor's uploads (AHEAD_FILES) is
        # the same task received again.
        return {e["uuid"]: e for e in events if e.get("type") == "task-received" and e.get("name") == contract.LIST_BATCH}

    wait_until(lambda: len(listing_tasks()) >= record.page, 30, "the listing tasks' events")
    pages = list(listing_tasks().values())
    assert len(pages) == record.page
    assert sorted(ast.literal_eval(e["kwargs"])["page"] for e in pages) == list(range(record.page))
    # No message carries file names: the largest is a few dozen bytes, whatever the batch's size.
    assert max(len(e["kwargs"]) for e in pages) < 200
    start = [e for e in events if e.get("type") == "task-received" and e.get("name") == contract.START_BATCH]
    assert len(start) == 1 and len(start[0]["kwargs"]) < 1000
    listener.join(1)


def test_a_directory_outside_the_roots_is_refused_and_nothing_is_created(stack: Stack) -> None:
    elsewhere = stack.workdir / f"not-a-root-{uuid.uuid4().hex[:8]}"
    make_tree(elsewhere, {"a.bin": 10})
    bucket = stack.new_bucket()
    handle = stack.uploader.submit_batch(str(elsewhere), f"s3://{bucket}/x/")
    with pytest.raises(SourceError, match="outside the allowed source roots"):
        handle.accepted(60)
    status = stack.uploader.batch_status(handle.batch_id)
    assert status.state is BatchProgress.REFUSED and "UPLOADER_SOURCE_ROOTS" in status.error
    batches = BatchStore(stack.uploader.checkpoint)
    assert batches.get(handle.batch_id) is None and not stack.uploader.checkpoint.redis.exists(batches.uploads_key(handle.batch_id))
    assert keys_under(stack, bucket, "") == set()


def _cli(stack: Stack, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "uploader.cli", *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **stack.env},
    )


def test_cli_submits_a_directory_with_r_and_reports_the_batch(stack: Stack, tmp_path: Path) -> None:
    root = stack.sources_root / f"batch-{uuid.uuid4().hex[:8]}"
    files = make_tree(root, {"a.bin": 100, "b/c.bin": 200, "b/d.tmp": 300})
    bucket = stack.new_bucket()

    refused = _cli(stack, "submit", str(root) + "/", f"s3://{bucket}/cli/")
    assert refused.returncode == ExitCode.REFUSED and "add -r" in refused.stderr

    done = _cli(stack, "submit", "-r", str(root) + "/", f"s3://{bucket}/cli/", "--exclude", "*.tmp", "--wait")
    assert done.returncode == ExitCode.OK, done.stderr
    batch_id = done.stdout.strip()
    assert "2/2 files uploaded" in done.stderr
    assert keys_under(stack, bucket, "") == {"cli/a.bin", "cli/b/c.bin"}
    assert stack.object_sha256(bucket, "cli/b/c.bin") == sha256_file(files["b/c.bin"])

    shown = _cli(stack, "status", batch_id, "--json")
    assert shown.returncode == ExitCode.OK, shown.stderr
    data = json.loads(shown.stdout)
    assert (data["state"], data["files_total"], data["files_done"]) == ("completed", 2, 2)

    # A relative directory, as typed in a shell, is the one under the current directory.
    rerun = subprocess.run(
        [sys.executable, "-m", "uploader.cli", "submit", "-r", root.name, f"s3://{bucket}/rel/", "--skip-unchanged", "--wait"],
        capture_output=True, text=True, timeout=180, env={**os.environ, **stack.env}, cwd=root.parent,
    )
    assert rerun.returncode == ExitCode.OK, rerun.stderr
    assert "rel/b/d.tmp" in keys_under(stack, bucket, "rel/")
