"""Alibaba OSS's own upload callback under the ``oss`` profile (issue 12): the request's
``oss_callback`` / ``oss_callback_vars`` go to the server base64-encoded as ``x-oss-callback`` /
``x-oss-callback-var`` on CompleteMultipartUpload (or the single PutObject) and on no other
request, and the callback server's answer, which OSS sends back instead of its XML, is recorded
and shown by ``status``. SeaweedFS behind a recording proxy stands in for OSS (path-style, as
the profile lets an operator override); the proxy answers a request carrying ``x-oss-callback``
as OSS would, with a callback server's JSON. Any other profile refuses the options at submit."""

from __future__ import annotations

import base64
import json

import pytest

from tests.conftest import Stack, sha256_file
from tests.faultproxy import FaultProxy
from uploader.errors import InvalidRequest
from uploader.planner import MiB
from uploader.request import parse_request
from uploader.storage.osscallback import MAX_ANSWER_CHARS, MAX_CALLBACK_BYTES

PART = 5 * MiB
CALLBACK = {
    "callbackUrl": "https://app.example.com/oss-done",
    "callbackBody": "bucket=${bucket}&object=${object}&size=${size}&who=${x:who}",
    "callbackBodyType": "application/x-www-form-urlencoded",
}
VARS = {"x:who": "ünïcode & friends"}


def _decoded(value: str) -> object:
    return json.loads(base64.b64decode(value, validate=True))


class OssCallbackServer:
    """Answers as OSS does when a request asked for a callback: the callback server's JSON
    (here a fixed answer naming the request's path, and long, to be cut), with 200."""

    def __init__(self) -> None:
        self.answers: list[str] = []

    def __call__(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes] | None:
        if "x-oss-callback" not in headers:
            return None
        answer = json.dumps({"Status": "OK", "path": path.split("?")[0], "pad": "z" * 3000})
        self.answers.append(answer)
        return 200, answer.encode()


def _kind(method: str, path: str) -> str:
    query = path.partition("?")[2]
    if "partNumber=" in query:
        return "UploadPart"
    if method == "POST" and "uploadId=" in query:
        return "CompleteMultipartUpload"
    if method == "POST" and "uploads" in query:
        return "CreateMultipartUpload"
    return f"{method} {query[:20]}"


def test_complete_carries_the_callback_and_its_answer_is_recorded(oss_stack: Stack, proxy: FaultProxy) -> None:
    proxy.answer = server = OssCallbackServer()
    bucket = oss_stack.new_bucket()
    path = oss_stack.make_file(2 * PART + 4321)
    handle = oss_stack.uploader.submit(
        str(path), f"s3://{bucket}/cb.bin", part_size=PART, oss_callback=CALLBACK, oss_callback_vars=VARS
    )
    status = handle.wait(timeout=120)
    assert status.state == "completed", status
    assert oss_stack.object_sha256(bucket, "cb.bin") == sha256_file(path)
    sent = [(_kind(m, p), h) for m, p, h in proxy.requests if "/cb.bin" in p]
    completes = [h for kind, h in sent if kind == "CompleteMultipartUpload"]
    assert len(completes) == 1, [k for k, _ in sent]
    assert _decoded(completes[0]["x-oss-callback"]) == CALLBACK
    assert _decoded(completes[0]["x-oss-callback-var"]) == VARS
    others = [kind for kind, h in sent if kind != "CompleteMultipartUpload" and ("x-oss-callback" in h or "x-oss-callback-var" in h)]
    assert others == [], "only Complete carries the callback"
    assert {kind for kind, _ in sent} >= {"CreateMultipartUpload", "UploadPart"}
    # The callback server's answer, as OSS passed it on, cut to its cap.
    assert len(server.answers) == 1
    assert status.oss_callback_answer == server.answers[0][:MAX_ANSWER_CHARS]
    assert len(status.oss_callback_answer) == MAX_ANSWER_CHARS
    assert status.to_dict()["oss_callback_answer"] == status.oss_callback_answer


def test_a_single_put_carries_the_callback_too(oss_stack: Stack, proxy: FaultProxy) -> None:
    bucket = oss_stack.new_bucket()
    small = oss_stack.make_file(7000)
    # First as SeaweedFS answers (an empty body): nothing to record.
    status = oss_stack.uploader.submit(str(small), f"s3://{bucket}/plain.bin", oss_callback=json.dumps(CALLBACK)).wait(timeout=60)
    assert status.state == "completed" and status.oss_callback_answer == "", status
    puts = [h for m, p, h in proxy.requests if m == "PUT" and "/plain.bin" in p]
    assert len(puts) == 1 and _decoded(puts[0]["x-oss-callback"]) == CALLBACK
    assert "x-oss-callback-var" not in puts[0], "no variables asked for, none sent"
    # Then as OSS answers with a callback server's body.
    proxy.answer = server = OssCallbackServer()
    status = oss_stack.uploader.submit(
        str(small), f"s3://{bucket}/small.bin", oss_callback=CALLBACK, oss_callback_vars=VARS
    ).wait(timeout=60)
    assert status.state == "completed", status
    puts = [h for m, p, h in proxy.requests if m == "PUT" and "/small.bin" in p]
    assert len(puts) == 1 and _decoded(puts[0]["x-oss-callback-var"]) == VARS
    assert status.oss_callback_answer == server.answers[0][:MAX_ANSWER_CHARS]
    # An upload without a callback carries no header and records no answer.
    status = oss_stack.uploader.submit(str(small), f"s3://{bucket}/none.bin").wait(timeout=60)
    assert status.state == "completed" and status.oss_callback_answer == "", status
    assert all("x-oss-callback" not in h for _, p, h in proxy.requests if "/none.bin" in p)


def test_the_callback_is_refused_under_another_profile(stack: Stack) -> None:
    stack.start_worker("seaweed", concurrency=2)  # the seaweedfs profile
    bucket = stack.new_bucket()
    source = stack.make_file(6 * MiB)
    handle = stack.uploader.submit(str(source), f"s3://{bucket}/x.bin", oss_callback=CALLBACK, oss_callback_vars=VARS)
    status = stack.wait_status(handle.upload_id, lambda s: s.state not in {"pending", "queued"}, 60, "a verdict")
    assert status.state == "refused", status
    assert "profile 'seaweedfs' does not support: " in status.error and "oss_callback" in status.error, status.error
    assert stack.open_multipart_uploads(bucket) == []


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"oss_callback": {"callbackBody": "a=b"}}, "needs a callbackUrl"),
        ({"oss_callback": "[1, 2]"}, "must be a JSON object"),
        ({"oss_callback": "{not json"}, "must be a JSON object"),
        ({"oss_callback": {"callbackUrl": "https://x", "callbackUrI": "typo"}}, "unknown fields"),
        ({"oss_callback": {"callbackUrl": "https://x", "callbackSNI": "yes"}}, "true or false"),
        ({"oss_callback": {"callbackUrl": "https://x", "callbackBody": "a" * MAX_CALLBACK_BYTES}}, "longer than"),
        ({"oss_callback": CALLBACK, "oss_callback_vars": {"who": "x"}}, "must be 'x:'"),
        ({"oss_callback": CALLBACK, "oss_callback_vars": {"x:who": "a\nb"}}, "printable"),
        ({"oss_callback_vars": VARS}, "needs oss_callback"),
    ],
)
def test_the_callback_options_are_validated(options: dict[str, object], problem: str) -> None:
    with pytest.raises(InvalidRequest, match=problem):
        parse_request({"source": "/data/x", "bucket": "bucket", "key": "k", **options})


def test_a_valid_callback_is_kept_as_given() -> None:
    request = parse_request({"source": "/data/x", "bucket": "bucket", "key": "k", "oss_callback": json.dumps(CALLBACK)})
    assert request.oss_callback == CALLBACK
    assert json.loads(request.oss_callback_fields()["oss_callback"]) == CALLBACK
