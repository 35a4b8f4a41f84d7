"""Control is authenticated (issue 10, item 4): a client that can push to the control queue
cannot forge internal tasks, nor cancel or resume uploads it did not submit.

Every test runs real workers on a real Redis and S3; the attacker is a plain Celery client that
knows the task names (the README's message contract) and not the fleet key.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from celery import Celery

from tests.conftest import FLEET_KEY, Stack, sha256_file, signed
from uploader import NotAuthorized, UploadConflict, Uploader, auth, contract
from uploader.capabilities import CapabilityStore
from uploader.checkpoint.deadletter import DeadLetters
from uploader.config import Settings
from uploader.errors import MessageQuarantined
from uploader.planner import MiB

PART = 5 * MiB


def attacker(stack: Stack) -> Celery:
    """A client with broker access and nothing else: no fleet key, no capability."""
    app = Celery("attacker", set_as_current=False)
    app.conf.update(broker_url=stack.redis_url, result_backend=stack.redis_url, task_serializer="json")
    return app


def ordinary_client(stack: Stack, **overrides: Any) -> Uploader:
    """An ordinary client of the stack: the same settings, without the fleet key."""
    return Uploader(stack.settings.model_copy(update={"fleet_key": None, **overrides}))


def parts_queued(stack: Stack) -> int:
    return int(stack.uploader.checkpoint.redis.llen(contract.PARTS_QUEUE))


def test_forged_internal_tasks_are_quarantined_and_the_upload_is_untouched(make_stack) -> None:  # type: ignore[no-untyped-def]
    """upload_failed, cancel-by-errback, complete_upload, upload_part, put_object(s), reconcile and
    janitor without a proof, with a proof made with another key, and with a proof copied onto
    other arguments: each is quarantined before it runs (its sender gets MessageQuarantined),
    and the upload they aimed at completes with the right bytes."""
    stack: Stack = make_stack()
    # Parts stay queued until the test lets a part worker start: the forged messages find the
    # upload mid-way, with every part unleased.
    stack.start_worker("control", concurrency=2, queues=contract.CONTROL_QUEUE)
    bucket = stack.new_bucket()
    path = stack.make_file(6 * PART + 7)
    handle = stack.uploader.submit(str(path), f"s3://{bucket}/target.bin", part_size=PART)
    handle.accepted(timeout=60)
    record = stack.uploader.checkpoint.get(handle.upload_id)
    assert record is not None and record.state == "uploading"
    queued = parts_queued(stack)
    assert queued == record.part_count == 7

    upload, generation = handle.upload_id, record.generation
    wrong = auth.signed(b"not-the-fleet-key-" * 3, contract.UPLOAD_FAILED, {"upload_id": upload, "generation": generation})
    genuine_for_other = signed(contract.COMPLETE_UPLOAD, upload_id="someone-else", generation=generation)
    forged: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
        (contract.UPLOAD_FAILED, ("a-task-id",), {"upload_id": upload, "generation": generation}),
        (contract.UPLOAD_FAILED, ("a-task-id",), wrong),
        (contract.COMPLETE_UPLOAD, (), {"upload_id": upload, "generation": generation}),
        # A real proof, of another upload's completion, with this upload's id put in.
        (contract.COMPLETE_UPLOAD, (), {**genuine_for_other, "upload_id": upload}),
        (contract.UPLOAD_PART, (), {"upload_id": upload, "part_number": 1, "generation": generation}),
        (contract.PUT_OBJECT, (), {"upload_id": upload, "generation": generation}),
        (contract.PUT_OBJECTS, (), {"uploads": [[upload, generation]]}),
        (contract.RECONCILE, (), {}),
        (contract.JANITOR, (), {"dry_run": False}),
        (contract.JANITOR, (), {"dry_run": False, "proof": "0" * 64}),
    ]
    app = attacker(stack)
    try:
        results = [
            app.send_task(name, args=args, kwargs=kwargs, queue=contract.PARTS_QUEUE if name in contract.PART_TASKS else contract.CONTROL_QUEUE)
            for name, args, kwargs in forged
        ]
        control = [(name, r) for (name, _, _), r in zip(forged, results, strict=True) if name not in contract.PART_TASKS]
        for _, result in control:
            with pytest.raises(MessageQuarantined, match="no valid proof"):
                result.get(timeout=60)
        # The forged part messages (on the parts queue) are still queued: no part worker yet.
        assert parts_queued(stack) == queued + len(forged) - len(control)
        after = stack.uploader.checkpoint.get(upload)
        assert after is not None and after.state == "uploading" and after.generation == generation and not after.error
        stack.start_worker("parts", concurrency=4)
        for result in results:
            with pytest.raises(MessageQuarantined, match="no valid proof"):
                result.get(timeout=60)
        status = handle.wait(timeout=180)
        assert status.state == "completed"
        assert stack.object_sha256(bucket, "target.bin") == sha256_file(path)
        # The forged part was quarantined by the part worker, never run.
        assert DeadLetters(stack.uploader.checkpoint.redis, prefix=stack.settings.key_prefix).count() == len(forged)
    finally:
        app.close()


def test_a_duplicated_or_replayed_complete_upload_never_multiplies_queued_parts(make_stack) -> None:  # type: ignore[no-untyped-def]
    """Five genuine (signed) complete_upload messages for the current generation while every
    part is still queued: none sends a part again (before, each re-sent every unleased part:
    96 queued parts became 566)."""
    stack: Stack = make_stack()
    stack.start_worker("control", concurrency=2, queues=contract.CONTROL_QUEUE)
    bucket = stack.new_bucket()
    path = stack.make_file(8 * PART)
    handle = stack.uploader.submit(str(path), f"s3://{bucket}/dup.bin", part_size=PART)
    handle.accepted(timeout=60)
    record = stack.uploader.checkpoint.get(handle.upload_id)
    assert record is not None
    assert parts_queued(stack) == 8
    celery = stack.uploader.celery
    replies = [
        celery.send_task(contract.COMPLETE_UPLOAD, kwargs=signed(contract.COMPLETE_UPLOAD, upload_id=handle.upload_id, generation=record.generation))
        for _ in range(5)
    ]
    assert [r.get(timeout=60) for r in replies] == ["queued"] * 5
    assert parts_queued(stack) == 8
    after = stack.uploader.checkpoint.get(handle.upload_id)
    assert after is not None and after.generation == record.generation
    stack.start_worker("parts", concurrency=4)
    assert handle.wait(timeout=180).state == "completed"
    assert stack.object_sha256(bucket, "dup.bin") == sha256_file(path)
    final = stack.uploader.checkpoint.get(handle.upload_id)
    assert final is not None and final.parts_sent == 8


def test_cancel_and_resume_need_the_uploads_capability_or_an_operator(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack()
    stack.start_worker("slow", concurrency=2, UPLOADER_MAX_BANDWIDTH=str(4 * MiB))
    bucket = stack.new_bucket()
    owner = ordinary_client(stack)
    other = ordinary_client(stack)
    try:
        path = stack.make_file(8 * PART)
        handle = owner.submit(str(path), f"s3://{bucket}/mine.bin", part_size=PART)
        handle.accepted(timeout=60)
        assert handle.token and handle.token not in stack.uploader.checkpoint.redis.hgetall(
            stack.uploader.checkpoint.record_key(handle.upload_id)
        ).values()

        # Another ordinary client: no token, a wrong token.
        with pytest.raises(NotAuthorized, match="no capability token"):
            other.cancel(handle.upload_id)
        with pytest.raises(NotAuthorized, match="not this upload's"):
            other.cancel(handle.upload_id, token="guessed-" + "x" * 40)
        with pytest.raises(NotAuthorized):
            other.resume(handle.upload_id, restart=True)
        # A foreign client sending by name, with an invalid operator proof.
        app = attacker(stack)
        try:
            forged = app.send_task(contract.CANCEL_UPLOAD, kwargs={"upload_id": handle.upload_id, "proof": "a" * 64}, queue=contract.CONTROL_QUEUE)
            with pytest.raises(MessageQuarantined, match="proof is not valid"):
                forged.get(timeout=60)
        finally:
            app.close()
        assert stack.uploader.status(handle.upload_id).state in {"uploading", "completing"}

        # The owner (its client kept the token), then an operator on another upload.
        assert owner.cancel(handle.upload_id) == "cancelled"
        assert stack.uploader.status(handle.upload_id).state == "cancelled"

        second = other.submit(str(stack.make_file(3 * PART)), f"s3://{bucket}/theirs.bin", part_size=PART)
        second.accepted(timeout=60)
        assert stack.uploader.cancel(second.upload_id) == "cancelled"  # the tests' client holds the fleet key
    finally:
        owner.close()
        other.close()


def test_a_start_cannot_take_over_an_upload_id_another_client_submitted(make_stack) -> None:  # type: ignore[no-untyped-def]
    """Submitting an existing upload id again resumes it only for its submitter (the same
    capability): another client's start with that id is refused, and the upload goes on."""
    stack: Stack = make_stack()
    stack.start_worker("w", concurrency=2, UPLOADER_MAX_BANDWIDTH=str(4 * MiB))
    bucket = stack.new_bucket()
    owner, other = ordinary_client(stack), ordinary_client(stack)
    try:
        path = stack.make_file(6 * PART)
        handle = owner.submit(str(path), f"s3://{bucket}/k.bin", part_size=PART, upload_id="taken-id-1")
        handle.accepted(timeout=60)
        thief = other.submit(str(path), f"s3://{bucket}/k.bin", part_size=PART, upload_id="taken-id-1")
        with pytest.raises(UploadConflict, match="already used by another submission"):
            thief.accepted(timeout=60)
        again = owner.submit(str(path), f"s3://{bucket}/k.bin", part_size=PART, upload_id="taken-id-1")
        again.accepted(timeout=60)  # the submitter's own retry is still idempotent
        assert handle.wait(timeout=180).state == "completed"
    finally:
        owner.close()
        other.close()


def test_the_cli_keeps_its_tokens_so_its_own_cancel_works(make_stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`uploader submit` keeps the capability in a 0700 directory; `uploader cancel` of the same
    user finds it; a user without it (another directory) is refused with exit status 2."""
    import subprocess
    import sys
    from pathlib import Path

    stack: Stack = make_stack()
    stack.start_worker("w", concurrency=1, UPLOADER_MAX_BANDWIDTH=str(2 * MiB))
    bucket = stack.new_bucket()
    path = stack.make_file(6 * PART)
    env = {k: v for k, v in stack.env.items() if k != "UPLOADER_FLEET_KEY"}
    cli = str(Path(sys.executable).parent / "uploader")

    def run(*args: str, state: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [cli, *args], env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "UPLOADER_CAPABILITY_DIR": str(state), **env},
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )

    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    submitted = run("submit", str(path), f"s3://{bucket}/cli.bin", "--part-size", "5MiB", state=mine)
    assert submitted.returncode == 0, submitted.stderr
    upload_id = submitted.stdout.split()[0]
    assert (mine.stat().st_mode & 0o777) == 0o700 and ((mine / upload_id).stat().st_mode & 0o777) == 0o600
    refused = run("cancel", upload_id, state=theirs)
    assert refused.returncode == 2 and "not allowed to cancel" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    cancelled = run("cancel", upload_id, state=mine)
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout, cancelled.stderr


def test_capabilities_can_be_turned_off_by_the_deployment(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack(UPLOADER_REQUIRE_CAPABILITY="false")
    stack.start_worker("w", concurrency=1, UPLOADER_MAX_BANDWIDTH=str(2 * MiB))
    bucket = stack.new_bucket()
    owner, other = ordinary_client(stack), ordinary_client(stack)
    try:
        handle = owner.submit(str(stack.make_file(4 * PART)), f"s3://{bucket}/open.bin", part_size=PART)
        handle.accepted(timeout=60)
        assert other.cancel(handle.upload_id) == "cancelled"
    finally:
        owner.close()
        other.close()


def test_a_worker_without_the_fleet_key_stops_at_once_saying_what_to_set(make_stack) -> None:  # type: ignore[no-untyped-def]
    from uploader.dev.localstack import Worker

    stack: Stack = make_stack()
    env = {**stack.env, "UPLOADER_FLEET_KEY": ""}
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="UPLOADER_FLEET_KEY is not set") as caught:
        Worker(stack.workdir, env, name="keyless", concurrency=1)
    assert time.monotonic() - started < 30
    assert "Traceback" not in str(caught.value)


def test_a_short_fleet_key_is_refused_without_showing_it() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as caught:
        Settings(fleet_key="short-secret-value")
    assert "shorter than 32" in str(caught.value) and "short-secret-value" not in str(caught.value)


def test_proofs_bind_the_task_and_every_argument() -> None:
    key = FLEET_KEY.encode()
    kwargs = {"upload_id": "u1", "part_number": 3, "generation": 2}
    proof = auth.prove(key, contract.UPLOAD_PART, kwargs)
    assert auth.proven(key, contract.UPLOAD_PART, {**kwargs, "proof": proof})
    # The order of the kwargs does not matter; any change of a value, the task or the key does.
    assert auth.proven(key, contract.UPLOAD_PART, {"generation": 2, "proof": proof, "part_number": 3, "upload_id": "u1"})
    assert not auth.proven(key, contract.UPLOAD_PART, {**kwargs, "part_number": 4, "proof": proof})
    assert not auth.proven(key, contract.PUT_OBJECT, {**kwargs, "proof": proof})
    assert not auth.proven(b"another-key" * 4, contract.UPLOAD_PART, {**kwargs, "proof": proof})
    assert not auth.proven(None, contract.UPLOAD_PART, {**kwargs, "proof": proof})
    assert not auth.proven(key, contract.UPLOAD_PART, {**kwargs, "extra": 1, "proof": proof})


def test_a_kept_capability_opens_only_its_own_seal(tmp_path) -> None:
    key = FLEET_KEY.encode()
    capability = auth.Capability.new()
    seal = auth.owner_seal(key, capability.digest)
    assert auth.token_opens(key, capability.token, seal)
    assert not auth.token_opens(key, capability.digest, seal)  # the digest (in the start message) is not the token
    assert not auth.token_opens(key, auth.Capability.new().token, seal)
    assert not auth.token_opens(b"other" * 8, capability.token, seal)
    store = CapabilityStore(tmp_path / "caps")
    store.save("up-1", capability.token)
    assert store.load("up-1") == capability.token and store.load("up-2") is None
    assert store.load("../etc/passwd") is None
    # The token is a bearer secret: only its owner may read it.
    assert (tmp_path / "caps" / "up-1").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "caps").stat().st_mode & 0o777 == 0o700


def test_celerys_built_in_tasks_are_not_accepted_from_the_broker(stack: Stack) -> None:
    """celery.chain / celery.group / celery.chord would send whatever signatures a message holds
    (internal tasks included, with the worker's own hands): workers accept our task names only."""
    app = attacker(stack)
    try:
        inner = {"task": contract.UPLOAD_PART, "args": [], "kwargs": {"upload_id": "x", "part_number": 1, "generation": 1},
                 "options": {}, "subtask_type": None, "immutable": True}
        for name, args in (("celery.chain", [[inner]]), ("celery.group", [[inner]]), ("celery.backend_cleanup", [])):
            result = app.send_task(name, args=args, queue=contract.CONTROL_QUEUE)
            with pytest.raises(MessageQuarantined, match="unknown task name"):
                result.get(timeout=60)
    finally:
        app.close()


def test_remote_control_is_read_only_unless_the_deployment_opens_it(make_stack) -> None:  # type: ignore[no-untyped-def]
    """Any broker client could broadcast Celery's `shutdown` and stop every worker. By default a
    worker answers what Flower reads (ping, stats, ...) and refuses the rest with an error reply;
    with UPLOADER_REMOTE_CONTROL=full it obeys (so the test would see a refusal fail)."""
    stack: Stack = make_stack()
    worker = stack.start_worker("guarded", concurrency=2)
    app = attacker(stack)
    try:
        assert app.control.ping(destination=[worker.name], timeout=10) == [{worker.name: {"ok": "pong"}}]
        for command in ("shutdown", "pool_shrink", "cancel_consumer", "rate_limit"):
            arguments = {"queue": contract.PARTS_QUEUE} if command == "cancel_consumer" else {}
            if command == "rate_limit":
                arguments = {"task_name": contract.UPLOAD_PART, "rate_limit": "1/h"}
            replies = app.control.broadcast(command, arguments=arguments, destination=[worker.name], reply=True, timeout=10)
            assert replies and "disabled on this worker" in replies[0][worker.name]["error"], (command, replies)
        assert worker.alive()
        assert app.control.inspect(destination=[worker.name], timeout=10).active_queues()[worker.name]
        bucket = stack.new_bucket()
        path = stack.make_file(6 * MiB)
        assert stack.uploader.submit(str(path), f"s3://{bucket}/still.bin").wait(timeout=120).state == "completed"

        open_worker = stack.start_worker("open", concurrency=1, UPLOADER_REMOTE_CONTROL="full")
        app.control.broadcast("shutdown", destination=[open_worker.name])
        open_worker.proc.wait(30)
        assert not open_worker.alive()
    finally:
        app.close()
