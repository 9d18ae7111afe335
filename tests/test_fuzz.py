"""Property-based fuzzing, bounded in time (hypothesis, derandomized so CI is reproducible): generated
annotation files never get anything but a DatasetError from the validator, and generated request bodies
never get a traceback or a 500 from the predictor."""

from __future__ import annotations

import base64
import json

import numpy as np
from conftest import encode_image, square
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from training.data.coco import DatasetError, load_coco

SETTINGS = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)
FIELDS = {
    "images": ["id", "file_name", "width", "height"],
    "annotations": ["id", "image_id", "category_id", "segmentation", "iscrowd", "bbox", "area"],
    "categories": ["id", "name"],
}
SEGMENTATIONS = st.one_of(
    st.lists(st.lists(st.floats(-5, 40, allow_nan=False), max_size=12), max_size=3),
    st.fixed_dictionaries({"size": st.lists(st.integers(-1, 40), max_size=3),
                           "counts": st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=130), max_size=20)
                           | st.lists(st.integers(-3, 1100), max_size=6)}),
)


def base() -> dict:
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "segmentation": square(2, 2, 10), "iscrowd": 0}],
        "categories": [{"id": 3, "name": "cat"}],
    }


@st.composite
def annotation_files(draw) -> dict:
    """A valid file with a few fields replaced by arbitrary JSON (or segmentations of arbitrary shape)."""
    coco = base()
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from(sorted(FIELDS)))
        field = draw(st.sampled_from(FIELDS[section]))
        value = draw(SEGMENTATIONS if field == "segmentation" and draw(st.booleans()) else JSON)
        if draw(st.integers(0, 9)) == 0:
            coco[section] = value  # the whole section
        elif isinstance(coco[section], list) and coco[section] and isinstance(coco[section][0], dict):
            coco[section][0][field] = value
    return coco


@SETTINGS
@given(coco=annotation_files())
def test_the_validator_answers_any_annotation_file_with_a_dataset_error(tmp_path_factory, coco):
    root = tmp_path_factory.mktemp("fuzz")
    Image.fromarray(np.full((32, 32, 3), 100, np.uint8)).save(root / "a.png")
    (root / "annotations.json").write_text(json.dumps(coco))
    try:
        split = load_coco(root)
    except DatasetError as exc:
        assert str(root / "annotations.json") in str(exc) and " object at 0x" not in str(exc)
    else:
        assert split.coco["annotations"]


PNG = base64.b64encode(encode_image(np.full((48, 48, 3), 90, np.uint8))).decode()
IMAGES = st.one_of(st.just(PNG), st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()), st.text(max_size=20), JSON)
PARAMS = st.one_of(JSON, st.fixed_dictionaries({}, optional={"score_threshold": JSON | st.floats(), "max_detections": JSON,
                                                             "overlay": JSON}))


@st.composite
def v1_bodies(draw):
    instance = draw(st.one_of(IMAGES, st.fixed_dictionaries({"image": st.fixed_dictionaries({"b64": IMAGES})}), JSON))
    body = {"instances": draw(st.one_of(st.lists(st.just(instance), max_size=3), JSON)), "parameters": draw(PARAMS)}
    return draw(st.one_of(st.just(body), JSON))


@st.composite
def v2_bodies(draw):
    data = draw(st.lists(IMAGES, max_size=3))
    tensor = {"name": draw(st.sampled_from(["image", "other"])), "datatype": draw(st.sampled_from(["BYTES", "FP32", "INT8"])),
              "shape": draw(st.one_of(st.just([len(data)]), st.lists(st.integers(-2, 4), max_size=3))), "data": data}
    body = {"inputs": [tensor], "parameters": draw(PARAMS)}
    if draw(st.booleans()):
        body["id"] = draw(st.text(max_size=8))
    return draw(st.one_of(st.just(body), JSON))


def _check(resp) -> None:
    assert resp.status_code != 500, resp.text
    assert resp.status_code in (200, 400, 404, 422), (resp.status_code, resp.text)
    assert "Traceback" not in resp.text


@SETTINGS
@given(body=v1_bodies())
def test_v1_bodies_never_get_a_500(serving_client, body):
    _check(serving_client.post("/v1/models/maskrcnn:predict", content=json.dumps(body), headers={"content-type": "application/json"}))


@SETTINGS
@given(body=v2_bodies())
def test_v2_bodies_never_get_a_500(serving_client, body):
    _check(serving_client.post("/v2/models/maskrcnn/infer", content=json.dumps(body), headers={"content-type": "application/json"}))


@SETTINGS
@given(raw=st.binary(max_size=200))
def test_raw_bytes_never_get_a_500(serving_client, raw):
    for path in ("/v1/models/maskrcnn:predict", "/v2/models/maskrcnn/infer"):
        _check(serving_client.post(path, content=raw, headers={"content-type": "application/json"}))


