"""Settings read from ``UPLOADER_*`` environment variables.

Defaults work against the local stack (Redis on 127.0.0.1:6379, SeaweedFS's S3 gateway on
127.0.0.1:8333). Credentials are deliberately absent: workers take them from boto3's standard
chain (environment, shared config, instance role), so they never travel in a task message.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import Annotated

from uploader.planner import DEFAULT_PART_SIZE, MiB


class Settings(BaseSettings):
    """Everything configurable, with the environment variable named ``UPLOADER_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="UPLOADER_", extra="ignore", frozen=True)

    #: Celery broker. Redis is what the crash-safety settings below are tuned for.
    broker_url: str = "redis://127.0.0.1:6379/0"
    #: Celery result backend (chord counters live here). Defaults to the broker URL.
    result_backend: str | None = None
    #: Redis holding the checkpoints. Defaults to the broker URL.
    checkpoint_url: str | None = None
    #: Prefix of every checkpoint key, so one Redis can serve several deployments.
    key_prefix: str = "uploader"
    #: With ``sentinel://`` URLs (``sentinel://host:26379;sentinel://host2:26379;...``): the
    #: name of the primary the sentinels monitor, and the sentinels' own password if they have
    #: one (the primary's goes in the URL).
    redis_sentinel_master: str | None = None
    redis_sentinel_password: SecretStr | None = None

    #: S3 endpoint; ``None`` means AWS's own endpoints.
    s3_endpoint_url: str | None = "http://127.0.0.1:8333"
    s3_region: str = "us-east-1"
    #: ``path`` for MinIO/SeaweedFS, ``virtual`` for Alibaba OSS, ``auto`` for AWS.
    s3_addressing_style: Literal["auto", "path", "virtual"] = "path"
    #: Per-part integrity check the server verifies: CRC32 (cheap) or MD5 (Content-MD5,
    #: accepted by every S3 dialect, including OSS which rejects x-amz-checksum headers).
    part_checksum: Literal["crc32", "md5"] = "crc32"
    #: Seconds to wait for a connection to S3. The socket keeps this timeout while a request's
    #: body is sent (urllib3 switches to the read timeout only afterwards), where it bounds each
    #: 16 KiB write: a send fails when the link accepts nothing for this long, however long the
    #: whole part takes.
    s3_connect_timeout: float = Field(10, gt=0)

    default_part_size: int = Field(DEFAULT_PART_SIZE, ge=1)
    #: Sources smaller than this take the single-PutObject path.
    multipart_threshold: int = Field(DEFAULT_PART_SIZE, ge=0)
    #: Directories sources must resolve into (after symlinks and ``..``). Colon- or
    #: comma-separated in the environment.
    source_roots: Annotated[tuple[Path, ...], NoDecode] = (Path("/"),)

    #: Attempts per part for transient S3/network errors, with exponential backoff and jitter.
    part_max_retries: int = Field(5, ge=0)
    retry_backoff_max: int = Field(60, ge=1)
    #: Seconds an unacknowledged message stays invisible before Redis redelivers it.
    #: Must exceed the slowest part's upload time, or parts run twice concurrently.
    visibility_timeout: int = Field(3600, ge=60)
    #: Seconds a finished upload's checkpoint is kept for ``status`` before it expires.
    retention_seconds: int = Field(7 * 24 * 3600, ge=60)
    #: Seconds without any live worker after which a client's ``wait``/``watch`` gives up with
    #: NoWorkers instead of waiting for ever (0: wait regardless).
    no_worker_seconds: float = Field(60, ge=0)
    #: Seconds ``uploader submit`` waits for a coordinator to accept or refuse the request
    #: (0: do not wait; the id is printed at once).
    submit_accept_timeout: float = Field(15, ge=0)
    #: Seconds the reason of a refused request is kept under its upload id for ``status``.
    refusal_retention_seconds: int = Field(24 * 3600, ge=60)
    #: Seconds a completer holds the ``completing`` lease before another may take over.
    completion_lease_seconds: int = Field(300, ge=5)
    #: Seconds without recorded progress after which an ``uploading`` upload counts as stalled
    #: (a duplicate ``start_upload`` then resumes it instead of being ignored).
    stall_seconds: int = Field(120, ge=1)
    #: Seconds a worker's heartbeat lives; a killed worker's in-flight parts are dispatched
    #: again once it lapses.
    worker_heartbeat_seconds: int = Field(15, ge=1)
    #: Seconds between two runs of the reconciler (run by the workers themselves, one at a time
    #: across the fleet: see ``leader_lease_seconds``).
    reconcile_interval: float = Field(30, gt=0)
    #: Seconds the worker running recovery (reconciler, automatic resumes, janitor) holds its
    #: leader lease; another worker takes over this long after the leader dies.
    leader_lease_seconds: float = Field(10, ge=1)
    #: A part task's time limit: this many seconds plus the part's length at
    #: ``part_min_throughput`` bytes per second. Past it the part's lease is void and the part is
    #: sent again elsewhere, whatever its worker's heartbeat says (a read hung on a network
    #: filesystem, a socket that never answers). Keep the largest part's limit below
    #: ``visibility_timeout``.
    part_time_base: float = Field(60, gt=0)
    part_min_throughput: int = Field(128 * 1024, ge=1024)
    #: Seconds after which failed or cancelled uploads, and uploads stalled that long, are
    #: aborted on the server and forgotten by the janitor.
    abandon_seconds: int = Field(7 * 24 * 3600, ge=1)
    #: Automatic resumes of an upload that failed for a transient reason (its parts' retries ran
    #: out during an S3 or network outage): the reconciler resumes it after
    #: ``auto_resume_backoff`` seconds, doubling each time up to an hour. 0 disables them, and
    #: such failures are final until someone runs ``resume``.
    auto_resume_limit: int = Field(10, ge=0)
    auto_resume_backoff: int = Field(30, ge=1)
    #: Seconds between two janitor runs (by the recovery leader among the workers).
    janitor_interval: float = Field(3600, gt=0)
    #: Bytes per second one worker process may send (0 = unlimited).
    max_bandwidth: int = Field(0, ge=0)
    #: How the coordinator sends a chord of part tasks: ``auto`` (in pipelined batches of
    #: ``fanout_batch`` messages on a Redis broker, Celery's plain chord otherwise), ``chord``
    #: (always the plain chord), ``fast-sent`` (batched, with a task-sent event per part; for
    #: measurements). See ``workers/fanout.py``.
    fanout: Literal["auto", "chord", "fast-sent"] = "auto"
    fanout_batch: int = Field(500, ge=1)
    #: Attempts per Redis command during a Redis outage (backoff up to 2 s each; 30: about a
    #: minute) before the task in hand gives up; the reconciler recovers from longer outages.
    redis_reconnect_attempts: int = Field(30, ge=0)
    #: Threads per worker process (also the S3 connection pool size).
    worker_concurrency: int = Field(8, ge=1)
    #: Celery pool of the workers: ``threads`` (the default), ``prefork`` (a process per
    #: slot) or ``solo``. (Set here, not with ``celery worker --pool``: Celery cannot tell an
    #: explicit ``--pool prefork`` from its default once the app configures a pool.)
    worker_pool: Literal["threads", "prefork", "solo"] = "threads"
    #: Bytes one worker thread holds in memory for one part, whatever part size a request asks
    #: for (S3 allows 5 GiB): a worker's part buffers stay below concurrency x this. A part up to
    #: this size is read into the thread's reusable buffer with one read and sent from it; a
    #: larger one is read twice in chunks of at most this (8 MiB by default) through that buffer,
    #: once to compute its checksum and once while it is sent.
    part_buffer_max: int = Field(64 * MiB, ge=1 * MiB, le=5 * 1024 * MiB)

    @field_validator("s3_endpoint_url", "result_backend", "checkpoint_url", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        # An empty variable means "not set": UPLOADER_S3_ENDPOINT_URL= selects AWS's endpoints.
        return None if value == "" else value

    @field_validator("source_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(Path(p) for p in value.replace(",", ":").split(":") if p)
        return value

    @model_validator(mode="after")
    def _sentinel_needs_a_master(self) -> Settings:
        urls = {"UPLOADER_BROKER_URL": self.broker_url, "UPLOADER_RESULT_BACKEND": self.result_backend,
                "UPLOADER_CHECKPOINT_URL": self.checkpoint_url}
        sentinel = [name for name, url in urls.items() if url and url.split(";", 1)[0].strip().lower().startswith("sentinel://")]
        if sentinel and not self.redis_sentinel_master:
            raise ValueError(
                f"{', '.join(sentinel)} use Redis Sentinel: set UPLOADER_REDIS_SENTINEL_MASTER to the name of the "
                "primary the sentinels monitor (`sentinel monitor <name> ...`)"
            )
        return self

    @property
    def redis_sentinel_password_value(self) -> str | None:
        return self.redis_sentinel_password.get_secret_value() if self.redis_sentinel_password else None

    @property
    def effective_result_backend(self) -> str:
        return self.result_backend or self.broker_url

    @property
    def effective_checkpoint_url(self) -> str:
        return self.checkpoint_url or self.broker_url


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, safe for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + host))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
