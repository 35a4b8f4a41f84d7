"""A slow uplink: a part that takes far longer to send than the S3 connect timeout still goes
through, sent once.

urllib3 leaves the connect timeout on the socket while it sends a request's body. A part handed to
botocore as a bare ``bytearray`` went out in one ``sendall``, which that timeout bounds as a whole,
so every attempt at a part slower to send than the timeout was cut off. As a file object the body
is sent 16 KiB at a time and the timeout bounds each write."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import Stack, sha256_file
from tests.faultproxy import FaultProxy, is_upload_part
from uploader.planner import MiB

PART = 16 * MiB
#: The S3 connect timeout the worker runs with (``UPLOADER_S3_CONNECT_TIMEOUT``).
CONNECT_TIMEOUT = 2.0
#: Request bodies reach the server at this rate: a part takes about 16 s to send, and the client's
#: ``sendall`` at least 12 s even if its socket buffer (at most 4 MiB here) takes a share: longer
#: than this test's connect timeout, and than the 10 s default too.
BODY_RATE = 1 * MiB


def test_a_part_slower_to_send_than_the_connect_timeout_goes_through_once(make_stack, seaweed) -> None:  # type: ignore[no-untyped-def]
    proxy = FaultProxy(seaweed.endpoint_url, rate=0.0, body_rate=BODY_RATE)
    try:
        # No retries at all: a part cut off by the timeout fails the upload instead of being sent
        # again and again.
        stack: Stack = make_stack(UPLOADER_PART_MAX_RETRIES="0", UPLOADER_AUTO_RESUME_LIMIT="0")
        stack.start_worker(
            "slow-link", concurrency=2, UPLOADER_S3_ENDPOINT_URL=proxy.url, UPLOADER_S3_CONNECT_TIMEOUT=str(CONNECT_TIMEOUT)
        )
        bucket = stack.new_bucket()
        path: Path = stack.make_file(2 * PART)
        status = stack.uploader.submit(str(path), f"s3://{bucket}/slow.bin", part_size=PART).wait(timeout=120)
        assert status.state == "completed"
        assert status.bytes_sent == status.size, "every part was sent exactly once (no task retry)"
        bodies = [b for b in proxy.bodies if is_upload_part(b[0], b[1])]
        assert proxy.counts["body-cut"] == 0, f"a send was cut off: {bodies}"
        assert len(bodies) == 2, f"each part reached the server once (no botocore retry): {bodies}"
        for _method, _path, got, length, seconds in bodies:
            assert got == length == PART
            assert seconds > 2 * CONNECT_TIMEOUT, f"the part took {seconds:.1f} s to send"
        assert stack.object_sha256(bucket, "slow.bin") == sha256_file(path)
    finally:
        proxy.close()
