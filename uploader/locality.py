"""Host-local sources: a file on one machine's own disk, read by the workers on that machine.

An upload submitted with ``locality="host"`` (CLI ``--local``) names the host its file is on
(the submitter's ``UPLOADER_HOST_NAME``, by default its hostname). Every worker reads, besides
the shared queues, the queue of its own host (:func:`host_queue_name`); the start, the parts, the
retries and every resume of a host-local upload go to that queue, so the file is only ever opened
on its host, yet its parts are still sent in parallel by all the workers there. A message of such
an upload that reaches a worker of another host (a resume sent to the control queue, the recovery
leader's own resumes) is forwarded to the host's queue, never run where the file is not.

Each worker's heartbeat also keeps its host alive (``<prefix>:hosts``, scored by when the
heartbeat lapses), so a submission for a host none of whose workers is alive is refused at once
(:class:`~uploader.errors.NoWorkerOnHost`), and a waiting upload says which host it waits for.
"""

from __future__ import annotations

import re
import socket
from enum import StrEnum
from typing import Protocol

from uploader.errors import NoWorkerOnHost

#: A host name as queues and records carry it: a DNS label or dotted name, at most 63 characters.
HOST_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
#: The queue of host ``h`` is ``uploader.host.h``.
HOST_QUEUE_PREFIX = "uploader.host."


class Locality(StrEnum):
    """Where an upload's source can be read: by every worker (``shared``: a shared filesystem,
    a URL, an S3 object) or only on one host (``host``)."""

    SHARED = "shared"
    HOST = "host"


def check_host(value: str) -> str:
    """``value`` if it is a usable host name, else :class:`ValueError` saying what one is."""
    if not HOST_RE.fullmatch(value):
        raise ValueError(
            f"host {value[:64]!r} is not a usable host name: 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (set UPLOADER_HOST_NAME to one)"
        )
    return value


def default_host_name() -> str:
    """This machine's hostname, as far as it is a usable host name (the part before the first
    character that is not), ``localhost`` if nothing of it is."""
    found = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", socket.gethostname())
    return found.group() if found else "localhost"


def host_queue_name(host: str) -> str:
    """The queue the workers of ``host`` read (and they alone)."""
    return HOST_QUEUE_PREFIX + check_host(host)


class HostRegistry(Protocol):
    """Where the workers' hosts are kept alive (the checkpoint store)."""

    def host_alive(self, host: str) -> bool: ...


def require_worker(hosts: HostRegistry, host: str) -> None:
    """Raise :class:`~uploader.errors.NoWorkerOnHost`, saying what to do, unless a worker of
    ``host`` is alive (a host-local upload's file can be read nowhere else)."""
    if not hosts.host_alive(host):
        raise NoWorkerOnHost(no_worker_message(host))


def no_worker_message(host: str) -> str:
    return (
        f"no worker on host {host} is alive: start `uploader worker` there (with UPLOADER_HOST_NAME={host} if "
        "its hostname differs), or submit without --local if every worker can read the file"
    )
