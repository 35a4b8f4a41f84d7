"""Where a client keeps the capability tokens of the uploads it submitted (see uploader/auth.py).

In memory for a library client (the :class:`~uploader.client.Uploader` that submitted an upload
can cancel and resume it); on disk for the CLI: one file per upload id in a directory only its user can enter (``0700``; files ``0600``),
written atomically (a temporary file renamed into place), so a crash never leaves half a token
and two CLI processes never interleave. Tokens of uploads that finished long ago are harmless
(they open nothing once the record expires) and are pruned after :data:`PRUNE_AFTER` seconds.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from uploader.ids import valid_upload_id

#: Seconds after which a kept token is deleted (the default checkpoint retention is 7 days).
PRUNE_AFTER = 30 * 24 * 3600


def default_directory() -> Path:
    """``$XDG_STATE_HOME/uploader/capabilities``, or ``~/.local/state/uploader/capabilities``."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "uploader" / "capabilities"


class CapabilityStore:
    """The tokens of uploads submitted from here, by upload id: in ``directory`` if given, else
    in this object only."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory
        self._memory: dict[str, str] = {}

    def _path(self, directory: Path, upload_id: str) -> Path:
        if not valid_upload_id(upload_id):  # an id is a file name here: never a path
            raise ValueError(f"not an upload id: {upload_id[:64]!r}")
        return directory / upload_id

    def save(self, upload_id: str, token: str) -> None:
        """Keep ``token`` for ``upload_id`` (replacing an older one)."""
        if self.directory is None:
            self._memory[upload_id] = token
            return
        path = self._path(self.directory, upload_id)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")  # mode 0600
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(token)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
        self._prune()

    def load(self, upload_id: str) -> str | None:
        """The token kept for ``upload_id``, or ``None``."""
        if self.directory is None:
            return self._memory.get(upload_id)
        try:
            return self._path(self.directory, upload_id).read_text().strip() or None
        except (FileNotFoundError, ValueError):
            return None

    def _prune(self) -> None:
        assert self.directory is not None
        cutoff = time.time() - PRUNE_AFTER
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return
        for entry in entries:
            try:
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
            except FileNotFoundError:
                pass
