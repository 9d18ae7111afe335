"""Property-based fuzzing, bounded in time (hypothesis, derandomized so CI is reproducible): generated
annotation files never get anything but a DatasetError from the validator, generated request bodies
never get a traceback or a 500 from the predictor, and a serving package's SHA256SUMS, config.yaml and
label_map.json never get anything but a PackageError (naming the file) from the package reader."""

from __future__ import annotations

import base64
import json

import numpy as np
from helpers import encode_image, square
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




# -- the serving package's text files -------------------------------------------------------------------
PACKAGE_SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                            suppress_health_check=[HealthCheck.too_slow])
DIGEST = st.one_of(st.text("0123456789abcdef", min_size=64, max_size=64), st.text("0123456789abcdefABCDEF g", max_size=70))
NAME = st.one_of(st.sampled_from(["model.pt", "config.yaml", "label_map.json", "metadata.json", "probe.npz",
                                  "detector.onnx", "SHA256SUMS", "../x", "a b", ""]), st.text(max_size=12))
LINE = st.one_of(st.builds(lambda d, sep, n: f"{d}{sep}{n}", DIGEST, st.sampled_from(["  ", " *", " ", "\t", ""]), NAME),
                 st.text(max_size=30))


@PACKAGE_SETTINGS
@given(lines=st.lists(LINE, max_size=9), newline=st.booleans(), raw=st.binary(max_size=40), use_raw=st.integers(0, 9))
def test_sha256sums_lines_get_a_package_error_or_a_clean_table(lines, newline, raw, use_raw):
    from maskrcnn.package import FILES, PackageError, parse_checksums

    data = raw if use_raw == 0 else ("\n".join(lines) + ("\n" if newline else "")).encode()
    try:
        sums = parse_checksums(data, "pkg/SHA256SUMS")
    except PackageError as exc:
        assert str(exc).startswith("pkg/SHA256SUMS")
    else:
        assert set(sums) <= set(FILES) and all(len(d) == 64 for d in sums.values())
        assert {n for n, rule in FILES.items() if rule.required} <= set(sums)


def _config_tree() -> dict:
    import yaml

    from maskrcnn.config import CONFIG_DIR

    return yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text())


CONFIG_FIELDS = {"model": ["min_size", "max_size", "representation_size", "mask_head_layers", "anchor_sizes",
                           "aspect_ratios", "backbone", "box_score_thresh", "fpn_levels"],
                 "eval": ["mask_threshold", "iou_match", "score_threshold"], "data": ["synthetic"], "train": ["epochs"]}


@st.composite
def config_files(draw) -> bytes:
    import yaml

    if draw(st.integers(0, 9)) == 0:
        return draw(st.one_of(st.binary(max_size=60), st.text(max_size=60).map(str.encode)))
    tree = _config_tree()
    for _ in range(draw(st.integers(1, 3))):
        section = draw(st.sampled_from(sorted(CONFIG_FIELDS)))
        tree.setdefault(section, {})[draw(st.sampled_from(CONFIG_FIELDS[section]))] = draw(
            JSON | st.integers(-10**12, 10**12) | st.floats())
    if draw(st.integers(0, 5)) == 0:
        tree = draw(JSON)
    text = yaml.safe_dump(tree)
    if draw(st.integers(0, 5)) == 0:  # an alias planted in the document
        text = "x: &x [1, 2]\ny: *x\n" + text
    return text.encode()


@PACKAGE_SETTINGS
@given(data=config_files())
def test_config_files_get_a_package_error_or_a_config_within_range(data):
    from maskrcnn.config import EVAL_RANGES, MODEL_RANGES
    from maskrcnn.package import PackageError, parse_config

    try:
        cfg = parse_config(data, "pkg/config.yaml")
    except PackageError as exc:
        assert str(exc).startswith("pkg/config.yaml: ") and " object at 0x" not in str(exc)
    else:
        for section, ranges in (("model", MODEL_RANGES), ("eval", EVAL_RANGES)):
            for name, (low, high) in ranges.items():
                value = getattr(getattr(cfg, section), name)
                assert all(low <= v <= high for v in (value if isinstance(value, list) else [value])), (section, name)


CATEGORY = st.fixed_dictionaries({"label": st.integers(-2, 5) | JSON, "id": st.integers(-3, 5) | JSON,
                                  "name": st.sampled_from(["a", "b", "c", ""]) | JSON})


@PACKAGE_SETTINGS
@given(value=st.one_of(st.fixed_dictionaries({"categories": st.lists(CATEGORY, max_size=5)}), JSON))
def test_label_maps_get_a_package_error_or_a_contiguous_map(value):
    from maskrcnn.package import PackageError, parse_label_map

    try:
        labels = parse_label_map(json.dumps(value).encode(), "pkg/label_map.json")
    except PackageError as exc:
        assert str(exc).startswith("pkg/label_map.json: ")
    else:
        k = len(labels.category_ids)
        assert k >= 1 and len(set(labels.category_ids)) == k == len(set(labels.names))
        assert [labels.name_of(i) for i in range(1, k + 1)] == labels.names
