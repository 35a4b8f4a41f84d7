"""Which source root a local path lies under, and the refusals that come before any open.

There is no implicit root: a worker reads sources only under the directories its deployment
names in ``UPLOADER_SOURCE_ROOTS``, and with none named it reads no local source at all. Whatever
the roots, the places in :mod:`uploader.sources.denylist` are refused.

This check names the root and the path beneath it; the open itself
(:func:`uploader.sources.beneath.open_beneath`) is what keeps the file inside the root, whatever
is renamed between the two.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from uploader.errors import SourceError
from uploader.sources.denylist import denial

NO_ROOTS_HINT = (
    "no source roots are configured on the workers (allowed roots: (none)); set UPLOADER_SOURCE_ROOTS "
    "to the directories sources may be read from"
)


@dataclass(frozen=True)
class Located:
    """A source path as the worker opens it: ``relative`` (``.`` for the root itself) beneath
    ``root`` (a real path: no symbolic links)."""

    root: Path
    relative: PurePosixPath

    @property
    def path(self) -> Path:
        return self.root / self.relative


def denied_error(name: str, why: str) -> SourceError:
    return SourceError(
        f"source {name!r} is refused: it is in {why}; workers never read sources there, whatever UPLOADER_SOURCE_ROOTS says"
    )


def locate(path: str, roots: Sequence[Path]) -> Located:
    """Where ``path`` (absolute, optionally ``file://``) lies: its real path (symbolic links and
    ``..`` resolved) beneath the first root that holds it.

    :class:`SourceError` if it is relative, denied (as written or once resolved), no roots are
    configured, or it lies outside every root."""
    raw = path.removeprefix("file://")
    if not os.path.isabs(raw):
        raise SourceError(f"source {path!r} must be an absolute path")
    real = _realpath(path, raw)
    why = denial(raw) or denial(real)
    if why:
        raise denied_error(path, why)
    if not roots:
        raise SourceError(f"source {path!r} cannot be read: {NO_ROOTS_HINT}")
    for real_root in _real_roots(tuple(roots)):
        if real == real_root or real_root in real.parents:
            return Located(real_root, PurePosixPath(real.relative_to(real_root)))
    allowed = ", ".join(str(r) for r in roots)
    raise SourceError(
        f"source {path!r} resolves outside the allowed source roots ({allowed}): it is under none of them, or a "
        "symbolic link on its path leads out; to allow its directory, add it to UPLOADER_SOURCE_ROOTS on the workers"
    )


#: realpath() fails (EINVAL from readlink) when a link it met is replaced by a file before it
#: reads it: a race with a writer, tried again a few times.
_REALPATH_ATTEMPTS = 8


def _realpath(name: str, raw: str) -> Path:
    kernels = _kernel_realpath(raw)
    if kernels is not None:
        return Path(kernels)
    for _ in range(_REALPATH_ATTEMPTS):
        try:
            return Path(os.path.realpath(raw))
        except OSError:
            continue
    raise SourceError(f"source {name!r} kept changing while it was resolved (links renamed over its path)")


def _kernel_realpath(raw: str) -> str | None:
    """The real path of an existing ``raw`` as the kernel resolves it: an ``O_PATH`` descriptor
    (nothing is opened for reading: no FIFO blocks, no device wakes) and its ``/proc/self/fd``
    link. Two system calls instead of ``os.path.realpath``'s ``lstat`` per component in Python,
    which was an eighth of a worker's CPU per small file. ``None`` (then ``os.path.realpath``
    decides, with its own words for a missing path) when the path does not resolve or there is
    no ``/proc``."""
    try:
        fd = os.open(raw, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    finally:
        os.close(fd)
    return real if real.startswith("/") and not real.endswith(" (deleted)") else None


@functools.lru_cache(maxsize=64)
def _real_roots(roots: tuple[Path, ...]) -> tuple[Path, ...]:
    """The roots' real paths. Settings, resolved once per process: a root's own links are the
    deployment's, and the open beneath the root (not this) is what confines a source."""
    return tuple(Path(os.path.realpath(root)) for root in roots)


def resolve_within_roots(path: str, roots: Sequence[Path]) -> Path:
    """The real path of ``path`` (symlinks and ``..`` resolved), or :class:`SourceError` (see
    :func:`locate`)."""
    return locate(path, roots).path
