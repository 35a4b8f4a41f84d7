"""``uploader doctor``: is this deployment well? One check per line, each with a verdict and, when
it is not ok, what to do. Read-only: it pings, reads and counts, and never changes anything.

What a check cannot see from here (a Redis user without ``INFO``, no S3 credentials on this
machine, a broker other than Redis for the queue checks) is ``skip`` with the reason, not a
failure: run it as an operator (the ``uploader-admin`` Redis user, the workers' environment) to
see everything.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import redis

from uploader.config import Settings, redact_url
from uploader.contract import CONTROL_QUEUE, part_lanes
from uploader.locality import HOST_QUEUE_PREFIX
from uploader.priority import PRIORITY_STEPS, is_redis

#: kombu's Redis transport: a queue's list for priority step ``n`` > 0 is ``<queue>\x06\x16<n>``.
PRIORITY_SEPARATOR = "\x06\x16"
#: Celery's default queue: a client that sends ``uploader.start_upload`` by name without routing
#: it to ``uploader.control`` puts it here, where no worker of ours reads.
CELERY_DEFAULT_QUEUE = "celery"
#: Seconds each connection and command may take: doctor answers, it does not wait out an outage.
TIMEOUT = 5.0


class Verdict(enum.StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True)
class Check:
    name: str
    verdict: Verdict
    detail: str
    #: What to do about it ("" when ok).
    advice: str = ""

    def to_dict(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}


def run_checks(settings: Settings, *, bucket: str | None = None, version: str = "") -> list[Check]:
    """Every check, in order; each one's own error is its verdict, never the end of the run."""
    doctor = _Doctor(settings, bucket, version)
    return list(doctor.checks())


class _Doctor:
    def __init__(self, settings: Settings, bucket: str | None, version: str) -> None:
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        from uploader.checkpoint.connection import redis_client
        from uploader.checkpoint.store import CheckpointStore
        from uploader.redis_tls import tls_options

        self.settings = settings
        self.bucket = bucket
        self.version = version
        self.store = CheckpointStore.from_settings(settings, reconnect_attempts=0, timeout=TIMEOUT)
        self.checkpoint = self.store.redis
        self.broker = redis_client(
            settings.broker_url, timeout=TIMEOUT, retry=Retry(NoBackoff(), 0), sentinel_master=settings.redis_sentinel_master,
            sentinel_password=settings.redis_sentinel_password_value, tls=tls_options(settings),
        ) if is_redis(settings.broker_url) else None
        self.prefix = settings.key_prefix

    def checks(self) -> Iterator[Check]:
        steps: list[tuple[str, Callable[[], Check | list[Check]]]] = [
            ("broker", self.check_broker),
            ("checkpoint", self.check_checkpoint),
            ("redis persistence", self.check_persistence),
            ("redis eviction", self.check_eviction),
            ("s3", self.check_s3),
            ("workers", self.check_workers),
            ("recovery", self.check_recovery),
            ("queues", self.check_queues),
            ("stray messages", self.check_stray),
            ("dead letters", self.check_dead_letters),
        ]
        for name, step in steps:
            try:
                found = step()
            except redis.exceptions.NoPermissionError as exc:
                found = Check(name, Verdict.SKIP, f"this Redis user may not look ({_first_line(exc)})",
                              "run doctor as an operator (the uploader-admin Redis user) to check it")
            except (redis.RedisError, OSError) as exc:
                found = Check(name, Verdict.FAIL, f"Redis did not answer: {_first_line(exc)}",
                              "check UPLOADER_BROKER_URL / UPLOADER_CHECKPOINT_URL and that Redis runs")
            except Exception as exc:  # noqa: BLE001  (a check's own failure is its verdict)
                found = Check(name, Verdict.FAIL, f"{type(exc).__name__}: {_first_line(exc)}")
            yield from found if isinstance(found, list) else [found]

    # -- the checks --------------------------------------------------------------------------------
    def check_broker(self) -> Check:
        url = redact_url(self.settings.broker_url)
        if self.broker is None:
            from kombu import Connection

            with Connection(self.settings.broker_url, connect_timeout=5) as connection:
                connection.ensure_connection(max_retries=1)
            return Check("broker", Verdict.OK, f"{url} answers")
        took = _timed(self.broker.ping)
        return Check("broker", Verdict.OK, f"{url} answers ({took * 1000:.1f} ms)")

    def check_checkpoint(self) -> Check:
        url = redact_url(self.settings.effective_checkpoint_url)
        if self.settings.checkpoint_url is None and self.broker is not None:
            return Check("checkpoint", Verdict.OK, f"{url}: the broker's Redis")
        took = _timed(self.checkpoint.ping)
        return Check("checkpoint", Verdict.OK, f"{url} answers ({took * 1000:.1f} ms)")

    def check_persistence(self) -> Check:
        info = self.checkpoint.info("persistence")
        if int(info.get("aof_enabled", 0)):
            return Check("redis persistence", Verdict.OK, "AOF on: a restart keeps queued parts and checkpoints")
        return Check(
            "redis persistence", Verdict.WARN, "AOF off: a Redis restart loses what was written since its last snapshot",
            "production Redis: appendonly yes, appendfsync everysec (deploy/README.md \"Redis in production\")",
        )

    def check_eviction(self) -> Check:
        policy = str(self.checkpoint.info("memory").get("maxmemory_policy", ""))
        if policy == "noeviction":
            return Check("redis eviction", Verdict.OK, "maxmemory-policy noeviction: nothing is dropped when full")
        return Check(
            "redis eviction", Verdict.FAIL, f"maxmemory-policy {policy or 'unknown'}: a full Redis drops queued parts or checkpoints",
            "set maxmemory-policy noeviction (writes are refused when full instead)",
        )

    def check_s3(self) -> Check:
        import boto3

        if boto3.session.Session().get_credentials() is None:
            return Check("s3", Verdict.SKIP, "no S3 credentials in this environment (the workers hold them)",
                         "run doctor with the workers' environment to check the endpoint and the bucket")
        from uploader.storage.adapter import object_store

        objects = object_store(self.settings)
        endpoint = self.settings.s3_endpoint_url or "AWS S3"
        if not self.bucket:
            return Check("s3", Verdict.SKIP, f"{endpoint}: name a bucket (--bucket) to check the credentials against it")
        took = _timed(lambda: objects.head_bucket(str(self.bucket)))
        return Check("s3", Verdict.OK, f"{endpoint}: bucket {self.bucket} reachable with these credentials ({took * 1000:.0f} ms)")

    def check_workers(self) -> Check:
        store = self.store
        live = store.live_workers()
        if not live:
            return Check("workers", Verdict.FAIL, "no worker is alive (no heartbeat in Redis)",
                         "start workers (uploader worker) on the same UPLOADER_BROKER_URL and UPLOADER_KEY_PREFIX")
        try:
            versions = store.worker_versions(live)
        except redis.exceptions.NoPermissionError:
            versions = {}  # (a client's Redis user: the count is what it may read)
        seen = sorted(set(versions.values()))
        shown = ", ".join(seen) if seen else "versions not readable here"
        detail = f"{len(live)} alive ({shown})"
        if len(seen) > 1:
            return Check("workers", Verdict.WARN, detail, "workers run different versions: finish the rollout")
        if self.version and seen and seen[0] != self.version:
            return Check("workers", Verdict.WARN, detail + f"; this client is {self.version}",
                         "upgrade the client or the workers so they match")
        return Check("workers", Verdict.OK, detail)

    def check_recovery(self) -> Check:
        state = self.store.recovery()
        limit = max(3 * self.settings.reconcile_interval, 90.0)
        if state.reconciled_at is None:
            return Check("recovery", Verdict.FAIL, "recovery has never run",
                         "workers run it themselves: start a worker (uploader worker)")
        age = time.time() - state.reconciled_at
        detail = f"last run {age:.0f} s ago on {state.leader or '?'}"
        if age > limit:
            return Check("recovery", Verdict.FAIL, detail + f" (expected every {self.settings.reconcile_interval:g} s)",
                         "no worker leads recovery: check that workers are alive and can write to Redis")
        stalled = f", {state.stalled} stalled" if state.stalled else ""
        active = sum(state.states.values())
        return Check("recovery", Verdict.OK if not state.stalled else Verdict.WARN,
                     detail + f"; {active} uploads need attention{stalled}",
                     "uploader list --state uploading; uploader status ID says why" if state.stalled else "")

    def check_queues(self) -> Check:
        if self.broker is None:
            return Check("queues", Verdict.SKIP, "queue depths are read on a Redis broker only")
        names = [CONTROL_QUEUE, *part_lanes(self.settings.part_lanes)]
        depths = {name: self._depth(name) for name in names}
        parts = sum(depths[n] for n in names[1:])
        return Check("queues", Verdict.OK, f"{depths[CONTROL_QUEUE]} control messages and {parts} part messages waiting")

    def check_stray(self) -> list[Check]:
        if self.broker is None:
            return [Check("stray messages", Verdict.SKIP, "checked on a Redis broker only")]
        found: list[Check] = []
        stray = self._depth(CELERY_DEFAULT_QUEUE)
        if stray:
            found.append(Check(
                "stray messages", Verdict.FAIL,
                f"{stray} messages wait on queue {CELERY_DEFAULT_QUEUE!r}, which no uploader worker reads",
                f"a client sent tasks without routing them: send_task(..., queue={CONTROL_QUEUE!r}) "
                "(README \"Message contract\"); then move or delete those messages",
            ))
        store = self.store
        for key in self.broker.scan_iter(match=HOST_QUEUE_PREFIX + "*", count=1000):
            name = key.split(PRIORITY_SEPARATOR, 1)[0]
            host = name[len(HOST_QUEUE_PREFIX):]
            waiting = int(self.broker.llen(key))
            if waiting and not store.host_alive(host):
                found.append(Check(
                    "stray messages", Verdict.WARN, f"{waiting} messages wait on {name}, and no worker of host {host} is alive",
                    f"start a worker on host {host} (UPLOADER_HOST_NAME={host}): only it can read those files",
                ))
        return found or [Check("stray messages", Verdict.OK, "no messages on queues no worker reads")]

    def check_dead_letters(self) -> Check:
        from uploader.checkpoint.deadletter import DeadLetters

        count = DeadLetters(self.checkpoint, prefix=self.prefix).count()
        if count:
            return Check("dead letters", Verdict.WARN, f"{count} malformed messages quarantined",
                         "uploader deadletter list shows them (and who sent them); uploader deadletter purge --yes")
        return Check("dead letters", Verdict.OK, "none")

    def _depth(self, queue: str) -> int:
        """Messages waiting in ``queue``: its list and its priority lists."""
        assert self.broker is not None
        pipe = self.broker.pipeline(transaction=False)
        pipe.llen(queue)
        for step in PRIORITY_STEPS:
            if step:
                pipe.llen(f"{queue}{PRIORITY_SEPARATOR}{step}")
        return sum(int(n) for n in pipe.execute())


def _timed(call: Callable[[], Any]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
