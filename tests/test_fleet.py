"""A fleet as operators run it: workers started as the README says (``uploader worker``, Celery's
default node name, so every worker on this machine is ``celery@<host>``), killed and restarted
on the same host, with no scheduler process and nobody calling ``resume``.

The stall reconciler is pushed out of reach here (``UPLOADER_STALL_SECONDS=600``) and the
visibility timeout is the default hour: only the parts' own recovery (leases held by worker
incarnations, taken back from dead ones by the workers' recovery leader) can finish these
uploads in the time the tests allow.
"""

from __future__ import annotations

import time

import pytest

from tests.conftest import Stack, sha256_file
from uploader.checkpoint.store import Lease
from uploader.dev.localstack import wait_until
from uploader.maintenance import RECOVERY_ROLE
from uploader.planner import MiB

PART = 5 * MiB
HEARTBEAT = 3
RECONCILE = 2


def _fleet(make_stack, **env: str) -> Stack:  # type: ignore[no-untyped-def]
    return make_stack(
        UPLOADER_WORKER_HEARTBEAT_SECONDS=str(HEARTBEAT),
        UPLOADER_RECONCILE_INTERVAL=str(RECONCILE),
        UPLOADER_LEADER_LEASE_SECONDS="3",
        UPLOADER_STALL_SECONDS="600",
        **env,
    )


def _leased(stack: Stack, upload_id: str) -> dict[int, Lease]:
    return stack.uploader.checkpoint.leases(upload_id)


def _wait_leases(stack: Stack, upload_id: str, at_least: int = 1) -> dict[int, Lease]:
    found: dict[int, Lease] = {}

    def some() -> bool:
        found.clear()
        found.update(_leased(stack, upload_id))
        return len(found) >= at_least

    wait_until(some, 60, f"{at_least} leased parts")
    return found


def test_a_worker_restarted_on_the_same_host_does_not_strand_its_parts(make_stack) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL ``uploader worker`` mid-upload and start it again at once under the same node name
    (systemd's Restart=always): its dead incarnation's parts are sent again within the heartbeat
    TTL plus one reconcile interval (and some slack for a busy machine), with no operator."""
    stack = _fleet(make_stack)
    bandwidth = str(8 * MiB)
    first = stack.start_worker("host", concurrency=3, default_name=True, UPLOADER_MAX_BANDWIDTH=bandwidth)
    bucket = stack.new_bucket()
    path = stack.make_file(18 * PART + 1234)
    handle = stack.uploader.submit(str(path), f"s3://{bucket}/restarted.bin", part_size=PART)
    handle.accepted(timeout=60)
    stack.wait_parts_done(handle.upload_id, 2)
    held = _wait_leases(stack, handle.upload_id, 2)
    dead_holders = {lease.holder for lease in held.values()}
    assert all(holder.startswith(f"{first.name}#") for holder in dead_holders), dead_holders

    first.kill()
    first.proc.wait(10)
    killed_at = time.monotonic()
    second = stack.start_worker("host", concurrency=3, default_name=True, UPLOADER_MAX_BANDWIDTH=bandwidth)
    assert second.name == first.name  # the same node name: only the incarnation differs

    def dead_leases_gone() -> bool:
        return not any(lease.holder in dead_holders for lease in _leased(stack, handle.upload_id).values())

    wait_until(dead_leases_gone, HEARTBEAT + RECONCILE + 30, "the dead incarnation's leases to be taken back")
    taken_back_after = time.monotonic() - killed_at
    status = handle.wait(timeout=180)
    assert status.state == "completed"
    assert stack.object_sha256(bucket, "restarted.bin") == sha256_file(path)
    assert stack.open_multipart_uploads(bucket) == []
    assert "sending parts" in second.log_text() + first.log_text()
    print(f"FLEET_RESTART taken_back_after_s={taken_back_after:.1f} bound_s={HEARTBEAT + RECONCILE}")


def test_two_live_workers_with_the_same_node_name_do_not_keep_each_others_leases(make_stack) -> None:  # type: ignore[no-untyped-def]
    """Two hosts whose hostnames collide (containers): both are ``celery@<host>``. When one dies
    the other's heartbeat, under the same node name, must not keep the dead one's leases held."""
    stack = _fleet(make_stack)
    bandwidth = str(6 * MiB)
    a = stack.start_worker("twin-a", concurrency=2, default_name=True, UPLOADER_MAX_BANDWIDTH=bandwidth)
    b = stack.start_worker("twin-b", concurrency=2, default_name=True, UPLOADER_MAX_BANDWIDTH=bandwidth)
    assert a.name == b.name
    bucket = stack.new_bucket()
    path = stack.make_file(16 * PART + 77)
    handle = stack.uploader.submit(str(path), f"s3://{bucket}/twins.bin", part_size=PART)
    handle.accepted(timeout=60)
    leases = _wait_leases(stack, handle.upload_id, 4)
    holders = {lease.holder for lease in leases.values()}
    assert len(holders) == 2, f"two incarnations under one node name hold leases: {holders}"

    a.kill()
    a.proc.wait(10)
    status = handle.wait(timeout=180)
    assert status.state == "completed"
    assert b.alive()
    assert stack.object_sha256(bucket, "twins.bin") == sha256_file(path)
    assert stack.open_multipart_uploads(bucket) == []


def test_recovery_has_one_leader_and_another_takes_over_when_it_dies(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack = _fleet(make_stack)
    workers = [stack.start_worker(f"lead{n}", concurrency=1) for n in range(3)]
    store = stack.uploader.checkpoint
    wait_until(lambda: store.leader(RECOVERY_ROLE) is not None, 30, "a recovery leader")
    leader = store.leader(RECOVERY_ROLE)
    assert leader is not None
    wait_until(lambda: store.recovery().reconciled_at is not None, 30, "a first reconcile run")
    # Exactly one of the three leads; the record of the last run names it.
    assert store.recovery().leader == leader
    victim = next(w for w in workers if leader.startswith(f"{w.name}#"))
    victim.kill()
    victim.proc.wait(10)
    killed_at = time.time()
    wait_until(
        lambda: (store.leader(RECOVERY_ROLE) or leader) != leader and (store.recovery().reconciled_at or 0) > killed_at,
        30, "another worker to lead recovery",
    )
    new_leader = store.leader(RECOVERY_ROLE)
    assert new_leader is not None and any(new_leader.startswith(f"{w.name}#") for w in workers if w is not victim)
    # status shows when recovery last ran, and where.
    bucket = stack.new_bucket()
    status = stack.uploader.submit(str(stack.make_file(1000)), f"s3://{bucket}/small").wait(timeout=60)
    assert status.recovery_ran_at is not None and status.recovery_ran_at > killed_at
    assert status.recovery_leader == new_leader


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_a_hung_part_is_sent_again_once_its_time_limit_passes(make_stack, pool: str) -> None:  # type: ignore[no-untyped-def]
    """A part task that hangs (here: throttled to a crawl far below the minimum throughput) while
    its worker lives: once the part's time limit passes, its lease is void and the recovery
    leader sends the part again on another worker."""
    stack = _fleet(make_stack, UPLOADER_PART_TIME_BASE="2", UPLOADER_PART_MIN_THROUGHPUT=str(4 * MiB))
    slow = stack.start_worker("crawl", concurrency=1, pool=pool, UPLOADER_MAX_BANDWIDTH=str(64 * 1024))
    bucket = stack.new_bucket()
    path = stack.make_file(3 * PART + 5)
    handle = stack.uploader.submit(str(path), f"s3://{bucket}/hung.bin", part_size=PART)
    handle.accepted(timeout=60)
    hung = _wait_leases(stack, handle.upload_id, 1)
    hung_holders = {lease.holder for lease in hung.values()}
    stack.start_worker("healthy", concurrency=4)
    status = handle.wait(timeout=120)
    assert status.state == "completed"
    assert stack.object_sha256(bucket, "hung.bin") == sha256_file(path)
    assert slow.alive()
    # The crawling worker's heartbeat lived all along: only the time limit freed its part.
    assert stack.uploader.checkpoint.live_owners(hung_holders) == hung_holders
    slow.kill()


def test_a_forked_pool_process_never_shares_the_parents_connections() -> None:
    """A prefork pool process forked after the worker's main process used S3 (its recovery loop
    resumes uploads, which lists parts) must build its own clients: two processes writing into
    one pooled socket interleave their requests (the fault suite saw BadDigest and bare 400s)."""
    import os

    from uploader.context import default_context
    from uploader.storage.adapter import object_store

    parent = default_context()
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status only
        child = default_context()
        fresh = (
            child is not parent
            and child.objects is not parent.objects
            and object_store(child.settings) is not parent.objects
            and child.checkpoint is not parent.checkpoint
        )
        os._exit(0 if fresh else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the forked child reused the parent's clients"
    assert default_context() is parent  # the parent keeps its own
