"""Stateful test of the checkpoint: hypothesis drives a real :class:`CheckpointStore` on a real
Redis through arbitrary interleavings of its Lua transitions (claim, attach, discard, begin/record/
release part, next generation, begin completion, mark completed/failed, cancel, reopen, restart,
forget parts, worker heartbeats), with a small Python model of what each upload should look like.

Two kinds of checks run after every step:

* the model: every transition's return value is predicted, and the record, parts hash and
  in-flight leases in Redis must equal the model's;
* the safety properties the design depends on (``@invariant`` and ``_require``): states stay in
  the known set, ``parts_done``/``bytes_done`` agree with the parts hash, a completed upload is
  completed once and never changes, ``go`` is given only with every part recorded and never to
  two tokens under a live lease, fenced records change nothing, cancelled stays cancelled,
  generations never decrease.

Besides one rule per transition (run in any state, so refusals are tested too), composite rules
play what the system does: a part task (begin + record), a fleet finishing the parts, a stale task
of an older attempt recording a leased part, the chord body (begin completion + mark completed),
clients and late messages racing a completer's live lease or poking a finished upload. Runs start
from any stage (none, creating, uploading, all parts recorded, completing).

Lease expiry is modelled with ``lease_seconds=0`` (lapsed by the next call) or an hour (live);
a worker's heartbeat expiring is modelled by deleting its heartbeat key.

Parts numbered outside the plan are refused (``stale`` from the store), leases are released only
by a record of the current attempt, and parts are forgotten only while ``uploading`` or
``failed``: the model expects exactly that. The tests at the end replay, as minimal sequences, the
bugs this machine found in earlier scripts.

``KNOWN_BUGS`` lists properties the scripts are known to violate (none today): the model then
follows what the scripts do and relaxes each listed property only as far as its bug needs, with a
``xfail(strict=True)`` test per bug. ``CHECKPOINT_MACHINE_STRICT=1`` (or ``=<bug name>``) checks
them in full, so that hypothesis prints a minimal sequence. ``CHECKPOINT_MACHINE_EXAMPLES=<n>``
runs more examples than the default (e.g. 2000 before changing a script).
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import uuid
from dataclasses import dataclass, field

import pytest
import redis
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from uploader.checkpoint.store import STATES, CheckpointStore, Lease, PartJob, PartTimeLimit, part_lease_owner
from uploader.model import UploadedPart, UploadRecord

IDS = ("u1", "u2")
OWNERS = ("w1|t1", "w2|t2", "w1|t3")  # "w1|t3": same worker as t1, another task
WORKERS = ("w1", "w2")
TOKENS = ("c1", "c2")
LIVE_LEASE = 3600  # seconds: still held by any later step
LAPSED_LEASE = 0  # lease_until == now: lapsed by the next call
RETENTION = 3600
PART_SIZE = 10
MTIME_NS = 1_700_000_000_123_456_789
MAX_PARTS = 4

# Properties the scripts violate today, each relaxed (not ignored) where the model says ``KNOWN:``.
# Empty: the four bugs the machine found (a fenced record_part dropping the current lease, restart
# under a live completion lease, forget_parts in any state, part numbers outside the plan) are fixed.
_ALL_KNOWN_BUGS: frozenset[str] = frozenset()
# CHECKPOINT_MACHINE_STRICT=1 checks every property in full; =<name>[,<name>] only the named ones.
_STRICT = {s.strip() for s in os.environ.get("CHECKPOINT_MACHINE_STRICT", "").split(",") if s.strip()}
KNOWN_BUGS = frozenset() if _STRICT & {"1", "all"} else _ALL_KNOWN_BUGS - _STRICT
MAX_EXAMPLES = int(os.environ.get("CHECKPOINT_MACHINE_EXAMPLES", "300"))


def _known(bug: str) -> bool:
    return bug in KNOWN_BUGS


def _require(condition: bool, message: str) -> None:
    assert condition, message


@dataclass
class Model:
    """What one upload id should look like in Redis."""

    state: str | None = None  # None: no record
    mode: str = "multipart"
    part_count: int = 0
    mpu: str | None = None  # None: the field is absent (never attached)
    old_mpus: list[str] = field(default_factory=list)
    generation: int = 0
    parts: dict[int, int] = field(default_factory=dict)  # part number -> size
    inflight: dict[int, str] = field(default_factory=dict)  # part number -> owner
    hung: set[int] = field(default_factory=set)  # leases taken with a time limit already past
    lease_token: str | None = None
    lease_live: bool = False
    complete_calls: int = 0
    parts_sent: int = 0
    bytes_sent: int = 0
    attempt: int = 0
    completed_ok: int = 0
    ever_cancelled: bool = False
    frozen_parts: dict[str, str] | None = None  # the parts hash when it was completed

    def clear_lease(self) -> None:
        self.lease_token = None
        self.lease_live = False


ids = st.sampled_from([IDS[0]] * 3 + [IDS[1]])  # mostly one upload; the other checks isolation
part_numbers = st.sampled_from(range(1, MAX_PARTS + 2))  # 5 is past the end of any plan
owners = st.sampled_from(OWNERS)
workers = st.sampled_from(WORKERS)
sizes = st.integers(1, 3 * PART_SIZE)
mpu_choices = st.sampled_from(["current", "current", "previous", "foreign"])
modes = st.sampled_from(["multipart", "multipart", "multipart", "single"])
tokens = st.sampled_from(TOKENS)
leases = st.sampled_from([LAPSED_LEASE, LIVE_LEASE])
# Terminal or destructive steps are taken one time in three, so that runs get far enough (cancel:
# always while "completing", where it races the completer; see also race_the_completer).
rarely = st.integers(0, 2).map(lambda n: n == 0)
STAGES = ["uploading"] * 3 + ["all_parts"] * 2 + ["completing"] * 2 + ["creating", "none"]


class CheckpointMachine(RuleBasedStateMachine):
    client: redis.Redis  # set by the test before running

    def __init__(self) -> None:
        super().__init__()
        self.store = CheckpointStore(self.client, prefix=f"cpm-{uuid.uuid4().hex[:12]}")
        self.models = {uid: Model() for uid in IDS}
        self.completed_total = {uid: 0 for uid in IDS}  # survives discard/re-claim of the id
        self.live_workers: set[str] = set()
        self.mpu_numbers = itertools.count(1)
        self.last_generation = {uid: 0 for uid in IDS}

    def teardown(self) -> None:
        keys = [self.store.index_key, *(self.store.worker_key(w) for w in WORKERS)]
        for uid in IDS:
            keys += [self.store.record_key(uid), self.store.parts_key(uid), self.store.inflight_key(uid)]
        self.client.delete(*keys)

    # -- helpers ------------------------------------------------------------------------------
    def fresh_mpu(self) -> str:
        return f"mpu-{next(self.mpu_numbers)}"

    def pick_mpu(self, m: Model, choice: str) -> str:
        if choice == "current" and m.mpu is not None:
            return m.mpu
        if choice == "previous" and m.old_mpus:
            return m.old_mpus[-1]
        return "mpu-foreign"

    def draw_part(self, data: st.DataObject, uid: str) -> int:
        """A part number: mostly one of the plan, leased or recorded; sometimes any (1..5)."""
        m = self.models[uid]
        hot = sorted(set(range(1, m.part_count + 1)) | set(m.inflight) | set(m.parts))
        if hot and data.draw(st.sampled_from([True, True, False]), label="planned"):
            return data.draw(st.sampled_from(hot), label="part")
        return data.draw(part_numbers, label="part")

    # Composite rules (what a task or a racing client does) only run where they apply, so that
    # no step is wasted; the single-transition rules run anywhere, to test the refusals too.
    def sending(self) -> list[str]:
        """Uploads with planned parts left to send."""
        return [
            uid
            for uid, m in self.models.items()
            if m.state == "uploading" and any(n not in m.parts for n in range(1, m.part_count + 1))
        ]

    def leased(self) -> list[str]:
        return [uid for uid, m in self.models.items() if m.inflight]

    def finished(self) -> list[str]:
        return [uid for uid, m in self.models.items() if m.state in ("completed", "cancelled")]

    def completing_live(self) -> list[str]:
        return [uid for uid, m in self.models.items() if m.state == "completing" and m.lease_live]

    def real_parts(self, uid: str) -> dict[str, str]:
        return self.client.hgetall(self.store.parts_key(uid))

    def real_inflight(self, uid: str) -> dict[str, str]:
        return self.client.hgetall(self.store.inflight_key(uid))

    def _go(self, m: Model, uid: str, token: str, lease: int) -> None:
        m.state = "completing"
        m.lease_token = token
        m.lease_live = lease > 0
        m.complete_calls += 1
        if m.mode == "single":  # the single PUT that follows sends the whole source
            m.bytes_sent += m.part_count * PART_SIZE
        recorded = {int(n) for n in self.real_parts(uid)}
        complete = m.mode == "single" or recorded >= set(range(1, m.part_count + 1))
        _require(
            complete,
            f"begin_completion said go for {uid} with parts {sorted(recorded)} of 1..{m.part_count} recorded",
        )

    # -- creation -----------------------------------------------------------------------------
    @initialize(
        setups=st.lists(
            st.tuples(
                modes,
                st.integers(1, MAX_PARTS),
                st.sampled_from(STAGES),
                leases,
            ),
            min_size=len(IDS),
            max_size=len(IDS),
        )
    )
    def start_uploads(self, setups: list[tuple[str, int, str, int]]) -> None:
        """Runs start from any stage of an upload's life (through the same transitions the rules
        use, and checked the same way); claim/attach/discard remain rules of their own."""
        for uid, (mode, part_count, stage, lease) in zip(IDS, setups, strict=True):
            if stage == "none":
                continue
            self.claim(uid, mode, part_count)
            if stage == "creating":
                continue
            self.attach_multipart(uid)
            if stage in ("all_parts", "completing"):
                self._send_remaining_parts(uid, ["w1|t1", "w2|t2"])
            if stage == "completing":
                self._begin_completion(uid, "c1", lease)

    @rule(uid=ids, mode=modes, part_count=st.integers(1, MAX_PARTS), token=st.sampled_from(["", *TOKENS]), lease=leases)
    def claim(self, uid: str, mode: str, part_count: int, token: str = "", lease: int = LIVE_LEASE) -> None:
        """Without a token, ``claim``; a single-PUT upload with one is created ``completing``
        under that completion lease (``claim_single``, what a coordinator does)."""
        m = self.models[uid]
        if mode == "single":
            part_count = 1
        else:
            token = ""
        fields = {
            "source": "/data/src.bin",
            "bucket": "bucket",
            "key": "key",
            "size": part_count * PART_SIZE,
            "mtime_ns": MTIME_NS,
            "part_size": PART_SIZE,
            "part_count": part_count,
            "mode": mode,
            "metadata": {},
            "abort_on_failure": False,
        }
        if not token:
            result = self.store.claim(uid, fields)
            if m.state is None:
                assert result == (True, "creating")
                self.models[uid] = Model(state="creating", mode=mode, part_count=part_count, generation=1)
                self.last_generation[uid] = 0
            else:
                assert result == (False, m.state)
            return
        created, record = self.store.claim_single(uid, fields, token, lease)
        if m.state is not None:
            assert (created, record) == (False, m.state)
            return
        assert created and isinstance(record, UploadRecord), (created, record)
        assert (record.state, record.mode, record.mpu_id, record.generation, record.source) == (
            "completing", "single", "", 1, "/data/src.bin",
        ), record
        m = self.models[uid] = Model(state="creating", mode=mode, part_count=part_count, generation=1)
        self.last_generation[uid] = 0
        m.state, m.mpu = "uploading", ""  # as attach_multipart(""), then begin_completion:
        self._go(m, uid, token, lease)
        assert record.complete_calls == m.complete_calls and record.bytes_sent == m.bytes_sent, record

    @rule(uid=ids)
    def attach_multipart(self, uid: str) -> None:
        m = self.models[uid]
        mpu = self.fresh_mpu() if m.mode == "multipart" else ""
        result = self.store.attach_multipart(uid, mpu)
        if m.state == "creating":
            assert result == "ok"
            m.state, m.mpu = "uploading", mpu
        else:
            assert result == (m.state or "missing")

    @rule(uid=ids, now=rarely)
    def discard(self, uid: str, now: bool) -> None:
        if not now:
            return
        m = self.models[uid]
        result = self.store.discard(uid)
        if m.state == "creating":
            assert result == "ok"
            self.models[uid] = Model()
            self.last_generation[uid] = 0
        else:
            assert result == (m.state or "missing")

    # -- parts --------------------------------------------------------------------------------
    @rule(uid=ids, generation=st.sampled_from(["current", "stale", "future"]), owner=owners, data=st.data(), hung=rarely)
    def begin_part(self, uid: str, generation: str, owner: str, data: st.DataObject, hung: bool = False) -> None:
        """A part task takes its lease; a ``hung`` one with a time limit already past (its task
        hung in a read: the lease is void although its worker lives)."""
        self._begin_part(uid, self.draw_part(data, uid), generation, owner, hung=hung)

    def _begin_part(
        self, uid: str, number: int, generation: str, owner: str, *, hung: bool = False
    ) -> tuple[str, PartJob | str]:
        m = self.models[uid]
        gen = {"current": m.generation, "stale": m.generation - 1, "future": m.generation + 1}[generation]
        limit = PartTimeLimit(-3600.0, 1e12) if hung else PartTimeLimit(3600.0, 1e12)
        result = self.store.begin_part(uid, number, gen, owner, time_limit=limit)
        if m.state != "uploading":
            expected = ("inactive", m.state or "missing")
        elif gen < m.generation:
            expected = ("stale", "")
        elif not 1 <= number <= m.part_count:
            expected = ("stale", "")  # the script's "unplanned": no byte range, nothing leased or counted
        elif number in m.parts:
            expected = ("recorded", "")
        else:
            holder = m.inflight.get(number)
            if self._lease_holds(m, number) and holder != owner:
                expected = ("leased", "")
            else:
                size = m.part_count * PART_SIZE
                offset = (number - 1) * PART_SIZE
                length = min(PART_SIZE, size - offset)
                job = PartJob(
                    uid, number, m.mpu or "", "/data/src.bin", "bucket", "key", size, MTIME_NS, offset, length
                )
                expected = ("send", job)
                m.inflight[number] = owner
                if hung:
                    m.hung.add(number)
                else:
                    m.hung.discard(number)
                m.parts_sent += 1
                m.bytes_sent += length
        assert result == expected, f"begin_part({uid}, {number}, gen={gen}, {owner}): {result} != {expected}"
        if result[0] == "send":
            job = result[1]
            assert isinstance(job, PartJob)
            _require(
                1 <= number <= m.part_count and 0 < job.length <= PART_SIZE,
                f"begin_part handed out part {number} of {uid} with length {job.length} (plan: {m.part_count} parts)",
            )
        return result

    @precondition(lambda self: self.sending())
    @rule(owner=owners, size=sizes, data=st.data())
    def send_part(self, owner: str, size: int, data: st.DataObject) -> None:
        """What a part task does: begin a missing part of the current dispatch, record it."""
        uid = data.draw(st.sampled_from(self.sending()), label="uid")
        m = self.models[uid]
        missing = [n for n in range(1, m.part_count + 1) if n not in m.parts]
        number = data.draw(st.sampled_from(missing), label="part")
        if self._begin_part(uid, number, "current", owner)[0] == "send":
            self._record_part(uid, number, "current", size)

    @precondition(lambda self: self.sending())
    @rule(owners_=st.lists(owners, min_size=1, max_size=MAX_PARTS), data=st.data())
    def send_remaining_parts(self, owners_: list[str], data: st.DataObject) -> None:
        """A fleet of part tasks sends every missing part of the current dispatch."""
        self._send_remaining_parts(data.draw(st.sampled_from(self.sending()), label="uid"), owners_)

    def _send_remaining_parts(self, uid: str, owners_: list[str]) -> None:
        m = self.models[uid]
        for i, number in enumerate([n for n in range(1, m.part_count + 1) if n not in m.parts]):
            owner = owners_[i % len(owners_)]
            if m.state == "uploading" and self._begin_part(uid, number, "current", owner)[0] == "send":
                self._record_part(uid, number, "current", PART_SIZE)

    @precondition(lambda self: self.sending())
    @rule(owner=owners, stale_mpu=st.sampled_from(["previous", "foreign"]), size=sizes, data=st.data())
    def stale_task_records_leased_part(self, owner: str, stale_mpu: str, size: int, data: st.DataObject) -> None:
        """A current task leases a part; a task of an older attempt (another mpu id) then records
        the same part number: it must be fenced and leave the current task's lease alone."""
        uid = data.draw(st.sampled_from(self.sending()), label="uid")
        m = self.models[uid]
        missing = [n for n in range(1, m.part_count + 1) if n not in m.parts]
        number = data.draw(st.sampled_from(missing), label="part")
        if self._begin_part(uid, number, "current", owner)[0] == "send":
            self._record_part(uid, number, stale_mpu, size)

    @rule(uid=ids, mpu_choice=mpu_choices, size=sizes, data=st.data())
    def record_part(self, uid: str, mpu_choice: str, size: int, data: st.DataObject) -> None:
        self._record_part(uid, self.draw_part(data, uid), mpu_choice, size)

    def _record_part(self, uid: str, number: int, mpu_choice: str, size: int) -> None:
        m = self.models[uid]
        mpu = self.pick_mpu(m, mpu_choice)
        inflight_before = self.real_inflight(uid)
        parts_before = self.real_parts(uid)
        part = UploadedPart(etag=f"etag-{number}-{size}", checksum="ck")
        result = self.store.record_part(uid, mpu, number, part, size)
        if m.state is not None and m.mpu == mpu:
            # Released by a record of the current attempt, in any state: a part finishing after
            # the upload failed must not keep its number leased once it is resumed.
            m.inflight.pop(number, None)
        if m.state not in ("uploading", "completing"):
            expected = f"inactive:{m.state or 'missing'}"
        elif m.mpu != mpu:
            expected = "fenced"
        elif not 1 <= number <= m.part_count:
            expected = "stale"  # the script's "unplanned": never counted towards completion
        elif number in m.parts:
            expected = "duplicate"
        else:
            m.parts[number] = size
            expected = "last" if len(m.parts) >= m.part_count else "recorded"
        assert result == expected, f"record_part({uid}, {mpu}, {number}): {result} != {expected}"
        if result == "fenced":
            _require(self.real_parts(uid) == parts_before, "a fenced record_part changed the parts hash")
            _require(
                self.real_inflight(uid) == inflight_before,
                f"a fenced record_part (stale mpu {mpu}) changed the leases of {uid}: "
                f"{inflight_before} -> {self.real_inflight(uid)}",
            )
        if result == "last":
            recorded = {int(n) for n in self.real_parts(uid)}
            _require(
                recorded == set(range(1, m.part_count + 1)),
                f"record_part answered last for {uid} with parts {sorted(recorded)} of 1..{m.part_count} recorded",
            )
        if result not in ("recorded", "last"):
            _require(self.real_parts(uid) == parts_before, f"record_part answered {result} but changed the parts")

    @rule(uid=ids, owner=owners, data=st.data())
    def release_part(self, uid: str, owner: str, data: st.DataObject) -> None:
        self._release_part(uid, self.draw_part(data, uid), owner)

    @precondition(lambda self: self.leased())
    @rule(owner=owners, data=st.data())
    def release_leased_part(self, owner: str, data: st.DataObject) -> None:
        """A task gives up a part that is leased, to it or to another task."""
        uid = data.draw(st.sampled_from(self.leased()), label="uid")
        self._release_part(uid, data.draw(st.sampled_from(sorted(self.models[uid].inflight)), label="part"), owner)

    def _release_part(self, uid: str, number: int, owner: str) -> None:
        m = self.models[uid]
        self.store.release_part(uid, number, owner)
        if m.inflight.get(number) == owner:
            del m.inflight[number]

    @rule(uid=ids, mpu_choice=mpu_choices, data=st.data())
    def forget_parts(self, uid: str, mpu_choice: str, data: st.DataObject) -> None:
        m = self.models[uid]
        recorded = st.sampled_from(sorted(m.parts)) | part_numbers if m.parts else part_numbers
        numbers = data.draw(st.sets(recorded, min_size=1, max_size=MAX_PARTS), label="parts")
        mpu = self.pick_mpu(m, mpu_choice)
        parts_before = self.real_parts(uid)
        result = self.store.forget_parts(uid, mpu, sorted(numbers))
        if m.state not in ("uploading", "failed"):
            # Not while completing (even with a lapsed lease: a takeover's "go" does not count the
            # parts again), and never from a completed or cancelled upload.
            assert result == -2, f"forget_parts of a {m.state or 'missing'} upload {uid}: {result} != -2"
        elif m.mpu is None or m.mpu != mpu:
            assert result == -1
        else:
            forgotten = sorted(n for n in numbers if n in m.parts)
            assert result == len(forgotten)
            for n in forgotten:
                del m.parts[n]
        if result < 0:
            _require(self.real_parts(uid) == parts_before, f"a refused forget_parts ({result}) changed the parts")

    def _lease_holds(self, m: Model, number: int) -> bool:
        holder = m.inflight.get(number)
        return holder is not None and holder.partition("|")[0] in self.live_workers and number not in m.hung

    @rule(uid=ids)
    def reclaim_parts(self, uid: str) -> None:
        """The reconciler takes back the leases of dead or hung holders of an uploading upload."""
        m = self.models[uid]
        result = self.store.reclaim_parts(uid)
        if m.state != "uploading":
            assert result == (0, []), f"reclaim_parts({uid}) in {m.state}: {result}"
            return
        expected = sorted(n for n in m.inflight if not self._lease_holds(m, n))
        assert result == (m.generation, expected), f"reclaim_parts({uid}): {result} != {(m.generation, expected)}"
        for n in expected:
            del m.inflight[n]

    # -- workers ------------------------------------------------------------------------------
    @rule(worker=workers, alive=st.booleans())
    def heartbeat(self, worker: str, alive: bool) -> None:
        """A worker's heartbeat (its leases stay live), or its heartbeat key expiring."""
        if alive:
            self.store.heartbeat(worker, LIVE_LEASE)
            self.live_workers.add(worker)
        else:
            self.client.delete(self.store.worker_key(worker))
            self.live_workers.discard(worker)

    # -- dispatch generations -----------------------------------------------------------------
    @rule(uid=ids, generation=st.sampled_from(["current", "stale"]))
    def next_generation(self, uid: str, generation: str) -> None:
        m = self.models[uid]
        gen = m.generation if generation == "current" else m.generation - 1
        result = self.store.next_generation(uid, gen)
        if m.state == "uploading" and gen == m.generation:
            m.generation += 1
            assert result == m.generation
        else:
            assert result == 0

    # -- completion ---------------------------------------------------------------------------
    @rule(uid=ids, token=tokens, lease=leases)
    def begin_completion(self, uid: str, token: str, lease: int) -> None:
        self._begin_completion(uid, token, lease)

    def _begin_completion(self, uid: str, token: str, lease: int) -> str:
        m = self.models[uid]
        before = (m.state, m.lease_token, m.lease_live)
        result = self.store.begin_completion(uid, token, lease)
        if m.state == "completed":
            expected = "done"
        elif m.state == "completing":
            expected = "busy" if (m.lease_token != token and m.lease_live) else "go"
        elif m.state == "uploading":
            expected = "missing" if (m.mode != "single" and len(m.parts) < m.part_count) else "go"
        else:
            expected = f"inactive:{m.state or 'missing'}"
        assert result == expected, f"begin_completion({uid}, {token}) in {before}: {result} != {expected}"
        if result == "go":
            _require(
                not (before[0] == "completing" and before[2] and before[1] != token),
                f"go to {token} while {before[1]} holds a live lease",
            )
            self._go(m, uid, token, lease)
        return result

    @rule(uid=ids, token=tokens, lease=leases, finish=st.booleans())
    def complete(self, uid: str, token: str, lease: int, finish: bool) -> None:
        """What the chord body does: take the completion, and (unless it dies) mark it done."""
        if self._begin_completion(uid, token, lease) == "go" and finish:
            self.mark_completed(uid, token)

    @rule(uid=ids, token=st.sampled_from(["holder", *TOKENS, "c-wrong"]))
    def mark_completed(self, uid: str, token: str) -> None:
        m = self.models[uid]
        if token == "holder":
            token = m.lease_token or "c1"
        result = self.store.mark_completed(uid, token, RETENTION, {"final_etag": '"abc-2"', "verified": "size"})
        if m.state != "completing":
            assert result == (m.state or "missing")
        elif m.lease_token != token:
            assert result == "fenced"
        else:
            assert result == "ok"
            m.state = "completed"
            m.clear_lease()
            m.inflight.clear()
            m.completed_ok += 1
            self.completed_total[uid] += 1
            m.frozen_parts = self.real_parts(uid)
        _require(self.completed_total[uid] <= 1, f"{uid} was marked completed {self.completed_total[uid]} times")

    @rule(uid=ids, generation=st.sampled_from(["current", "stale", "any"]), now=rarely)
    def mark_failed(self, uid: str, generation: str, now: bool) -> None:
        m = self.models[uid]
        if not now and generation != "stale":  # a stale failure should change nothing: always try it
            return
        gen = {"current": m.generation, "stale": m.generation - 1, "any": 0}[generation]
        result = self.store.mark_failed(uid, "boom", gen)
        if gen > 0 and m.state is not None and gen < m.generation:
            assert result == "inactive:stale"
        elif m.state not in ("uploading", "completing", "creating"):
            assert result == f"inactive:{m.state or 'missing'}"
        else:
            assert result == m.state
            m.state = "failed"
            m.clear_lease()

    # -- cancel, resume -----------------------------------------------------------------------
    @rule(uid=ids, now=rarely)
    def cancel(self, uid: str, now: bool) -> None:
        m = self.models[uid]
        if not now and m.state != "completing":
            return
        result = self.store.cancel(uid, RETENTION)
        if m.state is None:
            assert result == "missing"
        elif m.state == "cancelled":
            assert result == "already"
        elif m.state == "completed":
            assert result == "completed"
        elif m.state == "completing" and m.lease_live:
            assert result == "completing"
        else:
            assert result == "cancelled"
            m.state = "cancelled"
            m.ever_cancelled = True
            m.clear_lease()
            m.inflight.clear()

    @rule(uid=ids, mpu_choice=mpu_choices)
    def reopen(self, uid: str, mpu_choice: str) -> None:
        m = self.models[uid]
        mpu = self.pick_mpu(m, mpu_choice)
        result = self.store.reopen(uid, mpu)
        if m.state == "completing" and m.lease_live:
            assert result == "completing"
        elif m.state not in ("failed", "uploading", "completing"):
            assert result == (m.state or "missing")
        elif m.mpu != mpu:
            assert result == "fenced"
        else:
            m.state = "uploading"
            m.clear_lease()
            m.generation += 1
            assert result == m.generation

    @rule(
        uid=ids,
        mpu_choice=mpu_choices,
        mode=modes,
        part_count=st.integers(1, MAX_PARTS),
    )
    def restart(self, uid: str, mpu_choice: str, mode: str, part_count: int) -> None:
        m = self.models[uid]
        old = self.pick_mpu(m, mpu_choice)
        if mode == "single":
            part_count = 1
        new = self.fresh_mpu() if mode == "multipart" else ""
        fields = {"size": part_count * PART_SIZE, "part_size": PART_SIZE, "part_count": part_count, "mode": mode}
        result = self.store.restart(uid, old, new, fields)
        if m.state == "completing" and m.lease_live:
            # Refused like reopen and cancel: the completer may be calling Complete right now.
            _require(result == "completing", f"restart of {uid} under {m.lease_token}'s live lease: {result}")
        elif m.state not in ("failed", "uploading", "completing"):
            assert result == (m.state or "missing")
        elif m.mpu != old:
            assert result == "fenced"
        else:
            m.old_mpus.append(m.mpu)  # type: ignore[arg-type]
            m.mpu = new
            m.state = "uploading"
            m.parts.clear()
            m.inflight.clear()
            m.clear_lease()
            m.mode, m.part_count = mode, part_count
            m.attempt += 1
            m.generation += 1
            assert result == m.generation

    @precondition(lambda self: self.completing_live())
    @rule(
        action=st.sampled_from(
            ["cancel", "reopen", "restart", "mark_failed", "forget", "complete", "finish", "record"]
        ),
        data=st.data(),
    )
    def race_the_completer(self, action: str, data: st.DataObject) -> None:
        """While a completer holds a live lease, something else acts on the upload."""
        self._act(data.draw(st.sampled_from(self.completing_live()), label="uid"), action, data)

    def _act(self, uid: str, action: str, data: st.DataObject) -> None:
        """One transition on ``uid``, its arguments drawn from ``data``."""
        if action == "cancel":
            self.cancel(uid, True)
        elif action == "reopen":
            self.reopen(uid, data.draw(mpu_choices))
        elif action == "restart":
            self.restart(uid, data.draw(mpu_choices), data.draw(modes), data.draw(st.integers(1, MAX_PARTS)))
        elif action == "mark_failed":
            self.mark_failed(uid, data.draw(st.sampled_from(["current", "stale", "any"])), True)
        elif action == "forget":
            self.forget_parts(uid, data.draw(mpu_choices), data)
        elif action == "complete":
            self.begin_completion(uid, data.draw(tokens), data.draw(leases))
        elif action == "finish":
            self.mark_completed(uid, data.draw(st.sampled_from(["holder", *TOKENS, "c-wrong"])))
        elif action == "record":
            self.record_part(uid, data.draw(mpu_choices), data.draw(sizes), data)
        elif action == "begin":
            self.begin_part(uid, data.draw(st.sampled_from(["current", "stale", "future"])), data.draw(owners), data)
        else:
            raise AssertionError(f"no action {action!r}")

    @precondition(lambda self: self.finished())
    @rule(
        action=st.sampled_from(
            ["cancel", "reopen", "restart", "mark_failed", "forget", "complete", "finish", "record", "begin"]
        ),
        data=st.data(),
    )
    def poke_a_finished_upload(self, action: str, data: st.DataObject) -> None:
        """Late messages and clients acting on a completed or cancelled upload: nothing changes."""
        self._act(data.draw(st.sampled_from(self.finished()), label="uid"), action, data)

    # -- invariants ---------------------------------------------------------------------------
    @invariant()
    def redis_matches_model_and_properties_hold(self) -> None:
        pipe = self.client.pipeline(transaction=False)
        for uid in IDS:
            pipe.hgetall(self.store.record_key(uid))
            pipe.hgetall(self.store.parts_key(uid))
            pipe.hgetall(self.store.inflight_key(uid))
        replies = pipe.execute()
        for i, uid in enumerate(IDS):
            raw, parts, inflight = replies[3 * i : 3 * i + 3]
            m = self.models[uid]
            if m.state is None:
                assert raw == {} and parts == {} and inflight == {}, f"{uid} should not exist: {raw} {parts}"
                continue
            state = raw.get("state")
            assert state in STATES, f"{uid} in unknown state {state!r}"
            assert state == m.state, f"{uid}: state {state} != model {m.state}"
            if m.ever_cancelled:
                assert state == "cancelled", f"{uid} left cancelled for {state}"
            # parts_done / bytes_done agree with the parts hash itself
            sizes = {int(n): json.loads(v)["size"] for n, v in parts.items()}
            assert int(raw["parts_done"]) == len(parts), f"{uid}: parts_done {raw['parts_done']} != {len(parts)} parts"
            assert int(raw["bytes_done"]) == sum(sizes.values()), f"{uid}: bytes_done {raw['bytes_done']} != {sizes}"
            assert sizes == m.parts, f"{uid}: parts {sizes} != model {m.parts}"
            owners = {int(n): Lease.parse(o).owner for n, o in inflight.items()}
            assert owners == m.inflight, f"{uid}: leases {inflight} != {m.inflight}"
            generation = int(raw["generation"])
            assert generation >= self.last_generation[uid], f"{uid}: generation went back to {generation}"
            self.last_generation[uid] = generation
            assert generation == m.generation, f"{uid}: generation {generation} != model {m.generation}"
            assert raw.get("mpu_id") == m.mpu, f"{uid}: mpu_id {raw.get('mpu_id')} != model {m.mpu}"
            assert int(raw["part_count"]) == m.part_count and raw["mode"] == m.mode
            assert raw.get("lease_token") == m.lease_token, f"{uid}: lease {raw.get('lease_token')} != {m.lease_token}"
            assert ("lease_until" in raw) == (m.lease_token is not None)
            assert int(raw["complete_calls"]) == m.complete_calls, f"{uid}: complete_calls != go answers"
            assert int(raw["parts_sent"]) == m.parts_sent and int(raw["bytes_sent"]) == m.bytes_sent
            assert int(raw.get("attempt") or 0) == m.attempt
            # completed exactly once, and frozen afterwards
            assert self.completed_total[uid] <= 1
            if m.completed_ok:
                assert state == "completed", f"{uid} left completed for {state}"
                assert parts == m.frozen_parts, f"{uid}: completed upload's parts changed: {m.frozen_parts} -> {parts}"
                assert inflight == {}
            if state in ("completed", "cancelled"):
                assert "lease_token" not in raw


def test_checkpoint_state_machine(redis_server) -> None:  # type: ignore[no-untyped-def]
    url = redis_server.url.rsplit("/", 1)[0] + "/40"  # a database of its own; keys under a fresh prefix
    # The production client (from_url's options); each example gets a store with a prefix of its own.
    client = CheckpointStore.from_url(url, prefix="cpm").redis
    CheckpointMachine.client = client
    try:
        run_state_machine_as_test(
            CheckpointMachine,
            settings=settings(
                max_examples=MAX_EXAMPLES,
                stateful_step_count=30,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
                # No "explain" phase (it traces every line and takes minutes against a real Redis);
                # one failure at a time, shrunk to a minimal sequence.
                phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
                report_multiple_bugs=False,
            ),
        )
    finally:
        client.close()


# -- bugs the machine found, one minimal sequence each (as hypothesis shrank them) ----------------
# Each failed against the scripts before their fix. A newly found bug gets a test here marked
# xfail(strict=True) and an entry in _ALL_KNOWN_BUGS until its script is fixed.


def _uploading(store: CheckpointStore, upload_id: str, part_count: int, mpu_id: str) -> None:
    fields = {
        "source": "/data/src.bin", "bucket": "bucket", "key": "key", "size": part_count * PART_SIZE,
        "mtime_ns": MTIME_NS, "part_size": PART_SIZE, "part_count": part_count, "mode": "multipart",
    }  # fmt: skip
    assert store.claim(upload_id, fields) == (True, "creating")
    assert store.attach_multipart(upload_id, mpu_id) == "ok"


def _part(number: int) -> UploadedPart:
    return UploadedPart(etag=f"etag-{number}", checksum="ck")


def _leases(store: CheckpointStore, upload_id: str) -> dict[str, str]:
    """The owners of an upload's leases (without their deadlines)."""
    return {n: Lease.parse(v).owner for n, v in store.redis.hgetall(store.inflight_key(upload_id)).items()}


def test_fenced_record_part_keeps_the_current_lease(store: CheckpointStore) -> None:
    _uploading(store, "u1", 1, "mpu-1")
    assert store.begin_part("u1", 1, 1, "w1|t1")[0] == "send"
    assert store.record_part("u1", "mpu-old", 1, _part(1), PART_SIZE) == "fenced"
    assert _leases(store, "u1") == {"1": "w1|t1"}


def test_record_part_of_the_current_attempt_releases_its_lease_in_a_failed_upload(store: CheckpointStore) -> None:
    # Not a bug the machine found, but the edge of the fix above: the lease is kept only from a
    # fenced record. A part that finishes after the upload failed must not stay leased to its
    # (live) worker, or a resume would wait on it for as long as that worker runs.
    _uploading(store, "u1", 2, "mpu-1")
    assert store.begin_part("u1", 1, 1, "w1|t1")[0] == "send"
    assert store.mark_failed("u1", "part 2: boom") == "uploading"
    assert store.record_part("u1", "mpu-old", 1, _part(1), PART_SIZE) == "inactive:failed"
    assert _leases(store, "u1") == {"1": "w1|t1"}  # a stale attempt's record releases nothing
    assert store.record_part("u1", "mpu-1", 1, _part(1), PART_SIZE) == "inactive:failed"
    assert _leases(store, "u1") == {}


def test_restart_is_refused_under_a_live_completion_lease(store: CheckpointStore) -> None:
    _uploading(store, "u1", 1, "mpu-1")
    assert store.record_part("u1", "mpu-1", 1, _part(1), PART_SIZE) == "last"
    assert store.begin_completion("u1", "c1", LIVE_LEASE) == "go"
    assert store.reopen("u1", "mpu-1") == "completing"  # reopen and cancel refuse here...
    assert store.cancel("u1", RETENTION) == "completing"
    assert store.restart("u1", "mpu-1", "mpu-2", {"part_count": 1}) == "completing"  # ...and so does restart
    record = store.get("u1")
    assert record is not None and (record.state, record.mpu_id, record.parts_done) == ("completing", "mpu-1", 1)
    assert store.mark_completed("u1", "c1", RETENTION, {}) == "ok"  # the completer is not disturbed


def test_restart_takes_over_a_lapsed_completion(store: CheckpointStore) -> None:
    _uploading(store, "u1", 1, "mpu-1")
    assert store.record_part("u1", "mpu-1", 1, _part(1), PART_SIZE) == "last"
    assert store.begin_completion("u1", "c1", LAPSED_LEASE) == "go"
    assert store.restart("u1", "mpu-1", "mpu-2", {"part_count": 2}) == 2
    assert store.mark_completed("u1", "c1", RETENTION, {}) == "uploading"  # the lapsed completer is fenced out


def test_forget_parts_leaves_a_completed_upload_alone(store: CheckpointStore) -> None:
    _uploading(store, "u1", 1, "mpu-1")
    assert store.record_part("u1", "mpu-1", 1, _part(1), PART_SIZE) == "last"
    assert store.begin_completion("u1", "c1", LIVE_LEASE) == "go"
    assert store.mark_completed("u1", "c1", RETENTION, {}) == "ok"
    assert store.forget_parts("u1", "mpu-1", [1]) == -2
    record = store.get("u1")
    assert record is not None and record.parts_done == 1 and set(store.parts("u1")) == {1}


def test_forget_parts_is_refused_while_completing_so_a_takeover_has_every_part(store: CheckpointStore) -> None:
    # The machine's sequence: forget while "completing" under a lapsed lease, then a takeover got
    # "go" with part 1 missing (begin_completion counts parts only when coming from "uploading").
    _uploading(store, "u1", 1, "mpu-1")
    assert store.record_part("u1", "mpu-1", 1, _part(1), PART_SIZE) == "last"
    assert store.begin_completion("u1", "c1", LAPSED_LEASE) == "go"
    assert store.forget_parts("u1", "mpu-1", [1]) == -2  # resume: the server lost part 1
    assert set(store.parts("u1")) == {1}
    assert store.begin_completion("u1", "c2", LIVE_LEASE) == "go"  # with every part recorded
    # Resume forgets lost parts once the upload is "uploading" or "failed" again.
    assert store.mark_failed("u1", "InvalidPart: part 1") == "completing"
    assert store.forget_parts("u1", "mpu-other", [1]) == -1
    assert store.forget_parts("u1", "mpu-1", [1]) == 1
    record = store.get("u1")
    assert record is not None and (record.parts_done, record.bytes_done) == (0, 0)


def test_a_part_outside_the_plan_does_not_complete_the_upload(store: CheckpointStore) -> None:
    _uploading(store, "u1", 2, "mpu-1")
    assert store.record_part("u1", "mpu-1", 1, _part(1), PART_SIZE) == "recorded"
    assert store.record_part("u1", "mpu-1", 3, _part(3), PART_SIZE) == "stale"  # "last" before the fix
    assert set(store.parts("u1")) == {1}
    assert store.begin_completion("u1", "c1", LIVE_LEASE) == "missing"  # part 2 is not recorded


def test_begin_part_refuses_a_part_outside_the_plan(store: CheckpointStore) -> None:
    _uploading(store, "u1", 2, "mpu-1")
    for number in (0, 3, -1):
        assert store.begin_part("u1", number, 1, "w1|t1") == ("stale", "")
    record = store.get("u1")
    assert record is not None and (record.parts_sent, record.bytes_sent) == (0, 0)
    assert _leases(store, "u1") == {}


def test_part_numbers_must_be_canonical_integers(store: CheckpointStore) -> None:
    # The store always sends ints; the scripts still refuse "01" or "1.0", which would otherwise
    # become a second hash field for part 1 (and count twice), and "1.5".
    _uploading(store, "u1", 2, "mpu-1")
    keys = store._keys("u1")
    worker_prefix = store.worker_key("")
    for number in ("01", "1.0", "1.5", "x", ""):
        assert store._run("begin_part", keys, [number, 1, "w1|t1", worker_prefix, 60, 0, 1e6]) == ["unplanned"]
        assert store._run("record_part", keys, ["mpu-1", number, '{"size":10}', 10, 0]) == "unplanned"
    assert store.redis.hgetall(store.parts_key("u1")) == {} and _leases(store, "u1") == {}


# -- claim_single ----------------------------------------------------------------------------------


def test_claim_single_refuses_a_multipart_upload_and_leaves_nothing(store: CheckpointStore) -> None:
    fields = {
        "source": "/data/src.bin", "bucket": "bucket", "key": "key", "size": 3 * PART_SIZE,
        "mtime_ns": MTIME_NS, "part_size": PART_SIZE, "part_count": 3, "mode": "multipart",
    }  # fmt: skip
    with pytest.raises(redis.ResponseError, match="only a single-PUT upload"):
        store.claim_single("u1", fields, "c1", LIVE_LEASE)
    assert store.get("u1") is None
    assert store.redis.zscore(store.index_key, "u1") is None


def test_a_duplicate_start_finds_a_single_put_completing_under_its_lease(store: CheckpointStore) -> None:
    fields = {
        "source": "/data/src.bin", "bucket": "bucket", "key": "key", "size": 5,
        "mtime_ns": MTIME_NS, "part_size": 5, "part_count": 1, "mode": "single",
    }  # fmt: skip
    created, record = store.claim_single("u1", fields, "c1", LIVE_LEASE)
    assert created and isinstance(record, UploadRecord) and record.state == "completing"
    assert store.claim_single("u1", fields, "c2", LIVE_LEASE) == (False, "completing")
    assert store.begin_completion("u1", "c2", LIVE_LEASE) == "busy"  # the first holds the PUT
    assert store.begin_completion("u1", "c1", LIVE_LEASE) == "go"  # its own retry takes it again


# -- a part task delivered twice (not found by the machine, whose owners are fixed strings) -------


def _begin_at_once(store: CheckpointStore, owners: list[str]) -> list[str]:
    """``begin_part`` of part 1 of ``u1`` by every owner at the same moment (threads released
    together; each command takes its own connection from the client's pool): the verdicts, in
    the order of ``owners``."""
    barrier = threading.Barrier(len(owners))
    verdicts: list[str] = [""] * len(owners)

    def take(i: int) -> None:
        barrier.wait(timeout=10)
        verdicts[i] = store.begin_part("u1", 1, 1, owners[i])[0]

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(owners))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return verdicts


def test_a_part_task_delivered_twice_to_the_same_worker_sends_the_part_once(store: CheckpointStore) -> None:
    # The same message twice (same task id) on the same live holder (a threads pool): each
    # execution is its own owner, so the second is turned away while the first sends.
    _uploading(store, "u1", 1, "mpu-1")
    store.heartbeat("w1", LIVE_LEASE)
    first, second = part_lease_owner("w1", "task-1"), part_lease_owner("w1", "task-1")
    assert first != second and Lease.parse(first + "|1").holder == "w1"
    verdicts = _begin_at_once(store, [first, second])
    assert sorted(verdicts) == ["leased", "send"], verdicts
    assert _leases(store, "u1") == {"1": first if verdicts[0] == "send" else second}
    record = store.get("u1")
    assert record is not None and record.parts_sent == 1, "counted as sent once"


def test_a_replayed_begin_part_gets_its_own_lease_back(store: CheckpointStore) -> None:
    # What the script's same-owner rule is for: redis-py sends a call again when the connection
    # dropped after Redis ran it; that replay (same owner) must get the lease it took.
    _uploading(store, "u1", 1, "mpu-1")
    store.heartbeat("w1", LIVE_LEASE)
    owner = part_lease_owner("w1", "task-1")
    assert store.begin_part("u1", 1, 1, owner)[0] == "send"
    assert store.begin_part("u1", 1, 1, owner)[0] == "send"
    assert _leases(store, "u1") == {"1": owner}
    assert store.begin_part("u1", 1, 1, part_lease_owner("w1", "task-1"))[0] == "leased"
