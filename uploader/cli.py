"""``uploader``: submit, watch and manage uploads from a shell, and start workers.

Errors print one readable line (never a traceback) and exit with a status that says what kind of
end it was (:class:`ExitCode`, listed in ``uploader --help`` and the README).
"""

from __future__ import annotations

import enum
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from uploader.client import Uploader, UploadStatus
from uploader.errors import (
    InvalidRequest,
    NoWorkers,
    SourceChanged,
    SourceError,
    TransientStoreError,
    Unreachable,
    UploadCancelled,
    UploadConflict,
    UploaderError,
    UploadFailed,
    UploadNotFound,
    UploadRefused,
)
from uploader.planner import format_size, parse_size

console = Console(stderr=True)


class ExitCode(enum.IntEnum):
    """How a command ended (also the process's exit status)."""

    OK = 0
    #: The upload ended failed (status says why), or another error.
    FAILED = 1
    #: The request was invalid or refused (missing source or bucket, bad option, conflicting
    #: upload id, a state that forbids it); nothing was created. (Also click's usage errors.)
    REFUSED = 2
    #: No such upload.
    NOT_FOUND = 3
    #: Gave up waiting (--timeout, or no worker accepted the request in time).
    TIMED_OUT = 4
    #: Redis, the broker or S3 unreachable, or no worker alive: check the named setting.
    UNAVAILABLE = 5
    #: The upload was cancelled.
    CANCELLED = 6
    #: Interrupted (Ctrl-C); the upload goes on.
    INTERRUPTED = 130


#: Which exit status each error means (the first matching class wins).
_EXIT_CODES: tuple[tuple[type[BaseException], ExitCode], ...] = (
    (UploadFailed, ExitCode.FAILED),
    (UploadCancelled, ExitCode.CANCELLED),
    (UploadNotFound, ExitCode.NOT_FOUND),
    (Unreachable, ExitCode.UNAVAILABLE),
    (NoWorkers, ExitCode.UNAVAILABLE),
    (TransientStoreError, ExitCode.UNAVAILABLE),  # S3 kept failing (unreachable, throttling)
    (InvalidRequest, ExitCode.REFUSED),
    (UploadRefused, ExitCode.REFUSED),
    (SourceError, ExitCode.REFUSED),
    (SourceChanged, ExitCode.REFUSED),
    (UploadConflict, ExitCode.REFUSED),
    (TimeoutError, ExitCode.TIMED_OUT),
    (UploaderError, ExitCode.FAILED),
)

EXIT_STATUS_HELP = "Exit status: " + ", ".join(
    f"{code.value} {code.name.lower().replace('_', ' ')}" for code in ExitCode
) + "."


def exit_code(exc: BaseException) -> ExitCode:
    for cls, code in _EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return ExitCode.FAILED


def _fail(message: str, code: ExitCode) -> None:
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(int(code))


def _friendly_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (UploaderError, TimeoutError) as exc:
            _fail(str(exc), exit_code(exc))
        except KeyboardInterrupt:
            _fail("interrupted", ExitCode.INTERRUPTED)
        except Exception as exc:  # a bug: one line for the user, the traceback on request
            if os.environ.get("UPLOADER_DEBUG"):
                raise
            _fail(f"unexpected {type(exc).__name__}: {exc} (UPLOADER_DEBUG=1 shows the traceback)", ExitCode.FAILED)

    return wrapper


def _uploader() -> Uploader:
    return Uploader.from_env(interactive=True)


def _size(_: click.Context, __: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value)
    except UploaderError as exc:
        raise click.BadParameter(str(exc)) from None


def _metadata(_: click.Context, __: click.Parameter, values: tuple[str, ...]) -> dict[str, str] | None:
    out = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r}: write metadata as NAME=VALUE")
        out[name] = value
    return out or None


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_STATUS_HELP)
@click.version_option(package_name="uploader")
def main() -> None:
    """Distributed, resumable multipart uploads to S3-compatible storage.

    Configuration comes from UPLOADER_* environment variables (see the README)."""


@main.command()
@click.argument("source")
@click.argument("destination")
@click.option("--part-size", callback=_size, help="Part size, e.g. 16MiB (5MiB..5GiB). Default: 8MiB, grown to fit 10,000 parts.")
@click.option("--upload-id", help="Idempotency key: submitting the same id again continues that upload.")
@click.option("--metadata", "-m", multiple=True, callback=_metadata, help="User metadata NAME=VALUE (repeatable).")
@click.option("--content-type", help="Content-Type of the stored object.")
@click.option("--abort-on-failure", is_flag=True, help="Abort the multipart upload if it fails (default: keep parts for resume).")
@click.option("--wait", "wait_", is_flag=True, help="Show progress until the upload finishes.")
@click.option("--timeout", type=float, default=None, help="Give up waiting after this many seconds.")
@click.option(
    "--accept-timeout", type=float, default=None,
    help="Seconds to wait for a worker to accept or refuse the request (default UPLOADER_SUBMIT_ACCEPT_TIMEOUT, 15; 0: don't wait).",
)
@_friendly_errors
def submit(source: str, destination: str, wait_: bool, timeout: float | None, accept_timeout: float | None, **options: Any) -> None:
    """Upload SOURCE (an absolute path the workers can read) to DESTINATION (s3://bucket/key).

    Prints the upload id (on stdout, as soon as the request is sent), then waits until a worker
    accepts the request: a refusal is the reason on stderr and exit status 2 (``status ID`` says
    it again for a day)."""
    up = _uploader()
    handle = up.submit(source, destination, **{k: v for k, v in options.items() if v not in (None, False)})
    click.echo(handle.upload_id)
    wait_accept = up.settings.submit_accept_timeout if accept_timeout is None else accept_timeout
    if wait_accept:
        try:
            handle.accepted(wait_accept)
        except Unreachable as exc:  # a worker took it and is retrying: it says what it cannot reach
            _fail(f"upload {handle.upload_id}: {exc}; it goes on retrying", ExitCode.UNAVAILABLE)
        except TimeoutError:  # no worker took it at all
            _fail(
                f"upload {handle.upload_id} was not accepted within {wait_accept:g} s: is a worker running "
                "(uploader worker) on the same UPLOADER_BROKER_URL? The request stays queued; watch it with "
                f"`uploader watch {handle.upload_id}`",
                ExitCode.TIMED_OUT,
            )
    if wait_:
        _follow(up, handle.upload_id, timeout, start=handle.start)


def _follow(up: Uploader, upload_id: str, timeout: float | None, start: Any = None) -> None:
    """Progress bar until the upload ends; a non-zero exit unless it completed. Ctrl-C leaves
    the upload running and says how to watch it."""
    from uploader.progress import show_progress

    try:
        last = show_progress(up.watch(upload_id, timeout=timeout, start=start), console)
    except KeyboardInterrupt:
        _fail(
            f"interrupted: upload {upload_id} goes on without you; watch it with `uploader watch {upload_id}` "
            f"(or stop it with `uploader cancel {upload_id}`)",
            ExitCode.INTERRUPTED,
        )
        return
    if last is None or last.state != "completed":
        state = last.state if last else "unknown"
        reason = f": {last.error}" if last is not None and last.error else ""
        code = {"cancelled": ExitCode.CANCELLED, "failed": ExitCode.FAILED}.get(state, ExitCode.FAILED)
        if last is not None and state == "refused":
            code = exit_code(last.refusal_error())  # refused (2), or not started for want of S3 (5)
        _fail(f"upload {upload_id} ended {state}{reason}", code)
        return
    console.print(f"[green]completed[/green] s3://{last.bucket}/{last.key} {last.final_etag} (verified: {last.verified})")


@main.command()
@click.argument("upload_id")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_friendly_errors
def status(upload_id: str, as_json: bool) -> None:
    """Show an upload's state, parts and bytes done, error, and when recovery last ran."""
    st = _uploader().status(upload_id)
    if as_json:
        click.echo(json.dumps(st.to_dict(), indent=2))
        return
    table = Table(show_header=False, box=None)
    for name, value in _status_rows(st):
        table.add_row(f"[bold]{name}", value)
    Console().print(table)


def _status_rows(st: UploadStatus) -> list[tuple[str, str]]:
    if st.state == "refused":
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.finished or st.created))
        return [("upload id", st.upload_id), ("state", f"refused at {when}"), ("error", st.error)]
    rows = [
        ("upload id", st.upload_id),
        ("state", st.state),
        ("source", st.source),
        ("destination", f"s3://{st.bucket}/{st.key}"),
        ("parts", f"{st.parts_done}/{st.part_count} of {format_size(st.part_size)}"),
        ("bytes", f"{st.bytes_done}/{st.size} ({format_size(st.bytes_done)} of {format_size(st.size)})"),
    ]
    if st.final_etag:
        rows.append(("etag", f"{st.final_etag} (verified: {st.verified})"))
    if st.error:
        rows.append(("error", st.error))
    if st.retry_pending:
        assert st.retry_at is not None
        when = time.strftime("%H:%M:%S", time.localtime(st.retry_at))
        rows.append(("next", f"resumed automatically at {when} (automatic resume {st.auto_resumes + 1})"))
    if st.state != "refused":
        rows.append(("recovery", _recovery_row(st)))
    return rows


def _recovery_row(st: UploadStatus) -> str:
    """When the workers' recovery last ran: a long silence means no worker is running."""
    if st.recovery_ran_at is None:
        return "has not run yet (it runs inside `uploader worker`: is one running?)"
    ago = max(0.0, time.time() - st.recovery_ran_at)
    return f"last ran {ago:.0f} s ago on {st.recovery_leader or 'a worker'}"


@main.command()
@click.argument("upload_id")
@click.option("--timeout", type=float, default=None)
@_friendly_errors
def watch(upload_id: str, timeout: float | None) -> None:
    """Show a live progress bar until the upload finishes."""
    _follow(_uploader(), upload_id, timeout)


@main.command(name="list")
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@_friendly_errors
def list_(limit: int, as_json: bool) -> None:
    """List recent uploads, newest first."""
    uploads = _uploader().list(limit)
    if as_json:
        click.echo(json.dumps([u.to_dict() for u in uploads], indent=2))
        return
    table = Table("upload id", "state", "parts", "size", "destination", "error")
    for u in uploads:
        table.add_row(u.upload_id, u.state, f"{u.parts_done}/{u.part_count}", format_size(u.size), f"s3://{u.bucket}/{u.key}", u.error[:60])
    Console().print(table)


@main.command()
@click.argument("upload_id")
@click.option("--restart", is_flag=True, help="If the source changed, abort the old multipart upload and upload it again.")
@click.option("--source", help="Only if the checkpoint was lost: the upload's source, to rebuild it from the server's parts.")
@click.option("--to", "destination", help="Only if the checkpoint was lost: the upload's destination (s3://bucket/key).")
@click.option("--part-size", callback=_size, help="Only if the checkpoint was lost: the part size the upload was submitted with, if any.")
@click.option("--wait", "wait_", is_flag=True, help="Show progress until the upload finishes.")
@click.option("--timeout", type=float, default=None)
@_friendly_errors
def resume(
    upload_id: str, restart: bool, source: str | None, destination: str | None, part_size: int | None,
    wait_: bool, timeout: float | None,
) -> None:
    """Continue an upload from its checkpoint, sending only missing parts."""
    up = _uploader()
    options = {"part_size": part_size} if part_size else {}
    outcome = up.resume(upload_id, restart=restart, source=source, destination=destination, **options)
    click.echo(f"{upload_id}: dispatched {outcome['dispatched']} ({outcome['parts']} parts) {outcome['reason']}".rstrip())
    if wait_:
        _follow(up, upload_id, timeout)


@main.command()
@click.argument("upload_id")
@_friendly_errors
def cancel(upload_id: str) -> None:
    """Cancel an upload: stop its parts and abort its multipart upload."""
    outcome = _uploader().cancel(upload_id)
    click.echo(f"{upload_id}: {'cancelled' if outcome == 'cancelled' else 'was already cancelled'}")


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--concurrency", "-c", type=int, default=None, help="Parallel parts (default UPLOADER_WORKER_CONCURRENCY, 8).")
@click.option("--pool", type=click.Choice(["threads", "prefork", "solo"]), default=None, help="Celery pool (default UPLOADER_WORKER_POOL, threads).")
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@click.option("--hostname", "-n", default=None, help="Worker name (default celery@<host>).")
@click.pass_context
def worker(ctx: click.Context, concurrency: int | None, pool: str | None, loglevel: str, hostname: str | None) -> None:
    """Start a worker consuming both queues, with task events on (for Flower).

    Every worker also takes part in recovery (sending again the parts of dead workers, resuming
    stalled uploads, the janitor): one at a time across the fleet leads it, no scheduler needed.
    Extra arguments are passed to `celery worker`."""
    from uploader.config import get_settings
    from uploader.localstack import worker_argv

    pool = pool or get_settings().worker_pool
    argv = worker_argv(
        concurrency=concurrency or get_settings().worker_concurrency, hostname=hostname, loglevel=loglevel, pool=pool
    )
    os.environ["UPLOADER_WORKER_POOL"] = pool  # the app's configured pool wins over celery's --pool
    os.execv(argv[0], argv + list(ctx.args))


@main.command()
@click.option("--dry-run", is_flag=True, help="Only show what would be removed.")
@_friendly_errors
def gc(dry_run: bool) -> None:
    """Abort the multipart uploads of abandoned uploads (failed, cancelled or stalled longer than
    UPLOADER_ABANDON_SECONDS) and forget them. Never touches uploads this system did not start."""
    actions = _uploader().janitor(dry_run=dry_run)
    table = Table("upload id", "state", "destination", "multipart upload", "why", title="would remove" if dry_run else "removed")
    for a in actions:
        table.add_row(a["upload_id"], a["state"], f"s3://{a['bucket']}/{a['key']}", a["mpu_id"] or "-", a["reason"])
    Console().print(table)
    click.echo(f"{len(actions)} upload(s) {'to remove' if dry_run else 'removed'}")


@main.command()
@click.option("--size", callback=_size, default="256MiB", show_default=True, help="Size of the generated file.")
@click.option("--part-size", callback=_size, default="8MiB", show_default=True)
@click.option("--workers", type=int, default=1, show_default=True, help="Worker processes to start.")
@click.option("--concurrency", type=int, default=8, show_default=True, help="Threads per worker.")
@_friendly_errors
def demo(size: int, part_size: int, workers: int, concurrency: int) -> None:
    """Run the whole system locally: Redis, SeaweedFS, workers, one verified upload."""
    from uploader.demo import run_demo

    sys.exit(run_demo(size=size, part_size=part_size, workers=workers, concurrency=concurrency))


@main.group()
def deadletter() -> None:
    """Messages workers quarantined (malformed, unknown task, wrong arguments): inspect, purge.

    Workers acknowledge such a message and keep it here (newest first, at most 10,000) instead of
    stopping or running it: see the README's "Poison messages"."""


def _dead_letters(action: Callable[[Any], Any]) -> Any:
    """Run ``action`` on the dead-letter list of the configured checkpoint Redis."""
    from uploader.checkpoint.deadletter import DeadLetters

    up = _uploader()
    with up.reaching():
        return action(DeadLetters(up.checkpoint.redis, prefix=up.settings.key_prefix))


@deadletter.command(name="list")
@click.option("--limit", type=int, default=50, show_default=True, help="Newest entries to show.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (the entries as stored).")
@_friendly_errors
def deadletter_list(limit: int, as_json: bool) -> None:
    """Show the newest quarantined messages: when, queue, task, id and what was wrong."""
    from uploader.checkpoint.deadletter import printable

    entries, total = _dead_letters(lambda store: (store.list(limit), store.count()))
    if as_json:
        click.echo(json.dumps(entries, indent=2))
        return
    table = Table("when", "queue", "task", "task id", "reason")
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.get("at") or 0))
        cells = (printable(e.get(k) or "-", 120) for k in ("queue", "task", "task_id", "reason"))
        table.add_row(when, *(escape(c) for c in cells))
    Console().print(table)
    click.echo(f"{len(entries)} shown of {total} quarantined message(s)")


@deadletter.command(name="purge")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@_friendly_errors
def deadletter_purge(yes: bool) -> None:
    """Remove every quarantined message from the dead-letter list."""
    if not yes:
        count = _dead_letters(lambda store: store.count())
        if not count:
            click.echo("purged 0 quarantined message(s)")
            return
        click.confirm(f"Purge {count} quarantined message(s)?", abort=True)
    purged = _dead_letters(lambda store: store.purge())
    click.echo(f"purged {purged} quarantined message(s)")


if __name__ == "__main__":
    main()
