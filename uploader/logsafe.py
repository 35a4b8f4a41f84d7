"""Log lines nobody can forge, and no credentials at any log level.

Two filters, installed on the handlers of the processes this project starts (the worker:
``workers/app.py``; the CLI: :func:`configure_cli_logging`), so whatever a record's message was
built from, what reaches the log is safe:

- :class:`EscapeControlCharacters`: the final message of a record (after ``%`` formatting) is one
  printable line: control characters (CR, LF, NUL, ESC...), Unicode line separators and other
  unprintable characters are written as Python escapes (``\\n``, ``\\x00``, ``\\u2028``). A
  key, metadata value, source path, task id or exception message from a hostile request can
  neither start a line of its own nor drive a terminal. A traceback keeps its lines, but every one
  of them is indented (a genuine record starts at column 0) and escaped the same way.
- :class:`RedactCredentials`: botocore's and urllib3's DEBUG output holds the ``Authorization``
  header (access key id and signature), the session token (in the headers and the canonical
  request), the signature itself and, in S3 error bodies, the signature provided: they are
  replaced by ``***``, as are the literal values of the process's secrets
  (:func:`secrets_from_environment`, :func:`add_secret`).

:func:`protect_library_loggers` also puts :class:`RedactCredentials` on botocore's, urllib3's and
s3transfer's own loggers, so an application that embeds this package and logs at DEBUG with
handlers of its own gets the redaction too (a logger's filters apply to the records it creates,
whatever handlers later print them).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import traceback
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

#: What a redacted value is replaced with.
MASK = "***"
#: Shortest literal secret redacted by value (shorter strings would mask ordinary words).
MIN_SECRET_CHARS = 6
#: Environment variables whose values are secrets wherever they appear.
SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "UPLOADER_REDIS_SENTINEL_PASSWORD")
#: Environment variables holding URLs whose password is a secret.
URL_VARIABLES = ("UPLOADER_BROKER_URL", "UPLOADER_RESULT_BACKEND", "UPLOADER_CHECKPOINT_URL")
#: Loggers of the libraries that print requests, with their credentials, at DEBUG.
LIBRARY_LOGGERS = ("botocore", "urllib3", "s3transfer", "boto3")


def escape_controls(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with every unprintable character written as its Python escape (``\\n``, ``\\x00``,
    ``\\x1b``, ``\\u2028``, ``\\ud800``); printable text is returned as it is. With
    ``keep_newlines``, LF is kept (for tracebacks, whose lines the caller indents)."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() or (keep_newlines and c == "\n") else repr(c)[1:-1] for c in text
    )


# -- redaction ----------------------------------------------------------------------------------

_VALUE = r"""([^'"\s,&<]+)"""
#: (pattern, replacement) pairs, applied in order; every group 1 is kept, the value masked.
_REDACTIONS: tuple[tuple[re.Pattern[str], str], ...] = (
    # The whole Authorization value, in a headers dict repr (up to the closing quote) or as a
    # header line (to the end of the line): access key id, signed headers, signature.
    (re.compile(r"""(?i)(\bauthorization['"]?\s*[:=]\s*b?['"]?)[^'"\r\n]+"""), rf"\1{MASK}"),
    # Session token: header (dict repr or canonical request line) or query parameter.
    (re.compile(r"""(?i)(x-amz-security-token['"]?\s*[:=]\s*b?['"]?)""" + _VALUE), rf"\1{MASK}"),
    # Presigned URLs' and Authorization fragments wherever they appear.
    (re.compile(r"(?i)(x-amz-(?:signature|credential)=)" + _VALUE), rf"\1{MASK}"),
    (re.compile(r"(?i)(\b(?:signature|credential)=)" + _VALUE), rf"\1{MASK}"),
    # botocore.auth's "Signature:\n<hex>"; S3 error bodies' <SignatureProvided>, <AWSAccessKeyId>.
    (re.compile(r"(?i)(\bsignature:\s*)([0-9a-f]{16,})"), rf"\1{MASK}"),
    (re.compile(r"(?i)(<(?:SignatureProvided|AWSAccessKeyId|StringToSignBytes)>)[^<]*"), rf"\1{MASK}"),
)

_secrets: set[str] = set()
_secrets_lock = threading.Lock()
_secret_pattern: re.Pattern[str] | None = None


def add_secret(value: str | None) -> None:
    """Redact ``value`` wherever it appears in a record (values shorter than
    :data:`MIN_SECRET_CHARS` are ignored)."""
    global _secret_pattern
    if not value or len(value) < MIN_SECRET_CHARS:
        return
    with _secrets_lock:
        if value in _secrets:
            return
        _secrets.add(value)
        # Longest first, so a secret that contains another is masked whole.
        _secret_pattern = re.compile("|".join(re.escape(s) for s in sorted(_secrets, key=len, reverse=True)))


def secrets_from_environment(env: Mapping[str, str] | None = None) -> list[str]:
    """The secrets named by the environment: :data:`SECRET_VARIABLES`, the passwords of the
    Redis URLs in :data:`URL_VARIABLES`, and the HTTP(S) source credentials' values."""
    env = os.environ if env is None else env
    found = [env[name] for name in SECRET_VARIABLES if env.get(name)]
    for name in URL_VARIABLES:
        for url in (env.get(name) or "").split(";"):  # sentinel:// lists
            try:
                password = urlsplit(url.strip()).password
            except ValueError:
                continue
            if password:
                found.append(password)
    credentials = env.get("UPLOADER_SOURCE_CREDENTIALS")
    if credentials:
        from uploader.config import parse_source_credentials

        try:
            found += [secret for c in parse_source_credentials(credentials).values() for secret in c.secrets()]
        except ValueError:
            pass  # the settings refuse it, saying why
    return found


def redact(text: str) -> str:
    """``text`` with credentials, signatures and the registered secrets masked."""
    if _secret_pattern is not None:
        text = _secret_pattern.sub(MASK, text)
    lowered = text.lower()
    if not any(word in lowered for word in ("authoriz", "x-amz-", "signature", "credential", "accesskeyid")):
        return text  # the common case: nothing to look for
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


# -- the filters --------------------------------------------------------------------------------


def _message(record: logging.LogRecord) -> str | None:
    try:
        return record.getMessage()
    except Exception:  # noqa: BLE001  (bad format arguments: let the handler report it as usual)
        return None


def _exception_text(record: logging.LogRecord) -> str | None:
    if record.exc_text:
        return record.exc_text
    exc_info = record.exc_info
    if not exc_info:
        return None
    if not isinstance(exc_info, tuple):  # exc_info=True (Celery passes 1)
        exc_info = sys.exc_info()
    if exc_info[0] is None:
        return None
    return "".join(traceback.format_exception(*exc_info)).rstrip("\n")


def _indent(text: str) -> str:
    """Every line of a traceback escaped and indented: a line of it can never look like the
    start of a record."""
    return "\n".join("    " + line for line in escape_controls(text, keep_newlines=True).split("\n"))


class RedactCredentials(logging.Filter):
    """Masks credentials in a record's final message and traceback (see :func:`redact`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = _message(record)
        if message is not None:
            record.msg, record.args = redact(message), None
        text = _exception_text(record)
        if text is not None:
            record.exc_text = redact(text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class EscapeControlCharacters(logging.Filter):
    """Makes a record's final message one printable line, and its traceback lines indented and
    printable (see the module docstring). Idempotent."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = _message(record)
        if message is not None:
            record.msg, record.args = escape_controls(message), None
        text = _exception_text(record)
        if text is not None and not getattr(record, "_uploader_escaped", False):
            record.exc_text = _indent(text)
        if record.stack_info and not getattr(record, "_uploader_escaped", False):
            record.stack_info = _indent(record.stack_info)
        record._uploader_escaped = True
        return True


_redact = RedactCredentials()
_escape = EscapeControlCharacters()


def protect_handlers(handlers: Iterable[logging.Handler]) -> None:
    """Put both filters (redaction first) on each handler, once."""
    for handler in handlers:
        if _redact not in handler.filters:
            handler.addFilter(_redact)
        if _escape not in handler.filters:
            handler.addFilter(_escape)


def protect_logger(logger: logging.Logger | None) -> None:
    """Protect the handlers ``logger`` has now (Celery's ``after_setup_logger`` /
    ``after_setup_task_logger`` hand over the root and the task logger)."""
    if logger is not None:
        protect_handlers(logger.handlers)


def protect_library_loggers() -> None:
    """Put :class:`RedactCredentials` on botocore's, urllib3's, s3transfer's and boto3's loggers
    (those that exist now, and the modules' usual ones, which are then created here: a module's
    ``getLogger(__name__)`` returns the same logger later), and register the environment's
    secrets."""
    for value in secrets_from_environment():
        add_secret(value)
    names = set(LIBRARY_LOGGERS) | {
        "botocore.auth", "botocore.endpoint", "botocore.awsrequest", "botocore.parsers", "botocore.hooks",
        "botocore.httpsession", "botocore.retryhandler", "botocore.credentials", "botocore.utils",
        "botocore.regions", "urllib3.connectionpool", "urllib3.connection", "urllib3.util.retry",
    }
    names.update(
        name for name in list(logging.root.manager.loggerDict)
        if name.split(".", 1)[0] in LIBRARY_LOGGERS
    )
    for name in names:
        logger = logging.getLogger(name)
        if _redact not in logger.filters:
            logger.addFilter(_redact)


class _StderrHandler(logging.StreamHandler[Any]):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (as logging's last-resort
    handler does), so a command run in-process by a test runner logs to its captured stderr."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> Any:
        return sys.stderr


_cli_handler: logging.Handler | None = None


def configure_cli_logging(level: str | int) -> logging.Handler:
    """The CLI's logging: one protected stderr handler on the root logger at ``level`` (set up
    once per process; a second call only changes the level)."""
    global _cli_handler
    if _cli_handler is None:
        _cli_handler = _StderrHandler()
        _cli_handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        protect_handlers([_cli_handler])
        logging.getLogger().addHandler(_cli_handler)
    logging.getLogger().setLevel(level)
    protect_library_loggers()
    return _cli_handler
