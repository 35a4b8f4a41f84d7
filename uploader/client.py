"""The client API backend services use: submit, status, wait, resume, cancel, list.

The client sends tasks by name (it never imports the worker code) and reads progress straight
from the checkpoint in Redis, so ``status`` costs one Redis round trip and works while every
worker is busy.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import Any

import redis
from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult
from kombu.exceptions import OperationalError

from uploader import contract
from uploader.checkpoint import CheckpointStore, UploadRecord
from uploader.checkpoint.store import Refusal, UploadLifecycle
from uploader.config import Settings, get_settings, redact_url
from uploader.errors import (
    InvalidRequest,
    NoWorkers,
    Unreachable,
    UploadCancelled,
    UploadFailed,
    UploaderError,
    UploadNotFound,
    UploadRefused,
    error_classes,
)
from uploader.request import parse_request


#: Seconds between checkpoint polls while waiting: the first polls come quickly (a small upload
#: finishes in milliseconds), then back off to the longest interval. A poll is one Redis read.
FIRST_POLL_INTERVAL = 0.002
POLL_INTERVAL = 0.1
#: Seconds an interactive client (the CLI) waits for Redis before it gives up.
INTERACTIVE_TIMEOUT = 3.0


#: Seconds a watch tolerates Redis being unreachable once it has started (a Redis restart)
#: before it gives up with :class:`~uploader.errors.Unreachable`.
WATCH_OUTAGE_GRACE = 30
#: How often (seconds) a watch checks that some worker is alive.
WORKER_CHECK_INTERVAL = 2.0


@dataclass(frozen=True)
class UploadStatus(UploadLifecycle):
    """What ``status`` reports. ``state`` is one of creating, uploading, completing, completed,
    failed, cancelled, or refused (the request was refused before anything was created; ``error``
    says why)."""

    upload_id: str
    state: str
    source: str
    bucket: str
    key: str
    size: int
    bytes_done: int
    parts_done: int
    part_count: int
    part_size: int
    error: str
    final_etag: str
    verified: str
    created: float
    updated: float
    finished: float | None
    bytes_sent: int
    #: A failed upload the reconciler will resume by itself at this time (a transient failure,
    #: such as an S3 outage longer than the part retries); None when nothing more will happen.
    retry_at: float | None
    auto_resumes: int
    #: When the workers' recovery (reconciler, automatic resumes) last ran, and on which worker.
    recovery_ran_at: float | None = None
    recovery_leader: str = ""
    #: A refused request: the class name of the coordinator's error (SourceError, ...).
    refusal_kind: str = ""

    @property
    def terminal(self) -> bool:
        return self.state == "refused" or super().terminal

    @classmethod
    def from_record(cls, record: UploadRecord, **extra: Any) -> UploadStatus:
        values = {f.name: getattr(record, f.name) for f in fields(cls) if hasattr(record, f.name)}
        if record.state == "completed":  # a single PUT records no parts
            values.update(parts_done=record.part_count, bytes_done=record.size)
        return cls(**values, **extra)

    @classmethod
    def from_refusal(cls, upload_id: str, refusal: Refusal) -> UploadStatus:
        return cls(
            upload_id=upload_id, state="refused", source="", bucket="", key="", size=0, bytes_done=0,
            parts_done=0, part_count=0, part_size=0, error=refusal.reason, final_etag="", verified="",
            created=refusal.at, updated=refusal.at, finished=refusal.at, bytes_sent=0, retry_at=None,
            auto_resumes=0, refusal_kind=refusal.kind,
        )

    def refusal_error(self) -> UploaderError:
        """A refused request's error, as the class the coordinator raised."""
        cls = _ERRORS.get(self.refusal_kind, UploadRefused)
        return cls(f"upload {self.upload_id} was {self.error}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _ClientCelery(Celery):
    """The client's Celery app, which subscribes to a task's result only when someone waits for it.

    Celery's Redis result backend subscribes to a task's result channel as the task is sent
    (``on_task_call``): a round trip in every ``submit``, and a subscription held for as long as
    the handle lives, whether or not anyone ever asks for the result. ``AsyncResult.get``
    subscribes by itself and then reads the stored result, so a result that came first is not
    missed: subscribing there is enough."""

    def _get_backend(self) -> Any:
        backend = super()._get_backend()
        if hasattr(backend, "result_consumer"):  # the asynchronous (pub/sub) backends
            backend.on_task_call = _subscribe_when_waited_for
        return backend


def _subscribe_when_waited_for(producer: Any, task_id: str) -> None:
    """In place of the backend's ``on_task_call``: nothing to do when a task is sent."""


class Uploader:
    """Entry point: ``Uploader.from_env().submit("/data/big.bin", "s3://bucket/key")``.

    Redis errors reach the caller as :class:`~uploader.errors.Unreachable`, naming the setting to
    check. ``interactive`` (the CLI) gives up on an unreachable Redis within a few seconds
    instead of riding out a restart for ``UPLOADER_REDIS_RECONNECT_ATTEMPTS``."""

    def __init__(self, settings: Settings, *, interactive: bool = False) -> None:
        self.settings = settings
        self.interactive = interactive
        self.celery = _ClientCelery("uploader-client", set_as_current=False)
        self.celery.conf.update(contract.celery_config(settings))
        if interactive:
            self.celery.conf.update(
                broker_connection_timeout=INTERACTIVE_TIMEOUT,
                broker_connection_retry=False,
                broker_connection_max_retries=1,
                task_publish_retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.5, "interval_max": 0.5},
                redis_socket_connect_timeout=INTERACTIVE_TIMEOUT,
                redis_socket_timeout=INTERACTIVE_TIMEOUT,
            )
        self.checkpoint = CheckpointStore.from_settings(
            settings,
            reconnect_attempts=1 if interactive else None,
            timeout=INTERACTIVE_TIMEOUT if interactive else None,
        )

    @classmethod
    def from_env(cls, *, interactive: bool = False) -> Uploader:
        return cls(get_settings(), interactive=interactive)

    @contextmanager
    def reaching(self) -> Iterator[None]:
        """Redis and broker errors as :class:`Unreachable`, with the setting that names them."""
        try:
            yield
        except OperationalError as exc:
            raise Unreachable(
                f"cannot reach the broker at {redact_url(self.settings.broker_url)} (UPLOADER_BROKER_URL): {_first_line(exc)}"
            ) from None
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, ConnectionError) as exc:
            setting = "UPLOADER_CHECKPOINT_URL" if self.settings.checkpoint_url else "UPLOADER_BROKER_URL"
            raise Unreachable(
                f"cannot reach Redis at {redact_url(self.settings.effective_checkpoint_url)} ({setting}): {_first_line(exc)}"
            ) from None
        except redis.AuthenticationError as exc:
            raise Unreachable(f"Redis refused the credentials in the URL (UPLOADER_BROKER_URL / UPLOADER_CHECKPOINT_URL): {_first_line(exc)}") from None

    def close(self) -> None:
        self.celery.close()
        self.checkpoint.redis.close()

    # -- commands ------------------------------------------------------------------------------
    def submit(self, source: str, destination: str, *, accept_timeout: float | None = None, **options: Any) -> UploadHandle:
        """Validate and enqueue an upload of ``source`` to ``destination`` (``s3://bucket/key``).

        ``options``: ``upload_id`` (idempotency key), ``part_size`` (bytes), ``metadata``,
        ``content_type``, ``abort_on_failure``. Raises :class:`~uploader.errors.InvalidRequest`
        at once for malformed requests. Problems only a worker can see (a missing file, a
        missing bucket) are the coordinator's refusal: with ``accept_timeout`` this waits that
        long for the coordinator to accept the request and raises its refusal
        (:class:`TimeoutError` if no worker answered); otherwise they surface from
        :meth:`UploadHandle.accepted` or :meth:`UploadHandle.wait`.
        """
        bucket, key = parse_s3_url(destination)
        request = parse_request({"source": source, "bucket": bucket, "key": key, **options})
        kwargs = request.model_dump(exclude_none=True)
        with self.reaching():
            result = self.celery.send_task(contract.START_UPLOAD, kwargs=kwargs)
        handle = UploadHandle(self, kwargs["upload_id"], result)
        if accept_timeout:
            handle.accepted(accept_timeout)
        return handle

    def status(self, upload_id: str) -> UploadStatus:
        """The upload's status; a refused request's reason (state ``refused``) for a day
        (``UPLOADER_REFUSAL_RETENTION_SECONDS``); :class:`UploadNotFound` otherwise."""
        status = self._poll(upload_id, None)
        if status is None:
            raise UploadNotFound(f"no upload {upload_id!r} (never submitted, or expired)")
        return status

    def live_workers(self) -> list[str]:
        """The worker incarnations alive now (their heartbeats)."""
        with self.reaching():
            return self.checkpoint.live_workers()

    def resume(
        self,
        upload_id: str,
        *,
        restart: bool = False,
        timeout: float = 60,
        source: str | None = None,
        destination: str | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """Continue an upload from its checkpoint; returns what was dispatched. Raises
        :class:`~uploader.errors.SourceChanged` if the source changed (pass ``restart=True`` to
        abort the old multipart upload and start over).

        If the checkpoint is gone (expired, or lost with Redis) but the multipart upload is still
        on the server, give the original ``source``, ``destination`` and ``options`` (at least the
        same ``part_size`` if one was given): the checkpoint is rebuilt from ListParts, keeping
        every part whose size and MD5 match the source, and only the rest is sent."""
        with self.reaching():
            exists = self.checkpoint.get(upload_id) is not None
        if not exists:
            if source is None or destination is None:
                raise UploadNotFound(
                    f"no checkpoint for upload {upload_id!r} (never submitted, refused, expired or lost). If "
                    "its checkpoint was lost, resume it with its source and destination (CLI: uploader resume "
                    f"{upload_id} --source PATH --to s3://BUCKET/KEY [--part-size SIZE]): the parts already "
                    "on the server are found and kept"
                )
            handle = self.submit(source, destination, upload_id=upload_id, **options)
            handle.accepted(timeout)
            record = self.checkpoint.get(upload_id)
            found = record.parts_done if record is not None else 0
            return {
                "upload_id": upload_id,
                "dispatched": "parts",
                "parts": (record.part_count - found) if record is not None else 0,
                "reason": f"checkpoint rebuilt; {found} parts found on the server",
            }
        with self.reaching():
            result = self.celery.send_task(contract.RESUME_UPLOAD, kwargs={"upload_id": upload_id, "restart": restart})
            return _task_outcome(result, timeout)

    def cancel(self, upload_id: str, *, timeout: float = 60) -> str:
        """Cancel: dispatching stops, the multipart upload is aborted, the state is ``cancelled``."""
        status = self.status(upload_id)
        if status.state == "refused":
            raise UploadNotFound(f"upload {upload_id} was refused ({status.error}); there is nothing to cancel")
        with self.reaching():
            result = self.celery.send_task(contract.CANCEL_UPLOAD, kwargs={"upload_id": upload_id})
            return _task_outcome(result, timeout)

    def janitor(self, *, dry_run: bool = False, timeout: float = 120) -> list[dict[str, str]]:
        """Run the janitor now on a worker (clients hold no S3 credentials): the abandoned uploads
        it removed (or, ``dry_run``, would remove)."""
        with self.reaching():
            result = self.celery.send_task(contract.JANITOR, kwargs={"dry_run": dry_run})
            return _task_outcome(result, timeout)

    def list(self, limit: int = 100) -> list[UploadStatus]:
        """The most recent uploads, newest first."""
        out = []
        with self.reaching():
            for upload_id in self.checkpoint.list_ids(limit):
                record = self.checkpoint.get(upload_id)
                if record is not None:
                    out.append(UploadStatus.from_record(record))
        return out

    def wait(self, upload_id: str, *, timeout: float | None = None, start: AsyncResult | None = None) -> UploadStatus:
        """Block until the upload is completed; return its final status.

        Keeps waiting through a transient failure the reconciler will resume (``retry_at``).
        Raises :class:`UploadFailed` / :class:`UploadCancelled` when it ends otherwise,
        :class:`UploadRefused` (or the coordinator's own error) when the request was refused,
        :class:`NoWorkers` when no worker has been alive for ``UPLOADER_NO_WORKER_SECONDS``,
        and :class:`TimeoutError` at the deadline."""
        last = None
        for status in self.watch(upload_id, timeout=timeout, start=start):
            last = status
        assert last is not None
        if last.state == "failed":
            raise UploadFailed(f"upload {upload_id} failed: {last.error}")
        if last.state == "cancelled":
            raise UploadCancelled(f"upload {upload_id} was cancelled")
        if last.state == "refused":
            raise last.refusal_error()
        return last

    def watch(
        self, upload_id: str, *, timeout: float | None = None, start: AsyncResult | None = None
    ) -> Iterator[UploadStatus]:
        """Yield the status every poll interval until it is terminal (the last one yielded).

        Ends with an error rather than wait for ever: the start task's refusal, no live worker
        for ``UPLOADER_NO_WORKER_SECONDS`` (:class:`NoWorkers`), Redis unreachable for
        :data:`WATCH_OUTAGE_GRACE` seconds once the watch has started (:class:`Unreachable`), or
        the ``timeout`` (:class:`TimeoutError`)."""
        now = time.monotonic()
        deadline = None if timeout is None else now + timeout
        interval = FIRST_POLL_INTERVAL
        status = None
        outage_since: float | None = None
        workers = _WorkerWatch(self, now)
        while True:
            try:
                status = self._poll(upload_id, start)
                outage_since = None
            except Unreachable:
                now = time.monotonic()
                if status is None or (outage_since is not None and now - outage_since > WATCH_OUTAGE_GRACE):
                    raise
                outage_since = outage_since or now
            else:
                if status is not None:
                    yield status
                    if status.terminal:
                        return
                workers.check(upload_id, status)
            if deadline is not None and time.monotonic() > deadline:
                last = (
                    f"{status.state}, {status.parts_done}/{status.part_count} parts"
                    + (f", error: {status.error}" if status.error else "")
                    if status is not None
                    else "not accepted by a coordinator yet: is a worker running?"
                )
                raise TimeoutError(f"upload {upload_id} did not finish within {timeout} s ({last})")
            time.sleep(interval)
            interval = min(POLL_INTERVAL, interval * 1.5)

    def _poll(self, upload_id: str, start: AsyncResult | None) -> UploadStatus | None:
        """The status now; None while the request waits for a coordinator; the start task's error
        if it refused the request before noting anything."""
        with self.reaching():
            record, recovery = self.checkpoint.get_with_recovery(upload_id)
            if record is not None:
                return UploadStatus.from_record(
                    record, recovery_ran_at=recovery.reconciled_at, recovery_leader=recovery.leader
                )
            refusal = self.checkpoint.refusal(upload_id)
            if refusal is not None:
                return UploadStatus.from_refusal(upload_id, refusal)
            if start is not None and start.ready():
                if start.failed():
                    raise _task_error(start)
                # Accepted, yet no record: it was lost (a Redis restored without it, an
                # asynchronous failover) or has expired.
                raise UploadNotFound(
                    f"upload {upload_id} was accepted, but its checkpoint is gone (lost with Redis, or "
                    f"expired): resume it with `uploader resume {upload_id} --source PATH --to s3://BUCKET/KEY`"
                )
        return None


class _WorkerWatch:
    """While a watch waits: whether any worker is alive, checked every few seconds; raises
    :class:`NoWorkers` once none has been for ``no_worker_seconds``."""

    def __init__(self, uploader: Uploader, now: float) -> None:
        self.uploader = uploader
        self.limit = uploader.settings.no_worker_seconds
        self.last_seen = now
        self.checked = 0.0

    def check(self, upload_id: str, status: UploadStatus | None) -> None:
        now = time.monotonic()
        if not self.limit or now - self.checked < WORKER_CHECK_INTERVAL:
            return
        self.checked = now
        if self.uploader.live_workers():
            self.last_seen = now
        elif now - self.last_seen > self.limit:
            where = f"{status.state}, {status.parts_done}/{status.part_count} parts" if status else "not accepted yet"
            raise NoWorkers(
                f"upload {upload_id} is waiting ({where}), but no worker has been alive for "
                f"{self.limit:.0f} s: start one (uploader worker) with the same UPLOADER_BROKER_URL; "
                "the upload goes on when one runs"
            )


class UploadHandle:
    """A submitted upload."""

    def __init__(self, uploader: Uploader, upload_id: str, start: AsyncResult) -> None:
        self.uploader = uploader
        self.upload_id = upload_id
        self.start = start

    def status(self) -> UploadStatus:
        return self.uploader.status(self.upload_id)

    def wait(self, timeout: float | None = None) -> UploadStatus:
        return self.uploader.wait(self.upload_id, timeout=timeout, start=self.start)

    def watch(self, timeout: float | None = None) -> Iterator[UploadStatus]:
        return self.uploader.watch(self.upload_id, timeout=timeout, start=self.start)

    def accepted(self, timeout: float = 60) -> str:
        """Wait for the coordinator to accept the request; raises its error if it refused, and
        :class:`TimeoutError` if no worker answered within ``timeout``."""
        with self.uploader.reaching():
            return _task_outcome(self.start, timeout)

    def resume(self, **kwargs: Any) -> dict[str, Any]:
        return self.uploader.resume(self.upload_id, **kwargs)

    def cancel(self, **kwargs: Any) -> str:
        return self.uploader.cancel(self.upload_id, **kwargs)

    def __repr__(self) -> str:
        return f"UploadHandle({self.upload_id!r})"


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``(bucket, key)``."""
    if not url.startswith("s3://"):
        raise InvalidRequest(f"destination {url!r} must look like s3://bucket/key")
    bucket, _, key = url[len("s3://") :].partition("/")
    return bucket, key


def _task_outcome(result: AsyncResult, timeout: float) -> Any:
    """The task's return value, or its error as one of our exception classes."""
    try:
        value = result.get(timeout=timeout, propagate=False)
    except CeleryTimeoutError:
        if result.state == "RETRY":
            # A worker took the task and is retrying it: what it cannot reach is the answer.
            raise Unreachable(
                f"no answer within {timeout:g} s: the worker is retrying after {_first_line(result.info)} "
                "(S3 unreachable or refusing: check UPLOADER_S3_ENDPOINT_URL and the workers' network)"
            ) from None
        raise TimeoutError(
            f"no worker answered within {timeout:g} s: is a worker running (uploader worker) "
            "and connected to the same broker?"
        ) from None
    if result.failed():
        raise _task_error(result)
    return value


_ERRORS = error_classes()


def _task_error(result: AsyncResult) -> Exception:
    """The task's exception as one of our classes (clients need not share the worker's code)."""
    exc = result.result
    if isinstance(exc, UploaderError):
        return exc
    cls = _ERRORS.get(type(exc).__name__, UploaderError)
    return cls(str(exc))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
