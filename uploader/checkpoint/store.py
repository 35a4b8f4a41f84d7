"""The checkpoint: each upload's record and recorded parts in Redis, the source of truth.

Every state change is one Lua script in ``lua/`` named after its transition, so the protocol
reads as a short list of files::

    creating --attach_multipart--> uploading --begin_completion--> completing --mark_completed--> completed
        \\--discard_upload (store refused)    |  ^                        |
                                             |  +----reopen_upload------+ (lapsed lease) / failed
          any active --mark_failed--> failed --reopen_upload / restart_upload--> uploading
          any but completed --cancel_upload--> cancelled
    completed, failed for good (no automatic resume to come), cancelled: outbox events written in
    the same script, when the upload asked to be notified (``append_outbox`` in ``lua/_shared.lua``)
    (none) --claim_upload--> creating, or for a single PUT, with its completion lease --> completing

Parts are recorded with ``record_part``, fenced by the multipart upload id they were sent to,
so a stale task from an older attempt can never write into a newer one.

Besides the index of every upload (``<prefix>:uploads``, for ``list``), the transitions keep
recovery's *attention index* (``<prefix>:active``: the uploads that are creating, uploading,
completing, or failed with an automatic resume to come) in the same script, so the reconciler
reads those and nothing else; an upload that settles with Celery chords on record goes to
``<prefix>:settled``, from which the recovery leader deletes the chords' keys (see
``track_attention`` in ``lua/_shared.lua`` and :mod:`uploader.maintenance`).
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, cast

import redis
from redis.backoff import ExponentialBackoff

from uploader import metrics
from uploader.checkpoint.connection import OutageRetry, redis_client
from uploader.model import ObjectOptions, PartStart, UploadedPart, UploadRecord, UploadState, inactive_state

log = logging.getLogger(__name__)

#: Reconnection attempts per command (backoff up to 2 s each: about a minute in all), unless
#: ``UPLOADER_REDIS_RECONNECT_ATTEMPTS`` says otherwise.
RECONNECT_ATTEMPTS = 30
#: The errors a Redis outage raises (and that a retry may outlast).
REDIS_OUTAGE_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)

#: The longest error or refusal reason stored (characters); longer ones are cut.
MAX_ERROR_CHARS = 2000

#: Every state a record can be in (kept for callers that iterate them; see :class:`UploadState`).
STATES = tuple(UploadState)


@dataclass(frozen=True)
class PartJob:
    """What a part task needs to send one part, as ``begin_part`` hands it out."""

    upload_id: str
    part_number: int
    mpu_id: str
    source: str
    bucket: str
    key: str
    size: int
    mtime_ns: int
    offset: int
    length: int
    #: See UploadRecord.file_id.
    file_id: str = ""
    #: See UploadRecord.endpoint.
    endpoint: str = ""
    #: See UploadRecord.checksum_algorithm.
    checksum_algorithm: str = ""
    #: The upload's object options (the adapter sends what UploadPart takes of them: SSE-C...).
    options: ObjectOptions = field(default_factory=ObjectOptions)
    #: See UploadRecord.max_bandwidth (0: no fleet-wide limit).
    max_bandwidth: int = 0
    #: See UploadRecord.source_credentials.
    source_credentials: str = ""
    #: See UploadRecord.source_endpoint.
    source_endpoint: str = ""


@dataclass(frozen=True)
class PartTimeLimit:
    """How long a part task may hold its part: ``base_seconds`` plus its length at
    ``min_bytes_per_second``. Past that its lease is void, whatever its worker's heartbeat says,
    and the part is sent again elsewhere (a read hung on a dead network filesystem, a socket
    that never answers)."""

    base_seconds: float
    min_bytes_per_second: float

    def seconds(self, length: int) -> float:
        return self.base_seconds + length / self.min_bytes_per_second


#: 60 s plus 128 KiB/s: 124 s for an 8 MiB part, 70 min for a 512 MiB one.
DEFAULT_PART_TIME_LIMIT = PartTimeLimit(60.0, 128 * 1024)


def part_lease_owner(holder: str, task_id: str) -> str:
    """The owner of the part lease that one execution of a part task takes:
    ``"<holder>|<task id>.<execution>"``, ``execution`` new for every call.

    Why not just ``"<holder>|<task id>"``: ``begin_part`` lets a caller take again a lease its
    own owner holds, and it must, because redis-py's reconnection retry (the store's
    ``reconnect_attempts``) sends the same script call again when the connection dropped after
    Redis ran it: that replay must get its own lease back, or the part would stay leased to a
    task that skipped it until its time limit. But a message delivered twice (a publish retried
    after a lost confirmation, a visibility-timeout redelivery) carries the same task id, and two
    such executions on the same holder (a threads pool shares the incarnation's name) would then
    both send the part at once. A fresh ``execution`` per call tells the replay (same owner:
    retakes) from the duplicate (another owner: ``leased``). A retry after a release that Redis's
    absence postponed is covered by :meth:`CheckpointStore.begin_part`, which makes the release
    first."""
    return f"{holder}|{task_id}.{secrets.token_hex(4)}"


@dataclass(frozen=True)
class Lease:
    """A part lease as stored: ``"<holder>|<task>|<deadline>"`` (see ``_shared.lua``; ``task``
    names the execution of the part task: :func:`part_lease_owner`)."""

    owner: str
    holder: str
    deadline: float | None

    @classmethod
    def parse(cls, value: str) -> Lease:
        holder, sep, rest = value.partition("|")
        if not sep:
            return cls(value, value, None)
        task, _, deadline = rest.partition("|")
        try:
            until: float | None = float(deadline) if deadline else None
        except ValueError:
            until = None
        return cls(f"{holder}|{task}", holder, until)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and self.deadline <= now


@dataclass(frozen=True)
class Refusal:
    """Why a request was refused before anything was created, and when (unix seconds)."""

    reason: str
    at: float
    #: The class name of the error the coordinator raised (SourceError, InvalidRequest, ...).
    kind: str = "UploadRefused"


@dataclass(frozen=True)
class RecoveryState:
    """The fleet's recovery as the leader worker last noted it (times are unix seconds)."""

    leader: str = ""
    reconciled_at: float | None = None
    janitor_at: float | None = None
    #: When the attention index was last swept (its first build after an upgrade, then with each janitor run).
    indexed_at: float | None = None
    reclaimed: int = 0
    resumed: int = 0
    #: The uploads needing attention at the last reconcile run, by state, and how many were stalled.
    states: dict[str, int] = field(default_factory=dict)
    stalled: int | None = None

    @classmethod
    def from_hash(cls, raw: dict[str, str]) -> RecoveryState:
        def when(name: str) -> float | None:
            return float(raw[name]) if raw.get(name) else None

        return cls(
            leader=raw.get("leader", ""),
            reconciled_at=when("reconciled_at"),
            janitor_at=when("janitor_at"),
            indexed_at=when("indexed_at"),
            reclaimed=int(raw.get("reclaimed") or 0),
            resumed=int(raw.get("resumed") or 0),
            states={str(k): int(v) for k, v in json.loads(raw.get("states") or "{}").items()},
            stalled=int(raw["stalled"]) if raw.get("stalled") else None,
        )


#: The longest wait between two automatic resumes of a transiently failed upload (seconds).
AUTO_RESUME_MAX_WAIT = 3600


class _Scripts:
    """The Lua transitions, loaded once per Redis client and called by name."""

    def __init__(self, client: redis.Redis) -> None:
        lua = resources.files("uploader.checkpoint") / "lua"
        shared = (lua / "_shared.lua").read_text()
        self._scripts = {
            entry.name.removesuffix(".lua"): client.register_script(shared + entry.read_text())
            for entry in lua.iterdir()
            if entry.name.endswith(".lua") and not entry.name.startswith("_")
        }

    def __call__(self, name: str, keys: list[str], args: list[Any], client: Any = None) -> Any:
        """Run transition ``name``; with ``client`` a pipeline, queue it there (its answer comes
        with the pipeline's ``execute``)."""
        return self._scripts[name](keys=keys, args=args, client=client)


class CheckpointStore:
    """Reads and atomic transitions of upload checkpoints. Thread-safe (redis-py pools)."""

    def __init__(self, client: redis.Redis, *, prefix: str = "uploader") -> None:
        self.redis = client
        self.prefix = prefix
        self._run = _Scripts(client)
        self._unreleased: set[tuple[str, int, str]] = set()
        self._unreleased_lock = threading.Lock()

    @classmethod
    def from_url(
        cls, url: str, *, prefix: str = "uploader", reconnect_attempts: int = RECONNECT_ATTEMPTS,
        timeout: float | None = None, sentinel_master: str | None = None, sentinel_password: str | None = None,
        tls: dict[str, Any] | None = None,
    ) -> CheckpointStore:
        """A store on the Redis at ``url`` (``sentinel://`` URLs find the primary named
        ``sentinel_master`` through the sentinels: see :mod:`uploader.checkpoint.connection`).
        ``timeout``: seconds to connect and per command (an interactive client's), where a
        worker waits as long as its reconnection attempts take. ``tls``: the ``ssl_*`` options of a
        ``rediss://`` URL (:func:`uploader.redis_tls.tls_options`); a TLS failure is never retried."""
        # Ride out a Redis restart (tens of seconds with a large AOF) or a Sentinel failover
        # instead of failing the task in hand: a part already on the server must still be
        # recorded and its lease released, or the upload waits on a lease nobody will release.
        # A retried script whose first run took effect answers as a duplicate would
        # ("duplicate", "already", ...).
        client = redis_client(
            url,
            sentinel_master=sentinel_master,
            sentinel_password=sentinel_password,
            timeout=timeout,
            tls=tls,
            decode_responses=True,
            health_check_interval=30,
            socket_keepalive=True,
            retry=OutageRetry(ExponentialBackoff(cap=2.0, base=0.05), reconnect_attempts),
            retry_on_error=list(REDIS_OUTAGE_ERRORS),
        )
        return cls(client, prefix=prefix)

    @classmethod
    def from_settings(cls, settings: Any, *, reconnect_attempts: int | None = None, timeout: float | None = None) -> CheckpointStore:
        """The store the settings name (``UPLOADER_CHECKPOINT_URL`` or the broker's, the key prefix,
        the Sentinel primary, TLS)."""
        from uploader.redis_tls import tls_options

        return cls.from_url(
            settings.effective_checkpoint_url,
            prefix=settings.key_prefix,
            reconnect_attempts=settings.redis_reconnect_attempts if reconnect_attempts is None else reconnect_attempts,
            timeout=timeout,
            sentinel_master=settings.redis_sentinel_master,
            sentinel_password=settings.redis_sentinel_password_value,
            tls=tls_options(settings),
        )

    # -- keys ---------------------------------------------------------------------------------
    def record_key(self, upload_id: str) -> str:
        return f"{self.prefix}:upload:{upload_id}"

    def parts_key(self, upload_id: str) -> str:
        return f"{self.prefix}:upload:{upload_id}:parts"

    @property
    def index_key(self) -> str:
        return f"{self.prefix}:uploads"

    @property
    def active_key(self) -> str:
        """Sorted set of the uploads recovery must watch (creating, uploading, completing, or
        failed with an automatic resume to come), scored by creation time: kept in step with the
        records by the transition scripts themselves (``track_attention`` in ``lua/_shared.lua``)."""
        return f"{self.prefix}:active"

    @property
    def settled_key(self) -> str:
        """Sorted set of uploads that settled (completed, cancelled, failed for good, forgotten)
        with Celery chords on record whose keys the recovery leader has yet to delete."""
        return f"{self.prefix}:settled"

    def chords_key(self, upload_id: str) -> str:
        """The group ids of the Celery chords dispatched for an upload (see :meth:`note_chord`)."""
        return f"{self.record_key(upload_id)}:chords"

    def refusal_key(self, upload_id: str) -> str:
        return f"{self.prefix}:refused:{upload_id}"

    def rate_key(self, upload_id: str) -> str:
        """The upload's fleet-wide token bucket (uploader/limits/bucket.lua), while it is used."""
        return f"{self.prefix}:rate:{upload_id}"

    def inflight_key(self, upload_id: str) -> str:
        return f"{self.prefix}:upload:{upload_id}:inflight"

    def worker_key(self, holder: str) -> str:
        return f"{self.prefix}:worker:{holder}"

    @property
    def workers_key(self) -> str:
        """Sorted set of live worker incarnations, scored by when their heartbeat lapses."""
        return f"{self.prefix}:workers"

    @property
    def hosts_key(self) -> str:
        """Sorted set of the hosts with a live worker (uploader/locality.py), scored by when the
        last of their workers' heartbeats lapses."""
        return f"{self.prefix}:hosts"

    def _keys(self, upload_id: str) -> list[str]:
        return [self.record_key(upload_id), self.parts_key(upload_id), self.inflight_key(upload_id)]

    @property
    def outbox_key(self) -> str:
        """Sorted set of the notification events to deliver, scored by when each is due; each
        event's hash is ``<outbox_key>:<event id>`` (see :mod:`uploader.notify`)."""
        return f"{self.prefix}:outbox"

    def event_key(self, event_id: str) -> str:
        return f"{self.outbox_key}:{event_id}"

    def _attention_keys(self) -> list[str]:
        """The keys ``track_attention`` (``lua/_shared.lua``) needs after a transition's own."""
        return [self.active_key, self.settled_key]

    # -- reads --------------------------------------------------------------------------------
    def _hash(self, key: str) -> dict[str, str]:
        """The hash at ``key``, as text (the client decodes responses: redis-py's types do not
        follow ``decode_responses``, hence the casts here and below)."""
        return cast("dict[str, str]", self.redis.hgetall(key))

    def get(self, upload_id: str) -> UploadRecord | None:
        raw = self._hash(self.record_key(upload_id))
        return UploadRecord.from_hash(upload_id, raw) if raw else None

    def get_many(self, upload_ids: list[str]) -> list[UploadRecord | None]:
        """The records of ``upload_ids`` (``None`` where there is none), in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for upload_id in upload_ids:
            pipe.hgetall(self.record_key(upload_id))
        return [
            UploadRecord.from_hash(upload_id, raw) if raw else None
            for upload_id, raw in zip(upload_ids, pipe.execute(), strict=True)
        ]

    def ids_starting_with(self, prefix: str, at_most: int) -> list[str]:
        """Up to ``at_most`` ids of the index (recent uploads) that start with ``prefix`` (an id's
        shape: no glob characters)."""
        found: list[str] = []
        for upload_id in self.redis.zscan_iter(self.index_key, match=prefix + "*", count=1000):
            found.append(upload_id[0] if isinstance(upload_id, tuple) else upload_id)
            if len(found) >= at_most:
                break
        return found

    def get_with_recovery(self, upload_id: str) -> tuple[UploadRecord | None, RecoveryState, int]:
        """The record, the fleet's recovery state and the bytes of parts being sent now
        (:meth:`note_sending`), in one round trip (what ``status`` shows)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.record_key(upload_id))
        pipe.hgetall(self.recovery_key)
        pipe.hvals(self.sending_key(upload_id))
        raw, recovery, sending = pipe.execute()
        record = UploadRecord.from_hash(upload_id, raw) if raw else None
        return record, RecoveryState.from_hash(recovery), sum(int(v) for v in sending)

    def sending_key(self, upload_id: str) -> str:
        return f"{self.prefix}:upload:{upload_id}:sending"

    def note_sending(self, upload_id: str, part_number: int, sent: int, keep_seconds: float) -> None:
        """Part ``part_number`` has ``sent`` bytes out (reported while it is sent, every few MiB);
        the note lapses after ``keep_seconds`` if nothing clears it (a killed worker)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self.sending_key(upload_id), str(part_number), sent)
        pipe.expire(self.sending_key(upload_id), max(1, int(keep_seconds)))
        pipe.execute()

    def clear_sending(self, upload_id: str, part_number: int) -> None:
        """The part is recorded, or its attempt ended: its bytes are no longer "being sent"."""
        self.redis.hdel(self.sending_key(upload_id), str(part_number))

    def parts(self, upload_id: str) -> dict[int, UploadedPart]:
        """Recorded parts by number."""
        raw = self.redis.hgetall(self.parts_key(upload_id))
        out = {}
        for number, value in raw.items():
            data = json.loads(value)
            out[int(number)] = UploadedPart(
                etag=data["etag"], checksum=data["checksum"], crc64ecma=data.get("crc64ecma", "")
            )
        return out

    def missing_parts(self, upload_id: str, part_count: int, *, now: float | None = None) -> tuple[list[int], list[int]]:
        """Parts not recorded, split into ``(unleased, leased)``: a leased part is being sent by a
        live holder within its time limit, so dispatching it again would only duplicate it."""
        now = time.time() if now is None else now
        pipe = self.redis.pipeline(transaction=False)
        pipe.hkeys(self.parts_key(upload_id))
        pipe.hgetall(self.inflight_key(upload_id))
        recorded_raw, inflight = pipe.execute()
        recorded = {int(n) for n in recorded_raw}
        leases = {int(n): Lease.parse(value) for n, value in inflight.items()}
        live = self.live_owners({lease.holder for lease in leases.values()})
        leased = {n for n, lease in leases.items() if lease.holder in live and not lease.expired(now)}
        missing = [n for n in range(1, part_count + 1) if n not in recorded]
        return [n for n in missing if n not in leased], [n for n in missing if n in leased]

    def leases(self, upload_id: str) -> dict[int, Lease]:
        """The in-flight part leases of an upload, holding or not, by part number."""
        return {int(n): Lease.parse(v) for n, v in self._hash(self.inflight_key(upload_id)).items()}

    def live_owners(self, owners: set[str]) -> set[str]:
        """The lease holders in ``owners`` whose heartbeat has not expired."""
        owners = {o for o in owners if o}
        if not owners:
            return set()
        ordered = sorted(owners)
        pipe = self.redis.pipeline(transaction=False)
        for owner in ordered:
            pipe.exists(self.worker_key(owner))
        return {owner for owner, alive in zip(ordered, pipe.execute(), strict=True) if alive}

    def heartbeat(self, holder: str, ttl: int, *, worker: bool = False, host: str = "", version: str = "") -> None:
        """Declare ``holder`` alive for ``ttl`` seconds (its part leases keep holding). A
        ``worker`` (a worker incarnation's main process, not a prefork pool process) is also
        counted in :meth:`live_workers`, keeps its ``host`` alive (:meth:`host_alive`), and
        notes the ``version`` it runs (:meth:`worker_versions`)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.worker_key(holder), "1", ex=ttl)
        if worker:
            now = time.time()
            pipe.zadd(self.workers_key, {holder: now + ttl})
            pipe.zremrangebyscore(self.workers_key, "-inf", now)
            if version:
                pipe.hset(self.worker_versions_key, holder, version)
            if host:
                # GT: one worker's beat never shortens another's on the same host.
                pipe.zadd(self.hosts_key, {host: now + ttl}, gt=True)
                pipe.zremrangebyscore(self.hosts_key, "-inf", now)
        pipe.execute()

    def host_alive(self, host: str, *, now: float | None = None) -> bool:
        """Whether a worker of ``host`` beat within its heartbeat's lifetime (uploader/locality.py)."""
        now = time.time() if now is None else now
        lapses = self.redis.zscore(self.hosts_key, host)
        return lapses is not None and float(lapses) >= now

    def retire(self, holder: str) -> None:
        """``holder`` stops (a clean shutdown): its leases lapse now instead of after its TTL."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(self.worker_key(holder))
        pipe.zrem(self.workers_key, holder)
        pipe.hdel(self.worker_versions_key, holder)
        pipe.execute()

    @property
    def worker_versions_key(self) -> str:
        return f"{self.prefix}:worker_versions"

    def worker_versions(self, holders: Sequence[str]) -> dict[str, str]:
        """The version each of ``holders`` (live workers) runs, as its heartbeat noted it."""
        if not holders:
            return {}
        versions = self.redis.hmget(self.worker_versions_key, list(holders))
        return {h: str(v) for h, v in zip(holders, versions, strict=True) if v is not None}

    def forget_worker_versions(self, live: set[str]) -> int:
        """Drop the versions noted by workers that are gone (killed: a clean stop drops its own)."""
        gone = [h for h in self.redis.hkeys(self.worker_versions_key) if h not in live]
        return int(self.redis.hdel(self.worker_versions_key, *gone)) if gone else 0

    def live_workers(self, *, now: float | None = None) -> list[str]:
        """The worker incarnations whose heartbeat is alive now."""
        now = time.time() if now is None else now
        return cast("list[str]", self.redis.zrangebyscore(self.workers_key, now, "+inf"))

    # -- recovery (see uploader.maintenance) ---------------------------------------------------
    @property
    def recovery_key(self) -> str:
        return f"{self.prefix}:recovery"

    def recovery(self) -> RecoveryState:
        """When the fleet's recovery (reconciler, janitor) last ran, and on which worker."""
        return RecoveryState.from_hash(self._hash(self.recovery_key))

    def note_recovery(self, **fields: str | float | int) -> None:
        self.redis.hset(self.recovery_key, mapping={k: str(v) for k, v in fields.items()})

    def leader_key(self, role: str) -> str:
        return f"{self.prefix}:leader:{role}"

    def claim_leadership(self, role: str, holder: str, seconds: float) -> bool:
        """Take or renew ``role`` for ``holder`` for ``seconds``; whether ``holder`` holds it now.
        At most one holder holds a role at a time; when it stops renewing, another takes it
        over once the lease lapses."""
        return bool(self._run("claim_leadership", [self.leader_key(role)], [holder, int(seconds * 1000)]))

    def resign_leadership(self, role: str, holder: str) -> None:
        self._run("resign_leadership", [self.leader_key(role)], [holder])

    def leader(self, role: str) -> str | None:
        return cast("str | None", self.redis.get(self.leader_key(role)))

    def list_ids(self, limit: int = 100) -> list[str]:
        """Most recent upload ids first; ids whose checkpoint expired are pruned from the index."""
        ids = cast("list[str]", self.redis.zrevrange(self.index_key, 0, limit - 1))
        if not ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for upload_id in ids:
            pipe.exists(self.record_key(upload_id))
        alive = pipe.execute()
        gone = [i for i, ok in zip(ids, alive, strict=True) if not ok]
        if gone:
            try:
                self.redis.zrem(self.index_key, *gone)
            except redis.exceptions.NoPermissionError:
                pass  # a client's Redis user reads the index only (deploy/redis/users.acl); workers prune it too
        return [i for i, ok in zip(ids, alive, strict=True) if ok]

    # -- transitions --------------------------------------------------------------------------
    def claim(self, upload_id: str, fields: dict[str, Any]) -> tuple[bool, str]:
        """Create the record in ``creating``. Returns ``(True, "creating")`` when this call created
        it, else ``(False, existing_state)``."""
        created, result = self._claim(upload_id, fields, "", 0)
        return (True, UploadState.CREATING) if created else (False, result)

    def claim_single(
        self, upload_id: str, fields: dict[str, Any], token: str, lease_seconds: float
    ) -> tuple[bool, UploadRecord | str]:
        """Create a single-PUT upload's record (``fields["mode"] == "single"``) already
        ``completing``, its completion lease held by ``token``: as if claimed, attached and
        begun, in one round trip. Returns ``(True, record)`` when this call created it (the caller
        sends the object and marks it completed with ``token``), else ``(False, existing_state)``."""
        return self._claim(upload_id, fields, token, lease_seconds)

    def claim_queued(self, claims: list[tuple[str, dict[str, Any]]]) -> list[bool]:
        """Create single-PUT upload records (``fields["mode"] == "single"``) already ``uploading``,
        each to be sent by a ``put_objects`` task that takes its completion lease: as if claimed
        and attached, for every upload in one round trip. Returns, per upload in order, whether
        this call created it (False: a record existed, left as it was)."""
        pipe = self.redis.pipeline(transaction=False)
        for upload_id, fields in claims:
            self._claim_call(upload_id, {**fields, "state": UploadState.UPLOADING.value, "mpu_id": ""}, "", 0, pipe)
        created = [answer[0] == "created" for answer in pipe.execute()]
        metrics.upload_started("single", sum(created))
        return created

    def _claim_call(self, upload_id: str, fields: dict[str, Any], token: str, lease_seconds: float, client: Any = None) -> Any:
        args: list[Any] = [upload_id, time.time(), token, lease_seconds]
        for name, value in fields.items():
            args += [name, _encode(value)]
        return self._run(
            "claim_upload",
            [self.record_key(upload_id), self.index_key, self.refusal_key(upload_id), *self._attention_keys()],
            args,
            client,
        )

    def _claim(self, upload_id: str, fields: dict[str, Any], token: str, lease_seconds: float) -> tuple[bool, Any]:
        result = self._claim_call(upload_id, fields, token, lease_seconds)
        if result[0] != "created":
            return False, result[1]
        metrics.upload_started(str(fields.get("mode", "multipart")))
        if not token:
            return True, UploadState.CREATING
        flat = result[1]
        return True, UploadRecord.from_hash(upload_id, dict(zip(flat[::2], flat[1::2], strict=True)))

    def refuse(self, upload_id: str, reason: str, keep_seconds: int, kind: str = "UploadRefused") -> bool:
        """Note why a request for ``upload_id`` was refused before anything was created (kept
        ``keep_seconds``; ``kind`` is the error's class name); nothing is noted, and False
        returned, when a record exists under it."""
        return bool(self._run(
            "refuse_upload", [self.record_key(upload_id), self.refusal_key(upload_id)],
            [reason[:MAX_ERROR_CHARS], time.time(), keep_seconds, kind],
        ))

    def refusal(self, upload_id: str) -> Refusal | None:
        return self.refusal_at(self.refusal_key(upload_id))

    def refusal_at(self, key: str) -> Refusal | None:
        """The refusal noted at ``key`` (an upload's, or a batch's: uploader/checkpoint/batches.py)."""
        raw = self._hash(key)
        if not raw:
            return None
        return Refusal(raw.get("reason", ""), float(raw.get("at") or 0), raw.get("kind") or "UploadRefused")

    def attach_multipart(self, upload_id: str, mpu_id: str) -> str:
        return self._run("attach_multipart", [self.record_key(upload_id)], [mpu_id, time.time()])

    def discard(self, upload_id: str) -> str:
        return self._run(
            "discard_upload", [*self._keys(upload_id), self.index_key, *self._attention_keys()], [upload_id, time.time()]
        )

    def begin_part(
        self,
        upload_id: str,
        part_number: int,
        generation: int,
        owner: str,
        *,
        time_limit: PartTimeLimit = DEFAULT_PART_TIME_LIMIT,
        now: float | None = None,
    ) -> tuple[PartStart, PartJob | str]:
        """``("send", job)``, ``("recorded", "")``, ``("stale", "")``, ``("leased", "")``,
        ``("limited", "<live leases>")`` (the upload's ``max_concurrency`` is reached: nothing
        taken; come back later) or ``("inactive", state)`` (a :class:`PartStart` first). ``owner`` is :func:`part_lease_owner`'s, the holder a worker
        incarnation (see :mod:`uploader.checkpoint.heartbeat`).

        The lease taken holds while the holder's heartbeat lives, and at most for the part's
        ``time_limit`` (a hung task's part is taken back by :meth:`reclaim_parts`).
        A part number outside the current plan (the script's ``unplanned``) answers ``stale``:
        the message does not belong to this plan, and the caller skips it.

        The same ``owner`` calling again while its lease holds gets the lease again (a replayed
        script call must: see :func:`part_lease_owner`, which gives every execution of a part
        task its own owner so that a duplicate delivery is ``leased``). A release of this part
        that :meth:`release_part_or_later` postponed is made first: a task retried after it
        gave the part up must not find its own old lease in the way."""
        self._release_pending_of(upload_id, part_number)
        now = time.time() if now is None else now
        result = self._run(
            "begin_part",
            self._keys(upload_id),
            [part_number, generation, owner, self.worker_key(""), time_limit.base_seconds, now,
             time_limit.min_bytes_per_second],
        )
        verdict = PartStart(result[0])
        if verdict is PartStart.UNPLANNED:
            return PartStart.STALE, ""
        if verdict is not PartStart.SEND:
            return verdict, (result[1] if len(result) > 1 else "")
        mpu_id, source, bucket, key, size, mtime_ns, offset, length, file_id = result[1:10]
        endpoint, algorithm, options, max_bandwidth, credentials, source_endpoint = (list(result[10:16]) + [""] * 6)[:6]
        return PartStart.SEND, PartJob(
            upload_id, part_number, mpu_id, source, bucket, key, int(size), int(mtime_ns), int(offset), int(length),
            file_id or "", endpoint or "", algorithm or "",
            ObjectOptions.from_record({"options": options}) if options else ObjectOptions(),
            int(max_bandwidth or 0), credentials or "", source_endpoint or "",
        )

    def reclaim_parts(self, upload_id: str, *, now: float | None = None) -> tuple[int, list[int]]:
        """Take back the leases of an ``uploading`` upload whose holder died or whose time limit
        passed: ``(generation, part numbers)`` for the caller to send again (no parts when the
        upload is not uploading or every lease holds)."""
        now = time.time() if now is None else now
        result = self._run("reclaim_parts", [self.record_key(upload_id), self.inflight_key(upload_id)],
                           [self.worker_key(""), now])
        if not result:
            return 0, []
        return int(result[0]), sorted(int(n) for n in result[1:])

    def release_part(self, upload_id: str, part_number: int, owner: str) -> None:
        self._run("release_part", [self.inflight_key(upload_id)], [part_number, owner])

    def release_part_or_later(self, upload_id: str, part_number: int, owner: str) -> None:
        """Release the lease now, or, if Redis is away for longer than the reconnection
        attempts, remember it for :meth:`release_pending` (the worker's heartbeat calls it).
        A lease left behind would look held for as long as its worker lives: its part would
        never be sent again."""
        try:
            self.release_part(upload_id, part_number, owner)
        except REDIS_OUTAGE_ERRORS as exc:
            log.warning("upload %s: part %d: lease release postponed, Redis is away (%s)", upload_id, part_number, exc)
            with self._unreleased_lock:
                self._unreleased.add((upload_id, part_number, owner))

    def _release_pending_of(self, upload_id: str, part_number: int) -> None:
        """Make the postponed releases (:meth:`release_part_or_later`) of this part now."""
        with self._unreleased_lock:
            pending = [entry for entry in self._unreleased if entry[:2] == (upload_id, part_number)]
        for entry in pending:
            self.release_part(*entry)
            with self._unreleased_lock:
                self._unreleased.discard(entry)

    def release_pending(self) -> int:
        """Release the leases :meth:`release_part_or_later` could not; how many it released
        (a release only deletes a lease its owner still holds, so a late one is harmless).
        Raises the Redis error if Redis is still away."""
        with self._unreleased_lock:
            pending = sorted(self._unreleased)
        for upload_id, part_number, owner in pending:
            self.release_part(upload_id, part_number, owner)
            with self._unreleased_lock:
                self._unreleased.discard((upload_id, part_number, owner))
        return len(pending)

    def next_generation(self, upload_id: str, generation: int) -> int:
        """Supersede ``generation``; 0 if it is no longer current or the upload is not uploading."""
        return int(self._run("next_generation", [self.record_key(upload_id)], [generation]))

    def record_part(self, upload_id: str, mpu_id: str, part_number: int, part: UploadedPart, size: int) -> str:
        """``recorded``, ``last``, ``duplicate``, ``fenced``, ``inactive:<state>``, or ``stale``
        for a part number outside the current plan (the script's ``unplanned``: not recorded)."""
        fields: dict[str, Any] = {"etag": part.etag, "checksum": part.checksum, "size": size}
        if part.crc64ecma:  # only where the profile reports it (OSS)
            fields["crc64ecma"] = part.crc64ecma
        value = json.dumps(fields, separators=(",", ":"))
        result = self._run("record_part", self._keys(upload_id), [mpu_id, part_number, value, size, time.time()])
        return "stale" if result == "unplanned" else result

    def begin_completion(self, upload_id: str, token: str, lease_seconds: int) -> str:
        return self._run("begin_completion", self._keys(upload_id), [token, time.time(), lease_seconds])

    def begin_completions(self, uploads: list[tuple[str, str]], lease_seconds: int) -> list[str]:
        """``begin_completion`` of each ``(upload_id, token)``, in one round trip: the answers in order."""
        pipe = self.redis.pipeline(transaction=False)
        now = time.time()
        for upload_id, token in uploads:
            self._run("begin_completion", self._keys(upload_id), [token, now, lease_seconds], pipe)
        return [str(answer) for answer in pipe.execute()]

    def mark_completed(self, upload_id: str, token: str, retention: int, fields: dict[str, Any]) -> str:
        answer = str(self._mark_completed_call(upload_id, token, retention, fields))
        metrics.upload_finished(UploadState.COMPLETED, answer == "ok")
        return answer

    def mark_many_completed(self, completions: list[tuple[str, str, dict[str, Any]]], retention: int) -> list[str]:
        """``mark_completed`` of each ``(upload_id, token, fields)``, in one round trip; the
        answers in order."""
        pipe = self.redis.pipeline(transaction=False)
        for upload_id, token, fields in completions:
            self._mark_completed_call(upload_id, token, retention, fields, pipe)
        answers = [str(answer) for answer in pipe.execute()]
        metrics.upload_finished(UploadState.COMPLETED, answers.count("ok"))
        return answers

    def _mark_completed_call(
        self, upload_id: str, token: str, retention: int, fields: dict[str, Any], client: Any = None
    ) -> Any:
        args: list[Any] = [token, time.time(), retention]
        for name, value in fields.items():
            args += [name, _encode(value)]
        return self._run(
            "mark_completed", [*self._keys(upload_id), *self._attention_keys(), self.outbox_key], args, client
        )

    def mark_failed(
        self, upload_id: str, reason: str, generation: int = 0, *, auto_resumes: int = 0, backoff: int = 30
    ) -> str:
        """Fail the upload, unless ``generation`` (when given) was superseded by a newer dispatch.

        ``auto_resumes`` > 0 marks a transient failure: the reconciler may resume the upload by
        itself up to that many times in all, the first after ``backoff`` seconds, doubling each
        time up to :data:`AUTO_RESUME_MAX_WAIT` (see ``retry_at`` in the record)."""
        previous = str(self._run(
            "mark_failed",
            [self.record_key(upload_id), *self._attention_keys(), self.outbox_key],
            [reason[:MAX_ERROR_CHARS], time.time(), generation, auto_resumes, backoff, AUTO_RESUME_MAX_WAIT],
        ))
        metrics.upload_finished(UploadState.FAILED, inactive_state(previous) is None)
        return previous

    def note_error(self, upload_id: str, message: str) -> bool:
        """Record ``message`` as the upload's error (no state change); a failed upload is then
        not resumed automatically any more. False if the record is gone."""
        return bool(self._run(
            "note_error", [self.record_key(upload_id), *self._attention_keys(), self.outbox_key],
            [message[:MAX_ERROR_CHARS], time.time()],
        ))

    def claim_auto_resume(self, upload_id: str, limit: int, backoff: int, *, now: float | None = None) -> int:
        """Claim the automatic resume that is due for a transiently failed upload: its number
        (1, 2, ...), or 0 if none is due. At most one caller wins each."""
        now = time.time() if now is None else now
        return int(
            self._run(
                "claim_auto_resume", [self.record_key(upload_id), *self._attention_keys(), self.outbox_key],
                [now, limit, backoff, AUTO_RESUME_MAX_WAIT],
            )
        )

    def cancel(self, upload_id: str, retention: int) -> str:
        answer = str(self._run(
            "cancel_upload", [*self._keys(upload_id), *self._attention_keys(), self.outbox_key], [time.time(), retention]
        ))
        metrics.upload_finished(UploadState.CANCELLED, answer == UploadState.CANCELLED)
        return answer

    def reopen(self, upload_id: str, mpu_id: str) -> int | str:
        """The new dispatch generation, or the state (or ``"fenced"``) that forbade reopening."""
        return self._run("reopen_upload", [self.record_key(upload_id), *self._attention_keys()], [mpu_id, time.time()])

    def restart(self, upload_id: str, old_mpu_id: str, new_mpu_id: str, fields: dict[str, Any]) -> int | str:
        """The new dispatch generation, or the state (or ``"fenced"``) that forbade restarting."""
        args: list[Any] = [old_mpu_id, new_mpu_id, time.time()]
        for name, value in fields.items():
            args += [name, _encode(value)]
        return self._run("restart_upload", [*self._keys(upload_id), *self._attention_keys()], args)

    def forget_parts(self, upload_id: str, mpu_id: str, part_numbers: list[int]) -> int:
        """The number of parts forgotten; -1 when ``mpu_id`` is not the current attempt's, -2 when
        the upload is not ``uploading`` or ``failed`` (nothing is forgotten then)."""
        if not part_numbers:
            return 0
        return int(self._run("forget_parts", self._keys(upload_id), [mpu_id, *part_numbers]))

    def forget(self, upload_id: str) -> None:
        """Delete an upload's record, parts and leases, and take it out of the indexes (the
        janitor's last step for an abandoned upload)."""
        self._run(
            "forget_upload", [*self._keys(upload_id), self.index_key, *self._attention_keys()], [upload_id, time.time()]
        )

    # -- recovery's attention index and the chords of settled uploads ---------------------------
    def active_ids(self) -> list[str]:
        """The uploads recovery must watch (the attention index), oldest first."""
        return cast("list[str]", self.redis.zrange(self.active_key, 0, -1))

    def index_uploads(self, upload_ids: list[str]) -> int:
        """Put these uploads in the attention index or take them out, as their records say (a
        migration of records written before the index existed, or a repair); returns how many of
        them need attention."""
        if not upload_ids:
            return 0
        return int(self._run(
            "index_uploads", [*self._attention_keys(), *map(self.record_key, upload_ids)], [time.time()]
        ))

    def note_chord(self, upload_id: str, group_id: str, keep_seconds: int) -> None:
        """Note a Celery chord dispatched for ``upload_id`` (before its first message goes out),
        so that its keys in the result backend are deleted once the upload settles; the note
        lasts ``keep_seconds`` at most."""
        self._run("note_chord", [self.record_key(upload_id), *self._attention_keys()], [group_id, keep_seconds, time.time()])

    @property
    def lane_holds_key(self) -> str:
        """The part lanes chosen moments ago by a dispatch (see :meth:`claim_lane`)."""
        return f"{self.prefix}:lanes"

    def claim_lane(self, queued: Sequence[int], hold_seconds: float) -> int:
        """Choose the part lane of a dispatch, given the messages ``queued`` in each lane (in
        lane order), and hold it for ``hold_seconds``: the first free lane (nothing queued, not
        held), else the one with the fewest queued messages, and of those the one held longest
        ago. Atomic: dispatches racing each other get different lanes, as long as there are lanes."""
        return int(self._run("claim_lane", [self.lane_holds_key], [time.time(), hold_seconds, *queued]))

    def take_settled(self, limit: int) -> list[tuple[str, list[str]]]:
        """Up to ``limit`` settled uploads with the group ids of their chords, oldest first;
        call :meth:`release_chords` once those chords' keys are deleted."""
        flat = self._run("take_settled", [self.settled_key, self.active_key], [limit, self.record_key("")])
        return [(flat[i], flat[i + 1].split()) for i in range(0, len(flat), 2)]

    def release_chords(self, upload_id: str, group_ids: list[str]) -> None:
        """The keys of these chords are gone from the result backend: forget them."""
        self._run("release_chords", [self.chords_key(upload_id), self.settled_key], [upload_id, *group_ids])

    def try_lock(self, upload_id: str, name: str, token: str, seconds: int) -> bool:
        """A short advisory lock (e.g. one dispatcher at a time per upload)."""
        return bool(self.redis.set(f"{self.record_key(upload_id)}:{name}", token, nx=True, ex=seconds))

    def unlock(self, upload_id: str, name: str, token: str) -> None:
        key = f"{self.record_key(upload_id)}:{name}"
        # Compare-and-delete, so an expired lock someone else took is not released by us.
        self.redis.eval(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
            1,
            key,
            token,
        )


def _encode(value: Any) -> Any:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    if value is None:
        return ""
    return value
