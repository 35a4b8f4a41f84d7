"""Shared pieces of the fault suite: the scale knob, end-of-scenario checks and the one-line
JSON summary every scenario prints.

``UPLOADER_CHAOS_SCALE`` picks the sizes: ``ci`` (default: tens of MiB and a handful of faults,
each scenario well under a minute on two cores) or ``full`` (uploads of at least 1 GiB and
hundreds of faults)::

    .venv/bin/pytest tests/chaos -s                              # CI size
    UPLOADER_CHAOS_SCALE=full .venv/bin/pytest tests/chaos -s    # full size

Every scenario ends with the same checks on every upload it ran: the stored object's SHA-256
equals the source's, the checkpoint says ``complete_calls == 1``, no multipart upload is left
in the bucket (ListMultipartUploads is empty) and no in-flight lease is left in the checkpoint.
Each prints one line ``CHAOS_SUMMARY {json}`` (collect them with ``pytest -s``).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from botocore.exceptions import ClientError

from tests.conftest import Stack, sha256_file
from uploader.client import UploadStatus
from uploader.planner import MiB

SCALE = os.environ.get("UPLOADER_CHAOS_SCALE", "ci")
if SCALE not in ("ci", "full"):
    raise ValueError(f"UPLOADER_CHAOS_SCALE must be 'ci' or 'full', not {SCALE!r}")

GiB = 1024 * MiB
PART = 5 * MiB
#: Seed of every random choice the scenarios make (which worker dies, which fault is injected).
SEED = int(os.environ.get("UPLOADER_CHAOS_SEED", "20240611"))

T = TypeVar("T")


def scaled(ci: T, full: T) -> T:
    """``ci`` at CI size, ``full`` at full size."""
    return ci if SCALE == "ci" else full


#: Per-test time limit (pytest-timeout): generous at full size.
TIMEOUT = scaled(280, 3600)


class Stuck(TimeoutError):
    """The upload made no progress (same state, same parts recorded) for too long."""

    def __init__(self, message: str, status: UploadStatus | None) -> None:
        super().__init__(message)
        self.status = status


def wait_terminal(stack: Stack, upload_id: str, timeout: float, stuck_after: float | None = None) -> UploadStatus:
    """Wait until the upload is completed, failed or cancelled. With ``stuck_after``, give up
    early (:class:`Stuck`) once neither its state nor its recorded parts changed for that long."""
    deadline = time.monotonic() + timeout
    last: UploadStatus | None = None
    progress_key: tuple[str, int] | None = None
    progress_at = time.monotonic()
    while True:
        try:
            last = stack.uploader.status(upload_id)
            if last.terminal:
                return last
            if (last.state, last.parts_done) != progress_key:
                progress_key, progress_at = (last.state, last.parts_done), time.monotonic()
        except (redis.RedisError, OSError):
            pass
        now = time.monotonic()
        if stuck_after is not None and now - progress_at > stuck_after:
            raise Stuck(f"upload {upload_id} made no progress for {stuck_after} s: {progress_key}", last)
        if now > deadline:
            raise Stuck(f"timed out after {timeout} s waiting for upload {upload_id} to finish", last)
        time.sleep(0.1)


def inflight_leases(stack: Stack, upload_id: str) -> dict[str, str]:
    store = stack.uploader.checkpoint
    return store.redis.hgetall(store.inflight_key(upload_id))


def open_uploads_for(stack: Stack, bucket: str, key: str | None = None) -> list[dict[str, Any]]:
    uploads = stack.open_multipart_uploads(bucket)
    return [u for u in uploads if key is None or u["Key"] == key]


def multipart_upload_exists(stack: Stack, bucket: str, key: str, mpu_id: str) -> bool:
    """ListParts on ``mpu_id``: ``False`` when the server answers NoSuchUpload."""
    try:
        stack.s3.list_parts(Bucket=bucket, Key=key, UploadId=mpu_id)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "NoSuchUpload":
            return False
        raise
    return True


def object_exists(stack: Stack, bucket: str, key: str) -> bool:
    try:
        stack.s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)) == 404:
            return False
        raise
    return True


def worker_log_lines(stack: Stack, pattern: str, limit: int = 40) -> list[str]:
    """Lines matching ``pattern`` from every worker this stack started (killed ones included)."""
    regex = re.compile(pattern)
    out = []
    for worker in stack.workers:
        for line in worker.log_text().splitlines():
            if regex.search(line):
                out.append(f"[{worker.name}] {line}")
    return out[-limit:]


class Report:
    """Figures of one scenario, checked and printed as ``CHAOS_SUMMARY {json}``."""

    def __init__(self, scenario: str, command: str) -> None:
        self.scenario = scenario
        self.command = command
        self.faults: Counter[str] = Counter()
        self.uploads = 0
        self.objects_expected = 0
        self.objects_correct = 0
        self.bytes_verified = 0
        self.orphans = 0
        self.extra: dict[str, Any] = {}
        self.problems: list[str] = []
        self._checked: dict[str, set[str]] = {}
        self.started = time.monotonic()
        self.emitted = False

    def fault(self, kind: str, n: int = 1) -> None:
        self.faults[kind] += n

    def problem(self, text: str) -> None:
        self.problems.append(text)

    def _orphans(self, stack: Stack, upload_id: str, bucket: str, key: str) -> None:
        leases = inflight_leases(stack, upload_id)
        if leases:
            self.problem(f"{upload_id}: in-flight leases left in the checkpoint: {leases}")
        left = open_uploads_for(stack, bucket, key)
        if left:
            self.problem(f"{upload_id}: multipart uploads left for s3://{bucket}/{key}: {[u['UploadId'] for u in left]}")
        self.orphans += len(leases) + len(left)
        self._checked.setdefault(bucket, set()).add(key)

    def check_buckets(self, stack: Stack) -> None:
        """ListMultipartUploads of every bucket checked is empty (uploads under keys no check
        looked at count as orphans too)."""
        for bucket, keys in self._checked.items():
            left = open_uploads_for(stack, bucket)
            if left:
                self.problem(f"multipart uploads left in s3://{bucket}: {[(u['Key'], u['UploadId']) for u in left]}")
            self.orphans += sum(1 for u in left if u["Key"] not in keys)

    def check_completed(
        self, stack: Stack, upload_id: str, path: Path, bucket: str, key: str, *, takeovers: bool = False
    ) -> None:
        """The upload completed, once, into an object byte-identical to ``path``; nothing left.
        ``takeovers``: a completer may have been killed mid-way (a scenario that kills at random),
        so a second completer taking its lapsed lease over is allowed, and counted."""
        self.uploads += 1
        self.objects_expected += 1
        record = stack.uploader.checkpoint.get(upload_id)
        if record is None or record.state != "completed":
            self.problem(f"{upload_id}: state {record.state if record else 'missing'}, error {record.error if record else ''!r}")
        else:
            once = record.complete_calls == 1 or (takeovers and record.complete_calls > 1)
            if not once:
                self.problem(f"{upload_id}: complete_calls == {record.complete_calls}")
            elif record.complete_calls > 1:
                self.extra["completion_takeovers"] = self.extra.get("completion_takeovers", 0) + record.complete_calls - 1
            source = sha256_file(path)
            stored = stack.object_sha256(bucket, key)
            if stored != source:
                self.problem(f"{upload_id}: stored sha256 {stored} != source {source}")
            elif once:
                self.objects_correct += 1
                self.bytes_verified += record.size
        self._orphans(stack, upload_id, bucket, key)

    def check_cancelled(self, stack: Stack, upload_id: str, bucket: str, key: str) -> None:
        """The upload is cancelled, its multipart upload is gone (ListParts: NoSuchUpload), no
        object was created, nothing is left."""
        self.uploads += 1
        record = stack.uploader.checkpoint.get(upload_id)
        if record is None or record.state != "cancelled":
            self.problem(f"{upload_id}: expected cancelled, state {record.state if record else 'missing'}")
        if record is not None and record.mpu_id and multipart_upload_exists(stack, bucket, key, record.mpu_id):
            self.problem(f"{upload_id}: cancelled but its multipart upload {record.mpu_id} still answers ListParts")
        if object_exists(stack, bucket, key):
            self.problem(f"{upload_id}: cancelled but s3://{bucket}/{key} exists")
        if record is not None and record.complete_calls != 0:
            self.problem(f"{upload_id}: cancelled after {record.complete_calls} CompleteMultipartUpload call(s)")
        self._orphans(stack, upload_id, bucket, key)

    def summary(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "scale": SCALE,
            "faults_injected": sum(self.faults.values()),
            "faults": dict(self.faults),
            "uploads": self.uploads,
            "bytes_verified": self.bytes_verified,
            "objects_correct": f"{self.objects_correct}/{self.objects_expected}",
            "orphans": self.orphans,
            "seconds": round(time.monotonic() - self.started, 1),
            "problems": len(self.problems),
            **self.extra,
            "command": self.command,
        }

    def emit(self) -> None:
        if not self.emitted:
            self.emitted = True
            for text in self.problems:
                print("\nCHAOS_PROBLEM " + text, flush=True)
            print("\nCHAOS_SUMMARY " + json.dumps(self.summary(), sort_keys=False), flush=True)

    def finish(self, stack: Stack | None = None) -> None:
        """Check the buckets (given the stack), print the summary, then fail with every problem
        found."""
        if stack is not None:
            self.check_buckets(stack)
        self.emit()
        assert not self.problems, "\n".join(self.problems)


@pytest.fixture
def report(request) -> Iterator[Report]:  # type: ignore[no-untyped-def]
    """A :class:`Report` named after the test; its summary is printed even if the test fails."""
    path = Path(request.node.fspath).relative_to(Path(request.config.rootpath))
    prefix = "UPLOADER_CHAOS_SCALE=full " if SCALE == "full" else ""
    rep = Report(request.node.name.removeprefix("test_"), f"{prefix}.venv/bin/pytest '{path}::{request.node.name}' -s")
    yield rep
    if not rep.emitted:
        rep.extra["aborted"] = True
        rep.emit()
