"""Request bodies with their long strings lifted out before parsing (`serving.bodies`): whatever the JSON, the
parsed value is the one a plain parse gives, and a body a plain parse refuses is still refused."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.bodies import LargeText, lift, restore, restore_v2

SETTINGS = settings(max_examples=300, deadline=None, derandomize=True, database=None)
AT = 8  # lift strings of 8 characters or more, so that short generated strings exercise it
TEXT = st.one_of(st.text(max_size=20), st.sampled_from(["a" * 8, "abcdefgh\\", 'ab"cdefghij', "data:x;base64,QUJDRA==",
                                                       "\u00e9" * 9, "\n" * 9, "x" * 40]))
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | TEXT,
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
                    max_leaves=16)


def plain(value):
    """`value` with its lifted strings as the str a plain parse would give."""
    if isinstance(value, LargeText):
        return bytes(value.view).decode()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


@SETTINGS
@given(JSON, st.sampled_from([None, 0, 2]))
def test_a_lifted_body_parses_to_what_the_whole_body_parses_to(value, indent):
    body = json.dumps(value, indent=indent, ensure_ascii=bool(indent)).encode()
    skeleton, lifted = lift(body, at=AT)
    assert plain(restore(orjson.loads(skeleton), lifted)) == orjson.loads(body)
    assert all(b"\\" not in bytes(t.view) and b'"' not in bytes(t.view) and len(t) >= AT for t in lifted.values())


@SETTINGS
@given(JSON, st.data())
def test_a_body_cut_short_or_broken_is_still_refused(value, data):
    body = json.dumps({"instances": [value, "x" * 40]}).encode()
    cut = data.draw(st.integers(1, len(body) - 1))
    broken = data.draw(st.sampled_from([body[:cut], body[:cut] + b"}" + body[cut:], body[:cut] + b'"' + body[cut:]]))
    try:
        orjson.loads(broken)
    except orjson.JSONDecodeError:
        skeleton, _ = lift(broken, at=AT)
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(skeleton)


def test_what_is_lifted_and_what_is_not():
    image = "QUJD" * 20_000
    body = json.dumps({"instances": [{"image": {"b64": image}}, {"b64": "QUJD"}],
                       "escaped": "a\\/b" + image, image: 1}).encode()
    skeleton, lifted = lift(body)
    assert len(lifted) == 1 and len(skeleton) < len(body) - len(image) + 100  # the escaped value and the key stay
    (text,) = lifted.values()
    assert bytes(text.view) == image.encode() and text.startswith("QUJD") and not text.startswith("data:")
    payload = restore(orjson.loads(skeleton), lifted)
    assert payload["instances"][0]["image"]["b64"] is text and payload["instances"][1]["b64"] == "QUJD"
    assert payload["escaped"] == "a\\/b" + image and payload[image] == 1
    assert lift(b'{"a": "' + b"x" * 100) == (b'{"a": "' + b"x" * 100, {})  # not JSON: left to the parser


def test_placeholders_cannot_be_forged_by_the_client():
    """Each parse has its own nonce: a string that looks like another parse's placeholder is data."""
    body = json.dumps({"a": "x" * 70_000}).encode()
    skeleton, lifted = lift(body)
    forged = json.dumps({"a": "x" * 70_000, "b": next(iter(lifted))}).encode()
    skeleton, again = lift(forged)
    parsed = restore(orjson.loads(skeleton), again)
    assert isinstance(parsed["a"], LargeText) and parsed["b"] == next(iter(lifted))


def test_a_v2_request_gets_its_strings_back_wherever_it_may_hold_them():
    from kserve.protocol.rest.v2_datamodels import InferenceRequest

    big = "QUJD" * 20_000
    body = json.dumps({"id": big, "parameters": {"note": big},
                       "inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": [big, "QUJD"],
                                   "parameters": {"p": big}}]}).encode()
    skeleton, lifted = lift(body)
    request = restore_v2(InferenceRequest.model_validate_json(skeleton), lifted)
    assert restore_v2(InferenceRequest.model_validate_json(b"{\"inputs\": []}"), lifted).id is None
    assert len(lifted) == 4
    assert [plain(v) for v in (request.id, request.parameters["note"], request.inputs[0].parameters["p"])] == [big] * 3
    assert plain(request.inputs[0].data) == [big, "QUJD"]


@pytest.mark.parametrize("headers", [{"content-type": "text/plain"},
                                     {"content-type": "application/json"},
                                     {"ce-specversion": "1.0", "ce-source": "t", "ce-type": "t", "ce-id": "1",
                                      "content-type": "application/json"}])
def test_the_predictor_gets_the_body_kserve_would_have_given_it(headers):
    """Lifting is invisible: whatever kserve's decode makes of a body (parsed JSON, a CloudEvent's data, or,
    for a content type it does not parse, the bytes as sent), `_decode_v1` gives the same."""
    from kserve.model_repository import ModelRepository
    from kserve.protocol.dataplane import DataPlane

    from serving.app import _decode_v1

    dataplane = DataPlane(model_registry=ModelRepository())
    body = json.dumps({"instances": [{"b64": "QUJD" * 20_000}]}).encode()
    expected, _ = dataplane.decode(body, dict(headers))
    got, _ = _decode_v1(dataplane, body, dict(headers))
    assert plain(got) == expected
