"""Alibaba OSS's ``x-oss-hash-crc64ecma`` emulated in front of SeaweedFS.

An :class:`OssCrc64` is a :class:`~tests.faultproxy.FaultProxy` ``add_headers`` hook. It keeps
the bytes of every part the proxy forwards, and answers as OSS does: UploadPart and PutObject
with the CRC-64/ECMA of the body received, CompleteMultipartUpload and HeadObject with the
object's, computed over the concatenation of the listed parts' bytes (not by combining CRCs, as
the uploader does: the two must agree). The CRC-64/ECMA function itself is checked against
liblzma's in tests/test_checksum_combine.py.

Faults: ``wrong_part`` reports a wrong value for the first UploadPart of that part number only
(its resend is answered truthfully); ``wrong_object`` reports a wrong value for every object.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from urllib.parse import parse_qs, unquote, urlsplit

import anycrc

HEADER = "x-oss-hash-crc64ecma"
_CRC64_XZ = anycrc.Model("CRC64-XZ")


class OssCrc64:
    def __init__(self, *, wrong_part: int | None = None, wrong_object: bool = False) -> None:
        self.wrong_part = wrong_part
        self.wrong_object = wrong_object
        #: UploadPart requests answered, by part number.
        self.part_requests: Counter[int] = Counter()
        #: Wrong values reported (parts and objects).
        self.wrong_reported = 0
        self._parts: dict[tuple[str, int], bytes] = {}
        self._objects: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, method: str, path: str, body: bytes, _headers: dict[str, str]) -> dict[str, str]:
        url = urlsplit(path)
        query = parse_qs(url.query, keep_blank_values=True)
        key = unquote(url.path)
        upload = query.get("uploadId", [""])[0]
        with self._lock:
            if method == "PUT" and "partNumber" in query:
                number = int(query["partNumber"][0])
                self._parts[(upload, number)] = body
                self.part_requests[number] += 1
                wrong = number == self.wrong_part and self.part_requests[number] == 1
                return {HEADER: self._report(int(_CRC64_XZ.calc(body)), wrong)}
            if method == "PUT" and not url.query and key.count("/") >= 2:  # PutObject
                self._objects[key] = int(_CRC64_XZ.calc(body))
                return {HEADER: self._report(self._objects[key], self.wrong_object)}
            if method == "POST" and upload:  # CompleteMultipartUpload
                numbers = [int(n) for n in re.findall(rb"<PartNumber>(\d+)</PartNumber>", body)]
                whole = b"".join(self._parts[(upload, n)] for n in numbers)
                self._objects[key] = int(_CRC64_XZ.calc(whole))
                return {HEADER: self._report(self._objects[key], self.wrong_object)}
            if method == "HEAD" and key in self._objects:
                return {HEADER: self._report(self._objects[key], self.wrong_object)}
        return {}

    def _report(self, crc: int, wrong: bool) -> str:
        if wrong:
            self.wrong_reported += 1
            crc ^= 1
        return str(crc)
