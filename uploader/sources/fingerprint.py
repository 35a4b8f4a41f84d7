"""What identifies one version of a source: its size, modification time and, where the worker can
compare it, which file it is (device and inode).

Size and mtime alone cannot tell two files apart: a file swapped in under the source's name with
the same size and mtime (``touch -r``, ``renameat2`` exchange) passes them. The device and inode
numbers of the file opened catch that, but they name a file only on one machine, in one mount
namespace (``st_dev`` of a network or FUSE mount is numbered by each client; FUSE file systems and
some network ones number inodes per client too). So a :class:`FileId` carries its *scope*, this
boot of this machine and this mount namespace, and is compared only within it: a part read on
another worker machine is checked against size and mtime, as before (and is still confined to the
source roots when opened: see :mod:`uploader.sources.beneath`).

An HTTP(S) source has no file identity; what identifies its version is the server's entity tag
(``ETag``), kept in the same checkpoint field with the prefix :data:`ETAG_PREFIX`, beside its
length (``size``) and ``Last-Modified`` (``mtime_ns``).

Checkpoint records written before the identity was recorded have none (``file_id`` empty): for
them only size and mtime are compared, which is what they were started with.

An S3 object's identity is an :class:`ObjectVersion` (its ETag and, in a versioned bucket, its
VersionId), kept in the same record field (``file_id``, prefixed ``s3:``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache


@lru_cache(maxsize=1)
def identity_scope() -> str:
    """Where a ``(st_dev, st_ino)`` pair seen by this process names one file: the kernel's boot id
    and this process's mount namespace; ``""`` when either is unknown (no ``/proc``), and then
    identities are not recorded."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
        namespace = os.readlink("/proc/self/ns/mnt")  # "mnt:[4026531841]"
    except OSError:
        return ""
    return f"{boot}/{namespace.removeprefix('mnt:').strip('[]')}"


@dataclass(frozen=True)
class FileId:
    """One file as the kernel names it (``st_dev``, ``st_ino``), valid within ``scope``."""

    dev: int
    ino: int
    scope: str

    def encode(self) -> str:
        return f"{self.dev}:{self.ino}@{self.scope}"

    @classmethod
    def decode(cls, text: str) -> FileId | None:
        """The identity ``encode`` wrote; None for ``""`` (a record from before identities were
        recorded) or anything malformed (compared as unknown rather than refused)."""
        numbers, _, scope = text.partition("@")
        dev, _, ino = numbers.partition(":")
        if not (scope and dev.isdigit() and ino.isdigit()):
            return None
        return cls(int(dev), int(ino), scope)


#: How an entity tag is told from a :class:`FileId` in the checkpoint's ``file_id`` field.
ETAG_PREFIX = "etag:"


@dataclass(frozen=True)
class ObjectVersion:
    """One version of an S3 object: its ``etag`` (as the server quotes it) and ``version_id``
    ("" in a bucket without versioning). Valid on any machine."""

    etag: str
    version_id: str = ""

    #: What starts the record text of an object's identity (a file's starts with a digit).
    PREFIX = "s3:"

    def encode(self) -> str:
        return self.PREFIX + json.dumps([self.etag, self.version_id], separators=(",", ":"))

    @classmethod
    def decode(cls, text: str) -> ObjectVersion | None:
        """The version ``encode`` wrote; None for anything else."""
        if not text.startswith(cls.PREFIX):
            return None
        try:
            etag, version_id = json.loads(text[len(cls.PREFIX) :])
        except ValueError:
            return None
        return cls(str(etag), str(version_id)) if etag else None


def decode_identity(text: str) -> FileId | ObjectVersion | None:
    """The identity a record's ``file_id`` holds: a file's, an object's, or None (unknown)."""
    return ObjectVersion.decode(text) if text.startswith(ObjectVersion.PREFIX) else FileId.decode(text)


@dataclass(frozen=True)
class Fingerprint:
    """What identifies one version of a source; any difference means the bytes may differ."""

    size: int
    mtime_ns: int
    #: None: unknown (an old record, or a worker without ``/proc``): size and mtime decide.
    #: An :class:`ObjectVersion` for an S3 object.
    file_id: FileId | ObjectVersion | None = None
    #: An HTTP(S) source's entity tag as the server sent it (``W/"..."`` when weak); "" for files.
    etag: str = ""

    @classmethod
    def of(cls, st: os.stat_result) -> Fingerprint:
        """The fingerprint of the file ``st`` describes (an ``fstat`` of the opened descriptor)."""
        scope = identity_scope()
        return cls(st.st_size, st.st_mtime_ns, FileId(st.st_dev, st.st_ino, scope) if scope else None)

    @classmethod
    def from_record(cls, size: int, mtime_ns: int, file_id: str = "") -> Fingerprint:
        """The fingerprint the checkpoint stored (fields ``size``, ``mtime_ns``, ``file_id``)."""
        if file_id.startswith(ETAG_PREFIX):
            return cls(size, mtime_ns, etag=file_id.removeprefix(ETAG_PREFIX))
        return cls(size, mtime_ns, decode_identity(file_id))

    def to_record(self) -> dict[str, object]:
        """The checkpoint fields that hold this fingerprint."""
        identity = self.file_id.encode() if self.file_id else (ETAG_PREFIX + self.etag if self.etag else "")
        return {"size": self.size, "mtime_ns": self.mtime_ns, "file_id": identity}

    to_dict = to_record

    def difference(self, actual: Fingerprint) -> str | None:
        """Why ``actual`` is not the version this fingerprint describes (a short phrase for an
        error message), or None when it is. Identities are compared only when both are known and
        of the same scope."""
        if actual.size != self.size:
            return f"size {self.size} -> {actual.size}"
        if actual.mtime_ns != self.mtime_ns:
            return "modification time changed"
        if actual.etag != self.etag:
            return "entity tag changed"
        mine, theirs = self.file_id, actual.file_id
        if isinstance(mine, ObjectVersion) or isinstance(theirs, ObjectVersion):
            return version_difference(mine, theirs)
        if mine and theirs and mine.scope == theirs.scope and (mine.dev, mine.ino) != (theirs.dev, theirs.ino):
            return (
                f"another file is in its place: device/inode {mine.dev}/{mine.ino} -> {theirs.dev}/{theirs.ino}, "
                "same size and modification time"
            )
        return None

    def matches(self, actual: Fingerprint) -> bool:
        return self.difference(actual) is None

    @property
    def version(self) -> ObjectVersion | None:
        """The S3 object version this fingerprint pins (None for a file)."""
        return self.file_id if isinstance(self.file_id, ObjectVersion) else None


def version_difference(mine: FileId | ObjectVersion | None, theirs: FileId | ObjectVersion | None) -> str | None:
    """Why object version ``theirs`` is not ``mine`` (an object replaced with one of the same
    size and time has another ETag or VersionId), or None."""
    if not (isinstance(mine, ObjectVersion) and isinstance(theirs, ObjectVersion)):
        return "another kind of source is in its place"
    if mine.version_id and theirs.version_id and mine.version_id != theirs.version_id:
        return f"version {mine.version_id[:40]} -> {theirs.version_id[:40]}"
    if mine.etag != theirs.etag:
        return f"ETag {mine.etag[:48]} -> {theirs.etag[:48]}"
    return None
