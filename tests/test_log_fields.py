"""Logs one upload can be followed by (uploader/logfields.py): JSON lines with the upload id,
part, worker, event, bytes and duration; in text mode, every line about an upload names it."""

from __future__ import annotations

import json
import re

from tests.conftest import Stack
from uploader.dev.localstack import wait_until
from uploader.planner import MiB


def test_json_logs_carry_upload_part_worker_event_bytes_and_duration(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack()
    worker = stack.start_worker("jsonlog", concurrency=2, default_name=True, UPLOADER_LOG_FORMAT="json")
    bucket = stack.new_bucket()
    parts = 3
    handle = stack.uploader.submit(str(stack.make_file(parts * 5 * MiB)), f"s3://{bucket}/j.bin", part_size=5 * MiB)
    handle.wait(timeout=120)

    def succeeded() -> list[dict]:
        # From the first record on, every line is one JSON object. (Before it, as root only,
        # Celery's superuser warning, printed before logging is set up.)
        lines = worker.log_text().splitlines()
        first = next(i for i, line in enumerate(lines) if line.startswith("{"))
        records = [json.loads(line) for line in lines[first:] if line.strip()]
        return [r for r in records if r.get("event") == "task_succeeded" and r.get("task") == "uploader.upload_part"]

    wait_until(lambda: len(succeeded()) == parts, 30, "a JSON line per part sent")  # every line parses
    for record in succeeded():
        assert record["upload_id"] == handle.upload_id and 1 <= record["part"] <= parts
        assert record["bytes"] == 5 * MiB and record["duration_s"] > 0 and record["worker"]
        assert set(record) >= {"time", "level", "logger", "message", "task_id"}
    assert sorted(r["part"] for r in succeeded()) == list(range(1, parts + 1))
    received = [json.loads(line) for line in worker.log_text().splitlines() if '"task_received"' in line]
    assert {r.get("upload_id") for r in received if r.get("task") == "uploader.upload_part"} == {handle.upload_id}
    assert "\n" not in "".join(r["message"] for r in succeeded())


def test_every_text_line_about_an_upload_names_it(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack()
    worker = stack.start_worker("textlog", concurrency=2)
    bucket = stack.new_bucket()
    handle = stack.uploader.submit(str(stack.make_file(3 * 5 * MiB)), f"s3://{bucket}/t.bin", part_size=5 * MiB)
    handle.wait(timeout=120)
    wait_until(lambda: worker.log_text().count("succeeded in") >= 5, 30, "the tasks' lines")
    part_lines = [line for line in worker.log_text().splitlines() if re.search(r"uploader\.upload_part\[", line)]
    assert len(part_lines) >= 6  # received and succeeded, per part
    for line in part_lines:
        assert handle.upload_id in line, line
    # ... and its part: the prefix, or the result the line shows ({'part': 2, ...}).
    assert all(re.search(r"part'?:? [1-3]\b", line) for line in part_lines if "succeeded in" in line)
