"""Issue 10's race, through real workers: a writer inside the source root swaps the source file with
a symbolic link to a file outside the root (``renameat2`` exchange, the inside file given the
outside file's size and mtime), over and over, while the file is uploaded again and again. On the
old code (check the real path, then open by name; fingerprint = size and mtime) an upload
completed with 27 of 100 parts read from outside. Now no stored byte may come from outside: every
upload completes with the inside file's bytes, or ends refused or failed saying the source left its
root or changed.

The outside file is all 0xFF bytes and the inside one has none, so a single outside byte in a
stored object or part shows. Default runtime 60 s (``UPLOADER_RACE_SECONDS`` to change it): the
only long test of the sources.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import Stack
from uploader import UploadNotFound
from uploader.client import UploadHandle, UploadStatus
from uploader.planner import MiB

RACE_SECONDS = float(os.environ.get("UPLOADER_RACE_SECONDS", "60"))
PART_SIZE = 5 * MiB
PARTS = 12
#: Storms of exchanges as fast as they go, then calm spells with the file in place (so that some
#: uploads can complete and show they hold the inside bytes).
STORM_SECONDS, CALM_SECONDS = 2.0, 1.0
IN_FLIGHT = 2
OUTSIDE_BYTE = 0xFF
#: How an upload that met the link may end (refused at start, or failed by a part).
REASONS = ("outside the allowed source roots", "no longer lies inside its source root", "changed since the upload began")
REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(RACE_SECONDS + 300)


def _inside_bytes(size: int) -> bytes:
    """Random bytes below 0x80: no byte of the outside file can hide among them."""
    return os.urandom(size).translate(bytes(b & 0x7F for b in range(256)))


def _poll(stack: Stack, upload_id: str) -> UploadStatus | None:
    try:
        return stack.uploader.status(upload_id)
    except UploadNotFound:
        return None  # not accepted or refused yet


def _ended(stack: Stack, handle: UploadHandle) -> bool:
    status = _poll(stack, handle.upload_id)
    return status.terminal if status is not None else handle.start.failed()


def _ending(stack: Stack, handle: UploadHandle, timeout: float = 120) -> UploadStatus | str:
    """The upload's terminal status, or what went wrong: no status while its start task failed
    (an error no refusal was noted for), or no end within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _poll(stack, handle.upload_id)
        if status is not None and status.terminal:
            return status
        if status is None and handle.start.failed():
            return f"{handle.upload_id}: start failed without a refusal: {handle.start.result!r}"
        time.sleep(0.05)
    return f"{handle.upload_id} did not end within {timeout} s"


def test_exchange_race_puts_no_outside_byte_in_any_stored_object(make_stack, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    stack: Stack = make_stack()
    stack.start_worker("race-a", concurrency=4)
    stack.start_worker("race-b", concurrency=4)
    bucket = stack.new_bucket()
    tag = uuid.uuid4().hex[:12]
    root = stack.sources_root / f"race-{tag}"
    root.mkdir()
    outside = workdir / f"outside-{tag}"  # beside the sources root, not in it
    outside.mkdir()
    size = PARTS * PART_SIZE
    content = _inside_bytes(size)
    inside, secret, link = root / "data.bin", outside / "secret.bin", root / "swap"
    inside.write_bytes(content)
    secret.write_bytes(bytes([OUTSIDE_BYTE]) * size)
    st = inside.stat()
    os.utime(secret, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: the old fingerprint cannot tell
    link.symlink_to(os.path.relpath(secret, root))
    inside_sha = hashlib.sha256(content).hexdigest()
    part_md5 = {n: hashlib.md5(content[(n - 1) * PART_SIZE : n * PART_SIZE]).hexdigest() for n in range(1, PARTS + 1)}

    swapper = subprocess.Popen(
        [sys.executable, "-m", "tests.swapper", str(inside), str(link), str(RACE_SECONDS), str(STORM_SECONDS), str(CALM_SECONDS)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    handles: list[UploadHandle] = []
    in_flight: list[UploadHandle] = []
    try:
        deadline = time.monotonic() + RACE_SECONDS
        while time.monotonic() < deadline:
            while len(in_flight) < IN_FLIGHT:
                handle = stack.uploader.submit(str(inside), f"s3://{bucket}/race-{len(handles)}", part_size=PART_SIZE)
                handles.append(handle)
                in_flight.append(handle)
            in_flight = [h for h in in_flight if not _ended(stack, h)]
            time.sleep(0.05)  # polling interval
        swaps = int(swapper.communicate(timeout=30)[0])
    finally:
        if swapper.poll() is None:
            swapper.kill()
            swapper.wait()
    assert swaps > 1000, f"the swapper made only {swaps} exchanges"

    outcomes: dict[str, int] = {}
    outside_bytes = foreign_parts = parts_checked = parts_recorded = 0
    unclear: list[str] = []
    try:
        for handle in handles:
            status = _ending(stack, handle)
            if isinstance(status, str):
                unclear.append(status)
                continue
            outcomes[status.state] = outcomes.get(status.state, 0) + 1
            parts_recorded += status.parts_done
            if status.state == "completed":
                data = stack.s3.get_object(Bucket=bucket, Key=status.key)["Body"].read()
                outside_bytes += len(data) - len(data.translate(None, bytes([OUTSIDE_BYTE])))
                if hashlib.sha256(data).hexdigest() != inside_sha:
                    unclear.append(f"{handle.upload_id} completed with bytes that are not the inside file's")
                continue
            if status.state not in ("failed", "refused") or not any(reason in status.error for reason in REASONS):
                unclear.append(f"{handle.upload_id} ended {status.state}: {status.error!r}")
            record = stack.uploader.checkpoint.get(handle.upload_id)
            if record is None or not record.mpu_id:
                continue
            # The parts a failed upload left on the server: each must hold the inside file's bytes.
            listed = stack.s3.list_parts(Bucket=bucket, Key=record.key, UploadId=record.mpu_id).get("Parts", [])
            for part in listed:
                parts_checked += 1
                if part["ETag"].strip('"') != part_md5[part["PartNumber"]]:
                    foreign_parts += 1
    finally:
        for upload in stack.open_multipart_uploads(bucket):
            stack.s3.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        for handle_index in range(len(handles)):
            stack.s3.delete_object(Bucket=bucket, Key=f"race-{handle_index}")
        inside.unlink(missing_ok=True)
        link.unlink(missing_ok=True)
        secret.unlink(missing_ok=True)

    summary = (
        f"{RACE_SECONDS:.0f} s, {swaps} exchanges, {len(handles)} uploads {outcomes}, "
        f"{parts_recorded} parts recorded, {parts_checked} parts of failed uploads checked on the server, "
        f"{len(unclear)} unclear"
    )
    print(f"\nexchange race: {summary}")
    assert outside_bytes == 0, f"{outside_bytes} bytes from outside the root in stored objects ({summary})"
    assert foreign_parts == 0, f"{foreign_parts} stored parts do not hold the inside file's bytes ({summary})"
    assert not unclear, f"uploads that did not end cleanly ({summary}): {unclear[:5]}"
    # The race was run: uploads got under way (parts were read between exchanges), not only refused.
    assert len(handles) >= 10 and parts_recorded > 0, summary
