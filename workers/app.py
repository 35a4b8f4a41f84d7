"""The Celery application the workers run (``celery -A workers.app worker``).

Crash safety comes from configuration: messages are acknowledged only after a task finishes
(``task_acks_late``), a killed pool child's message is requeued (``task_reject_on_worker_lost``),
and each worker holds one message per slot (prefetch multiplier 1), so a lost worker costs only
the parts it was sending.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from celery import Celery
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    celeryd_after_setup,
    celeryd_init,
    task_postrun,
    task_prerun,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)

from uploader import logfields, logsafe, metrics, signing
from uploader.auth import FLEET_KEY_MISSING
from uploader.checkpoint.heartbeat import Heartbeat, incarnation_name, pool_process_name
from uploader.config import get_settings
from uploader.context import default_context
from uploader.contract import celery_config, host_queue, queue_arguments
from uploader.probe import ProbeFile
from workers import control, transport
from workers.transport import broker_settings

settings = get_settings()
# A short GIL switch interval, so that a short task (a start, a small PutObject, a completion)
# is not made to wait for the GIL behind the threads sending parts, once per Redis or S3 call:
# with Python's 5 ms, a 1 MiB upload took 5.5x as long while a large upload was being sent,
# with 0.5 ms 2.3x, and the large upload's own speed and CPU did not change (see the README's
# "Fairness"). Set here, at import: the worker, its pool processes and any embedding process.
sys.setswitchinterval(settings.worker_switch_interval)

app = Celery("uploader", include=["workers.tasks"])
app.conf.update(
    celery_config(settings),
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    # A worker that loses the broker connection cannot ack: its tasks will be redelivered, so
    # stop them rather than finish work whose acknowledgement is lost. Tasks are idempotent.
    worker_cancel_long_running_tasks_on_connection_loss=True,
    # Flower sees tasks only through events.
    worker_send_task_events=True,
    worker_concurrency=settings.worker_concurrency,
    worker_pool=settings.worker_pool,
    worker_hijack_root_logger=False,
)
# Message signing (optional, uploader/signing.py): set up at import, so that every process using
# this app (the worker, its pool, Flower, `celery inspect`) signs what it sends and the worker's
# consumers accept only signed messages. A setting that names a bad file stops the process here.
try:
    signing.enable(app, settings, worker=True)
except signing.SigningMisconfigured as exc:
    print(f"error: {exc}", file=sys.stderr, flush=True)
    raise SystemExit(7) from None  # uploader.cli.ExitCode.MISCONFIGURED
# Poison messages are quarantined, never allowed to stop a worker (workers/poison.py): each task
# message is checked before Celery's strategy sees it, and the Redis transport is guarded against
# list items kombu cannot read. Workers only: clients send through plain Celery and kombu.
app.conf.update(
    worker_consumer="workers.consumer:QuarantiningConsumer",
    **broker_settings(app.conf.broker_url, app.conf.broker_use_ssl),
)
# Remote control: read-only by default, so that no broker client can stop or reconfigure the
# fleet (workers/control.py).
control.restrict(settings.remote_control)


@after_setup_logger.connect
@after_setup_task_logger.connect
def protect_logs(logger: Any = None, **_: Any) -> None:
    """Whatever a record was built from (a hostile key, source path, task id or exception
    message), the worker's log gets one printable line per record and no credentials, at any
    level: the root logger's and the task logger's handlers (Celery's, set up just now) escape
    and redact (uploader.logsafe), and botocore's and urllib3's loggers redact at the source."""
    logsafe.protect_logger(logger)
    logsafe.protect_library_loggers()
    if logger is not None:
        logfields.install(logger.handlers, settings.log_format)


class _Incarnation:
    """This worker process start: its holder name (``<node name>#<random>``, unique per start,
    see :mod:`uploader.checkpoint.heartbeat`), its heartbeat and its recovery loop. In a prefork
    pool process, the pool process's own holder name."""

    name: str | None = None
    pool_process: str | None = None
    heartbeat: Heartbeat | None = None
    recovery: Any = None
    notifier: Any = None
    metrics_server: Any = None


incarnation = _Incarnation()


def lease_holder(hostname: str) -> str:
    """The holder a part lease taken by this process is held under: the worker incarnation's
    name, or in a prefork pool process that process's own."""
    if incarnation.pool_process:
        return incarnation.pool_process
    if incarnation.name is None:
        incarnation.name = incarnation_name(hostname)
    return incarnation.name


@celeryd_init.connect
def refuse_to_start_without_a_fleet_key(**_: Any) -> None:
    """A worker without the fleet key could neither send internal messages the others accept nor
    tell forged ones from real ones: it stops at once, saying what to set. (``SystemExit`` is not
    an ``Exception``: Celery's signal dispatch lets it through.)"""
    if settings.fleet_key is None:
        print(f"error: {FLEET_KEY_MISSING}", file=sys.stderr, flush=True)
        raise SystemExit(7)  # uploader.cli.ExitCode.MISCONFIGURED


@celeryd_init.connect
def turn_metrics_on(**_: Any) -> None:
    """With ``UPLOADER_METRICS_PORT``, count what this worker does (uploader/metrics.py): before
    the pool starts, so that a prefork pool's processes count into the same figures."""
    metrics.install(settings)


@celeryd_after_setup.connect
def name_incarnation(sender: str = "", instance: Any = None, **_: Any) -> None:
    """Name this start of the worker, before its prefork pool processes fork (they inherit it),
    and have it read its own host's queue too, whatever its ``-Q`` says (host-local uploads:
    uploader/locality.py)."""
    incarnation.name = incarnation_name(sender)
    logfields.worker_name = incarnation.name
    # The messages this incarnation receives are filed under its name (workers/transport.py).
    transport.holder = incarnation.name
    if instance is not None:
        instance.app.amqp.queues.select_add(
            host_queue(settings.host_name, declare=True, arguments=queue_arguments(settings))
        )


@task_prerun.connect
def bind_log_fields(task_id: str = "", task: Any = None, kwargs: dict[str, Any] | None = None, **_: Any) -> None:
    """Every line logged while a task runs names what it works on (uploader/logfields.py)."""
    kwargs = kwargs or {}
    logfields.clear()
    logfields.bind(
        task=getattr(task, "name", None), task_id=task_id, upload_id=_id(kwargs.get("upload_id")),
        batch_id=_id(kwargs.get("batch_id")), part=kwargs.get("part_number") if isinstance(kwargs.get("part_number"), int) else None,
    )


@task_postrun.connect
def clear_log_fields(**_: Any) -> None:
    logfields.clear()


def _id(value: Any) -> str | None:
    """An id from a message, if it has an id's shape (a hostile one is left out of the fields)."""
    from uploader.ids import valid_upload_id

    return value if isinstance(value, str) and valid_upload_id(value) else None


@worker_ready.connect
def start_heartbeat_and_recovery(sender: Any = None, **_: Any) -> None:
    """Lease in-flight parts to this incarnation for as long as it lives, and take part in the
    fleet's recovery (one worker at a time leads it: see uploader.maintenance)."""
    from uploader.maintenance import RecoveryLoop
    from uploader.notify.notifier import NotifierLoop
    from workers.figures import fleet_figures
    from workers.tasks import dispatch, forget_chords

    name = lease_holder(sender.hostname)
    ctx = default_context()
    if metrics.enabled():
        incarnation.metrics_server = metrics.serve(settings, lambda: fleet_figures(app))
    probe = ProbeFile(settings.probe_file, settings.worker_heartbeat_seconds) if settings.probe_file else None
    incarnation.heartbeat = Heartbeat(
        ctx.checkpoint, name, settings.worker_heartbeat_seconds, worker=True, host=settings.host_name, probe=probe,
        version=_version(),
    )
    incarnation.heartbeat.start()
    incarnation.recovery = RecoveryLoop(ctx, name, dispatch, forget_chords, restore_held_messages)
    incarnation.recovery.start()
    # Every worker delivers the notification outbox (no leader: claims are atomic).
    incarnation.notifier = NotifierLoop(ctx, send_callback_task)
    incarnation.notifier.start()


def _version() -> str:
    """This worker's uploader version (as installed), for ``uploader doctor``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("uploader")
    except PackageNotFoundError:
        return "unknown"


def restore_held_messages(live: set[str], grace: float) -> dict[str, int]:
    return transport.restore_dead_holders(app, live, grace=grace)


def send_callback_task(name: str, kwargs: dict[str, Any], queue: str) -> None:
    """Send a request's callback task by name (plain kwargs, not signed: it is not ours) to
    ``queue``, declared as Celery declares a queue by default (a direct exchange of its name):
    the fleet's own routing knows only its own queues (``task_create_missing_queues`` is off)."""
    from kombu import Exchange, Queue

    app.send_task(name, kwargs=kwargs, queue=Queue(queue, Exchange(queue, "direct"), routing_key=queue))


@worker_process_init.connect
def start_pool_process_heartbeat(sender: Any = None, **_: Any) -> None:
    """A prefork pool process holds its part leases under a name of its own
    (``<incarnation>/pool-<pid>``) and keeps it alive with a heartbeat of its own. The process may
    die while its worker lives (Celery terminates running tasks when the broker connection is
    lost, and replaces the process): its leases then lapse with its heartbeat instead of looking
    held by the live worker for ever, and leases its tasks could not release during a Redis
    outage are released by its heartbeat, in the process that remembers them."""
    if incarnation.name is None:  # named in celeryd_after_setup, before the pool forks
        incarnation.name = incarnation_name(str(sender))
    holder = pool_process_name(incarnation.name, os.getpid())
    Heartbeat(default_context().checkpoint, holder, settings.worker_heartbeat_seconds).start()
    incarnation.pool_process = holder


@worker_process_shutdown.connect
def forget_pool_process_figures(pid: int | None = None, **_: Any) -> None:
    """A prefork pool process exits: the parts it was sending no longer count as in flight."""
    metrics.process_exited(pid or os.getpid())


@worker_shutdown.connect
def stop_heartbeat_and_recovery(**_: Any) -> None:
    if incarnation.notifier is not None:
        incarnation.notifier.stop()
    if incarnation.recovery is not None:
        incarnation.recovery.stop()
    if incarnation.heartbeat is not None:
        # Celery's warm shutdown has finished the running tasks by now: nothing of this
        # incarnation holds a lease any more, so its name can go at once.
        incarnation.heartbeat.stop(retire=True)
    if incarnation.metrics_server is not None:
        incarnation.metrics_server.shutdown()
        metrics.remove()
