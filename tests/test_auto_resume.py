"""Automatic resumes of transiently failed uploads, at the checkpoint (real Redis, no workers):
``mark_failed`` sets when the reconciler may resume, ``claim_auto_resume`` hands each resume to
one caller, and the limit makes the failure final."""

from __future__ import annotations

import threading

from uploader.checkpoint import CheckpointStore
from uploader.checkpoint.store import AUTO_RESUME_MAX_WAIT

FIELDS = {
    "source": "/data/src.bin", "bucket": "bucket", "key": "key", "size": 20, "mtime_ns": 1,
    "part_size": 10, "part_count": 2, "mode": "multipart",
}  # fmt: skip


def _failed(store: CheckpointStore, upload_id: str, *, auto_resumes: int, backoff: int = 30) -> float:
    assert store.claim(upload_id, FIELDS) == (True, "creating")
    assert store.attach_multipart(upload_id, "mpu-1") == "ok"
    assert store.mark_failed(upload_id, "part 2: SlowDown", auto_resumes=auto_resumes, backoff=backoff) == "uploading"
    record = store.get(upload_id)
    assert record is not None
    return record.finished or 0.0


def test_a_permanent_failure_is_final(store: CheckpointStore) -> None:
    _failed(store, "u1", auto_resumes=0)
    record = store.get("u1")
    assert record is not None and record.state == "failed" and record.retry_at is None and record.terminal
    assert store.claim_auto_resume("u1", 5, 30, now=record.finished + 10**6) == 0  # type: ignore[operator]


def test_a_transient_failure_is_resumed_after_a_doubling_wait_until_the_limit(store: CheckpointStore) -> None:
    failed_at = _failed(store, "u1", auto_resumes=2, backoff=30)
    record = store.get("u1")
    assert record is not None and not record.terminal and record.retry_pending
    assert record.retry_at == failed_at + 30
    assert store.claim_auto_resume("u1", 2, 30, now=failed_at + 29) == 0, "not due yet"
    assert store.claim_auto_resume("u1", 2, 30, now=failed_at + 30) == 1
    assert store.claim_auto_resume("u1", 2, 30, now=failed_at + 30) == 0, "claimed once"
    # While the resume runs the upload must not look finally failed to a waiting client.
    during = store.get("u1")
    assert during is not None and during.retry_pending and during.retry_at == failed_at + 30 + 60

    # The resume reopens it; its parts fail again: the second (last) resume waits twice as long.
    assert isinstance(store.reopen("u1", "mpu-1"), int)
    assert store.mark_failed("u1", "part 2: SlowDown", auto_resumes=2, backoff=30) == "uploading"
    again = store.get("u1")
    assert again is not None and again.auto_resumes == 1
    assert again.retry_at is not None and abs(again.retry_at - (again.finished + 60)) < 1e-6  # type: ignore[operator]
    assert store.claim_auto_resume("u1", 2, 30, now=again.retry_at) == 2
    assert isinstance(store.reopen("u1", "mpu-1"), int)
    assert store.mark_failed("u1", "part 2: SlowDown", auto_resumes=2, backoff=30) == "uploading"
    final = store.get("u1")
    assert final is not None and final.retry_at is None and final.terminal and final.auto_resumes == 2


def test_a_resume_that_never_got_going_is_claimed_again_then_ends(store: CheckpointStore) -> None:
    failed_at = _failed(store, "u1", auto_resumes=1, backoff=5)
    assert store.claim_auto_resume("u1", 1, 5, now=failed_at + 5) == 1
    # The resume itself failed (S3 still down at ListParts): the state is still "failed". At its
    # next retry_at, no resume is left: the failure becomes final instead of a second resume.
    record = store.get("u1")
    assert record is not None and record.retry_at is not None
    assert store.claim_auto_resume("u1", 1, 5, now=record.retry_at) == 0
    final = store.get("u1")
    assert final is not None and final.terminal and final.error == "part 2: SlowDown"


def test_the_wait_is_capped(store: CheckpointStore) -> None:
    failed_at = _failed(store, "u1", auto_resumes=50, backoff=10**6)
    record = store.get("u1")
    assert record is not None and record.retry_at == failed_at + AUTO_RESUME_MAX_WAIT


def test_concurrent_reconcilers_claim_each_resume_once(store: CheckpointStore) -> None:
    failed_at = _failed(store, "u1", auto_resumes=3, backoff=1)
    barrier = threading.Barrier(8)
    claims: list[int] = []

    def claim() -> None:
        barrier.wait()
        claims.append(store.claim_auto_resume("u1", 3, 1, now=failed_at + 1))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(claims) == [0] * 7 + [1]


def test_a_note_for_a_person_stops_automatic_resumes(store: CheckpointStore) -> None:
    _failed(store, "u1", auto_resumes=3)
    assert store.note_error("u1", "source changed since the upload began")
    record = store.get("u1")
    assert record is not None and record.terminal and record.error.startswith("source changed")
    assert not store.note_error("gone", "x"), "no record is created for a missing upload"
    assert store.get("gone") is None
