"""``uploader``: submit, watch and manage uploads from a shell, and start workers.

Errors print one readable line (never a traceback) and exit with a status that says what kind of
end it was (:class:`ExitCode`, listed in ``uploader --help`` and the README).
"""

from __future__ import annotations

import enum
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from uploader import logsafe
from uploader.errors import (
    InvalidRequest,
    Misconfigured,
    NotAuthorized,
    NoWorkerOnHost,
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

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from uploader.client import Uploader, UploadStatus

# What the commands need is imported when a command runs, not here: `uploader --help` and a
# usage error load click and little else (no pydantic, rich, Celery, Redis or boto3).


class _Console:
    """rich's console on stderr, made at its first use."""

    _real: Console | None = None

    def real(self) -> Console:
        if _Console._real is None:
            from rich.console import Console

            _Console._real = Console(stderr=True)
        return _Console._real

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real(), name)


console = _Console()


def escape(text: str) -> str:
    """``text`` with rich's markup characters escaped."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def _print(renderable: Any) -> None:
    """Print ``renderable`` (a table) on stdout: to the terminal's width, or, into a file or a
    pipe, as wide as its rows are (nothing cut or folded for grep and awk)."""
    from rich.console import Console

    out = Console()
    if not out.is_terminal:
        out.width = 4096
    out.print(renderable)


def _print_line(markup: str) -> None:
    """One line of rich markup on stdout (plain text into a file or a pipe)."""
    from rich.console import Console

    Console(soft_wrap=True, highlight=False).print(markup)


def _table(*columns: str, **options: Any) -> Table:
    from rich.table import Table

    return Table(*columns, **options)


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
    #: A required setting is missing or invalid (e.g. a worker without UPLOADER_FLEET_KEY).
    MISCONFIGURED = 7
    #: Interrupted (Ctrl-C); the upload goes on.
    INTERRUPTED = 130


#: Which exit status each error means (the first matching class wins).
_EXIT_CODES: tuple[tuple[type[BaseException], ExitCode], ...] = (
    (UploadFailed, ExitCode.FAILED),
    (UploadCancelled, ExitCode.CANCELLED),
    (UploadNotFound, ExitCode.NOT_FOUND),
    (Unreachable, ExitCode.UNAVAILABLE),
    (NoWorkers, ExitCode.UNAVAILABLE),
    (NoWorkerOnHost, ExitCode.UNAVAILABLE),
    (TransientStoreError, ExitCode.UNAVAILABLE),  # S3 kept failing (unreachable, throttling)
    (InvalidRequest, ExitCode.REFUSED),
    (UploadRefused, ExitCode.REFUSED),
    (SourceError, ExitCode.REFUSED),
    (SourceChanged, ExitCode.REFUSED),
    (UploadConflict, ExitCode.REFUSED),
    (NotAuthorized, ExitCode.REFUSED),
    (TimeoutError, ExitCode.TIMED_OUT),
    (Misconfigured, ExitCode.MISCONFIGURED),
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
    # One line, whatever the message quotes (a key, a path, a server's answer): control
    # characters escaped, so it can neither break the line nor drive the terminal.
    console.print(
        f"[red]error:[/red] {escape(logsafe.escape_controls(message))}", highlight=False, soft_wrap=True, emoji=False
    )
    sys.exit(int(code))


def _friendly_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from pydantic import ValidationError

        try:
            return func(*args, **kwargs)
        except (UploaderError, TimeoutError) as exc:
            _fail(str(exc), exit_code(exc))
        except KeyboardInterrupt:
            _fail("interrupted", ExitCode.INTERRUPTED)
        except ValidationError as exc:  # the UPLOADER_* settings (their values are never shown)
            _fail(f"invalid settings: {settings_problems(exc)}", ExitCode.REFUSED)
        except Exception as exc:  # a bug: one line for the user, the traceback on request
            if os.environ.get("UPLOADER_DEBUG"):
                raise
            _fail(f"unexpected {type(exc).__name__}: {exc} (UPLOADER_DEBUG=1 shows the traceback)", ExitCode.FAILED)

    return wrapper


def settings_problems(exc: Any) -> str:
    """The problems of invalid settings on one line, each under its variable's name."""
    problems = []
    for error in exc.errors(include_input=False, include_url=False):
        message = str(error["msg"]).removeprefix("Value error, ")
        field = ".".join(str(part) for part in error["loc"])
        problems.append(f"UPLOADER_{field.upper()}: {message}" if field else message)
    return "; ".join(problems)


def _uploader() -> Uploader:
    from uploader.capabilities import CapabilityStore, default_directory
    from uploader.client import Uploader
    from uploader.config import get_settings

    # The CLI keeps the capability tokens of what it submits on disk: `cancel` and `resume`
    # from the same user account find them there.
    directory = get_settings().capability_dir or default_directory()
    return Uploader.from_env(interactive=True, capabilities=CapabilityStore(directory))


def _size(_: click.Context, __: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value)
    except UploaderError as exc:
        raise click.BadParameter(str(exc)) from None


class Seconds(click.ParamType):
    """A number of seconds: finite and not negative (a NaN deadline is never reached, and an
    infinite one is no deadline: leave the option out instead)."""

    name = "seconds"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float) and math.isfinite(value) and value >= 0:
            return value
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            seconds = math.nan
        if not (math.isfinite(seconds) and seconds >= 0):
            self.fail(f"{logsafe.escape_controls(repr(value)[:40])} is not a number of seconds (0 or more)", param, ctx)
        return seconds


SECONDS = Seconds()
#: The states ``list --state`` takes (uploader.model.UploadState's, not imported for --help).
LISTED_STATES = ("creating", "uploading", "completing", "completed", "failed", "cancelled")
#: Most rows a listing shows (Redis takes 64-bit indexes; nobody reads more).
MAX_LISTED = 100_000


def _upload_id(_: click.Context, __: click.Parameter, value: str) -> str:
    from uploader.ids import check_upload_id

    try:
        check_upload_id(value)
    except InvalidRequest as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def _pairs(what: str, shape: str) -> Any:
    """A click callback reading repeated ``NAME=VALUE`` options into a dict (``None`` if none)."""

    def parse(_: click.Context, __: click.Parameter, values: tuple[str, ...]) -> dict[str, str] | None:
        out = {}
        for item in values:
            name, sep, value = item.partition("=")
            if not sep:
                raise click.BadParameter(f"{item!r}: write {what} as {shape}")
            out[name] = value
        return out or None

    return parse


_metadata = _pairs("metadata", "NAME=VALUE")


class OutputMode(enum.Enum):
    """What a command prints on stdout: its ordinary text, JSON, or nothing (``--quiet``)."""

    NORMAL = "normal"
    JSON = "json"
    QUIET = "quiet"


@dataclass(frozen=True)
class Output:
    """How a command prints (``--json``, ``--quiet``, ``--no-progress``). Errors always go to
    stderr, one line each; the exit status says how it ended whatever is printed."""

    mode: OutputMode = OutputMode.NORMAL
    #: Whether a waiting command shows progress (on stderr).
    progress: bool = True

    def emit(self, data: Any, text: str) -> None:
        """``data`` as JSON with ``--json``, ``text`` otherwise, nothing with ``--quiet``."""
        if self.mode is OutputMode.JSON:
            click.echo(json.dumps(data, indent=2, default=str))
        elif self.mode is OutputMode.NORMAL and text:
            click.echo(text)


def _output_options(*, progress: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--json`` and ``--quiet``/``-q`` (and, for a command that can wait, ``--no-progress``),
    handed to the command as ``output``."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def wrapper(*args: Any, as_json: bool, quiet: bool, no_progress: bool = False, **kwargs: Any) -> Any:
            if as_json and quiet:
                raise click.UsageError("--json and --quiet do not go together")
            mode = OutputMode.JSON if as_json else OutputMode.QUIET if quiet else OutputMode.NORMAL
            return func(*args, output=Output(mode, progress=mode is OutputMode.NORMAL and not no_progress), **kwargs)

        command = click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")(wrapper)
        command = click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors; the exit status says how it ended.")(command)
        if progress:
            command = click.option("--no-progress", is_flag=True, help="No progress while waiting, only the final line.")(command)
        return command

    return decorate


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_STATUS_HELP)
@click.version_option(package_name="uploader")
@click.option(
    "--log-level", envvar="UPLOADER_LOG_LEVEL", default="WARNING", show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], case_sensitive=False),
    help="Log level of this command's own log lines on stderr (escaped, credentials redacted). "
    "Workers: `uploader worker --loglevel`.",
)
def main(log_level: str) -> None:
    """Distributed, resumable multipart uploads to S3-compatible storage.

    Configuration comes from UPLOADER_* environment variables (see the README)."""
    logsafe.configure_cli_logging(log_level.upper())


@main.command()
@click.argument("source")
@click.argument("destination")
@click.option("--part-size", callback=_size, help="Part size, e.g. 16MiB (5MiB..5GiB). Default: 8MiB, grown to fit 10,000 parts.")
@click.option("--upload-id", help="Idempotency key: submitting the same id again continues that upload.")
@click.option("--metadata", "-m", multiple=True, callback=_metadata, help="User metadata NAME=VALUE (repeatable).")
@click.option("--content-type", help="Content-Type of the stored object (default: guessed from the key or the file name).")
@click.option("--cache-control", help="Cache-Control header of the stored object.")
@click.option("--content-disposition", help="Content-Disposition header of the stored object.")
@click.option("--content-encoding", help="Content-Encoding header of the stored object.")
@click.option("--content-language", help="Content-Language header of the stored object.")
@click.option("--expires", help="Expires header: an ISO 8601 date-time with its zone, e.g. 2030-01-31T00:00:00Z.")
@click.option("--acl", help="Canned ACL: private, public-read, bucket-owner-full-control, ...")
@click.option("--storage-class", help="Storage class: STANDARD, STANDARD_IA, GLACIER_IR, ...")
@click.option("--tag", "tags", multiple=True, callback=_pairs("tag", "KEY=VALUE"), help="Object tag KEY=VALUE (repeatable; at most 10).")
@click.option("--sse", help="Server-side encryption: AES256 or aws:kms.")
@click.option("--sse-kms-key-id", help="KMS key (id, ARN or alias) for --sse aws:kms.")
@click.option("--bucket-key", "bucket_key_enabled", is_flag=True, default=None, help="Use an S3 Bucket Key for SSE-KMS.")
@click.option("--sse-c-key", "sse_customer_key", metavar="NAME", help="SSE-C: the NAME of a key in the workers' UPLOADER_SSE_C_KEYS.")
@click.option("--no-overwrite", is_flag=True, help="Fail instead of replacing an existing object at the key.")
@click.option("--object-lock-mode", help="Object lock mode: GOVERNANCE or COMPLIANCE (with --object-lock-retain-until).")
@click.option("--object-lock-retain-until", help="Object lock retention date: ISO 8601 with its zone.")
@click.option("--object-lock-legal-hold", help="Object lock legal hold: ON or OFF.")
@click.option("--expected-bucket-owner", help="Account id (12 digits) the bucket must belong to.")
@click.option("--request-payer", help="'requester' to upload into a Requester Pays bucket.")
@click.option(
    "--checksum", "checksum_algorithm", type=click.Choice(["CRC32", "CRC32C", "CRC64NVME", "SHA1", "SHA256", "MD5"], case_sensitive=False),
    help="Per-part checksum, combined into the whole object's (default: the workers' UPLOADER_PART_CHECKSUM).",
)
@click.option("--abort-on-failure", is_flag=True, help="Abort the multipart upload if it fails (default: keep parts for resume).")
@click.option("--callback-url", help="POST the result here (signed JSON) when the upload completes, fails for good or is cancelled.")
@click.option("--callback-var", "callback_vars", multiple=True, callback=_pairs("callback variables", "NAME=VALUE"),
              help="A variable NAME=VALUE sent with the notification (repeatable).")
@click.option("--callback-body", metavar="TEMPLATE",
              help="POST this body instead of the JSON result, e.g. 'bucket=${bucket}&object=${object}&who=${x:who}' (OSS's callbackBody).")
@click.option("--callback-body-type", type=click.Choice(["application/x-www-form-urlencoded", "application/json"]),
              help="Content type of --callback-body, and how its values are escaped (default: application/x-www-form-urlencoded).")
@click.option("--on-complete", metavar="TASK", help="Celery task (by name) sent with the result when the upload completes.")
@click.option("--on-failure", metavar="TASK", help="Celery task (by name) sent with the result when it fails for good or is cancelled.")
@click.option("--callback-queue", metavar="QUEUE", help="Queue of the --on-complete/--on-failure tasks (default: celery).")
@click.option("--oss-callback", metavar="JSON",
              help="Alibaba OSS's own callback (oss profile only): its JSON, e.g. '{\"callbackUrl\": \"https://...\", \"callbackBody\": \"...\"}'.")
@click.option("--oss-callback-var", "oss_callback_vars", multiple=True, callback=_pairs("OSS callback variables", "x:NAME=VALUE"),
              help="An OSS callback variable x:NAME=VALUE (repeatable; with --oss-callback).")
@click.option("--endpoint", help="Named S3 endpoint of the workers (UPLOADER_ENDPOINTS). Default: the one from UPLOADER_S3_*.")
@click.option("--source-credentials", metavar="NAME",
              help="An http(s):// source's credentials: the NAME of a header or basic auth in the workers' UPLOADER_SOURCE_CREDENTIALS.")
@click.option("--source-endpoint", help="Named S3 endpoint an s3://bucket/key SOURCE is read from. Default: the one from UPLOADER_S3_*.")
@click.option(
    "--concurrency", "max_concurrency", type=int,
    help="At most this many parts of this upload sent at once, across every worker (default: no cap).",
)
@click.option(
    "--limit-rate", "max_bandwidth", callback=_size,
    help="Bytes per second for this upload across every worker, e.g. 10MiB (default: no limit).",
)
@click.option(
    "--priority", type=click.IntRange(0, 9),
    help="How urgent this upload is, 0-9, 9 the most urgent (default: none, the broker's default).",
)
@click.option(
    "--local", "locality", flag_value="host", default=None,
    help="SOURCE is on this machine's own disk: only the workers on this host (UPLOADER_HOST_NAME) read it.",
)
@click.option("--recursive", "-r", is_flag=True, help="SOURCE is a directory: upload each of its files (a batch) under DESTINATION as a prefix.")
@click.option("--include", multiple=True, metavar="GLOB", help="With -r: only files whose relative path matches (repeatable; '*' matches '/' too).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="With -r: leave out files whose relative path matches (repeatable).")
@click.option("--skip-unchanged", is_flag=True, help="With -r: skip files whose object exists with the same size and fingerprint.")
@click.option("--page-size", type=click.IntRange(1, 10_000), default=None, help="With -r: files listed per listing task (default 500).")
@click.option("--wait", "wait_", is_flag=True, help="Show progress until the upload finishes.")
@click.option("--timeout", type=SECONDS, default=None, help="Give up waiting after this many seconds.")
@click.option(
    "--accept-timeout", type=SECONDS, default=None,
    help="Seconds to wait for a worker to accept or refuse the request (default UPLOADER_SUBMIT_ACCEPT_TIMEOUT, 15; 0: don't wait).",
)
@click.option("--dry-run", is_flag=True, help="Check the request and show what would be uploaded; send nothing.")
@_output_options(progress=True)
@_friendly_errors
def submit(
    source: str, destination: str, wait_: bool, timeout: float | None, accept_timeout: float | None, recursive: bool,
    include: tuple[str, ...], exclude: tuple[str, ...], skip_unchanged: bool, page_size: int | None, dry_run: bool,
    output: Output, **options: Any,
) -> None:
    """Upload SOURCE (a path the workers can read, relative ones taken from here; an http(s):// URL;
    or an S3 object s3://bucket/key) to DESTINATION (s3://bucket/key; s3://bucket/prefix/ keeps the
    file's name); with -r, every file of the directory SOURCE to DESTINATION as a prefix.

    Prints the upload id (the batch id with -r; on stdout, as soon as the request is sent), then
    waits until a worker accepts the request: a refusal is the reason on stderr and exit status 2
    (``status ID`` says it again for a day)."""
    if "://" not in source and not os.path.isabs(source):
        source = os.path.abspath(source)  # a path typed here: from here (the workers share the mount)
    if recursive:
        _submit_batch(source, destination, wait_, timeout, accept_timeout, include, exclude, skip_unchanged, page_size,
                      options, dry_run, output)
        return
    batch_only = [name for name, given in (("--include", include), ("--exclude", exclude), ("--skip-unchanged", skip_unchanged),
                                           ("--page-size", page_size)) if given]
    if batch_only:
        raise InvalidRequest(f"{', '.join(batch_only)} applies to directories: add -r (--recursive)")
    if source.endswith("/") or os.path.isdir(source):
        raise InvalidRequest(f"source {source!r} is a directory: add -r (--recursive) to upload its files")
    up = _uploader()
    # (`is`, not `in (None, False)`: 0 == False, and `--part-size 0` must reach validation.)
    given = {k: v for k, v in options.items() if v is not None and v is not False}
    if dry_run:
        planned = up.check_submission(source, destination, **given)
        output.emit(planned, f"would upload {planned['source']} to s3://{planned['bucket']}/{planned['key']}")
        return
    handle = up.submit(source, destination, **given)
    output.emit({"upload_id": handle.upload_id}, handle.upload_id)
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
        _follow(up, handle.upload_id, timeout, start=handle.start, output=output)


def _submit_batch(
    source: str, destination: str, wait_: bool, timeout: float | None, accept_timeout: float | None,
    include: tuple[str, ...], exclude: tuple[str, ...], skip_unchanged: bool, page_size: int | None, options: dict[str, Any],
    dry_run: bool, output: Output,
) -> None:
    """``submit -r``: the directory as the workers will read it (a relative one, from here: the
    workers share the mount), one batch."""
    up = _uploader()
    given = {k: v for k, v in options.items() if v is not None and v is not False}
    if given.get("upload_id"):
        raise InvalidRequest("--upload-id names one upload: a batch has one per file (its id is printed)")
    directory = source.rstrip("/") or "/"
    if dry_run:
        _plan_batch(up, directory, destination, include, exclude, page_size, given, output)
        return
    handle = up.submit_batch(
        directory, destination, include=include, exclude=exclude, skip_unchanged=skip_unchanged,
        page_size=page_size, **given,
    )
    output.emit({"batch_id": handle.batch_id}, handle.batch_id)
    wait_accept = up.settings.submit_accept_timeout if accept_timeout is None else accept_timeout
    if wait_accept:
        try:
            handle.accepted(wait_accept)
        except TimeoutError:
            _fail(f"batch {handle.batch_id} was not accepted within {wait_accept:g} s: is a worker running?", ExitCode.TIMED_OUT)
    if wait_:
        _follow_batch(up, handle.batch_id, timeout, output)


def _plan_batch(
    up: Uploader, directory: str, destination: str, include: tuple[str, ...], exclude: tuple[str, ...],
    page_size: int | None, options: dict[str, Any], output: Output,
) -> None:
    """``submit -r --dry-run``: the request checked as the client checks it, and the files this
    machine sees in the directory that the batch would take (the workers list it themselves)."""
    from uploader.sources.directory import Selector

    up.check_batch(directory, destination, include=include, exclude=exclude, page_size=page_size, **options)
    bucket, _, prefix = destination.removeprefix("s3://").partition("/")
    selector = Selector(tuple(include), tuple(exclude))
    files: list[dict[str, Any]] = []
    for root, dirs, names in os.walk(directory):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(root, name)
            relative = os.path.relpath(path, directory).replace(os.sep, "/")
            if os.path.isfile(path) and not os.path.islink(path) and selector.takes(relative):
                files.append({"path": relative, "key": prefix + relative, "size": os.path.getsize(path)})
    total = sum(int(f["size"]) for f in files)
    text = "\n".join(f"would upload {directory}/{f['path']} to s3://{bucket}/{f['key']}" for f in files)
    summary = f"{len(files)} files, {format_size(total)}"
    output.emit({"directory": directory, "bucket": bucket, "files": files, "count": len(files), "bytes": total},
                f"{text}\n{summary}" if text else summary)


def _follow_batch(up: Uploader, batch_id: str, timeout: float | None, output: Output | None = None) -> None:
    """Wait for the batch; its summary, and a non-zero exit unless every file was uploaded or skipped."""
    last = up.wait_batch(batch_id, timeout=timeout)
    if output is not None and output.mode is not OutputMode.NORMAL:
        output.emit(last.to_dict(), "")
        if last.failures:
            sys.exit(int(ExitCode.FAILED))
        return
    console.print(_batch_summary(last), highlight=False)
    for problem in last.failures:
        console.print(f"  failed: {escape(logsafe.escape_controls(problem.path))}: {escape(logsafe.escape_controls(problem.reason))}",
                      highlight=False, soft_wrap=True)
    if last.state != "completed":
        _fail(f"batch {batch_id} ended {last.state}", ExitCode.CANCELLED if last.state == "cancelled" else ExitCode.FAILED)


def _batch_summary(st: Any) -> str:
    return (
        f"batch {st.batch_id} {st.state}: {st.files_done}/{st.files_total} files uploaded, {st.files_skipped} unchanged, "
        f"{st.files_failed} failed, {st.files_cancelled} cancelled, {st.files_active} in progress; "
        f"{format_size(st.bytes_done)} of {format_size(st.bytes_total)}"
    )


def _follow(up: Uploader, upload_id: str, timeout: float | None, start: Any = None, output: Output | None = None) -> None:
    """Progress until the upload ends (a bar on a terminal, a line every few seconds otherwise;
    none with ``--quiet``, ``--json`` or ``--no-progress``); a non-zero exit unless it completed.
    Ctrl-C leaves the upload running and says how to watch it."""
    from uploader.progress import show_progress

    output = output or Output()
    statuses = up.watch(upload_id, timeout=timeout, start=start)
    try:
        if output.progress:
            last = show_progress(statuses, console.real(), line_every=up.settings.progress_interval)
        else:
            last = None
            for status in statuses:  # (watch ends when the upload does)
                last = status
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
        if output.mode is OutputMode.JSON and last is not None:
            click.echo(json.dumps(last.to_dict(), indent=2))
        _fail(f"upload {upload_id} ended {state}{reason}", code)
        return
    if output.mode is OutputMode.JSON:
        click.echo(json.dumps(last.to_dict(), indent=2))
    elif output.mode is OutputMode.NORMAL:
        console.print(f"[green]completed[/green] s3://{last.bucket}/{last.key} {last.final_etag} (verified: {last.verified})")


@main.command()
@click.argument("upload_id", callback=_upload_id)
@_output_options(progress=False)
@_friendly_errors
def status(upload_id: str, output: Output) -> None:
    """Show an upload's (or a batch's) state, parts and bytes done, error, and when recovery last
    ran. UPLOAD_ID may be the start of a recent upload's id (4 characters or more)."""
    up = _uploader()
    upload_id = up.resolve_id(upload_id)
    batch = up.find_batch(upload_id)
    if batch is not None:
        if output.mode is not OutputMode.NORMAL:
            output.emit(batch.to_dict(), "")
        else:
            click.echo(_batch_summary(batch))
            for problem in batch.failures:
                click.echo(f"  failed: {logsafe.escape_controls(problem.path)}: {logsafe.escape_controls(problem.reason)}")
        return
    st = up.status(upload_id)
    if output.mode is not OutputMode.NORMAL:
        output.emit(st.to_dict(), "")
        return
    table = _table(show_header=False, box=None)
    for name, value in _status_rows(st):
        table.add_row(f"[bold]{name}", value)
    _print(table)


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
    limits = _limits_row(st)
    if limits:
        rows.append(("limits", limits))
    if st.priority is not None:
        rows.append(("priority", f"{st.priority} (0-9, 9 most urgent)"))
    if st.host:
        rows.append(("host", f"{st.host} (a host-local file: only that host's workers read it)"))
    if st.final_etag:
        rows.append(("etag", f"{st.final_etag} (verified: {st.verified})"))
    result = st.result
    if result is not None:
        rows.append(("storage class", result.storage_class))
        if result.version_id:
            rows.append(("version id", result.version_id))
    if st.checksum:
        rows.append(("checksum", f"{st.checksum_algorithm} {st.checksum} ({st.checksum_type})"))
    if st.crc64ecma:
        rows.append(("crc64ecma", st.crc64ecma))
    if st.oss_callback_answer:
        rows.append(("oss callback answer", st.oss_callback_answer))
    if st.error:
        rows.append(("error", st.error))
    if st.retry_pending:
        assert st.retry_at is not None
        when = time.strftime("%H:%M:%S", time.localtime(st.retry_at))
        rows.append(("next", f"resumed automatically at {when} (automatic resume {st.auto_resumes + 1})"))
    for delivery in st.notifications:
        rows.append((f"notify {delivery.channel}", _delivery_row(delivery)))
    if st.state != "refused":
        rows.append(("recovery", _recovery_row(st)))
    return rows


def _limits_row(st: UploadStatus) -> str:
    """The upload's own limits across the fleet ("" when it asked for none)."""
    limits = []
    if st.max_concurrency:
        limits.append(f"at most {st.max_concurrency} part{'s' if st.max_concurrency != 1 else ''} at once")
    if st.max_bandwidth:
        limits.append(f"{format_size(st.max_bandwidth)}/s")
    return ", ".join(limits)


def _delivery_row(delivery: Any) -> str:
    """How a notification's delivery went: attempts, last status, delivered or next attempt."""
    def at(when: float) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))

    status = f", last status {delivery.last_status}" if delivery.last_status else ""
    head = f"{delivery.kind}: {delivery.attempts} attempt{'s' if delivery.attempts != 1 else ''}{status}"
    if delivery.delivered_at:
        return f"{head}, delivered at {at(delivery.delivered_at)}"
    if delivery.gave_up_at:
        return f"{head}, given up at {at(delivery.gave_up_at)}: {delivery.last_error}"
    error = f" ({delivery.last_error})" if delivery.last_error else ""
    return f"{head}{error}, next attempt at {at(delivery.next_attempt)}" if delivery.next_attempt else f"{head}, pending"


def _recovery_row(st: UploadStatus) -> str:
    """When the workers' recovery last ran: a long silence means no worker is running."""
    if st.recovery_ran_at is None:
        return "has not run yet (it runs inside `uploader worker`: is one running?)"
    ago = max(0.0, time.time() - st.recovery_ran_at)
    return f"last ran {ago:.0f} s ago on {st.recovery_leader or 'a worker'}"


@main.command()
@click.argument("upload_id", callback=_upload_id)
@click.option("--timeout", type=SECONDS, default=None, help="Give up waiting after this many seconds.")
@_output_options(progress=True)
@_friendly_errors
def watch(upload_id: str, timeout: float | None, output: Output) -> None:
    """Show progress until the upload finishes (UPLOAD_ID may be the start of a recent upload's id)."""
    up = _uploader()
    _follow(up, up.resolve_id(upload_id), timeout, output=output)


@main.command(name="list")
@click.option("--limit", type=click.IntRange(0, MAX_LISTED), default=50, show_default=True)
@click.option("--state", "states", multiple=True, type=click.Choice(LISTED_STATES),
              help="Only uploads in this state (repeatable).")
@_output_options(progress=False)
@_friendly_errors
def list_(limit: int, states: tuple[str, ...], output: Output) -> None:
    """List recent uploads, newest first: whole ids, state, parts, size, when created and last
    updated (local time), destination and error."""
    uploads = _uploader().list(limit, states=states)
    if output.mode is not OutputMode.NORMAL:
        output.emit([u.to_dict() for u in uploads], "")
        return
    table = _table("upload id", "state", "parts", "size", "created", "updated", "destination", "error")
    table.columns[0].no_wrap = True  # an id is never cut: it is what the other commands take
    for u in uploads:
        table.add_row(u.upload_id, u.state, f"{u.parts_done}/{u.part_count}", format_size(u.size), _when(u.created),
                      _when(u.updated), escape(logsafe.escape_controls(f"s3://{u.bucket}/{u.key}")),
                      escape(logsafe.escape_controls(u.error[:60])))
    _print(table)


def _when(stamp: float | None) -> str:
    """A unix time as local ``YYYY-MM-DD HH:MM:SS`` ("-" for none)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) if stamp else "-"


@main.command()
@click.argument("upload_id", callback=_upload_id)
@click.option("--restart", is_flag=True, help="If the source changed, abort the old multipart upload and upload it again.")
@click.option("--source", help="Only if the checkpoint was lost: the upload's source, to rebuild it from the server's parts.")
@click.option("--to", "destination", help="Only if the checkpoint was lost: the upload's destination (s3://bucket/key).")
@click.option("--part-size", callback=_size, help="Only if the checkpoint was lost: the part size the upload was submitted with, if any.")
@click.option("--wait", "wait_", is_flag=True, help="Show progress until the upload finishes.")
@click.option("--timeout", type=SECONDS, default=None, help="Give up waiting after this many seconds.")
@_output_options(progress=True)
@_friendly_errors
def resume(
    upload_id: str, restart: bool, source: str | None, destination: str | None, part_size: int | None,
    wait_: bool, timeout: float | None, output: Output,
) -> None:
    """Continue an upload from its checkpoint, sending only missing parts (a batch: its failed
    uploads). UPLOAD_ID may be the start of a recent upload's id."""
    up = _uploader()
    upload_id = up.resolve_id(upload_id)
    if up.find_batch(upload_id) is not None:
        outcome = up.resume_batch(upload_id)
        output.emit(outcome, f"{upload_id}: {outcome['uploads_resumed']} uploads resumed, {outcome['files_restarted']} files started again")
        if wait_:
            _follow_batch(up, upload_id, timeout, output)
        return
    options: dict[str, Any] = {"part_size": part_size} if part_size is not None else {}
    outcome = up.resume(upload_id, restart=restart, source=source, destination=destination, **options)
    output.emit(outcome, f"{upload_id}: dispatched {outcome['dispatched']} ({outcome['parts']} parts) {outcome['reason']}".rstrip())
    if wait_:
        _follow(up, upload_id, timeout, output=output)


@main.command()
@click.argument("upload_id", callback=_upload_id)
@_output_options(progress=False)
@_friendly_errors
def cancel(upload_id: str, output: Output) -> None:
    """Cancel an upload: stop its parts and abort its multipart upload (a batch: each of its
    uploads). UPLOAD_ID may be the start of a recent upload's id."""
    up = _uploader()
    upload_id = up.resolve_id(upload_id)
    if up.find_batch(upload_id) is not None:
        done = up.cancel_batch(upload_id)
        output.emit(done, f"{upload_id}: {'cancelled' if done['outcome'] == 'cancelled' else 'was already cancelled'} "
                          f"({done['uploads_cancelled']} uploads cancelled)")
        return
    outcome = up.cancel(upload_id)
    output.emit({"upload_id": upload_id, "outcome": outcome},
                f"{upload_id}: {'cancelled' if outcome == 'cancelled' else 'was already cancelled'}")


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--concurrency", "-c", type=click.IntRange(1, 4096), default=None, help="Parallel parts (default UPLOADER_WORKER_CONCURRENCY, 8).")
@click.option("--pool", type=click.Choice(["threads", "prefork", "solo"]), default=None, help="Celery pool (default UPLOADER_WORKER_POOL, threads).")
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@click.option("--hostname", "-n", default=None, help="Worker name (default celery@<host>).")
@click.pass_context
def worker(ctx: click.Context, concurrency: int | None, pool: str | None, loglevel: str, hostname: str | None) -> None:
    """Start a worker consuming both queues, with task events on (for Flower).

    Every worker also takes part in recovery (sending again the parts of dead workers, resuming
    stalled uploads, the janitor): one at a time across the fleet leads it, no scheduler needed.
    Extra arguments are passed to `celery worker`."""
    from uploader.auth import FLEET_KEY_MISSING
    from uploader.config import get_settings
    from workers.command import worker_argv

    if get_settings().fleet_key is None:
        _fail(FLEET_KEY_MISSING, ExitCode.MISCONFIGURED)
    pool = pool or get_settings().worker_pool
    argv = worker_argv(
        concurrency=concurrency or get_settings().worker_concurrency, hostname=hostname, loglevel=loglevel, pool=pool
    )
    os.environ["UPLOADER_WORKER_POOL"] = pool  # the app's configured pool wins over celery's --pool
    os.execv(argv[0], argv + list(ctx.args))


@main.command()
@click.argument("kind", type=click.Choice(["live", "ready"]))
@click.option("--file", "path", envvar="UPLOADER_PROBE_FILE", required=True, metavar="PATH",
              help="The worker's probe file (default: UPLOADER_PROBE_FILE, the setting the worker writes it by).")
def probe(kind: str, path: str) -> None:
    """Whether this machine's (or container's) worker is live (its heartbeat runs) or ready (its
    heartbeat reaches Redis): exit status 0, or 1 with the reason. For Kubernetes and Compose probes."""
    from uploader.probe import ProbeKind, check

    result = check(path, ProbeKind(kind))
    if not result.ok:
        click.echo(f"not {kind}: {result.reason}", err=True)
        sys.exit(1)
    click.echo(kind)


@main.command()
@click.option("--bucket", help="Also check that the S3 credentials here reach this bucket.")
@click.option("--strict", is_flag=True, help="Exit 1 on warnings too, not only on failures.")
@_output_options(progress=False)
@_friendly_errors
def doctor(bucket: str | None, strict: bool, output: Output) -> None:
    """Check the deployment, one line each with a verdict and what to do: Redis (reachable,
    persistence, eviction policy), S3, live workers and their versions, recovery, queues,
    messages on queues no worker reads, dead letters. Exit status 1 if a check failed."""
    from importlib.metadata import PackageNotFoundError, version

    from uploader.config import get_settings
    from uploader.doctor import Verdict, run_checks

    try:
        mine = version("uploader")
    except PackageNotFoundError:
        mine = ""
    checks = run_checks(get_settings(), bucket=bucket, version=mine)
    colours = {Verdict.OK: "green", Verdict.WARN: "yellow", Verdict.FAIL: "red", Verdict.SKIP: "dim"}
    if output.mode is OutputMode.JSON:
        output.emit([c.to_dict() for c in checks], "")
    elif output.mode is OutputMode.NORMAL:
        for check in checks:
            advice = f" -> {check.advice}" if check.advice else ""
            line = logsafe.escape_controls(f"{check.name}: {check.detail}{advice}")
            colour = colours[check.verdict]
            _print_line(f"[{colour}]{check.verdict.value:4}[/{colour}] {escape(line)}")
    bad = {Verdict.FAIL, Verdict.WARN} if strict else {Verdict.FAIL}
    if any(check.verdict in bad for check in checks):
        sys.exit(int(ExitCode.FAILED))


@main.group()
def local() -> None:
    """The local stack for your own uploads: Redis, SeaweedFS's S3 and workers on this machine,
    left running (`up`), their settings for a shell (`env`), and stopped (`down`)."""


_LOCAL_DIR = click.option("--dir", "directory", type=click.Path(file_okay=False), default=None,
                          help="Where its state, logs and data go (default ~/.local/state/uploader/local).")


@local.command(name="up")
@_LOCAL_DIR
@click.option("--sources", type=click.Path(exists=True, file_okay=False), default=".", show_default=True,
              help="The directory whose files the workers may read (UPLOADER_SOURCE_ROOTS).")
@click.option("--bucket", default="uploads", show_default=True, help="The bucket to create.")
@click.option("--workers", type=click.IntRange(1, 16), default=1, show_default=True)
@click.option("--concurrency", "-c", type=click.IntRange(1, 64), default=8, show_default=True)
@_friendly_errors
def local_up(directory: str | None, sources: str, bucket: str, workers: int, concurrency: int) -> None:
    """Start the local stack (or say it is up), and print how to use it."""
    from pathlib import Path

    from uploader.dev import local as stack_module

    where = Path(directory) if directory else stack_module.default_directory()
    stack, started = stack_module.up(where, sources=Path(sources), bucket=bucket, workers=workers, concurrency=concurrency)
    console.print(
        f"{'started' if started else 'already up'}: Redis {stack.env['UPLOADER_BROKER_URL']}, S3 "
        f"{stack.env['UPLOADER_S3_ENDPOINT_URL']} (bucket {stack.bucket}), {len(stack.pids) - 2} worker(s); "
        f"sources beneath {stack.env['UPLOADER_SOURCE_ROOTS']}; logs in {stack.directory}",
        highlight=False, markup=False, soft_wrap=True,
    )
    hint = f"uploader local env --dir {shlex_quote(str(where))}" if directory else "uploader local env"
    console.print(f'use it: eval "$({hint})"; then: uploader submit FILE s3://{stack.bucket}/ --wait',
                  highlight=False, markup=False, soft_wrap=True)


@local.command(name="env")
@_LOCAL_DIR
@_friendly_errors
def local_env(directory: str | None) -> None:
    """Print the settings of the running local stack as `export` lines: eval "$(uploader local env)"."""
    from pathlib import Path

    from uploader.dev import local as stack_module

    where = Path(directory) if directory else stack_module.default_directory()
    stack = stack_module.LocalStack.load(where)
    if stack is None or not stack.alive():
        raise UploadNotFound(f"no local stack is running in {where}: start one with `uploader local up`")
    click.echo(stack.shell())


@local.command(name="down")
@_LOCAL_DIR
@_friendly_errors
def local_down(directory: str | None) -> None:
    """Stop the local stack and remove its state, logs and data."""
    from pathlib import Path

    from uploader.dev import local as stack_module

    where = Path(directory) if directory else stack_module.default_directory()
    stopped = stack_module.down(where)
    console.print(f"stopped: {', '.join(stopped)}" if stopped else f"nothing was running in {where}",
                  highlight=False, markup=False)


def shlex_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


@main.command()
def keygen() -> None:
    """Print a new fleet key (UPLOADER_FLEET_KEY) for workers and operators."""
    from uploader.auth import new_fleet_key

    click.echo(new_fleet_key())


@main.command()
@click.option("--dry-run", is_flag=True, help="Only show what would be removed.")
@_friendly_errors
def gc(dry_run: bool) -> None:
    """Abort the multipart uploads of abandoned uploads (failed, cancelled or stalled longer than
    UPLOADER_ABANDON_SECONDS) and forget them. Never touches uploads this system did not start."""
    actions = _uploader().janitor(dry_run=dry_run)
    table = _table("upload id", "state", "destination", "multipart upload", "why", title="would remove" if dry_run else "removed")
    for a in actions:
        table.add_row(a["upload_id"], a["state"], f"s3://{a['bucket']}/{a['key']}", a["mpu_id"] or "-", a["reason"])
    _print(table)
    click.echo(f"{len(actions)} upload(s) {'to remove' if dry_run else 'removed'}")


@main.command()
@click.option("--size", callback=_size, default="256MiB", show_default=True, help="Size of the generated file.")
@click.option("--part-size", callback=_size, default="8MiB", show_default=True)
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True, help="Worker processes to start.")
@click.option("--concurrency", type=click.IntRange(1, 4096), default=8, show_default=True, help="Threads per worker.")
@_friendly_errors
def demo(size: int, part_size: int, workers: int, concurrency: int) -> None:
    """Run the whole system locally: Redis, SeaweedFS, workers, one verified upload."""
    from uploader.dev.demo import run_demo

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
@click.option("--limit", type=click.IntRange(0, MAX_LISTED), default=50, show_default=True, help="Newest entries to show.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (the entries as stored).")
@_friendly_errors
def deadletter_list(limit: int, as_json: bool) -> None:
    """Show the newest quarantined messages: when, queue, task, id and what was wrong."""
    from uploader.checkpoint.deadletter import printable

    entries, total = _dead_letters(lambda store: (store.list(limit), store.count()))
    if as_json:
        click.echo(json.dumps(entries, indent=2))
        return
    table = _table("when", "queue", "task", "task id", "reason")
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.get("at") or 0))
        cells = (printable(e.get(k) or "-", 120) for k in ("queue", "task", "task_id", "reason"))
        table.add_row(when, *(escape(c) for c in cells))
    _print(table)
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
