"""Hostile input is refused cleanly (issue 10, item 6): property-based tests over every public
task's kwargs, sent raw by a foreign Celery client to one long-lived real worker, and over the
CLI's arguments.

Every generated message or command line carries at least one thing that makes it invalid (a
wrong type, a huge, negative or non-finite number, a control character or an unpaired surrogate
in a key, metadata, content type or path, an unknown field, a random capability token, stray
positional arguments). Each must get a clear refusal the sender sees (a FAILURE result with one
of our error classes and a one-line printable reason; the CLI: one error line and exit status 2),
the worker must stay alive and log no traceback, and nothing may be created: no checkpoint
record (a refusal note at most), no multipart upload, no object, and an existing upload the
messages name is left exactly as it was.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Stack, sha256_file
from uploader import cli
from uploader.config import get_settings
from uploader.contract import CANCEL_UPLOAD, CONTROL_QUEUE, RESUME_UPLOAD, START_UPLOAD
from uploader.planner import MAX_PART_SIZE, MIN_PART_SIZE, MiB
from uploader.request import UploadRequest, valid_upload_id

#: The errors a refusal may carry: what the sender is told, never a TypeError or the like.
REFUSALS = {
    "InvalidRequest", "SourceError", "MessageQuarantined", "UploadRefused", "UploadNotFound", "UploadConflict",
    "NotAuthorized",
    "PermanentStoreError",
}
START_FIELDS = set(UploadRequest.model_fields)

# -- hostile values -----------------------------------------------------------------------------

CONTROL_CHARS = [chr(c) for c in range(0x20)] + ["\x7f", "\x85", "\x9b"]
SURROGATES = ["\ud800", "\udbff", "\udc00", "\udcff", "\udfff"]
TEXT = st.text(max_size=12)
#: A string with at least one control character or unpaired surrogate somewhere.
POISONED = st.tuples(TEXT, st.sampled_from(CONTROL_CHARS + SURROGATES), TEXT).map("".join)
#: A value to forge log lines with, should any reach a log unescaped.
FORGED_LINE = "\n[2099-01-01 00:00:00,000: CRITICAL/MainProcess] FORGED\r\x00\x1b[2J"
HUGE = st.sampled_from([2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, 10**30, -(10**30), -1])
NUMBERS = st.one_of(st.integers(), HUGE, st.floats(allow_nan=True, allow_infinity=True))
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT, POISONED)
JUNK = st.recursive(
    SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)), max_leaves=5
)


def not_a(*types: type, optional: bool = False) -> st.SearchStrategy[Any]:
    """Junk of any JSON type but ``types`` (``bool`` is not an ``int`` here), and not null when
    the field is ``optional`` (null is then a valid value)."""
    return JUNK.filter(lambda v: type(v) not in types and not (optional and v is None))


def bad_part_size(value: Any) -> bool:
    return not (type(value) is int and MIN_PART_SIZE <= value <= MAX_PART_SIZE) and value is not None


BAD_START_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "source": st.one_of(
        not_a(str), st.just(""), POISONED, st.just("relative/file.bin"), st.just("/" + "a" * 4100),
        st.sampled_from(["/etc/passwd", "/proc/self/environ", "/root/.aws/credentials", "/dev/zero"]),
    ),
    "bucket": st.one_of(
        not_a(str), POISONED, st.sampled_from(["", "A", "ab", "Bad_Bucket", "192.168.0.1", "a" * 64, "a..b", "-ab"]),
        st.just("no-such-bucket-" + uuid.uuid4().hex[:12]),
    ),
    "key": st.one_of(not_a(str), st.just(""), POISONED, st.just("k" * 1025), st.just("é" * 513), st.just(FORGED_LINE)),
    "upload_id": st.one_of(
        not_a(str, optional=True), POISONED, st.sampled_from(["", "-abc", "a" * 129, "a/b", "a b", "é"]),
    ),
    "part_size": st.one_of(
        st.integers().filter(bad_part_size), HUGE, st.floats(allow_nan=True, allow_infinity=True),
        st.booleans(), st.just("8MiB"), st.lists(st.integers(), max_size=2),
    ),
    "metadata": st.one_of(
        not_a(dict, optional=True),
        st.dictionaries(st.just("a"), not_a(str), min_size=1),
        st.dictionaries(st.one_of(POISONED, st.sampled_from(["", "a b", "é", "a:b", "a\nb"])), st.just("v"), min_size=1),
        st.dictionaries(st.just("a"), st.one_of(POISONED, st.just("é"), st.just(FORGED_LINE)), min_size=1),
        st.just({"a": "x" * 3000}),
    ),
    "content_type": st.one_of(not_a(str, optional=True), POISONED, st.just("tëxt/plain"), st.just("x" * 257)),
    "abort_on_failure": not_a(bool),
}
UNKNOWN_NAMES = st.one_of(
    st.sampled_from(["self", "request", "task", "kwargs", "args", "__class__", "Source", "upload-id", "x" * 5000]),
    TEXT.filter(lambda n: n not in START_FIELDS and n not in {"token", "proof"}),
    POISONED,
)


@st.composite
def hostile_start(draw: st.DrawFn, base: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """(args, kwargs) of a start_upload message: ``base`` (a valid request) made invalid in 1-3 ways."""
    kwargs = dict(base)
    args: list[Any] = []
    count = draw(st.sampled_from([1, 1, 1, 2, 3]))  # mostly one: then that one alone must be refused
    ways = draw(st.lists(st.sampled_from([*BAD_START_FIELDS, "unknown", "missing", "positional"]), min_size=count, max_size=count, unique=True))
    for way in ways:
        if way == "unknown":
            kwargs.update(draw(st.dictionaries(UNKNOWN_NAMES, JUNK, min_size=1, max_size=20)))
        elif way == "missing":
            for name in draw(st.lists(st.sampled_from(["source", "bucket", "key"]), min_size=1, unique=True)):
                kwargs.pop(name, None)
        elif way == "positional":
            args = draw(st.lists(JUNK, min_size=1, max_size=3))
        else:
            kwargs[way] = draw(BAD_START_FIELDS[way])
    return args, kwargs


@st.composite
def hostile_control(draw: st.DrawFn, task: str, upload_ids: list[str]) -> tuple[list[Any], dict[str, Any]]:
    """(args, kwargs) of a resume or cancel message naming one of ``upload_ids`` (or a random
    well-formed id), made invalid in 1-3 ways. A random ``token`` is one of them: whether or not
    the task takes a capability token, a random one must be refused."""
    kwargs: dict[str, Any] = {"upload_id": draw(st.one_of(st.sampled_from(upload_ids), st.from_regex(r"[a-z0-9]{8,40}", fullmatch=True)))}
    if task == RESUME_UPLOAD and draw(st.booleans()):
        kwargs["restart"] = draw(st.booleans())
    args: list[Any] = []
    choices = ["upload_id", "unknown", "token", "positional"] + (["restart"] if task == RESUME_UPLOAD else [])
    count = draw(st.sampled_from([1, 1, 2, 3]))
    for way in draw(st.lists(st.sampled_from(choices), min_size=count, max_size=count, unique=True)):
        if way == "upload_id":
            kwargs["upload_id"] = draw(st.one_of(not_a(str), POISONED, st.sampled_from(["", "-x", "a" * 129, "a/b"])))
        elif way == "restart":
            kwargs["restart"] = draw(not_a(bool))
        elif way == "unknown":
            names = UNKNOWN_NAMES.filter(lambda n: n not in {"upload_id", "restart", "token", "proof"})
            kwargs.update(draw(st.dictionaries(names, JUNK, min_size=1, max_size=5)))
        elif way == "token":
            kwargs["token"] = draw(st.one_of(TEXT, POISONED, st.from_regex(r"[A-Za-z0-9_-]{16,64}", fullmatch=True)))
        else:  # a first positional argument that is no upload id, and more of them than any task takes
            args = [draw(not_a(str)), *draw(st.lists(JUNK, min_size=3, max_size=4))]
    return args, kwargs


# -- the deployment under attack ----------------------------------------------------------------


def foreign_client(stack: Stack) -> Celery:
    """A Celery client as another team's service builds one from the README (no import of this
    project's settings or workers)."""
    app = Celery("foreign", broker=stack.redis_url, backend=stack.redis_url, set_as_current=False)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])
    return app


def single_line(text: str) -> bool:
    return bool(text) and text.isprintable()


class Target:
    """One stack with one worker, a completed upload (the victim every resume and cancel may
    name) and an empty bucket every start request names."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.worker = stack.start_worker("hostile", concurrency=2)
        self.bucket = stack.new_bucket()
        self.victim_bucket = stack.new_bucket()
        source = stack.make_file(11 * MiB)
        self.victim = stack.uploader.submit(str(source), f"s3://{self.victim_bucket}/victim", part_size=5 * MiB).wait(timeout=120)
        self.victim_etag = stack.s3.head_object(Bucket=self.victim_bucket, Key="victim")["ETag"]
        self.good_source = stack.make_file(1000)
        self.store = stack.uploader.checkpoint

    def victim_record(self) -> Any:
        return self.store.get(self.victim.upload_id)

    def assert_nothing_created(self, upload_id: str | None) -> None:
        """No object or multipart upload in the bucket, no upload record but the victim's, and
        under ``upload_id`` at most the refusal note."""
        assert self.stack.s3.list_objects_v2(Bucket=self.bucket).get("KeyCount", 0) == 0
        assert self.stack.open_multipart_uploads(self.bucket) == []
        assert self.store.list_ids(1000) == [self.victim.upload_id]
        if upload_id is not None:
            assert set(self.stack.checkpoint_keys(upload_id)) <= {self.store.refusal_key(upload_id)}

    def assert_refused(self, result: Any, what: object) -> str:
        """The sender's answer is a refusal of ours with a one-line printable reason."""
        result.get(timeout=60, propagate=False)
        assert result.state == "FAILURE", f"{what!r} was not refused: {result.state} {result.result!r}"
        error = result.result
        assert type(error).__name__ in REFUSALS, f"{what!r}: {type(error).__name__}: {error}"
        assert single_line(str(error)) and len(str(error)) <= 2500, repr(str(error))
        assert self.worker.alive()
        return str(error)

    def assert_worker_healthy(self) -> None:
        """Alive, no traceback or Celery 'unexpected' in its log, and it still uploads."""
        assert self.worker.alive()
        log = self.worker.log_text()
        assert "Traceback" not in log and "raised unexpected" not in log, log[-3000:]
        path = self.stack.make_file(7 * MiB)
        status = self.stack.uploader.submit(str(path), f"s3://{self.bucket}/after-hostile-input").wait(timeout=120)
        assert status.state == "completed"
        assert self.stack.object_sha256(self.bucket, "after-hostile-input") == sha256_file(path)
        assert self.worker.alive()


@pytest.fixture
def target(make_stack) -> Iterator[Target]:  # type: ignore[no-untyped-def]
    yield Target(make_stack())


def test_hostile_task_messages_are_refused_cleanly(target: Target) -> None:
    """Raw start, resume and cancel messages from a foreign client, one worker for all of them."""
    client = foreign_client(target.stack)
    victim_before = target.victim_record()
    upload_ids = [target.victim.upload_id]

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(data=st.data())
    def attack(data: st.DataObject) -> None:
        task = data.draw(st.sampled_from([START_UPLOAD] * 3 + [RESUME_UPLOAD, CANCEL_UPLOAD]), label="task")
        if task == START_UPLOAD:
            base = {"source": str(target.good_source), "bucket": target.bucket, "key": "k", "upload_id": f"h-{uuid.uuid4().hex}"}
            args, kwargs = data.draw(hostile_start(base), label="message")
        else:
            args, kwargs = data.draw(hostile_control(task, upload_ids), label="message")
        result = client.send_task(task, args=args, kwargs=kwargs, queue=CONTROL_QUEUE)
        reason = target.assert_refused(result, (task, args, kwargs))
        upload_id = kwargs.get("upload_id") if "upload_id" in kwargs else result.id.replace("-", "")
        named = upload_id if isinstance(upload_id, str) and valid_upload_id(upload_id) else None
        if task == START_UPLOAD and named is not None:
            # The refusal is also what status says about the upload id, for a day.
            status = target.stack.uploader.status(named)
            assert status.state == "refused" and single_line(status.error), status
            assert reason.removeprefix("the message was quarantined (never run): ")[:40] in status.error or "quarantined" in status.error
        target.assert_nothing_created(None if named == target.victim.upload_id else named)

    try:
        attack()
        assert target.victim_record() == victim_before, "a hostile resume or cancel changed an upload"
        assert target.stack.s3.head_object(Bucket=target.victim_bucket, Key="victim")["ETag"] == target.victim_etag
        assert target.stack.open_multipart_uploads(target.victim_bucket) == []
        target.assert_worker_healthy()
    finally:
        client.close()


# -- the CLI ------------------------------------------------------------------------------------

BAD_SIZES = st.one_of(
    st.sampled_from(["-1", "0", "1", "-5MiB", "nan", "inf", "1e400", "99999999999999999999999999GiB", "", "é", "5 GiBB", "1.5"]),
    st.integers().filter(lambda n: not MIN_PART_SIZE <= n <= MAX_PART_SIZE).map(str),
    POISONED,
)
BAD_SECONDS = st.one_of(st.sampled_from(["nan", "-nan", "-1", "-0.5", "inf", "-inf", "1e999", "abc", "", "0x10"]), POISONED)
BAD_UPLOAD_IDS = st.one_of(st.sampled_from(["-x", "a" * 129, "a/b", "a b", "é", "..", "\udcff\udcfe"]), POISONED)
BAD_LIMITS = st.one_of(st.sampled_from(["-1", str(2**63), str(10**30), "nan", "1.5", "abc", ""]), st.integers(max_value=-1).map(str))


@st.composite
def hostile_command(draw: st.DrawFn, source: str, bucket: str, upload_id: str) -> list[str]:
    """A command line with 1-3 invalid arguments (every one of them must be refused)."""
    command = draw(st.sampled_from(["submit", "submit", "submit", "status", "watch", "cancel", "resume", "list", "deadletter"]))
    if command in {"status", "watch", "cancel"}:
        extra = ["--timeout", draw(BAD_SECONDS)] if command == "watch" and draw(st.booleans()) else []
        return [command, draw(BAD_UPLOAD_IDS), *extra]
    if command == "resume":
        way = draw(st.sampled_from(["id", "size", "to"]))
        if way == "id":
            return ["resume", draw(BAD_UPLOAD_IDS)]
        if way == "size":
            return ["resume", upload_id, "--source", source, "--to", f"s3://{bucket}/k", "--part-size", draw(BAD_SIZES)]
        return ["resume", upload_id, "--source", source, "--to", draw(st.one_of(POISONED, st.just(f"s3://{bucket}/" + FORGED_LINE)))]
    if command in {"list", "deadletter"}:
        return [*(["deadletter", "list"] if command == "deadletter" else ["list"]), "--limit", draw(BAD_LIMITS)]
    options = {"source": source, "destination": f"s3://{bucket}/k", "--upload-id": upload_id, "--accept-timeout": "30"}
    for way in draw(st.lists(st.sampled_from(
        ["source", "destination", "--part-size", "--upload-id", "--metadata", "--content-type", "--timeout", "--accept-timeout"]
    ), min_size=1, max_size=3, unique=True)):
        if way == "source":
            options[way] = draw(st.one_of(POISONED, st.sampled_from(["relative.bin", "/etc/passwd", source + ".missing"])))
        elif way == "destination":
            options[way] = draw(st.one_of(
                POISONED.map(lambda k: f"s3://{bucket}/{k}"), st.sampled_from(["s3://", "s3:///k", "s3://Bad/k", f"s3://{bucket}/", "http://x/y"]),
                st.just(f"s3://{bucket}/" + FORGED_LINE), TEXT.map(lambda t: "x" + t),
            ))
        elif way == "--part-size":
            options[way] = draw(BAD_SIZES)
        elif way == "--upload-id":
            options[way] = draw(BAD_UPLOAD_IDS)
        elif way == "--metadata":
            options[way] = draw(st.one_of(
                st.just("no-equals-sign"), POISONED.map(lambda v: f"a={v}"), POISONED.map(lambda n: f"{n}=v"),
                st.sampled_from(["=v", "a b=v", "é=v", "a=é", f"a={FORGED_LINE}"]),
            ))
        elif way == "--content-type":
            options[way] = draw(st.one_of(POISONED, st.sampled_from(["tëxt/plain", "x" * 257, FORGED_LINE])))
        else:
            options[way] = draw(BAD_SECONDS)
    argv = ["submit", options.pop("source"), options.pop("destination")]
    if "--timeout" in options:
        argv.append("--wait")
    for name, value in options.items():
        argv += [name, value]
    return argv


def assert_clean_cli_refusal(argv: list[str], exit_code: int, stdout: str, stderr: str, upload_id: str) -> None:
    """Exit status 2 (refused, or a usage error), exactly one error line, printable output (the
    upload id on stdout if the request was sent), click's usage lines, and nothing else."""
    assert exit_code == cli.ExitCode.REFUSED, (argv, exit_code, stdout, stderr)
    assert stdout.strip() in {"", upload_id}, (argv, stdout)
    lines = stderr.splitlines()
    errors = [line for line in lines if line.startswith(("error:", "Error:"))]
    assert len(errors) == 1, (argv, stderr)
    others = [line for line in lines if line not in errors and line and not line.startswith(("Usage: ", "Try '"))]
    assert others == [], (argv, stderr)
    assert all(line.isprintable() for line in lines), (argv, stderr)
    assert "Traceback" not in stderr


@pytest.fixture
def cli_env(target: Target, monkeypatch: pytest.MonkeyPatch) -> Iterator[Target]:
    """The CLI, in this process, configured for the target stack (as its environment would)."""
    for name, value in target.stack.env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    yield target
    get_settings.cache_clear()


def test_hostile_cli_arguments_are_refused_cleanly(cli_env: Target) -> None:
    target = cli_env
    runner = CliRunner()

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(data=st.data())
    def attack(data: st.DataObject) -> None:
        upload_id = f"c-{uuid.uuid4().hex}"
        argv = data.draw(hostile_command(str(target.good_source), target.bucket, upload_id), label="argv")
        result = runner.invoke(cli.main, argv, catch_exceptions=True)
        assert result.exception is None or isinstance(result.exception, SystemExit), (argv, result.exception)
        assert_clean_cli_refusal(argv, result.exit_code, result.stdout, result.stderr, upload_id)
        target.assert_nothing_created(upload_id)

    attack()
    target.assert_worker_healthy()


def run_cli(env: dict[str, str], *argv: str | bytes, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "uploader.cli", *argv], env={**os.environ, **env},
        capture_output=True, timeout=timeout,
    )


def test_hostile_cli_arguments_in_real_processes(target: Target) -> None:
    """What a shell really passes: bytes that are not UTF-8 (Python sees unpaired surrogates),
    control characters, numbers out of range; exit status 2 and one line each, nothing started."""
    env = target.stack.env
    good, bucket = str(target.good_source), target.bucket
    cases: list[list[str | bytes]] = [
        ["submit", good, f"s3://{bucket}/a\n[2099-01-01 00:00:00,000: CRITICAL/MainProcess] FORGED"],
        ["submit", good, f"s3://{bucket}/k\x1b[2J", "--accept-timeout", "10"],
        ["submit", good, b"s3://" + bucket.encode() + b"/k\xff\xfe"],
        ["submit", good.encode() + b"\xff", f"s3://{bucket}/k"],
        ["submit", good, f"s3://{bucket}/k", "--part-size", "1e400"],
        ["submit", good, f"s3://{bucket}/k", "--accept-timeout", "nan"],
        ["submit", good, f"s3://{bucket}/k", "-m", "a=\x07\x1b[31m"],
        ["status", b"\xff\xfe"],
        ["cancel", "a\nb"],
        ["list", "--limit", str(2**64)],
        ["worker", "--concurrency", "-1"],
        ["worker", "--concurrency", str(2**64)],
    ]
    for argv in cases:
        done = run_cli(env, *argv)
        stdout, stderr = done.stdout.decode("utf-8", "replace"), done.stderr.decode("utf-8", "replace")
        assert_clean_cli_refusal([repr(a) for a in argv], done.returncode, stdout, stderr, "")
        target.assert_nothing_created(None)
    assert target.worker.alive()


def test_nan_and_infinite_numbers_never_pass_the_cli(cli_env: Target) -> None:
    """A NaN deadline never passes (time.monotonic() > nan is always false: a wait for ever)."""
    for value in ("nan", "inf", "-1"):
        for argv in (
            ["submit", str(cli_env.good_source), f"s3://{cli_env.bucket}/k", "--accept-timeout", value],
            ["submit", str(cli_env.good_source), f"s3://{cli_env.bucket}/k", "--wait", "--timeout", value],
            ["watch", "some-upload", "--timeout", value],
        ):
            result = CliRunner().invoke(cli.main, argv)
            assert result.exit_code == 2 and "seconds" in result.stderr, (argv, result.stderr)


def test_a_zero_part_size_on_the_command_line_is_refused_not_ignored(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`--part-size 0` was dropped as if not given (0 == False) and the upload went ahead with
    the default part size (found by the property test above)."""
    from click.testing import CliRunner

    source = tmp_path / "f.bin"
    source.write_bytes(b"x" * 10)
    result = CliRunner().invoke(cli.main, ["submit", str(source), "s3://some-bucket/k", "--part-size", "0"])
    assert result.exit_code == cli.ExitCode.REFUSED and "part size 0 bytes is outside" in result.output, result.output
