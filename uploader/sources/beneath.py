"""Opening a file beneath a directory without ever leaving it, whatever a writer inside it renames
meanwhile.

Checking a path and then opening it by name is a race: between the two, a writer inside the
root can swap a file for a symbolic link to anything the worker may read (with ``renameat2``'s
``RENAME_EXCHANGE``, atomically and as often as it likes). So the file is opened relative to a
descriptor of the root, in one step that cannot resolve to anything outside it:

- ``openat2(2)`` with ``RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`` (Linux >= 5.6): the kernel fails
  with ``EXDEV`` any resolution that would leave the root (``..`` above it, an absolute symbolic
  link, a relative one pointing out) and with ``ELOOP`` a ``/proc`` magic link. Symbolic links
  that stay inside the root are followed.
- Where ``openat2`` is unavailable (older kernels, a seccomp filter that refuses it), a walk one
  component at a time with ``O_NOFOLLOW``: no symbolic link is followed at all, not even one
  inside the root, and ``..`` is refused. (The callers hand over a path already resolved with
  ``realpath``, so a link that was in place when the request was checked has been replaced by its
  target; only a link that appears afterwards is refused.)

Either way the caller checks the opened descriptor (``fstat``), never the name.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os
import stat
import struct
import sys
from pathlib import PurePosixPath

#: ``openat2`` has this number on every Linux architecture (system calls from 424 on are numbered
#: alike everywhere).
SYS_OPENAT2 = 437
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_BENEATH = 0x08
#: ``struct open_how { u64 flags; u64 mode; u64 resolve; }``
_OPEN_HOW = struct.Struct("=QQQ")
#: A rename anywhere on the system while ``..`` is resolved makes ``openat2`` fail with ``EAGAIN``
#: (it cannot prove the result is beneath the root); it is safe to try again, and after this many
#: the walk (which needs no retry, and follows no link) decides.
_EAGAIN_ATTEMPTS = 32
#: How directories on the way are held: ``O_PATH`` needs only search permission on them.
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC


class OpenMethod(enum.Enum):
    OPENAT2 = "openat2"
    WALK = "walk"


class LeavesRoot(Exception):
    """The path leads out of the root (``..`` above it, a symbolic link pointing outside), or
    through a link the method does not follow; ``str()`` says which."""


def _load_syscall():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        syscall = libc.syscall
    except (OSError, AttributeError):
        return None
    syscall.restype = ctypes.c_long
    return syscall


_syscall = _load_syscall()
_available: bool | None = None


def openat2(dirfd: int, path: str, flags: int, resolve: int) -> int:
    """``openat2(dirfd, path, {flags, 0, resolve})``: a new descriptor, or :class:`OSError`."""
    if _syscall is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS), path)
    how = ctypes.create_string_buffer(_OPEN_HOW.pack(flags, 0, resolve), _OPEN_HOW.size)
    fd = _syscall(
        ctypes.c_long(SYS_OPENAT2), ctypes.c_long(dirfd), ctypes.c_char_p(os.fsencode(path)), how,
        ctypes.c_size_t(_OPEN_HOW.size),
    )
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)
    return int(fd)


def openat2_available() -> bool:
    """Whether this process can use ``openat2`` with ``RESOLVE_BENEATH`` (asked once)."""
    global _available
    if _available is None:
        try:
            root = os.open("/", _DIR_FLAGS)
        except OSError:
            return False
        try:
            os.close(openat2(root, ".", os.O_PATH | os.O_CLOEXEC, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS))
            _available = True
        except OSError as exc:
            # ENOSYS: kernel < 5.6; EPERM: a seccomp filter (Docker's before 20.10); E2BIG/EINVAL:
            # a kernel that does not know these resolve flags.
            if exc.errno not in (errno.ENOSYS, errno.EPERM, errno.E2BIG, errno.EINVAL):
                raise
            _available = False
        finally:
            os.close(root)
    return _available


def default_method() -> OpenMethod:
    return OpenMethod.OPENAT2 if openat2_available() else OpenMethod.WALK


def open_beneath(root: str | os.PathLike[str], relative: PurePosixPath, flags: int, *, method: OpenMethod | None = None) -> int:
    """A descriptor of ``root/relative`` opened with ``flags``, resolved without leaving ``root``.

    Raises :class:`LeavesRoot` when the path leads out of it, and the usual :class:`OSError`s
    (``FileNotFoundError``, ``NotADirectoryError``, ``PermissionError``, ``ENXIO`` for a socket...)
    otherwise. ``root`` itself is trusted (it is the deployment's configuration); ``relative``
    ``.`` opens the root. ``method``: forced (tests), or the best this kernel offers."""
    if relative.is_absolute():
        raise ValueError(f"{relative} must be relative to the root")
    method = method or default_method()
    root_fd = os.open(root, _DIR_FLAGS)
    try:
        if method is OpenMethod.OPENAT2:
            fd = _open_openat2(root_fd, str(relative), flags)
            if fd is not None:
                return fd
        return _open_walk(root_fd, relative.parts, flags)
    finally:
        os.close(root_fd)


def _open_openat2(root_fd: int, relative: str, flags: int) -> int | None:
    """The descriptor, or None when renames elsewhere kept making the kernel answer EAGAIN."""
    for _ in range(_EAGAIN_ATTEMPTS):
        try:
            return openat2(root_fd, relative, flags, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                continue
            if exc.errno == errno.EXDEV:
                raise LeavesRoot("it leads out of the source root (through '..' or a symbolic link)") from None
            if exc.errno == errno.ELOOP:
                raise LeavesRoot("it goes through a /proc magic link or too many symbolic links") from None
            raise
    return None


def _open_walk(root_fd: int, parts: tuple[str, ...], flags: int) -> int:
    names = [name for name in parts if name not in ("", ".")]
    if ".." in names:
        raise LeavesRoot("'..' is not followed")
    if not names:
        return os.open(".", flags, dir_fd=root_fd)
    current = root_fd
    try:
        for name in names[:-1]:
            try:
                step = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=current)
            except NotADirectoryError:
                if _is_symlink(name, current):
                    raise LeavesRoot("a directory on its path is a symbolic link (not followed)") from None
                raise
            if current != root_fd:
                os.close(current)
            current = step
        try:
            return os.open(names[-1], flags | os.O_NOFOLLOW, dir_fd=current)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise LeavesRoot("it is a symbolic link (not followed)") from None
            raise
    finally:
        if current != root_fd:
            os.close(current)


def _is_symlink(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def fd_path(fd: int) -> str | None:
    """The path the kernel gives for ``fd`` (``/proc/self/fd``), or None without ``/proc``."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
