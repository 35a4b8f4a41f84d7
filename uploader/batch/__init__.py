"""Directory batches (this package: ``request``, the client's and the message's; ``status``, the
aggregate a client reads; ``coordinator``, the workers' side): one request, one upload per file of a directory, listed by the workers.

The ``uploader.start_batch`` message carries a :class:`BatchRequest` (the directory, the
destination ``bucket``/``prefix``, include/exclude globs, ``skip_unchanged`` and the options
every upload gets). The coordinator checks it, locates the directory beneath the source roots,
writes the batch record (:mod:`uploader.checkpoint.batches`) and lists the first page; each
page then sends the next (``uploader.list_batch``, ids and numbers only: the listing's cursor is
in the record). So no message holds the file list, and a worker holds one page at a time.

Each listed file becomes an upload of its own (key = prefix + its path relative to the
directory, ``/`` separators), started by :func:`start_page`, the one place that turns a page
into uploads. A file that cannot become an upload is noted as a failure of the batch; the others
go on.

``skip_unchanged``: a file is skipped when its object exists with the same size and the
fingerprint metadata (:data:`FINGERPRINT_METADATA`: ``<size>-<mtime ns>`` of the file as listed)
that every upload of a batch writes. One HeadObject per file, no read of the file: an ETag is
the MD5 of the object only for single-part uploads without SSE-KMS/SSE-C, so comparing it
would mean reading every file and would still upload multipart objects again. A file changed
after it was listed uploads the new bytes with the old fingerprint, so the next run uploads it
again (never the reverse: a changed file is never skipped). Objects the uploader did not write
have no fingerprint and are uploaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from uploader.lazy import exports

if TYPE_CHECKING:
    from uploader.batch.request import FINGERPRINT_METADATA, BatchRequest, file_upload_id, parse_batch_request
    from uploader.batch.status import BatchProgress, BatchStatus, batch_status

__all__ = [
    "FINGERPRINT_METADATA", "BatchProgress", "BatchRequest", "BatchStatus", "batch_status", "file_upload_id",
    "parse_batch_request",
]
#: Where each name lives (imported at first use: reading a batch's status needs no request checks).
_HOMES = {
    **dict.fromkeys(("FINGERPRINT_METADATA", "BatchRequest", "file_upload_id", "parse_batch_request"), "uploader.batch.request"),
    **dict.fromkeys(("BatchProgress", "BatchStatus", "batch_status"), "uploader.batch.status"),
}


__getattr__ = exports(__name__, globals(), _HOMES)
