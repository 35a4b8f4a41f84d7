"""Prometheus instruments of a worker (``UPLOADER_METRICS_PORT``); every call here is a no-op
until :func:`install` turned them on, so the library, clients and tests pay nothing for them.

Two kinds of figures:

- **What this worker did** (counters, histograms, the parts it is sending): recorded where it
  happens (the checkpoint's transitions, the part and PUT paths, retries, recovery, callback
  deliveries). They are kept in prometheus-client's multiprocess mode, in a directory of this
  worker start's own, so that a prefork pool's processes count into the same figures (each
  process its own files; the scrape sums them) and a threads pool is no different.
- **What the fleet looks like** (uploads by state, stalled uploads, live workers, queued and
  unacknowledged messages, the last recovery run): read from Redis and the broker when scraped,
  the same on every worker (take ``max`` across workers, not ``sum``).

Labels stay low-cardinality: kinds, outcomes, causes, states and queue names, never an upload
id, a key or a worker name (Prometheus adds the instance).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from uploader.config import Settings

log = logging.getLogger(__name__)

NAMESPACE = "uploader"
#: Seconds a part takes to be read and sent (parts are MiBs to GiBs).
PART_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60, 120, 300, 900)
#: Seconds a completion takes (CompleteMultipartUpload, the check of the result).
COMPLETION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
#: Seconds a small object's PUT takes (read, PutObject, verification).
OBJECT_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
#: An S3 error code fit for a label (``SlowDown``, ``InternalError``...).
_CODE = re.compile(r"[A-Za-z][A-Za-z0-9.]{0,39}")


@dataclass
class FleetFigures:
    """What the fleet looks like, read when scraped (see the module docstring). ``None``: not
    known (the broker cannot say, recovery never ran)."""

    #: Active uploads by state (creating, uploading, completing, failed with a resume to come)
    #: and how many of them are stalled, as the recovery leader counted them at its last run.
    states: dict[str, int] = field(default_factory=dict)
    stalled: int | None = None
    workers_alive: int | None = None
    #: Messages waiting in each of the fleet's queues (every part lane, control, this host's).
    queued: dict[str, int] = field(default_factory=dict)
    #: Messages delivered to a worker and not yet acknowledged (Redis broker: every queue's).
    unacked: int | None = None
    recovery_last_run: float | None = None
    janitor_last_run: float | None = None


#: The fleet's figures (gauges read at each scrape, ``uploader_<name>``) and what each says.
FLEET_FAMILIES = {
    "fleet_figures_up": "Whether the fleet's figures could be read from Redis and the broker at this scrape",
    "uploads_active": "Uploads needing the fleet's attention, by state, at the recovery leader's last run "
                      "(failed: with an automatic resume to come)",
    "uploads_stalled": "Active uploads without progress for UPLOADER_STALL_SECONDS at the last recovery run",
    "workers_alive": "Worker processes whose heartbeat is alive",
    "messages_queued": "Messages waiting in each queue",
    "messages_unacked": "Messages delivered to workers and not yet acknowledged (being worked on)",
    "parts_queued": "Part messages waiting, plus every message being worked on (an autoscaler must not see a "
                    "busy fleet as idle)",
    "recovery_last_run_timestamp_seconds": "When the reconciler last ran (unix time)",
    "janitor_last_run_timestamp_seconds": "When the janitor last ran (unix time)",
}


class _Instruments:
    """The instruments, created by :func:`install` once the multiprocess directory is set."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.uploads_started = Counter(
            "uploads_started", "Uploads this worker created (a record in the checkpoint), by mode", ["mode"],
            namespace=NAMESPACE,
        )
        self.uploads_finished = Counter(
            "uploads_finished", "Uploads that reached completed, failed or cancelled on this worker (a failure "
            "that will be resumed automatically counts as failed too)", ["outcome"], namespace=NAMESPACE,
        )
        self.parts = Counter(
            "parts_uploaded", "Parts (kind=part) and small objects (kind=object) sent and recorded", ["kind"],
            namespace=NAMESPACE,
        )
        self.bytes = Counter("bytes_uploaded", "Bytes sent and recorded (parts and small objects)", ["kind"],
                             namespace=NAMESPACE)
        self.retries = Counter(
            "retries", "Tasks retried after a transient error, by what they were doing and the error's cause",
            ["task", "cause"], namespace=NAMESPACE,
        )
        self.part_seconds = Histogram(
            "part_duration_seconds", "Time to read and send one part and record it", buckets=PART_BUCKETS,
            namespace=NAMESPACE,
        )
        self.object_seconds = Histogram(
            "object_duration_seconds", "Time to read, PUT and verify one small object", buckets=OBJECT_BUCKETS,
            namespace=NAMESPACE,
        )
        self.completion_seconds = Histogram(
            "completion_duration_seconds", "Time to complete a multipart upload (CompleteMultipartUpload and checks)",
            buckets=COMPLETION_BUCKETS, namespace=NAMESPACE,
        )
        self.in_flight = Gauge(
            "parts_in_flight", "Parts and small objects being sent by this worker now", namespace=NAMESPACE,
            multiprocess_mode="livesum",
        )
        self.recovery_runs = Counter(
            "recovery_runs", "Reconciler runs led by this worker", namespace=NAMESPACE,
        )
        self.recovered = Counter(
            "recovery_actions", "What the reconciler did: parts sent again (reclaimed) and uploads resumed (resumed)",
            ["action"], namespace=NAMESPACE,
        )
        self.callbacks = Counter(
            "callback_deliveries", "Notification delivery attempts, by target and outcome", ["target", "outcome"],
            namespace=NAMESPACE,
        )


_on: _Instruments | None = None
_directory: Path | None = None


def enabled() -> bool:
    return _on is not None


def install(settings: Settings) -> bool:
    """Turn the instruments on in this process if ``settings.metrics_port`` asks for them: call
    it in the worker's main process before its pool starts (a prefork pool's processes inherit
    it). Each call gives this worker start a fresh directory of figures. Whether they are on."""
    global _on, _directory
    if not settings.metrics_port:
        return False
    _directory = Path(tempfile.mkdtemp(prefix="uploader-metrics-"))
    # prometheus-client picks its value store from this variable (its multiprocess mode); the
    # store may have been picked already if something imported it before us: pick it again.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_directory)
    from prometheus_client import values

    values.ValueClass = values.get_value_class()
    _on = _Instruments()
    return True


def serve(settings: Settings, fleet: Callable[[], FleetFigures]) -> Any:
    """Serve ``/metrics`` on ``settings.metrics_address``:``metrics_port`` from this process (the
    worker's main process): every process's figures of this worker start, and ``fleet()`` read
    at each scrape. Returns the server (``shutdown()`` stops it)."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    assert _directory is not None, "install() first"
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(_directory))
    registry.register(_FleetCollector(fleet, _directory))
    server, _thread = start_http_server(settings.metrics_port, settings.metrics_address, registry=registry)
    log.info("metrics on http://%s:%d/metrics", settings.metrics_address, settings.metrics_port)
    return server


def process_exited(pid: int) -> None:
    """A pool process ended: its in-flight figures no longer count (its counters still do)."""
    if _directory is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, str(_directory))


def remove() -> None:
    """This worker start's figures are no longer needed (the worker stops)."""
    if _directory is not None:
        shutil.rmtree(_directory, ignore_errors=True)


# -- recording (no-ops when off) -------------------------------------------------------------------
def upload_started(mode: str, count: int = 1) -> None:
    if _on is not None and count:
        _on.uploads_started.labels(mode).inc(count)


def upload_finished(outcome: str, count: int = 1) -> None:
    """``outcome``: ``completed``, ``failed`` or ``cancelled``."""
    if _on is not None and count:
        _on.uploads_finished.labels(outcome).inc(count)


def retried(task: str, exc: BaseException) -> None:
    """A task retried after ``exc``: its cause is the error's class (and, for an S3 error, its
    code), a short fixed vocabulary."""
    if _on is not None:
        _on.retries.labels(task, cause_of(exc)).inc()


def cause_of(exc: BaseException) -> str:
    """``<error class>`` or ``<error class>:<S3 error code>``; a code that is not a plain word
    (whatever a server sends) is ``other``, so a label never takes arbitrary values."""
    code = getattr(exc, "code", "") or ""
    if not code:
        return type(exc).__name__
    return f"{type(exc).__name__}:{code if _CODE.fullmatch(code) else 'other'}"


class Transfer:
    """One part or small object being sent (see :func:`sending`)."""

    def __init__(self, kind: str, length: int) -> None:
        self.kind, self.length = kind, length
        self.started = time.perf_counter()
        self.seconds: float | None = None

    def sent(self) -> None:
        """The server acknowledged the bytes: the time taken stops here."""
        self.seconds = time.perf_counter() - self.started

    def recorded(self) -> None:
        """The checkpoint recorded them: count them (once)."""
        if _on is None:
            return
        seconds = self.seconds if self.seconds is not None else time.perf_counter() - self.started
        _on.parts.labels(self.kind).inc()
        _on.bytes.labels(self.kind).inc(self.length)
        (_on.part_seconds if self.kind == "part" else _on.object_seconds).observe(seconds)


@contextlib.contextmanager
def sending(kind: str, length: int) -> Iterator[Transfer]:
    """Around sending one part (``kind="part"``) or small object (``"object"``) of ``length``
    bytes: counted in flight meanwhile. The caller marks the :class:`Transfer` it gets
    ``sent()`` when the server acknowledged it and ``recorded()`` once the checkpoint holds it
    (only then are its bytes counted as uploaded)."""
    transfer = Transfer(kind, length)
    if _on is None:
        yield transfer
        return
    gauge = _on.in_flight
    gauge.inc()
    try:
        yield transfer
    finally:
        gauge.dec()


def completion_took(seconds: float) -> None:
    if _on is not None:
        _on.completion_seconds.observe(seconds)


def recovery_ran(reclaimed: int, resumed: int) -> None:
    if _on is not None:
        _on.recovery_runs.inc()
        _on.recovered.labels("reclaimed").inc(reclaimed)
        _on.recovered.labels("resumed").inc(resumed)


def callback_delivery(target: str, outcome: str) -> None:
    if _on is not None:
        _on.callbacks.labels(target, outcome).inc()


class _FleetCollector:
    """The fleet's figures, read at each scrape (Redis and broker errors leave them out: a scrape
    never fails because Redis is away, and ``uploader_fleet_figures_up`` says so)."""

    def __init__(self, fleet: Callable[[], FleetFigures], directory: Path) -> None:
        self.fleet = fleet
        self.directory = directory

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        self._forget_dead_processes()
        try:
            figures = self.fleet()
            up = 1
        except Exception as exc:  # noqa: BLE001  (Redis or the broker away: say so, keep the rest)
            log.warning("metrics: the fleet's figures could not be read: %s", exc)
            figures, up = FleetFigures(), 0

        def family(name: str, value: float | None = None, labels: list[str] | None = None) -> Any:
            return GaugeMetricFamily(f"{NAMESPACE}_{name}", FLEET_FAMILIES[name], value=value, labels=labels)

        yield family("fleet_figures_up", up)
        states = family("uploads_active", labels=["state"])
        for state, count in sorted(figures.states.items()):
            states.add_metric([state], count)
        yield states
        optional = {
            "uploads_stalled": figures.stalled, "workers_alive": figures.workers_alive,
            "messages_unacked": figures.unacked, "recovery_last_run_timestamp_seconds": figures.recovery_last_run,
            "janitor_last_run_timestamp_seconds": figures.janitor_last_run,
        }
        for name, value in optional.items():
            if value is not None:
                yield family(name, value)
        queued = family("messages_queued", labels=["queue"])
        for queue, count in sorted(figures.queued.items()):
            queued.add_metric([queue], count)
        yield queued
        parts = sum(count for queue, count in figures.queued.items() if queue.startswith("uploader.parts"))
        yield family("parts_queued", parts + (figures.unacked or 0))

    def _forget_dead_processes(self) -> None:
        """Pool processes killed without a clean exit still have in-flight figures on file:
        drop those of processes that are gone."""
        for path in self.directory.glob("gauge_live*_*.db"):
            pid = path.stem.rsplit("_", 1)[-1]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                process_exited(int(pid))
