"""A webhook body template like OSS's ``callbackBody`` (issue 12): with ``callback_body`` the
webhook POSTs the rendered template (form-encoded by default, or JSON) instead of the JSON result,
signed the same way, each value escaped for the body type. Real Redis, SeaweedFS, workers and an
HTTP receiver on loopback (tests/test_notify.py's)."""

from __future__ import annotations

import json
from urllib.parse import parse_qs

import pytest

from tests.receiver import Receiver
from tests.test_notify import SECRET, notify_stack, settled, wait_delivery
from uploader.errors import InvalidRequest
from uploader.notify.signature import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from uploader.notify.template import MAX_TEMPLATE_CHARS, BodyType, render
from uploader.request import parse_request

FORM = "bucket=${bucket}&object=${object}&etag=${etag}&size=${size}&mimeType=${mimeType}&who=${x:who}&state=${state}"
#: A key and a variable that need escaping in a form and in JSON.
KEY = 'reports/a b&c=d+"e".bin'
WHO = 'Zoë & "friends"=1/2%'




def test_a_form_template_is_posted_with_its_values_escaped(make_stack, receiver: Receiver) -> None:  # type: ignore[no-untyped-def]
    stack = notify_stack(make_stack)
    stack.start_worker("notify-body")
    bucket = stack.new_bucket()
    path = stack.make_file(4321)
    handle = stack.uploader.submit(str(path), f"s3://{bucket}/{KEY}", content_type="text/csv; charset=utf-8",
                                   callback_url=receiver.url, callback_vars={"who": WHO}, callback_body=FORM)
    status = handle.wait(timeout=60)
    assert status.state == "completed", status
    wait_delivery(stack, handle.upload_id, settled, "the webhook delivered")
    (headers, body), = receiver.received
    assert headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert verify(SECRET.encode(), headers[TIMESTAMP_HEADER], headers[SIGNATURE_HEADER], body)
    form = parse_qs(body.decode(), keep_blank_values=True, strict_parsing=True)
    assert form == {
        "bucket": [bucket], "object": [KEY], "etag": [status.final_etag], "size": ["4321"],
        "mimeType": ["text/csv; charset=utf-8"], "who": [WHO], "state": ["completed"],
    }


def test_a_json_template_is_posted_as_json(make_stack, receiver: Receiver) -> None:  # type: ignore[no-untyped-def]
    stack = notify_stack(make_stack)
    stack.start_worker("notify-json")
    bucket = stack.new_bucket()
    path = stack.make_file(999)
    handle = stack.uploader.submit(
        str(path), f"s3://{bucket}/{KEY}", callback_url=receiver.url, callback_vars={"who": WHO},
        callback_body='{"object":${object},"size":${size},"who":${x:who},"id":${uploadId}}', callback_body_type="application/json",
    )
    assert handle.wait(timeout=60).state == "completed"
    wait_delivery(stack, handle.upload_id, settled, "the webhook delivered")
    (headers, body), = receiver.received
    assert headers["Content-Type"] == "application/json"
    assert verify(SECRET.encode(), headers[TIMESTAMP_HEADER], headers[SIGNATURE_HEADER], body)
    assert json.loads(body) == {"object": KEY, "size": 999, "who": WHO, "id": handle.upload_id}


def test_rendering_escapes_for_the_body_type() -> None:
    values = {"object": "a&b=c d", "size": 5}
    assert render("o=${object}&s=${size}&v=${x:v}", BodyType.FORM, values, {"v": "é"}) == b"o=a%26b%3Dc%20d&s=5&v=%C3%A9"
    assert render("[${object},${size},${x:v}]", BodyType.JSON, values, {"v": '"'}) == b'["a&b=c d",5,"\\""]'


BASE = {"source": "/data/x", "bucket": "bucket", "key": "k", "callback_url": "https://hooks.example.com/x"}


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"callback_body": "a=${nope}"}, r"unknown placeholders \['\$\{nope\}'\]"),
        ({"callback_body": "a=${x:who}"}, "which callback_vars does not give"),
        ({"callback_body": "a" * (MAX_TEMPLATE_CHARS + 1)}, "longer than"),
        ({"callback_body": "a=\x00"}, "control characters"),
        ({"callback_body": "a=b", "callback_body_type": "text/plain"}, "callback_body_type must be one of"),
        ({"callback_body_type": "application/json"}, "needs callback_body"),
        ({"callback_body": "a=b", "callback_url": None}, "need callback_url"),
    ],
)
def test_the_template_is_validated(options: dict[str, object], problem: str) -> None:
    kwargs = {**BASE, **options}
    with pytest.raises(InvalidRequest, match=problem):
        parse_request({k: v for k, v in kwargs.items() if v is not None})


def test_the_template_defaults_to_a_form() -> None:
    request = parse_request({**BASE, "callback_body": "bucket=${bucket}"})
    assert request.notify_fields()["callback_body_type"] == "application/x-www-form-urlencoded"
