"""The client API backend services use: submit, status, wait, resume, cancel, list.

The client sends tasks by name (it never imports the worker code) and reads progress straight
from the checkpoint in Redis, so ``status`` costs one Redis round trip and works while every
worker is busy.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any

from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult

from uploader import contract
from uploader.checkpoint import CheckpointStore, UploadRecord
from uploader.checkpoint.store import UploadLifecycle
from uploader.config import Settings, get_settings
from uploader.errors import InvalidRequest, UploadCancelled, UploadFailed, UploaderError, UploadNotFound
from uploader.request import parse_request

#: Seconds between checkpoint polls while waiting: the first polls come quickly (a small upload
#: finishes in milliseconds), then back off to the longest interval. A poll is one Redis read.
FIRST_POLL_INTERVAL = 0.002
POLL_INTERVAL = 0.1


@dataclass(frozen=True)
class UploadStatus(UploadLifecycle):
    """What ``status`` reports. ``state`` is one of creating, uploading, completing, completed,
    failed, cancelled."""

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

    @classmethod
    def from_record(cls, record: UploadRecord) -> UploadStatus:
        values = {f.name: getattr(record, f.name) for f in fields(cls)}
        if record.state == "completed":  # a single PUT records no parts
            values.update(parts_done=record.part_count, bytes_done=record.size)
        return cls(**values)

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
    """Entry point: ``Uploader.from_env().submit("/data/big.bin", "s3://bucket/key")``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.celery = _ClientCelery("uploader-client", set_as_current=False)
        self.celery.conf.update(contract.celery_config(settings))
        self.checkpoint = CheckpointStore.from_url(
            settings.effective_checkpoint_url, prefix=settings.key_prefix, reconnect_attempts=settings.redis_reconnect_attempts
        )

    @classmethod
    def from_env(cls) -> Uploader:
        return cls(get_settings())

    def close(self) -> None:
        self.celery.close()
        self.checkpoint.redis.close()

    # -- commands ------------------------------------------------------------------------------
    def submit(self, source: str, destination: str, **options: Any) -> UploadHandle:
        """Validate and enqueue an upload of ``source`` to ``destination`` (``s3://bucket/key``).

        ``options``: ``upload_id`` (idempotency key), ``part_size`` (bytes), ``metadata``,
        ``content_type``, ``abort_on_failure``. Raises :class:`~uploader.errors.InvalidRequest`
        at once for malformed requests; problems only a worker can see (a missing file, a
        missing bucket) surface from :meth:`UploadHandle.wait`.
        """
        bucket, key = parse_s3_url(destination)
        request = parse_request({"source": source, "bucket": bucket, "key": key, **options})
        kwargs = request.model_dump(exclude_none=True)
        result = self.celery.send_task(contract.START_UPLOAD, kwargs=kwargs)
        return UploadHandle(self, kwargs["upload_id"], result)

    def status(self, upload_id: str) -> UploadStatus:
        record = self.checkpoint.get(upload_id)
        if record is None:
            raise UploadNotFound(f"no upload {upload_id!r} (never submitted, refused, or expired)")
        return UploadStatus.from_record(record)

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
        if self.checkpoint.get(upload_id) is None:
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
        result = self.celery.send_task(contract.RESUME_UPLOAD, kwargs={"upload_id": upload_id, "restart": restart})
        return _task_outcome(result, timeout)

    def cancel(self, upload_id: str, *, timeout: float = 60) -> str:
        """Cancel: dispatching stops, the multipart upload is aborted, the state is ``cancelled``."""
        self.status(upload_id)
        result = self.celery.send_task(contract.CANCEL_UPLOAD, kwargs={"upload_id": upload_id})
        return _task_outcome(result, timeout)

    def list(self, limit: int = 100) -> list[UploadStatus]:
        """The most recent uploads, newest first."""
        out = []
        for upload_id in self.checkpoint.list_ids(limit):
            record = self.checkpoint.get(upload_id)
            if record is not None:
                out.append(UploadStatus.from_record(record))
        return out

    def wait(self, upload_id: str, *, timeout: float | None = None, start: AsyncResult | None = None) -> UploadStatus:
        """Block until the upload is completed; return its final status.

        Keeps waiting through a transient failure the reconciler will resume (``retry_at``).
        Raises :class:`UploadFailed` / :class:`UploadCancelled` when it ends otherwise, the
        coordinator's error when it refused the request, and :class:`TimeoutError` at the
        deadline."""
        last = None
        for status in self.watch(upload_id, timeout=timeout, start=start):
            last = status
        assert last is not None
        if last.state == "failed":
            raise UploadFailed(f"upload {upload_id} failed: {last.error}")
        if last.state == "cancelled":
            raise UploadCancelled(f"upload {upload_id} was cancelled")
        return last

    def watch(
        self, upload_id: str, *, timeout: float | None = None, start: AsyncResult | None = None
    ) -> Iterator[UploadStatus]:
        """Yield the status every poll interval until it is terminal (the last one yielded)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = FIRST_POLL_INTERVAL
        status = None
        while True:
            record = self.checkpoint.get(upload_id)
            if record is None:
                if start is not None and start.failed():
                    raise _task_error(start)
            else:
                status = UploadStatus.from_record(record)
                yield status
                if status.terminal:
                    return
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
        """Wait for the coordinator to accept the request; raises its error if it refused."""
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
        raise TimeoutError(
            f"no worker answered within {timeout} s: is a worker running (uploader worker) "
            "and connected to the same broker?"
        ) from None
    if result.failed():
        raise _task_error(result)
    return value


_ERRORS = {cls.__name__: cls for cls in UploaderError.__subclasses__()}


def _task_error(result: AsyncResult) -> Exception:
    """The task's exception as one of our classes (clients need not share the worker's code)."""
    exc = result.result
    if isinstance(exc, UploaderError):
        return exc
    cls = _ERRORS.get(type(exc).__name__, UploaderError)
    return cls(str(exc))
