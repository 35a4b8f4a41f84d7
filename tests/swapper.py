"""The attack on source roots: swap a file inside the root with a symbolic link to a file outside,
atomically and over and over (``renameat2`` with ``RENAME_EXCHANGE``), so that a worker that checks
a path and then opens it by name reads the outside file.

Run as a script (``python -m tests.swapper A B SECONDS [STORM CALM]``), it swaps in storms of
``STORM`` seconds separated by calm spells of ``CALM`` seconds (``A`` back in place), for
``SECONDS``, then prints how many exchanges it made.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time

AT_FDCWD = -100
RENAME_EXCHANGE = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]


def exchange(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> None:
    """Swap the directory entries ``a`` and ``b`` in one atomic step."""
    if _libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(a))


def swap_for(a: str, b: str, seconds: float, storm: float, calm: float) -> int:
    """Exchange ``a`` and ``b`` as fast as possible in storms, ``a`` back in place for the calm
    spells (``a`` is a regular file, ``b`` the link, at the start and at the end). The exchanges made."""
    count = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        storm_end = min(end, time.monotonic() + storm)
        while time.monotonic() < storm_end:
            exchange(a, b)
            count += 1
        if count % 2:
            exchange(a, b)
            count += 1
        time.sleep(min(calm, max(0.0, end - time.monotonic())))
    return count


if __name__ == "__main__":
    first, second, duration = sys.argv[1], sys.argv[2], float(sys.argv[3])
    storm_seconds = float(sys.argv[4]) if len(sys.argv) > 4 else duration
    calm_seconds = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
    print(swap_for(first, second, duration, storm_seconds, calm_seconds), flush=True)
