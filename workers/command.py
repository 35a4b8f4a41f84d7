"""The ``celery worker`` command line of an uploader worker (``uploader worker`` execs it; the
local stack and the tests start workers with it too).
"""

from __future__ import annotations

import sys


def worker_argv(
    *, concurrency: int, hostname: str | None = None, loglevel: str = "INFO", pool: str = "threads", lanes: int | None = None,
) -> list[str]:
    """The command line of a worker with the options crash safety and Flower rely on: it reads
    the control queue and every part lane (``lanes``; by default ``UPLOADER_PART_LANES`` as
    this process reads it: the worker's app declares as many)."""
    from uploader.config import get_settings
    from uploader.contract import CONTROL_QUEUE, part_lanes

    queues = ",".join((CONTROL_QUEUE, *part_lanes(lanes or get_settings().part_lanes)))
    argv = [
        sys.executable, "-m", "celery", "-A", "workers.app", "worker",
        "-Q", queues, "--pool", pool, "--concurrency", str(concurrency),
        "--prefetch-multiplier", "1", "-E", "--loglevel", loglevel, "--without-gossip", "--without-mingle",
    ]
    if hostname:
        argv += ["--hostname", hostname]
    if get_settings().log_format == "json":
        argv.insert(argv.index("worker"), "--quiet")  # no start-up banner: every line of the output is a JSON object
    return argv
