"""Settings read from ``UPLOADER_*`` environment variables.

Defaults work against the local stack (Redis on 127.0.0.1:6379, SeaweedFS's S3 gateway on
127.0.0.1:8333). Credentials are deliberately absent: workers take them from boto3's standard
chain (environment, shared config, instance role), so they never travel in a task message.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, FilePath, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from uploader import redis_tls
from uploader.locality import check_host, default_host_name
from uploader.planner import DEFAULT_PART_SIZE, MiB
from uploader.storage.endpoints import EndpointSpec, validate_endpoint_names
from uploader.storage.profiles import ProfileName

#: Characters a fleet key has at least (``uploader keygen`` makes 43: 256 random bits).
MIN_FLEET_KEY = 32


class Settings(BaseSettings):
    """Everything configurable, with the environment variable named ``UPLOADER_<FIELD>``."""

    # Errors never quote the values: a URL may carry a Redis password, a key is a secret.
    model_config = SettingsConfigDict(env_prefix="UPLOADER_", extra="ignore", frozen=True, hide_input_in_errors=True)

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
    #: RabbitMQ only: declare the queues with ``x-max-priority`` of this value (10 for requests'
    #: ``priority`` 0-9; 0: without it, as before). RabbitMQ cannot change an existing queue's
    #: arguments: see the README's "Priorities". Redis brokers ignore it.
    queue_max_priority: int = Field(0, ge=0, le=255)
    #: RabbitMQ only: ``classic`` queues, or ``quorum`` queues (replicated across the cluster's
    #: nodes: a node lost loses no queued part). RabbitMQ cannot change an existing queue's type.
    #: Quorum queues of RabbitMQ 3.x have no priorities (``UPLOADER_QUEUE_MAX_PRIORITY`` must stay 0).
    queue_type: Literal["classic", "quorum"] = "classic"
    #: TLS for every ``rediss://`` URL above, broker, results and checkpoint alike (see
    #: ``uploader/redis_tls.py``): the CA (PEM) that signed the Redis server's certificate
    #: (unset: the system's CAs), a client certificate and key for ``tls-auth-clients yes``, and
    #: how the server's certificate is checked (``required``: chains to the CA and names the host).
    redis_tls_ca_file: FilePath | None = None
    redis_tls_cert_file: FilePath | None = None
    redis_tls_key_file: FilePath | None = None
    redis_tls_verify: Literal["required", "optional", "none"] = "required"

    #: The fleet's shared secret (at least 32 characters; ``uploader keygen`` makes one). Workers
    #: need it: they sign the internal messages they send with it and refuse internal messages
    #: without its proof (see ``uploader/auth.py``). Operators' clients may hold it too: their
    #: ``cancel``/``resume`` then act on any upload, and they may run ``janitor``/``reconcile``.
    #: Ordinary clients must not have it.
    fleet_key: SecretStr | None = None
    #: The workers' SSE-C keyring: the keys a request may name with ``sse_customer_key`` (the
    #: request carries the name only; the key never enters a message, the checkpoint, a log or
    #: Flower). ``name=BASE64,name2=BASE64`` or a JSON object ``{"name": "BASE64"}``, each key
    #: 32 bytes (AES-256), base64-encoded. Workers need it; clients do not.
    sse_c_keys: SecretStr | None = None
    #: ``cancel`` and ``resume`` of an upload need its capability (the token ``submit`` keeps)
    #: or an operator's proof. ``false`` lets any client that reaches the broker act on any
    #: upload (a deployment whose broker only trusted services can write to).
    require_capability: bool = True
    #: Which of Celery's remote control commands workers obey: ``inspect`` (the read-only ones
    #: Flower and ``celery inspect`` use) or ``full`` (also shutdown, pool changes, revoke, rate
    #: limits...: anyone who can publish to the broker could then stop every worker). See
    #: ``workers/control.py``.
    remote_control: Literal["inspect", "full"] = "inspect"
    #: Where the CLI keeps the capability tokens of the uploads it submitted (one file each,
    #: readable by its user only). Default: ``$XDG_STATE_HOME/uploader/capabilities``
    #: (``~/.local/state/uploader/capabilities``).
    capability_dir: Path | None = None
    #: Celery message signing (optional; see ``uploader/signing.py`` and the README): every
    #: message is signed with this process's private key (an unencrypted PEM RSA key file: the
    #: setting is its path, and the key itself is never logged) and its certificate, and
    #: workers run only messages signed by a certificate in the store (a directory of PEM
    #: certificates or a glob). The three are set together or not at all; with them, unsigned
    #: messages are refused, so every client then needs a key and a certificate.
    message_signing_key: Path | None = None
    message_signing_cert: Path | None = None
    message_signing_cert_store: str | None = None
    message_signing_digest: Literal["sha256", "sha384", "sha512"] = "sha256"

    #: S3 endpoint; ``None`` means AWS's own endpoints.
    s3_endpoint_url: str | None = "http://127.0.0.1:8333"
    s3_region: str = "us-east-1"
    #: ``path`` for MinIO/SeaweedFS, ``virtual`` for Alibaba OSS, ``auto`` for AWS.
    s3_addressing_style: Literal["auto", "path", "virtual"] = "path"
    #: The default per-part checksum (a request's ``checksum_algorithm`` overrides it): crc32
    #: (cheap), crc32c, crc64nvme, sha1, sha256, or md5 (Content-MD5, accepted by every S3
    #: dialect, including OSS which rejects x-amz-checksum headers). See uploader/checksums.py.
    #: When set, it (and ``s3_addressing_style``) overrides what ``s3_profile`` chooses.
    part_checksum: Literal["crc32", "crc32c", "crc64nvme", "sha1", "sha256", "md5"] = "crc32"
    #: Create multipart uploads with ``ChecksumType=FULL_OBJECT`` for CRC algorithms and send
    #: the combined part CRCs on Complete, so the server verifies the whole object. Off for a
    #: server without it: the composite checksum it reports is compared instead.
    full_object_checksum: bool = True
    #: Provider profile of the default endpoint (uploader/storage/profiles.py): its addressing
    #: style, part checksum, ``Expect`` policy, part rules and the options it supports. The default,
    #: ``seaweedfs``, is the local stack's server and behaves as the uploader did before profiles.
    s3_profile: ProfileName = ProfileName.SEAWEEDFS
    #: More endpoints, by name, as JSON: ``{"name": {"profile": "r2", "endpoint_url": "https://...",
    #: "region": "auto", "aws_profile": "<a profile of the workers' AWS shared config>"}}``.
    #: A request picks one with ``endpoint``; without one it goes to the default endpoint.
    endpoints: dict[str, EndpointSpec] = Field(default_factory=dict)
    #: Seconds to wait for a connection to S3. The socket keeps this timeout while a request's
    #: body is sent (urllib3 switches to the read timeout only afterwards), where it bounds each
    #: 16 KiB write: a send fails when the link accepts nothing for this long, however long the
    #: whole part takes.
    s3_connect_timeout: float = Field(10, gt=0)

    default_part_size: int = Field(DEFAULT_PART_SIZE, ge=1)
    #: Sources smaller than this take the single-PutObject path.
    multipart_threshold: int = Field(DEFAULT_PART_SIZE, ge=0)
    #: Directories sources must resolve into (after symlinks and ``..``). Colon- or
    #: comma-separated in the environment. None by default: with none, no local source is read
    #: (the request is refused, saying to set this). Some places are refused whatever the roots
    #: (``/proc``, ``/sys``, ``/dev``, credentials, home dot-files: see uploader/sources/denylist.py).
    source_roots: Annotated[tuple[Path, ...], NoDecode] = ()
    #: The workers' credentials for HTTP(S) sources: the names a request may give with
    #: ``source_credentials`` (the request carries the name only; the secret never enters a
    #: message, the checkpoint, a log or Flower). A JSON object
    #: ``{"name": {"header": "Authorization: Bearer TOKEN"}, "name2": {"basic": "user:password"}}``.
    #: Workers need it; clients do not. See uploader/sources/http.py.
    source_credentials: SecretStr | None = None
    #: Seconds an HTTP(S) source may take to connect, and to send the next bytes of an answer.
    source_timeout: float = Field(30, gt=0)
    #: The buckets S3 sources (``s3://bucket/key``) may be read from, comma-separated in the
    #: environment: ``bucket`` (on the default endpoint), ``endpoint:bucket`` (on a named one),
    #: ``*`` / ``endpoint:*`` (every bucket there). None by default: with none, every S3 source
    #: is refused (the workers' credentials may read more than a submitter should copy).
    source_buckets: Annotated[tuple[str, ...], NoDecode] = ()

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
    #: Part lanes (``uploader.parts``, ``uploader.parts.1``, ...): each upload's parts go to the
    #: lane with the fewest queued parts, and every worker reads the lanes in turn, so that up to
    #: this many uploads are sent interleaved instead of one after the other (``workers/lanes.py``).
    #: The same on every worker; 1: one queue, first in first out.
    part_lanes: int = Field(8, ge=1, le=64)
    #: The host this process runs on, for host-local uploads (``--local``, uploader/locality.py):
    #: a worker reads the queue ``uploader.host.<host_name>``; a client's ``--local`` uploads
    #: name it. By default the hostname; set it where hostnames are not unique or not stable.
    host_name: str = Field(default_factory=default_host_name)
    #: How workers write their log lines: ``text`` (a line about an upload names it) or ``json``
    #: (one object per line with upload id, part, worker, event, bytes, duration: uploader/logfields.py).
    log_format: Literal["text", "json"] = "text"
    #: Seconds between two progress lines of ``--wait``/``watch`` when the output is not a
    #: terminal (a file, a pipe, a CI log); on a terminal the bar moves continuously.
    progress_interval: float = Field(10, gt=0)
    #: The file a worker's heartbeat rewrites at each beat, for ``uploader probe live|ready``
    #: (uploader/probe.py; Kubernetes and Compose probes); "" : none.
    probe_file: str = ""
    #: The port a worker serves its Prometheus metrics on (``/metrics``; uploader/metrics.py);
    #: 0: none. Each worker process needs its own (one per machine or pod).
    metrics_port: int = Field(0, ge=0, le=65535)
    #: The address the metrics are served on: every interface by default (Prometheus scrapes the
    #: pod or machine address); 127.0.0.1 to keep them on the machine.
    metrics_address: str = "0.0.0.0"
    #: Attempts per Redis command during a Redis outage (backoff up to 2 s each; 30: about a
    #: minute) before the task in hand gives up; the reconciler recovers from longer outages.
    redis_reconnect_attempts: int = Field(30, ge=0)
    #: Seconds a worker thread may hold the GIL while another waits for it (Python's
    #: ``sys.setswitchinterval``; Python's default is 0.005): short, so that short tasks do not
    #: queue for the GIL behind the threads sending parts (workers/app.py).
    worker_switch_interval: float = Field(0.0005, gt=0, le=0.1)
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

    #: Notifications (see ``uploader/notify/``). The secret that signs webhook POSTs
    #: (``X-Uploader-Signature``: HMAC-SHA256 over ``"<timestamp>.<body>"``); workers refuse a
    #: ``callback_url`` without it.
    callback_secret: SecretStr | None = None
    #: Hosts and CIDRs a worker may reach although they are loopback, private, link-local or
    #: metadata addresses (comma-separated: ``hooks.internal,10.1.0.0/16,127.0.0.1``).
    outbound_allow: str = ""
    #: Seconds a webhook POST may take (connect and answer).
    callback_timeout: float = Field(10, gt=0)
    #: Attempts per notification before it is given up (5xx, timeouts and refused connections
    #: are retried; any other 4xx than 408/429 is final at once).
    callback_max_attempts: int = Field(8, ge=1)
    #: The wait before the second attempt (seconds), doubled for each further one up to
    #: ``callback_backoff_max``, each with random jitter (between half and all of it).
    callback_backoff: float = Field(2, gt=0)
    callback_backoff_max: float = Field(600, gt=0)
    #: How often each worker's notifier looks for due events (seconds), and how long it holds
    #: an event it is delivering (a worker killed meanwhile leaves it to another after that).
    notify_poll_seconds: float = Field(1, gt=0)
    notify_lease_seconds: float = Field(60, ge=1)

    @field_validator(
        "s3_endpoint_url", "result_backend", "checkpoint_url", "redis_tls_ca_file", "redis_tls_cert_file", "redis_tls_key_file",
        "fleet_key", "sse_c_keys", "source_credentials", "callback_secret", "message_signing_key", "message_signing_cert", "message_signing_cert_store", mode="before",
    )
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        # An empty variable means "not set": UPLOADER_S3_ENDPOINT_URL= selects AWS's endpoints.
        return None if value == "" else value

    @field_validator("endpoints", mode="before")
    @classmethod
    def _endpoints_json(cls, value: object) -> object:
        # From the environment pydantic-settings decodes the JSON; given as a value, it is text.
        if isinstance(value, str):
            try:
                return json.loads(value) if value.strip() else {}
            except ValueError:
                raise ValueError("UPLOADER_ENDPOINTS must be a JSON object: {\"name\": {\"profile\": ..., \"endpoint_url\": ...}}") from None
        return value

    @field_validator("endpoints", mode="after")
    @classmethod
    def _endpoint_names(cls, value: dict[str, EndpointSpec]) -> dict[str, EndpointSpec]:
        validate_endpoint_names(list(value))
        return value

    @field_validator("host_name")
    @classmethod
    def _host_name(cls, value: str) -> str:
        return check_host(value)

    @field_validator("source_buckets", mode="before")
    @classmethod
    def _split_buckets(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(b.strip() for b in value.split(",") if b.strip())
        return value

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

    @model_validator(mode="after")
    def _quorum_queues_have_no_priorities(self) -> Settings:
        if self.queue_type == "quorum" and self.queue_max_priority:
            raise ValueError(
                "UPLOADER_QUEUE_TYPE=quorum and UPLOADER_QUEUE_MAX_PRIORITY do not go together: RabbitMQ 3.x quorum "
                "queues have no priorities (set UPLOADER_QUEUE_MAX_PRIORITY=0, or keep classic queues)"
            )
        return self

    @model_validator(mode="after")
    def _message_signing_is_all_or_nothing(self) -> Settings:
        given = {"UPLOADER_MESSAGE_SIGNING_KEY": self.message_signing_key, "UPLOADER_MESSAGE_SIGNING_CERT": self.message_signing_cert,
                 "UPLOADER_MESSAGE_SIGNING_CERT_STORE": self.message_signing_cert_store}
        missing = [name for name, value in given.items() if value is None]
        if 0 < len(missing) < len(given):
            raise ValueError(f"message signing needs all of {', '.join(given)}; {', '.join(missing)} not set")
        return self

    @property
    def message_signing(self) -> bool:
        """Whether this process signs the messages it sends and (a worker) runs only signed ones."""
        return self.message_signing_key is not None

    @field_validator("fleet_key", mode="after")
    @classmethod
    def _fleet_key_is_long(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_FLEET_KEY:
            # (The message never quotes the value: a secret must not reach a log.)
            raise ValueError(
                f"UPLOADER_FLEET_KEY is shorter than {MIN_FLEET_KEY} characters; make one with `uploader keygen`"
            )
        return value

    @field_validator("sse_c_keys", mode="after")
    @classmethod
    def _keyring_parses(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parse_keyring(value.get_secret_value())
        return value

    @property
    def sse_c_keyring(self) -> dict[str, bytes]:
        """The SSE-C keys by name (empty without ``UPLOADER_SSE_C_KEYS``)."""
        return parse_keyring(self.sse_c_keys.get_secret_value()) if self.sse_c_keys else {}

    @field_validator("source_credentials", mode="after")
    @classmethod
    def _source_credentials_parse(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parse_source_credentials(value.get_secret_value())
        return value

    @property
    def source_credential_map(self) -> dict[str, SourceCredential]:
        """The HTTP(S) source credentials by name (empty without ``UPLOADER_SOURCE_CREDENTIALS``)."""
        return parse_source_credentials(self.source_credentials.get_secret_value()) if self.source_credentials else {}

    @property
    def fleet_key_bytes(self) -> bytes | None:
        """The fleet key as HMAC key bytes, or ``None`` when this process has none."""
        return self.fleet_key.get_secret_value().encode("utf-8") if self.fleet_key else None

    @model_validator(mode="after")
    def _one_way_to_tls(self) -> Settings:
        urls = {"UPLOADER_BROKER_URL": self.broker_url, "UPLOADER_RESULT_BACKEND": self.result_backend,
                "UPLOADER_CHECKPOINT_URL": self.checkpoint_url}
        for name, url in urls.items():
            in_url = redis_tls.url_tls_parameters(url) if url else []
            if in_url:
                raise ValueError(
                    f"{name} carries TLS options in its query ({', '.join(in_url)}): give them as UPLOADER_REDIS_TLS_CA_FILE, "
                    "UPLOADER_REDIS_TLS_CERT_FILE, UPLOADER_REDIS_TLS_KEY_FILE and UPLOADER_REDIS_TLS_VERIFY instead, "
                    "which apply to the broker, the result backend and the checkpoint alike"
                )
        files = self.redis_tls_ca_file or self.redis_tls_cert_file or self.redis_tls_key_file
        plain = [name for name, url in urls.items() if url and redis_tls.scheme(url) == redis_tls.PLAIN_SCHEME]
        if files and plain:
            raise ValueError(
                f"UPLOADER_REDIS_TLS_* files are set but {', '.join(plain)} is a plain-text redis:// URL, which would "
                "ignore them: use rediss://"
            )
        if self.redis_tls_key_file and not self.redis_tls_cert_file:
            raise ValueError("UPLOADER_REDIS_TLS_KEY_FILE is set without UPLOADER_REDIS_TLS_CERT_FILE (the client certificate)")
        return self

    def __repr_args__(self) -> Any:
        # A Redis URL may carry a password: repr() and str() show it redacted, like SecretStr fields.
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if name in _URL_FIELDS and isinstance(value, str) else value

    @property
    def redis_sentinel_password_value(self) -> str | None:
        return self.redis_sentinel_password.get_secret_value() if self.redis_sentinel_password else None

    @property
    def effective_result_backend(self) -> str:
        return self.result_backend or self.broker_url

    @property
    def effective_checkpoint_url(self) -> str:
        return self.checkpoint_url or self.broker_url


#: Settings that hold URLs which may carry a password.
_URL_FIELDS = frozenset({"broker_url", "result_backend", "checkpoint_url", "s3_endpoint_url"})


#: An SSE-C key's length: AES-256.
SSE_C_KEY_BYTES = 32


def parse_keyring(text: str) -> dict[str, bytes]:
    """``name=BASE64,...`` or ``{"name": "BASE64"}`` as ``{name: 32-byte key}``. A ``ValueError``
    names the entry, never its key."""
    import base64
    import binascii
    import json

    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            loaded = json.loads(stripped)
        except ValueError:
            raise ValueError("UPLOADER_SSE_C_KEYS is not valid JSON") from None
        if not isinstance(loaded, dict) or not all(isinstance(v, str) for v in loaded.values()):
            raise ValueError('UPLOADER_SSE_C_KEYS must be a JSON object {"name": "BASE64 key"}')
        entries = list(loaded.items())
    else:
        entries = []
        for item in re.split(r"[,\s]+", stripped):
            if item:
                name, sep, encoded = item.partition("=")
                if not sep:
                    raise ValueError(f"UPLOADER_SSE_C_KEYS entry {len(entries) + 1} is not NAME=BASE64KEY")
                entries.append((name, encoded))
    keyring = {}
    for name, encoded in entries:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
            raise ValueError("UPLOADER_SSE_C_KEYS: a key name must be 1-64 letters, digits, '.', '_' or '-'")
        try:
            key = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"UPLOADER_SSE_C_KEYS: key {name!r} is not base64") from None
        if len(key) != SSE_C_KEY_BYTES:
            raise ValueError(f"UPLOADER_SSE_C_KEYS: key {name!r} is {len(key)} bytes; SSE-C keys are {SSE_C_KEY_BYTES}")
        keyring[name] = key
    return keyring


#: A credential's name, as a request gives it (an SSE-C key's name has the same shape).
CREDENTIAL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: An HTTP header name (RFC 9110 ``token``).
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


@dataclass(frozen=True)
class SourceCredential:
    """One request header a worker adds to its requests for an HTTP(S) source. ``value`` is the
    secret: it is left out of ``repr`` (and so of logs and tracebacks)."""

    header: str
    value: str = field(repr=False)

    def secrets(self) -> tuple[str, ...]:
        """What a log must never show: the value, and its token after a scheme (``Bearer``...)."""
        scheme, _, token = self.value.partition(" ")
        return (self.value, token) if token and scheme.isalpha() else (self.value,)


def parse_source_credentials(text: str) -> dict[str, SourceCredential]:
    """``{"name": {"header": "Name: value"} | {"basic": "user:password"}}`` as
    ``{name: SourceCredential}``. A ``ValueError`` names the entry, never its secret."""
    import base64

    what = "UPLOADER_SOURCE_CREDENTIALS"
    try:
        loaded = json.loads(text)
    except ValueError:
        raise ValueError(f"{what} is not valid JSON") from None
    shape = f'{what} must be a JSON object {{"name": {{"header": "Name: value"}} or {{"basic": "user:password"}}}}'
    if not isinstance(loaded, dict):
        raise ValueError(shape)
    credentials = {}
    for name, spec in loaded.items():
        if not CREDENTIAL_NAME_RE.fullmatch(name):
            raise ValueError(f"{what}: a credential name must be 1-64 letters, digits, '.', '_' or '-'")
        if not (isinstance(spec, dict) and len(spec) == 1 and isinstance(next(iter(spec.values())), str)):
            raise ValueError(f"{what}: credential {name!r}: {shape.removeprefix(what + ' ')}")
        (kind, secret), = spec.items()
        if kind == "basic":
            if ":" not in secret:
                raise ValueError(f"{what}: credential {name!r}: basic is \"user:password\"")
            credential = SourceCredential("Authorization", "Basic " + base64.b64encode(secret.encode()).decode())
        elif kind == "header":
            header, sep, value = secret.partition(":")
            if not sep or not _HEADER_NAME_RE.fullmatch(header.strip()) or _UNSAFE_HEADER_RE.search(value):
                raise ValueError(f"{what}: credential {name!r}: header is \"Name: value\" (one line)")
            credential = SourceCredential(header.strip(), value.strip())
        else:
            raise ValueError(f"{what}: credential {name!r}: give \"header\" or \"basic\"")
        credentials[name] = credential
    return credentials


#: What a header value must not hold: line breaks and other control characters (but tab).
_UNSAFE_HEADER_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, safe for logs and errors (each entry of a
    ``;``-separated Sentinel list too)."""
    if ";" in url:
        return ";".join(redact_url(entry) for entry in url.split(";"))
    parts = urlsplit(url)
    try:
        _ = parts.port  # read for its ValueError on a port that is not a number
    except ValueError:  # not a URL urlsplit can take apart: hide anything between ':' and '@'
        return re.sub(r":[^:@/]*@", ":***@", url)
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
