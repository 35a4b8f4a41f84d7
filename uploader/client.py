"""The client API backend services use: submit, status, wait, resume, cancel, list.

The client sends tasks by name (it never imports the worker code) and reads progress straight
from the checkpoint in Redis, so ``status`` costs one Redis round trip and works while every
worker is busy.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import redis

from uploader import auth, contract, locality, signing
from uploader.auth import Capability
from uploader.capabilities import CapabilityStore
from uploader.checkpoint import CheckpointStore, UploadRecord
from uploader.checkpoint.outbox import Delivery, Outbox
from uploader.checkpoint.store import Refusal
from uploader.config import Settings, get_settings, redact_url
from uploader.errors import (
    InvalidRequest,
    NotAuthorized,
    NoWorkers,
    Unreachable,
    UploadCancelled,
    UploaderError,
    UploadFailed,
    UploadNotFound,
    UploadRefused,
    error_classes,
)
from uploader.ids import check_upload_id
from uploader.model import UploadState, UploadSummary
from uploader.priority import message_priority
from uploader.redis_tls import explain_connection_error

if TYPE_CHECKING:
    from celery import Celery
    from celery.result import AsyncResult

    from uploader.batch.request import BatchRequest
    from uploader.batch.status import BatchStatus

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


@dataclass(frozen=True, kw_only=True)
class UploadStatus(UploadSummary):
    """What ``status`` reports: the record's :class:`~uploader.model.UploadSummary` (declare a
    field there to show it), and what the client adds. ``state`` is one of creating, uploading,
    completing, completed, failed, cancelled, or refused (the request was refused before
    anything was created; ``error`` says why)."""

    #: Bytes of the parts being sent now, as far as they got (workers report every few MiB):
    #: ``bytes_done + bytes_sending`` is how far the upload is, within a part.
    bytes_sending: int = 0
    #: When the workers' recovery (reconciler, automatic resumes) last ran, and on which worker.
    recovery_ran_at: float | None = None
    recovery_leader: str = ""
    #: A refused request: the class name of the coordinator's error (SourceError, ...).
    refusal_kind: str = ""
    #: The delivery of the notifications the latest terminal transition wrote (webhook, task):
    #: attempts, last HTTP status, next attempt, delivered at (uploader/checkpoint/outbox.py).
    notifications: tuple[Delivery, ...] = ()

    @property
    def terminal(self) -> bool:
        return self.state == "refused" or super().terminal

    @classmethod
    def from_record(cls, record: UploadRecord, **extra: Any) -> UploadStatus:
        values = {f.name: getattr(record, f.name) for f in fields(UploadSummary)}
        if record.state == UploadState.COMPLETED:  # a single PUT records no parts
            values.update(parts_done=record.part_count, bytes_done=record.size)
        return cls(**values, **extra)

    @classmethod
    def from_refusal(cls, upload_id: str, refusal: Refusal) -> UploadStatus:
        return cls(
            upload_id=upload_id, state="refused", error=refusal.reason, created=refusal.at, updated=refusal.at,
            finished=refusal.at, refusal_kind=refusal.kind,
        )

    def refusal_error(self) -> UploaderError:
        """A refused request's error, as the class the coordinator raised."""
        cls = _ERRORS.get(self.refusal_kind, UploadRefused)
        return cls(f"upload {self.upload_id} was {self.error}")

    def to_dict(self) -> dict[str, Any]:
        """The fields, and ``result`` (``null`` until completed)."""
        result = self.result
        return {**asdict(self), "result": result.to_dict() if result else None}


#: ``list`` with states looks through at most this many recent uploads, reading this many at a time.
LIST_SCAN_LIMIT = 10_000
LIST_PAGE = 200
#: The shortest id prefix ``resolve_id`` looks up (shorter ones are taken as whole ids).
MIN_ID_PREFIX = 4


def _client_celery(settings: Settings, interactive: bool) -> Celery:
    """The client's Celery app (made when the client first sends a task or reads a result:
    ``status``, ``list`` and ``watch`` need only Redis, and start without Celery)."""
    from celery import Celery

    class ClientCelery(Celery):
        """Subscribes to a task's result only when someone waits for it.

        Celery's Redis result backend subscribes to a task's result channel as the task is sent
        (``on_task_call``): a round trip in every ``submit``, and a subscription held for as long
        as the handle lives, whether or not anyone ever asks for the result. ``AsyncResult.get``
        subscribes by itself and then reads the stored result, so a result that came first is
        not missed: subscribing there is enough."""

        def _get_backend(self) -> Any:
            backend = super()._get_backend()
            if hasattr(backend, "result_consumer"):  # the asynchronous (pub/sub) backends
                backend.on_task_call = _subscribe_when_waited_for
            return backend

    app = ClientCelery("uploader-client", set_as_current=False)
    app.conf.update(contract.celery_config(settings))
    # Publish by queue name only: the workers declare the queues (clients' Redis user may not).
    app.conf.update(task_queues=contract.task_queues(declare=False, lanes=settings.part_lanes, arguments=contract.queue_arguments(settings)))
    # No task-sent events from clients: each process would appear in Flower (and in its
    # metrics' ``worker`` label) as a worker of its own, ``gen<pid>@host``, one more per CLI
    # call. Flower learns of a submitted task when a worker receives it.
    app.conf.update(task_send_sent_event=False)
    # Message signing, if the deployment turned it on: every message this client sends is signed.
    signing.enable(app, settings)
    if interactive:
        app.conf.update(
            broker_connection_timeout=INTERACTIVE_TIMEOUT,
            broker_connection_retry=False,
            broker_connection_max_retries=1,
            task_publish_retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.5, "interval_max": 0.5},
            redis_socket_connect_timeout=INTERACTIVE_TIMEOUT,
            redis_socket_timeout=INTERACTIVE_TIMEOUT,
        )
    return app


def _subscribe_when_waited_for(producer: Any, task_id: str) -> None:
    """In place of the backend's ``on_task_call``: nothing to do when a task is sent."""


class Uploader:
    """Entry point: ``Uploader.from_env().submit("/data/big.bin", "s3://bucket/key")``.

    Redis errors reach the caller as :class:`~uploader.errors.Unreachable`, naming the setting to
    check. ``interactive`` (the CLI) gives up on an unreachable Redis within a few seconds
    instead of riding out a restart for ``UPLOADER_REDIS_RECONNECT_ATTEMPTS``."""

    def __init__(
        self, settings: Settings, *, interactive: bool = False, capabilities: CapabilityStore | None = None
    ) -> None:
        """``capabilities``: where to keep the capability tokens of uploads this client submits
        and find them for ``cancel``/``resume`` (the CLI keeps them on disk); by default this
        object remembers them (and each :class:`UploadHandle` holds its own)."""
        self.settings = settings
        self.interactive = interactive
        self.capabilities = capabilities or CapabilityStore()
        self.checkpoint = CheckpointStore.from_settings(
            settings,
            reconnect_attempts=1 if interactive else None,
            timeout=INTERACTIVE_TIMEOUT if interactive else None,
        )
        if settings.message_signing:
            # Signing settings are checked as the app is made: a misconfigured client says so
            # at once, whatever command it runs (the app is otherwise made at first use).
            _ = self.celery

    @functools.cached_property
    def celery(self) -> Celery:
        """The Celery app this client sends tasks with (made at first use)."""
        return _client_celery(self.settings, self.interactive)

    @classmethod
    def from_env(cls, *, interactive: bool = False, capabilities: CapabilityStore | None = None) -> Uploader:
        return cls(get_settings(), interactive=interactive, capabilities=capabilities)

    @contextmanager
    def reaching(self) -> Iterator[None]:
        """Redis and broker errors as :class:`Unreachable`, with the setting that names them."""
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, ConnectionError) as exc:
            setting = "UPLOADER_CHECKPOINT_URL" if self.settings.checkpoint_url else "UPLOADER_BROKER_URL"
            raise Unreachable(self._unreachable(exc, self.settings.effective_checkpoint_url, "Redis", setting)) from None
        except redis.AuthenticationError as exc:
            raise Unreachable(f"Redis refused the credentials in the URL (UPLOADER_BROKER_URL / UPLOADER_CHECKPOINT_URL): {_first_line(exc)}") from None
        except Exception as exc:
            from kombu.exceptions import OperationalError  # (loaded with Celery, when a task was sent)

            if isinstance(exc, OperationalError):
                raise Unreachable(self._unreachable(exc, self.settings.broker_url, "the broker", "UPLOADER_BROKER_URL")) from None
            raise

    def _unreachable(self, exc: BaseException, url: str, what: str, setting: str) -> str:
        """One line: what could not be reached, why, and (for TLS) which setting to fix."""
        hint = explain_connection_error(exc, url, self.settings)
        return f"cannot reach {what} at {redact_url(url)} ({setting}): " + (hint or _first_line(exc))

    def close(self) -> None:
        if "celery" in self.__dict__:
            self.celery.close()
        self.checkpoint.redis.close()

    # -- commands ------------------------------------------------------------------------------
    def submit(self, source: str, destination: str, *, accept_timeout: float | None = None, **options: Any) -> UploadHandle:
        """Validate and enqueue an upload of ``source`` to ``destination`` (``s3://bucket/key``).

        ``options``: ``upload_id`` (idempotency key), ``part_size`` (bytes), ``abort_on_failure``,
        ``endpoint`` (a named endpoint of the workers, ``UPLOADER_ENDPOINTS``), ``source_endpoint``
        (the one an ``s3://bucket/key`` source is read from),
        ``checksum_algorithm``, ``priority`` (0-9, 9 most urgent: see the README's "Priorities"),
        and the object's options (:class:`~uploader.model.ObjectOptions`:
        ``content_type``, ``metadata``, ``acl``, ``storage_class``, ``tags``, ``sse``,
        ``no_overwrite``... see the README's "Object options"). Raises :class:`~uploader.errors.InvalidRequest`
        at once for malformed requests. Problems only a worker can see (a missing file, a
        missing bucket) are the coordinator's refusal: with ``accept_timeout`` this waits that
        long for the coordinator to accept the request and raises its refusal
        (:class:`TimeoutError` if no worker answered); otherwise they surface from
        :meth:`UploadHandle.accepted` or :meth:`UploadHandle.wait`.
        """
        kwargs, capability, wanted = self._start_kwargs(source, destination, options)
        host = kwargs.get("host", "")
        if host:
            self.check_host(host)
        # Before the message: an upload must never exist whose token was not kept.
        self.capabilities.save(kwargs["upload_id"], capability.token)
        with self.reaching():
            result = self.celery.send_task(
                contract.START_UPLOAD, kwargs=kwargs, priority=message_priority(wanted, self.settings.broker_url),
                # A host-local upload starts on its host: only the workers there can read its file.
                **({"queue": contract.host_queue(host)} if host else {}),
            )
        handle = UploadHandle(self, kwargs["upload_id"], result, token=capability.token)
        if accept_timeout:
            handle.accepted(accept_timeout)
        return handle

    def check_submission(self, source: str, destination: str, **options: Any) -> dict[str, Any]:
        """What :meth:`submit` would send for these arguments, validated as it validates them
        (:class:`~uploader.errors.InvalidRequest`), without sending anything or keeping a
        capability (``submit --dry-run``). The request's capability digest is left out."""
        kwargs, _, _ = self._start_kwargs(source, destination, options)
        kwargs.pop("capability", None)
        return kwargs

    def submit_many(
        self, uploads: Iterable[tuple[str, str] | tuple[str, str, dict[str, Any]]], *, accept_timeout: float | None = None
    ) -> list[UploadHandle]:
        """Validate and enqueue many uploads, each ``(source, destination)`` or ``(source,
        destination, options)`` with the options of :meth:`submit`, in as few messages as
        possible: one ``uploader.start_many`` per :data:`~uploader.contract.MAX_UPLOADS_PER_MESSAGE`
        uploads. Meant for many small files: a worker starts a whole message's uploads at once
        and sends their objects in groups, a task per group rather than per file.

        Returns a handle per upload, in order; each is an ordinary upload (``status``, ``wait``,
        ``cancel``, ``resume`` by its upload id). Raises :class:`~uploader.errors.InvalidRequest`
        at once, before anything is sent, if any request is malformed. A request the workers
        refuse is refused alone: its handle's :meth:`~UploadHandle.accepted` and ``wait`` raise
        why; with ``accept_timeout`` this waits for every message to be accepted and raises the
        first refusal."""
        # Host-local uploads start on their host (uploader/locality.py): one series of messages per host.
        by_host: dict[str, list[tuple[int, tuple[dict[str, Any], Capability, int | None]]]] = {}
        count = 0
        for count, entry in enumerate(uploads, 1):
            source, destination, options = (*entry, {}) if len(entry) == 2 else entry
            message = self._start_kwargs(source, destination, dict(options))
            by_host.setdefault(message[0].get("host", ""), []).append((count - 1, message))
        for host in by_host:
            if host:
                self.check_host(host)
        placed: list[UploadHandle | None] = [None] * count
        step = contract.MAX_UPLOADS_PER_MESSAGE
        for host, messages in by_host.items():
            where = {"queue": contract.host_queue(host)} if host else {}
            for first in range(0, len(messages), step):
                chunk = messages[first : first + step]
                # Before the message: an upload must never exist whose token was not kept.
                for _, (kwargs, capability, _) in chunk:
                    self.capabilities.save(kwargs["upload_id"], capability.token)
                wanted = [p for _, (_, _, p) in chunk if p is not None]
                with self.reaching():
                    result = self.celery.send_task(
                        contract.START_MANY, kwargs={"uploads": [kwargs for _, (kwargs, _, _) in chunk]},
                        priority=message_priority(max(wanted) if wanted else None, self.settings.broker_url), **where,
                    )
                for index, (at, (kwargs, capability, _)) in enumerate(chunk):
                    placed[at] = UploadHandle(self, kwargs["upload_id"], result, token=capability.token, index=index)
        handles = [handle for handle in placed if handle is not None]
        if accept_timeout:
            for handle in handles:
                handle.accepted(accept_timeout)
        return handles

    def check_host(self, host: str) -> None:
        """Raise :class:`NoWorkerOnHost` unless a worker of ``host`` is alive (a host-local
        upload's file can be read nowhere else: uploader/locality.py)."""
        with self.reaching():
            locality.require_worker(self.checkpoint, host)

    def _start_kwargs(self, source: str, destination: str, options: dict[str, Any]) -> tuple[dict[str, Any], Capability, int | None]:
        """A start request's kwargs (validated here: :class:`InvalidRequest`), its capability
        (the one kept for its upload id, if it is resubmitted) and its priority. A host-local
        request (``locality="host"``) that names no host is for this one (``UPLOADER_HOST_NAME``)."""
        if options.get("locality") == locality.Locality.HOST and not options.get("host"):
            options = {**options, "host": self.settings.host_name}
        bucket, key = parse_s3_url(destination)
        if not key or key.endswith("/"):
            key += source_name(source)  # s3://bucket/prefix/ keeps the file's name, as `aws s3 cp` does
        # Submitting an upload id again (an idempotent retry) must carry the same capability.
        kept = self.capabilities.load(options["upload_id"]) if options.get("upload_id") else None
        capability = Capability.of(kept) if kept else Capability.new()
        from uploader.request import parse_request  # (the request model: loaded by the first submit)

        request = parse_request(
            {"source": source, "bucket": bucket, "key": key, "capability": capability.digest, **options}
        )
        return request.to_message(), capability, request.priority

    def submit_batch(
        self, source: str, destination: str, *, include: list[str] | tuple[str, ...] = (),
        exclude: list[str] | tuple[str, ...] = (), skip_unchanged: bool = False, page_size: int | None = None,
        batch_id: str | None = None, accept_timeout: float | None = None, **options: Any,
    ) -> BatchHandle:
        """Upload every file of the directory ``source`` (an absolute path the workers can read,
        beneath their source roots) to ``destination`` (``s3://bucket/prefix/``): one upload per
        file, its key the prefix and the file's path relative to ``source``. ``include`` and
        ``exclude``: globs on that relative path (see :class:`uploader.sources.directory.Selector`);
        ``skip_unchanged``: leave out files whose object matches already (see :mod:`uploader.batch`);
        ``options``: what :meth:`submit` takes, for every upload. With ``accept_timeout``, waits
        that long for a worker to accept the batch (raising its refusal)."""
        kept = self.capabilities.load(batch_id) if batch_id else None
        capability = Capability.of(kept) if kept else Capability.new()
        request = self.check_batch(
            source, destination, include=include, exclude=exclude, skip_unchanged=skip_unchanged, page_size=page_size,
            batch_id=batch_id, capability=capability.digest, **options,
        )
        assert request.batch_id is not None
        message = request.model_dump(mode="json", exclude_none=True)
        host = request.local_host
        if host:
            self.check_host(host)
        self.capabilities.save(request.batch_id, capability.token)
        with self.reaching():
            result = self.celery.send_task(
                contract.START_BATCH, kwargs=message, **({"queue": contract.host_queue(host)} if host else {})
            )
        handle = BatchHandle(self, request.batch_id, result, token=capability.token)
        if accept_timeout:
            handle.accepted(accept_timeout)
        return handle

    def check_batch(
        self, source: str, destination: str, *, include: list[str] | tuple[str, ...] = (),
        exclude: list[str] | tuple[str, ...] = (), skip_unchanged: bool = False, page_size: int | None = None,
        batch_id: str | None = None, capability: str | None = None, **options: Any,
    ) -> BatchRequest:
        """The batch request :meth:`submit_batch` would send, validated as it validates it
        (:class:`~uploader.errors.InvalidRequest`), without sending anything (``submit -r --dry-run``)."""
        from uploader.batch.request import parse_batch_request

        bucket, prefix = parse_s3_url(destination)
        if options.get("locality") == locality.Locality.HOST and not options.get("host"):
            options = {**options, "host": self.settings.host_name}
        kwargs: dict[str, Any] = {
            "source": source, "bucket": bucket, "prefix": prefix, "include": list(include), "exclude": list(exclude),
            "skip_unchanged": skip_unchanged, "options": options,
        }
        for name, value in (("capability", capability), ("page_size", page_size), ("batch_id", batch_id)):
            if value is not None:
                kwargs[name] = value
        return parse_batch_request(kwargs)

    def find_batch(self, batch_id: str, *, completed: dict[str, int] | None = None) -> BatchStatus | None:
        """The batch's aggregate status (:class:`uploader.batch.BatchStatus`), a refused batch's
        reason, or ``None`` if there is no batch ``batch_id`` (an upload id, say). ``completed``:
        see :func:`uploader.batch.status.batch_status` (what a poller keeps between its reads)."""
        from uploader.batch.status import batch_status
        from uploader.checkpoint.batches import BatchStore

        check_upload_id(batch_id)
        with self.reaching():
            return batch_status(BatchStore(self.checkpoint), batch_id, completed)

    def batch_status(self, batch_id: str) -> BatchStatus:
        status = self.find_batch(batch_id)
        if status is None:
            raise UploadNotFound(f"no batch {batch_id!r} (never submitted, not accepted yet, or expired)")
        return status

    def wait_batch(self, batch_id: str, *, timeout: float | None = None, start: AsyncResult | None = None) -> BatchStatus:
        """Poll until every file of the batch has ended; its final status (whatever it is: the
        caller reads ``state`` and ``failures``). A refused batch raises its refusal;
        :class:`TimeoutError` at the deadline."""
        deadline = None if timeout is None else time.monotonic() + timeout
        completed: dict[str, int] = {}  # read once each: a completed upload stays completed
        while True:
            status = self.find_batch(batch_id, completed=completed)
            if status is None and start is not None and start.ready() and start.failed():
                raise _task_error(start)
            if status is not None and status.terminal:
                if status.state == "refused":
                    raise UploadRefused(f"batch {batch_id} was {status.error}")
                return status
            if deadline is not None and time.monotonic() > deadline:
                where = f"{status.state}, {status.files_done}/{status.files_total} files" if status else "not accepted yet"
                raise TimeoutError(f"batch {batch_id} did not finish within {timeout} s ({where})")
            time.sleep(POLL_INTERVAL)

    def cancel_batch(self, batch_id: str, *, timeout: float = 120, token: str | None = None) -> dict[str, Any]:
        """Cancel a batch: its listing stops and its uploads not completed yet are cancelled."""
        return self._batch_command(contract.CANCEL_BATCH, batch_id, timeout, token)

    def resume_batch(self, batch_id: str, *, timeout: float = 120, token: str | None = None) -> dict[str, Any]:
        """Resume a batch: its failed uploads, the files whose start was refused, a stalled listing."""
        return self._batch_command(contract.RESUME_BATCH, batch_id, timeout, token)

    def _batch_command(self, task: str, batch_id: str, timeout: float, token: str | None) -> dict[str, Any]:
        check_upload_id(batch_id)
        kwargs = self._with_authority(task, {"batch_id": batch_id}, token)
        with self.reaching():
            return _task_outcome(self._send(task, kwargs), timeout)

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
        token: str | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """Continue an upload from its checkpoint; returns what was dispatched. Raises
        :class:`~uploader.errors.SourceChanged` if the source changed (pass ``restart=True`` to
        abort the old multipart upload and start over).

        If the checkpoint is gone (expired, or lost with Redis) but the multipart upload is still
        on the server, give the original ``source``, ``destination`` and ``options`` (at least the
        same ``part_size`` if one was given): the checkpoint is rebuilt from ListParts, keeping
        every part whose size and MD5 match the source, and only the rest is sent."""
        check_upload_id(upload_id)
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
        kwargs = self._with_authority(contract.RESUME_UPLOAD, {"upload_id": upload_id, "restart": restart}, token)
        with self.reaching():
            result = self._send(contract.RESUME_UPLOAD, kwargs)
            return _task_outcome(result, timeout)

    def cancel(self, upload_id: str, *, timeout: float = 60, token: str | None = None) -> str:
        """Cancel: dispatching stops, the multipart upload is aborted, the state is ``cancelled``.
        Needs the upload's capability ``token`` (by default the one this client kept when it
        submitted it) or this client's fleet key (operators): :class:`NotAuthorized` otherwise."""
        status = self.status(upload_id)
        if status.state == "refused":
            raise UploadNotFound(f"upload {upload_id} was refused ({status.error}); there is nothing to cancel")
        kwargs = self._with_authority(contract.CANCEL_UPLOAD, {"upload_id": upload_id}, token)
        with self.reaching():
            result = self._send(contract.CANCEL_UPLOAD, kwargs)
            return _task_outcome(result, timeout)

    def janitor(self, *, dry_run: bool = False, timeout: float = 120) -> list[dict[str, str]]:
        """Run the janitor now on a worker (clients hold no S3 credentials): the abandoned uploads
        it removed (or, ``dry_run``, would remove). Operators only (it needs the fleet key)."""
        kwargs = self._operator_signed(contract.JANITOR, {"dry_run": dry_run}, "run the janitor")
        with self.reaching():
            result = self._send(contract.JANITOR, kwargs)
            return _task_outcome(result, timeout)

    # -- authority -----------------------------------------------------------------------------
    def _with_authority(self, task: str, kwargs: dict[str, Any], token: str | None) -> dict[str, Any]:
        """``kwargs`` of a cancel or resume with the sender's authority: the upload's capability
        token (given, or kept when this client submitted it), else an operator's proof if this
        client holds the fleet key, else nothing (the worker then refuses it, unless the
        deployment does not require capabilities)."""
        token = token or self.capabilities.load(kwargs.get("upload_id") or kwargs["batch_id"])
        if token is not None:
            return {**kwargs, auth.TOKEN: token}
        key = self.settings.fleet_key_bytes
        return auth.signed(key, task, kwargs) if key is not None else kwargs

    def _operator_signed(self, task: str, kwargs: dict[str, Any], what: str) -> dict[str, Any]:
        key = self.settings.fleet_key_bytes
        if key is None:
            raise NotAuthorized(f"only operators may {what}: it needs UPLOADER_FLEET_KEY, which this client does not have")
        return auth.signed(key, task, kwargs)

    def _send(self, task: str, kwargs: dict[str, Any]) -> AsyncResult:
        # Shown (task-sent events, Flower) without the token or proof.
        return self.celery.send_task(task, kwargs=kwargs, kwargsrepr=repr(auth.redacted(kwargs)))

    def list(self, limit: int = 100, *, states: Iterable[str] = ()) -> list[UploadStatus]:
        """The most recent uploads, newest first; with ``states``, only those in one of them
        (``uploading``, ``failed``...), looking through at most :data:`LIST_SCAN_LIMIT` recent
        uploads for them."""
        wanted = {str(s) for s in states}
        unknown = wanted - {s.value for s in UploadState}
        if unknown:
            raise InvalidRequest(f"unknown state {sorted(unknown)[0]!r}: one of {', '.join(s.value for s in UploadState)}")
        out: list[UploadStatus] = []
        scan = limit if not wanted else max(limit, LIST_SCAN_LIMIT)
        with self.reaching():
            ids = self.checkpoint.list_ids(scan)
            for first in range(0, len(ids), LIST_PAGE):
                for record in self.checkpoint.get_many(ids[first : first + LIST_PAGE]):
                    if record is not None and (not wanted or record.state in wanted):
                        out.append(UploadStatus.from_record(record))
                        if len(out) >= limit:
                            return out
        return out

    def resolve_id(self, given: str) -> str:
        """The upload (or batch) id ``given`` stands for: itself when an upload, a batch or a
        refusal has that id; otherwise the one recent upload whose id starts with it (at least
        :data:`MIN_ID_PREFIX` characters), as ``git`` takes a commit's prefix. Several such
        uploads: :class:`InvalidRequest` naming two of them. None: ``given`` (whoever reads it
        says there is no such upload)."""
        check_upload_id(given)
        store = self.checkpoint
        with self.reaching():
            if store.redis.exists(store.record_key(given), store.refusal_key(given), f"{store.prefix}:batch:{given}"):
                return given
            if len(given) < MIN_ID_PREFIX:
                return given
            matches = store.ids_starting_with(given, 2)
        if len(matches) > 1:
            raise InvalidRequest(
                f"{given!r} is the start of several upload ids ({matches[0]}, {matches[1]}, ...): give more of it"
            )
        return matches[0] if matches else given

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
        if last.state == UploadState.FAILED:
            raise UploadFailed(f"upload {upload_id} failed: {last.error}")
        if last.state == UploadState.CANCELLED:
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
        check_upload_id(upload_id)
        with self.reaching():
            # Whether the start had ended, asked *before* the record is read: a start that ends
            # in between (a small upload is created and completed in milliseconds) must not look
            # like an accepted upload whose record is gone.
            started = start is not None and start.ready()
            record, recovery, sending = self.checkpoint.get_with_recovery(upload_id)
            if record is not None:
                return UploadStatus.from_record(
                    record, recovery_ran_at=recovery.reconciled_at, recovery_leader=recovery.leader,
                    bytes_sending=sending if record.state == UploadState.UPLOADING else 0,
                    notifications=tuple(Outbox(self.checkpoint).deliveries(list(record.notified))),
                )
            refusal = self.checkpoint.refusal(upload_id)
            if refusal is not None:
                return UploadStatus.from_refusal(upload_id, refusal)
            if started:
                assert start is not None
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

    def __init__(
        self, uploader: Uploader, upload_id: str, start: AsyncResult, *, token: str | None = None, index: int | None = None
    ) -> None:
        """``start``: the task that starts it; ``index``: its place in that task's list, for an
        upload started by ``uploader.start_many`` (``submit_many``)."""
        self.uploader = uploader
        self.upload_id = upload_id
        self.start = start
        self.index = index
        #: The upload's capability: ``cancel``/``resume`` need it (keep it as you would a password).
        self.token = token

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
            outcome = _task_outcome(self.start, timeout)
        if self.index is None:
            return outcome
        entry = outcome[self.index]  # start_many: one entry per upload, in order
        if entry["error"]:
            raise _ERRORS.get(entry.get("kind", ""), UploadRefused)(entry["error"])
        return self.upload_id

    def resume(self, **kwargs: Any) -> dict[str, Any]:
        return self.uploader.resume(self.upload_id, **{"token": self.token, **kwargs})

    def cancel(self, **kwargs: Any) -> str:
        return self.uploader.cancel(self.upload_id, **{"token": self.token, **kwargs})

    def __repr__(self) -> str:
        return f"UploadHandle({self.upload_id!r})"


class BatchHandle:
    """A submitted batch (see :meth:`Uploader.submit_batch`)."""

    def __init__(self, uploader: Uploader, batch_id: str, start: AsyncResult, *, token: str | None = None) -> None:
        self.uploader = uploader
        self.batch_id = batch_id
        self.start = start
        #: The batch's capability (also its uploads'): ``cancel``/``resume`` need it.
        self.token = token

    def accepted(self, timeout: float = 60) -> str:
        """Wait for a worker to accept the batch; raises its refusal (a directory outside the
        source roots...), :class:`TimeoutError` if no worker answered."""
        with self.uploader.reaching():
            return _task_outcome(self.start, timeout)

    def status(self) -> BatchStatus:
        return self.uploader.batch_status(self.batch_id)

    def wait(self, timeout: float | None = None) -> BatchStatus:
        return self.uploader.wait_batch(self.batch_id, timeout=timeout, start=self.start)

    def cancel(self, **kwargs: Any) -> dict[str, Any]:
        return self.uploader.cancel_batch(self.batch_id, **{"token": self.token, **kwargs})

    def resume(self, **kwargs: Any) -> dict[str, Any]:
        return self.uploader.resume_batch(self.batch_id, **{"token": self.token, **kwargs})

    def __repr__(self) -> str:
        return f"BatchHandle({self.batch_id!r})"


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``(bucket, key)``."""
    if not url.startswith("s3://"):
        shown = repr(url[:80]) + ("..." if len(url) > 80 else "")
        raise InvalidRequest(f"destination {shown} must look like s3://bucket/key")
    bucket, _, key = url[len("s3://") :].partition("/")
    return bucket, key


def source_name(source: str) -> str:
    """The name a source is stored under below a destination prefix: a path's or URL's last
    segment, an S3 source's key's. :class:`InvalidRequest` if it has none."""
    from urllib.parse import unquote, urlsplit

    if source.startswith("s3://"):
        path = source[len("s3://"):].partition("/")[2]
    elif "://" in source:
        path = unquote(urlsplit(source).path)
    else:
        path = source
    name = path.rstrip("/").rsplit("/", 1)[-1]
    if not name or name in {".", ".."}:
        raise InvalidRequest(f"source {source[:80]!r} has no name to keep: give the destination's whole key (s3://bucket/key)")
    return name


def _task_outcome(result: AsyncResult, timeout: float) -> Any:
    """The task's return value, or its error as one of our exception classes."""
    from celery.exceptions import TimeoutError as CeleryTimeoutError

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
