"""Logs are safe (issue 10, item 6): a hostile value cannot forge a log line or put a NUL or a
terminal escape in it, and no log level prints credentials, signatures or ``Authorization``
headers (uploader/logsafe.py, installed on the worker's handlers in workers/app.py and on the
CLI's in uploader/cli.py).

The filters are tested on their own (pure), then on real workers: one at INFO fed messages built
to forge lines, one at DEBUG (botocore and urllib3 at DEBUG too) holding canary credentials, whose
whole log is scanned after real uploads; the CLI's DEBUG output is scanned as well.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import subprocess
import sys
import uuid

import pytest
import redis
from celery import Celery

from tests.conftest import Stack
from uploader import UploaderError, logsafe
from uploader.contract import CONTROL_QUEUE, START_UPLOAD
from uploader.dev.localstack import Worker, wait_until
from uploader.planner import MiB

#: A line the attacker would like to see in the log, as if the worker had written it.
FORGED = "[2099-01-01 00:00:00,000: CRITICAL/MainProcess] FORGED"
#: Characters no log line may hold raw: NUL, CR, ESC (terminal escapes), NEL and the Unicode
#: line and paragraph separators (line breaks to some viewers).
RAW_FORBIDDEN = ("\x00", "\r", "\x1b", "\x85", "\u2028", "\u2029")
#: How a record of the worker's log starts (Celery's format); other lines are a traceback's,
#: indented by the filter.
RECORD_START = re.compile(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}: [A-Z]+/[\w-]+\] ")

# -- the filters alone --------------------------------------------------------------------------


def _logged(*args: object, exc: BaseException | None = None, name: str = "test.logsafe") -> str:
    """What a handler protected like the worker's writes for ``log.error(*args)``."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("[%(levelname)s] %(message)s"))
    logsafe.protect_handlers([handler])
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    try:
        if exc is not None:
            try:
                raise exc
            except BaseException:
                logger.exception(*args)
        else:
            logger.error(*args)
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
    return stream.getvalue()


@pytest.mark.parametrize(
    "value",
    ["a\nb", "a\r\nb", "nul\x00byte", "esc\x1b[2Jclear", "sep\u2028line", "para\u2029graph", "nel\x85", "\ud800lone", "tab\tx"],
)
def test_a_record_is_one_printable_line_whatever_its_values(value: str) -> None:
    out = _logged("upload %s: key %s\n" + FORGED, "id-1", value + "\n" + FORGED)
    assert out.count("\n") == 1 and out.endswith("\n"), out
    assert out.startswith("[ERROR] upload id-1: key ")
    assert out[:-1].isprintable(), repr(out)
    assert "\\n" + FORGED in out  # still there to read, escaped


def test_a_traceback_keeps_its_lines_but_cannot_start_a_record() -> None:
    out = _logged("it failed: %s", "x\n" + FORGED, exc=ValueError("bad\n" + FORGED + "\x00\x1b[2J"))
    lines = out.rstrip("\n").split("\n")
    assert lines[0] == "[ERROR] it failed: x\\n" + FORGED
    assert len(lines) > 3 and all(line.startswith("    ") for line in lines[1:]), out
    assert not any(line.startswith("[") for line in lines[1:])
    assert all(line.isprintable() for line in lines), repr(out)
    assert "Traceback (most recent call last):" in lines[1]


def test_credentials_are_redacted_from_botocore_shaped_records() -> None:
    secret, token = "canary-secret-" + uuid.uuid4().hex, "canary-token-" + uuid.uuid4().hex
    logsafe.add_secret(secret)
    logsafe.add_secret(token)
    signature = "f" * 64
    auth = f"AWS4-HMAC-SHA256 Credential=AKIACANARY/20990101/us-east-1/s3/aws4_request, SignedHeaders=host;x-amz-date, Signature={signature}"
    records = [
        ("Sending http request: %s", f"<AWSPreparedRequest headers={{'Authorization': b'{auth}', 'X-Amz-Security-Token': b'{token}'}}>"),
        ("CanonicalRequest:\n%s", f"PUT\n/b/k\n\nhost:x\nx-amz-security-token:{token}\n\nhost;x-amz-security-token\nUNSIGNED-PAYLOAD"),
        ("Signature:\n%s", signature),
        ("%s", f"Authorization: {auth}"),
        ("%s", f"GET /b/k?X-Amz-Credential=AKIACANARY%2F2099&X-Amz-Signature={signature}&X-Amz-Security-Token={token} HTTP/1.1"),
        ("Response body:\n%r", f"<Error><AWSAccessKeyId>AKIACANARY</AWSAccessKeyId><SignatureProvided>{signature}</SignatureProvided></Error>".encode()),
        ("the secret itself: %s", secret),
    ]
    for message, arg in records:
        out = _logged(message, arg, name="botocore.endpoint")
        for leak in (secret, token, signature, "AKIACANARY"):
            assert leak not in out, (message, out)
        assert logsafe.MASK in out


def test_library_loggers_redact_for_any_handler() -> None:
    """An application embedding the client, logging at DEBUG with a handler of its own (no
    filter of ours): botocore's loggers mask credentials at the source."""
    logsafe.protect_library_loggers()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = logging.getLogger("botocore.auth").level
    logging.getLogger("botocore.auth").setLevel(logging.DEBUG)
    try:
        logging.getLogger("botocore.auth").debug("Signature:\n%s", "a" * 64)
    finally:
        root.removeHandler(handler)
        logging.getLogger("botocore.auth").setLevel(old_level)
    assert "a" * 64 not in stream.getvalue() and logsafe.MASK in stream.getvalue()


# -- real workers -------------------------------------------------------------------------------


def log_problems(text: str) -> list[str]:
    """Lines of a worker's log (after its start-up banner) that are neither a record nor an
    indented traceback line, or that hold a forbidden raw character."""
    problems = [repr(c) for c in RAW_FORBIDDEN if c in text]
    after_banner = text[text.index(" ready.") :].split("\n")[1:]
    for line in after_banner:
        if line and not RECORD_START.match(line) and not line.startswith("    "):
            problems.append(line[:200])
    if re.search(r"(?m)^\s*\[2099-01-01", text):
        problems.append("a forged record")
    return problems


def raw_message(task: str, task_id: str, kwargs: dict[str, object], headers: dict[str, object]) -> bytes:
    """A Redis list item as kombu writes it (for a message no Celery client would produce)."""
    body = json.dumps([[], kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    envelope = {
        "body": base64.b64encode(body.encode()).decode(), "content-encoding": "utf-8", "content-type": "application/json",
        "headers": {"lang": "py", "task": task, "id": task_id, "retries": 0, "root_id": None, "parent_id": None, **headers},
        "properties": {"correlation_id": "x", "reply_to": "", "delivery_mode": 2, "priority": 0, "body_encoding": "base64",
                       "delivery_info": {"exchange": CONTROL_QUEUE, "routing_key": CONTROL_QUEUE}, "delivery_tag": str(uuid.uuid4())},
    }
    return json.dumps(envelope).encode()


def test_hostile_values_cannot_forge_worker_log_lines(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack()
    worker = stack.start_worker("logsafe", concurrency=2)
    bucket = stack.new_bucket()
    small, big = stack.make_file(1000), stack.make_file(11 * MiB)
    client = Celery("foreign", broker=stack.redis_url, backend=stack.redis_url, set_as_current=False)
    hostile = "x\n" + FORGED + "\r\n" + FORGED + "\x00\x1b[2J\u2028" + FORGED
    try:
        sent = [
            {"source": str(small), "bucket": bucket, "key": hostile},  # main: logged raw by the failed PUT
            {"source": str(big), "bucket": bucket, "key": hostile, "part_size": 5 * MiB},
            {"source": str(small) + hostile, "bucket": bucket, "key": "k"},
            {"source": str(small), "bucket": bucket, "key": "k", "metadata": {"a": hostile}},
            {"source": str(small), "bucket": bucket, "key": "k", "content_type": hostile},
            {"source": str(small), "bucket": bucket, "key": "k", hostile: 1},
            {"source": "/no/such" + hostile, "bucket": "no-such-bucket-" + uuid.uuid4().hex[:8], "key": hostile},
        ]
        for kwargs in sent:
            result = client.send_task(START_UPLOAD, kwargs=kwargs, queue=CONTROL_QUEUE)
            result.get(timeout=60, propagate=False)
        # Headers only Celery and our checks read: a task id, a display repr, an unknown task.
        queue = redis.Redis.from_url(stack.redis_url)
        for task, task_id, headers in [
            (START_UPLOAD, "id\n" + FORGED, {}),
            (START_UPLOAD, str(uuid.uuid4()), {"kwargsrepr": hostile, "argsrepr": hostile}),
            ("uploader." + hostile, str(uuid.uuid4()), {}),
        ]:
            queue.lpush(CONTROL_QUEUE, raw_message(task, task_id, {"source": "/no/such", "bucket": bucket, "key": "k"}, headers))
        wait_until(lambda: queue.llen(CONTROL_QUEUE) == 0, 30, "the raw messages consumed")
        ok = stack.uploader.submit(str(small), f"s3://{bucket}/after").wait(timeout=60)
        assert ok.state == "completed"
        # Every message answered and a later upload done: their lines are in the log.
        wait_until(lambda: worker.log_text().count("quarantined a message") >= 2 and ok.upload_id in worker.log_text(), 30, "the log lines")
    finally:
        client.close()
    assert worker.alive()
    text = worker.log_path.read_bytes().decode("utf-8", "surrogateescape")
    assert log_problems(text) == [], "\n".join(log_problems(text))


CANARY_ACCESS_KEY = "AKIACANARY" + uuid.uuid4().hex[:10].upper()
CANARY_SECRET = "canary-secret-" + uuid.uuid4().hex
CANARY_TOKEN = "canary-session-token-" + uuid.uuid4().hex


def credential_leaks(text: str) -> list[str]:
    """Credentials, signatures or Authorization values in ``text``."""
    leaks = [name for name, value in (("secret key", CANARY_SECRET), ("session token", CANARY_TOKEN)) if value in text]
    for pattern in (
        r"""Authorization['"]?\s*[:=]\s*b?['"]?AWS4""",  # the header's value
        r"Credential=AKIA", CANARY_ACCESS_KEY + "/",  # the access key id as a credential scope
        r"Signature=[0-9a-f]{16}", r"Signature:\s*[0-9a-f]{16}", r"X-Amz-Signature=[0-9a-f]",
    ):
        leaks += [f"{pattern}: ...{text[max(0, m.start() - 80):m.end() + 40]!r}..." for m in re.finditer(pattern, text)][:3]
    return leaks


def test_no_log_level_prints_credentials(make_stack) -> None:  # type: ignore[no-untyped-def]
    """A worker at DEBUG (so botocore and urllib3 log every request) with canary credentials, a
    multipart and a single-PUT upload: its whole log holds none of them; nor the CLI's DEBUG output."""
    canaries = {"AWS_ACCESS_KEY_ID": CANARY_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": CANARY_SECRET, "AWS_SESSION_TOKEN": CANARY_TOKEN}
    stack: Stack = make_stack(**canaries)
    worker = Worker(stack.workdir, {**stack.env, "UPLOADER_WORKER_POOL": "threads"}, name="debug", concurrency=2, loglevel="DEBUG")
    stack.workers.append(worker)
    bucket = stack.new_bucket()
    for size, key in ((11 * MiB, "multipart"), (1000, "single")):
        path = stack.make_file(size)
        status = stack.uploader.submit(str(path), f"s3://{bucket}/{key}", part_size=5 * MiB).wait(timeout=120)
        assert status.state == "completed", status
    # A request S3 refuses (no such bucket): error bodies and exceptions are logged too.
    refused = stack.uploader.submit(str(path), "s3://no-such-bucket-for-canary/k")
    with pytest.raises(UploaderError, match="does not exist"):
        refused.wait(timeout=60)

    log = worker.log_text()
    # DEBUG really was on for botocore, and what it printed was masked rather than absent.
    assert "botocore" in log and "Sending http request" in log, log[-2000:]
    assert f"Authorization': b'{logsafe.MASK}'" in log or f"Authorization': '{logsafe.MASK}'" in log
    assert credential_leaks(log) == [], "\n".join(credential_leaks(log))

    # The client side: the CLI at DEBUG, with the same canaries in its environment.
    path = stack.make_file(1000)
    done = subprocess.run(
        [sys.executable, "-m", "uploader.cli", "--log-level", "DEBUG", "submit", str(path), f"s3://{bucket}/cli", "--wait"],
        env={**os.environ, **stack.env}, capture_output=True, timeout=120,
    )
    output = (done.stdout + done.stderr).decode("utf-8", "replace")
    assert done.returncode == 0, output[-3000:]
    assert "DEBUG" in output  # the client's own debug lines (celery, kombu) were printed
    assert credential_leaks(output) == [], "\n".join(credential_leaks(output))
    assert worker.alive()
