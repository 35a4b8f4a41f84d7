"""Listing a directory of the source roots one page at a time, for directory batches.

The walk is depth first over each directory's entries in sorted order, so the files come in the
order of their relative paths compared component by component, and a page resumes after a
*cursor* (the last relative path of the previous page, as a tuple of components) without keeping
anything between pages: the directories on the cursor's path are listed again and everything up
to the cursor is passed over (whole subtrees at once). A page's memory is bounded by its size
and by the largest single directory, never by the whole tree.

Confinement is the one files have (:mod:`.roots`, :mod:`.beneath`): the batch's directory is
located beneath a source root and opened beneath the root's descriptor; subdirectories are opened
relative to their parent's descriptor with ``O_NOFOLLOW`` (a symbolic link to a directory is
never descended: it is reported, as are FIFOs, sockets, devices and denied places). A symbolic
link to a file is listed and left to the file's own start, which follows it only if it stays
within the roots.
"""

from __future__ import annotations

import fnmatch
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from uploader.errors import SourceError
from uploader.sources.beneath import LeavesRoot, open_beneath
from uploader.sources.denylist import denial
from uploader.sources.local import _file_kind
from uploader.sources.roots import Located, denied_error, locate

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
#: Subdirectories: never through a symbolic link.
_SUBDIR_FLAGS = _DIR_FLAGS | os.O_NOFOLLOW

Cursor = tuple[str, ...]


@dataclass(frozen=True)
class ListedFile:
    #: Components of the path relative to the batch's directory.
    parts: Cursor
    size: int
    mtime_ns: int

    @property
    def relative(self) -> str:
        return "/".join(self.parts)


@dataclass(frozen=True)
class RefusedEntry:
    parts: Cursor
    reason: str

    @property
    def relative(self) -> str:
        return "/".join(self.parts)


@dataclass(frozen=True)
class Selector:
    """Which files a batch takes, by their relative path (``/`` separators): those matching an
    ``include`` pattern (every file if there is none) and no ``exclude`` pattern. Patterns are
    :mod:`fnmatch` globs on the whole relative path, where ``*`` also matches ``/`` (as in
    ``aws s3 cp --include``): ``*.log`` matches ``a/b.log``."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def takes(self, relative: str) -> bool:
        if self.include and not any(fnmatch.fnmatchcase(relative, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(relative, p) for p in self.exclude)


@dataclass
class Page:
    """One page of a listing: at most ``limit`` entries (files and refused entries), the cursor
    after them, and whether the walk ended within it."""

    files: list[ListedFile] = field(default_factory=list)
    refused: list[RefusedEntry] = field(default_factory=list)
    cursor: Cursor | None = None
    done: bool = False


def locate_directory(path: str, roots: Sequence[Path]) -> Located:
    """The batch's directory beneath its source root; :class:`SourceError` if it is outside the
    roots, denied, or not a directory (checked on the opened descriptor)."""
    located = locate(path, roots)
    fd = _open_directory(located, path)
    os.close(fd)
    return located


def _open_directory(located: Located, name: str) -> int:
    try:
        return open_beneath(located.root, located.relative, _DIR_FLAGS)
    except LeavesRoot as exc:
        raise SourceError(f"source {name!r} is refused: {exc}") from None
    except NotADirectoryError:
        raise SourceError(f"source {name!r} is not a directory (upload a file without -r/--recursive)") from None
    except FileNotFoundError:
        raise SourceError(f"source directory {name!r} does not exist on the worker") from None
    except OSError as exc:
        raise SourceError(f"source directory {name!r} cannot be read: {exc.strerror}") from None


def list_page(located: Located, name: str, after: Cursor | None, limit: int, selector: Selector) -> Page:
    """The next ``limit`` entries of the directory ``located`` (as the request ``name``-d it)
    after the cursor ``after`` (``None``: from the start)."""
    page = Page()
    fd = _open_directory(located, name)
    try:
        for entry in _walk(fd, located.path, (), after):
            if isinstance(entry, ListedFile):
                if not selector.takes(entry.relative):
                    continue
                page.files.append(entry)
            else:
                page.refused.append(entry)
            page.cursor = entry.parts
            if len(page.files) + len(page.refused) >= limit:
                return page
        page.done = True
        return page
    finally:
        os.close(fd)


def _walk(dir_fd: int, path: Path, parts: Cursor, after: Cursor | None) -> Iterator[ListedFile | RefusedEntry]:
    """The entries beneath ``dir_fd`` (the directory ``path``, ``parts`` below the batch's)
    after ``after``, in order. Takes ownership of nothing: ``dir_fd`` stays open."""
    try:
        names = sorted(os.listdir(dir_fd))
    except OSError as exc:
        if parts:
            yield RefusedEntry(parts, f"directory cannot be listed: {exc.strerror}")
        return
    for name in names:
        here = (*parts, name)
        if after is not None and here < after[: len(here)]:
            continue  # this file, or this whole subtree, comes before the cursor
        if after is not None and here == after:
            continue  # the cursor itself (a file, or a directory refused before)
        full = path / name
        why = denial(str(full))
        if why:
            yield RefusedEntry(here, str(denied_error(str(full), why)))
            continue
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError as exc:
            yield RefusedEntry(here, f"cannot be examined: {exc.strerror}")
            continue
        if stat.S_ISLNK(st.st_mode):
            try:
                st = os.stat(name, dir_fd=dir_fd)  # the file's own start decides whether it may follow it
            except OSError:
                yield RefusedEntry(here, "a symbolic link to nothing")
                continue
            if stat.S_ISDIR(st.st_mode):
                yield RefusedEntry(here, "a symbolic link to a directory: not followed")
                continue
        if stat.S_ISDIR(st.st_mode):
            try:
                sub = os.open(name, _SUBDIR_FLAGS, dir_fd=dir_fd)
            except OSError as exc:
                yield RefusedEntry(here, f"directory cannot be opened: {exc.strerror}")
                continue
            try:
                yield from _walk(sub, full, here, after if after is not None and here == after[: len(here)] else None)
            finally:
                os.close(sub)
        elif stat.S_ISREG(st.st_mode):
            yield ListedFile(here, st.st_size, st.st_mtime_ns)
        else:
            yield RefusedEntry(here, f"not a regular file ({_file_kind(st.st_mode)})")
