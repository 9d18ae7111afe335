"""A corpus of bad and odd requests to the predictor: each is a 4xx whose message names the problem, or a
valid answer where the input is valid; the server answers a good request after every one of them. Then
property-based fuzzing (hypothesis) of request bodies: nothing produces a traceback or a 500."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import numpy as np
import pytest
import tifffile
from helpers import SERVING_MAX_BODY, SERVING_MAX_PIXELS, encode_image
from PIL import Image


V1 = "/v1/models/maskrcnn:predict"
V2 = "/v2/models/maskrcnn/infer"
MAX_PIXELS = SERVING_MAX_PIXELS
MAX_BODY = SERVING_MAX_BODY


def picture(h: int = 64, w: int = 64) -> np.ndarray:
    img = np.full((h, w, 3), 30, np.uint8)
    img[h // 6: h // 2, w // 5: w // 2] = (200, 120, 40)
    return img


def pil_bytes(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def tiff_bytes(array: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, array, **kw)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def v1(*images: bytes | str, **params) -> dict:
    return {"instances": [{"image": {"b64": i if isinstance(i, str) else b64(i)}} for i in images], "parameters": params}


def v2(*images: bytes, shape: Any = None, datatype: str = "BYTES", name: str = "image", **params) -> dict:
    data = [b64(i) for i in images]
    return {"id": "r1", "inputs": [{"name": name, "shape": [len(data)] if shape is None else shape, "datatype": datatype,
                                    "data": data}], "parameters": params}


PNG = encode_image(picture())
HUGE_PLANAR = tiff_bytes(np.zeros((3, 8, 400_000), np.uint8), planarconfig="separate", compression="zlib")
VOLUME = tiff_bytes(np.zeros((40, 200, 200), np.uint8), volumetric=True, compression="zlib")

# name -> (path, body (dict -> JSON) or raw bytes, expected status, text the answer must contain)
BAD: dict[str, tuple[str, Any, int, str]] = {
    "not-json": (V1, b"{nope", 400, "Unrecognized request format: unexpected character, expected a string key: line 1 column 2"),
    "json-array": (V1, [1, 2], 400, "expected a JSON object"),
    "no-instances": (V1, {"inputs": []}, 400, "missing field 'instances'"),
    "empty-instances": (V1, {"instances": []}, 400, "field 'instances': expected a non-empty list of"),
    "instances-string": (V1, {"instances": "abc"}, 400, "field 'instances': expected a non-empty list of {\\\"image\\\": {\\\"b64\\\": ...}}, got a str"),
    "instance-number": (V1, {"instances": [5]}, 400, "instances[0]: expected a base64 string, got int"),
    "instance-without-image": (V1, {"instances": [{"picture": "x"}]}, 400, "instances[0]: expected an object with 'image' or 'b64'"),
    "b64-number": (V1, {"instances": [{"image": {"b64": 12}}]}, 400, "instances[0].image: expected a base64 string, got int"),
    "b64-invalid": (V1, v1("!!!not base64!!!"), 400, "instances[0].image: not valid base64"),
    "b64-empty": (V1, v1(""), 400, "image[0]: empty file, expected a JPG, PNG or TIFF image"),
    "text-not-image": (V1, v1(b"hello world, not an image"), 400, "image[0]: not a decodable image, expected JPG, PNG or TIFF"),
    "truncated-png": (V1, v1(PNG[:80]), 400, "image[0]: corrupt image data"),
    "png-header-only": (V1, v1(PNG[:8]), 400, "image[0]"),
    "too-many-images": (V1, v1(*[PNG] * 9), 400, "9 images in one request; at most 8"),
    "threshold-above-1": (V1, v1(PNG, score_threshold=2), 400, "parameters.score_threshold: expected a number in [0, 1]"),
    "threshold-negative": (V1, v1(PNG, score_threshold=-0.1), 400, "parameters.score_threshold"),
    "threshold-text": (V1, v1(PNG, score_threshold="abc"), 400, "score_threshold must be a number"),
    "threshold-nan-literal": (V1, json.dumps({"instances": [{"b64": b64(PNG)}], "parameters": {"score_threshold": float("nan")}}).encode(),
                              400, "Unrecognized request format"),
    "threshold-nan-string": (V1, v1(PNG, score_threshold="nan"), 400, "parameters.score_threshold: expected a number in [0, 1], got nan"),
    "threshold-list": (V1, v1(PNG, score_threshold=[0.5]), 400, "score_threshold must be a number"),
    "max-detections-zero": (V1, v1(PNG, max_detections=0), 400, "parameters.max_detections: expected an integer >= 1"),
    "max-detections-negative": (V1, v1(PNG, max_detections=-5), 400, "parameters.max_detections"),
    "max-detections-text": (V1, v1(PNG, max_detections="many"), 400, "max_detections an integer"),
    "max-detections-fraction": (V1, v1(PNG, max_detections=2.5), 400, "max_detections an integer (2.5 is not a whole number)"),
    "max-detections-bool": (V1, v1(PNG, max_detections=True), 400, "max_detections an integer"),
    "parameters-list": (V1, {"instances": [{"b64": b64(PNG)}], "parameters": [1, 2]}, 400, "parameters: expected an object"),
    "too-many-pixels": (V1, v1(encode_image(np.zeros((1001, 1000, 3), np.uint8))), 400, "above the limit of 1000000"),
    "planar-tiff-bomb": (V1, v1(HUGE_PLANAR), 400, "TIFF image is 400000x8 = 3200000 pixels, above the limit"),
    "volumetric-tiff": (V1, v1(VOLUME), 400, "above the limit"),
    "too-elongated": (V1, v1(encode_image(picture(2, 3000))), 400, "3000x2 pixels (aspect ratio 1500:1) is too elongated"),
    "too-elongated-tall": (V1, v1(encode_image(picture(3000, 2))), 400, "too elongated"),
    "body-over-limit": (V1, b'{"instances": [{"b64": "' + b"A" * (MAX_BODY + 10) + b'"}]}', 400, "above the limit of 1048576 bytes"),
    "unknown-model": ("/v1/models/nope:predict", v1(PNG), 404, "nope"),
    "v2-shape-mismatch": (V2, v2(PNG, shape=[3]), 400, "shape [3] holds 3 element(s), but data has 1"),
    "v2-shape-2d-mismatch": (V2, v2(PNG, PNG, shape=[2, 2]), 400, "shape [2, 2] holds 4 element(s), but data has 2"),
    "v2-shape-negative": (V2, v2(PNG, shape=[-1]), 400, "shape"),
    "v2-no-image-input": (V2, v2(PNG, name="pixels"), 400, "missing input 'image'"),
    "v2-fp32": (V2, {"id": "x", "inputs": [{"name": "image", "shape": [2], "datatype": "FP32", "data": [0.1, 0.2]}]}, 400,
                "expected datatype BYTES"),
    "v2-empty-data": (V2, {"id": "x", "inputs": [{"name": "image", "shape": [0], "datatype": "BYTES", "data": []}]}, 400, "no data"),
    "v2-numbers-as-bytes": (V2, {"id": "x", "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [7]}]}, 400,
                            "image[0]"),
    "v2-no-inputs": (V2, {"id": "x"}, 422, '"loc":["body","InferenceRequest","inputs"],"msg":"Field required"'),
    # found by tests/serving/test_fuzz.py: FastAPI's handler echoed the value back and failed to serialise it (a 500)
    "v2-infinity-body": (V2, b"Infinity", 422, "invalid request body: body"),
    "v2-threshold": (V2, v2(PNG, score_threshold=5), 400, "parameters.score_threshold"),
    "v2-not-image": (V2, v2(b"GIF89a but not really"), 400, "image[0]: not a decodable image"),
}


def _rgba() -> bytes:
    return pil_bytes(Image.fromarray(picture()).convert("RGBA"), "PNG")


# name -> (path, body, how many results the valid answer holds)
ODD_BUT_VALID: dict[str, tuple[str, Any, int]] = {
    "1x1": (V1, v1(encode_image(np.full((1, 1, 3), 200, np.uint8))), 1),
    "16-bit-png": (V1, v1(pil_bytes(Image.fromarray((picture()[:, :, 0].astype(np.uint16) * 257)), "PNG")), 1),
    "16-bit-tiff": (V1, v1(tiff_bytes(picture().astype(np.uint16) * 257)), 1),
    "float-tiff": (V1, v1(tiff_bytes(picture().astype(np.float32) / 255)), 1),
    "rgba-png": (V1, v1(_rgba()), 1),
    "rgba-tiff": (V1, v1(tiff_bytes(np.dstack([picture(), np.full((64, 64), 255, np.uint8)]))), 1),
    "cmyk-jpeg": (V1, v1(pil_bytes(Image.fromarray(picture()).convert("CMYK"), "JPEG")), 1),
    "palette-png": (V1, v1(pil_bytes(Image.fromarray(picture()).convert("P"), "PNG")), 1),
    "1-bit-png": (V1, v1(pil_bytes(Image.fromarray(picture()).convert("1"), "PNG")), 1),
    "grayscale-jpeg": (V1, v1(pil_bytes(Image.fromarray(picture()).convert("L"), "JPEG")), 1),
    "gray-alpha-png": (V1, v1(pil_bytes(Image.fromarray(picture()).convert("LA"), "PNG")), 1),
    "multi-page-tiff": (V1, v1(tiff_bytes(np.stack([picture(), picture()[::-1]]))), 1),
    "huge-max-detections": (V1, v1(PNG, max_detections=10**9), 1),
    "threshold-as-string": (V1, v1(PNG, score_threshold="0.3"), 1),
    "elongated-but-answerable": (V1, v1(encode_image(picture(100, 3000))), 1),
    "data-url": (V1, v1("data:image/png;base64," + b64(PNG)), 1),
    "b64-at-top-level-of-instance": (V1, {"instances": [{"b64": b64(PNG)}]}, 1),
    "eight-images": (V1, v1(*[PNG] * 8), 8),
    "v2-two-images": (V2, v2(PNG, PNG), 2),
    "v2-shape-2x1": (V2, v2(PNG, PNG, shape=[2, 1]), 2),
    "v2-without-id": (V2, {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64(PNG)]}]}, 1),
}


@pytest.fixture(scope="module")
def client(serving_client):
    return serving_client


def send(client, path: str, body: Any):
    if isinstance(body, bytes):
        return client.post(path, content=body, headers={"content-type": "application/json"})
    return client.post(path, json=body)


def still_serves(client) -> None:
    resp = client.post(V1, json=v1(PNG, max_detections=2))
    assert resp.status_code == 200 and len(resp.json()["predictions"]) == 1


def test_the_corpora_are_large_enough():
    assert len(BAD) + len(ODD_BUT_VALID) >= 40 and len(BAD) >= 30


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_request_is_a_4xx_that_names_the_problem(client, name):
    path, body, status, text = BAD[name]
    resp = send(client, path, body)
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert text in resp.text, resp.text
    assert "Traceback" not in resp.text and " object at 0x" not in resp.text
    still_serves(client)


@pytest.mark.parametrize("name", sorted(ODD_BUT_VALID))
def test_an_odd_but_valid_request_gets_an_answer(client, name):
    path, body, count = ODD_BUT_VALID[name]
    resp = send(client, path, body)
    assert resp.status_code == 200, resp.text
    if path == V1:
        results = resp.json()["predictions"]
    else:
        (output,) = resp.json()["outputs"]
        results = [json.loads(d) for d in output["data"]]
    assert len(results) == count
    for result in results:
        assert result["width"] >= 1 and result["height"] >= 1
        assert all(set(d) == {"label", "category_id", "score", "box", "mask"} for d in result["detections"])
    still_serves(client)
