"""Structure-aware fuzzing of every importer (hypothesis, derandomized, bounded): a valid export of each
format with some fields replaced by values of any JSON type, extreme or non-finite numbers, long or
control-character text; `convert` answers every one with a COCO folder or a DatasetError that names the
export, never a traceback, and writes nothing outside OUT."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from training.data.coco import DatasetError
from training.data.convert import convert

SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
NUMBERS = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, -1, 1e308, -1e308, 1e7, 2e8, 40, 30, 0.5]))
TEXT = st.one_of(st.text(max_size=12), st.sampled_from(["", "\n", "x" * 300, "../a.png", "/etc/passwd", "inf", "nan", "-1",
                                                          "1e308", "http://[::1/a.png", "a.png", "./a.png"]))
JSON = st.recursive(st.none() | st.booleans() | NUMBERS | TEXT,
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
                    max_leaves=12)
POINTS = st.lists(st.lists(NUMBERS, min_size=0, max_size=3), max_size=6) | st.lists(NUMBERS, max_size=8)


def _png(w=40, h=30) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (80, 80, 80)).save(buf, format="PNG")
    return buf.getvalue()


def _with_image(root: Path) -> Path:
    (root / "src" / "images").mkdir(parents=True)
    (root / "src" / "images" / "a.png").write_bytes(_png())
    return root


def _mutate(draw, record: dict, fields: dict) -> None:
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(fields)))
        record[key] = draw(fields[key] | JSON)


def _answer(fmt: str, src: Path, root: Path) -> None:
    before = sorted(p.name for p in root.iterdir())
    try:
        convert(fmt, src, root / "out")
    except DatasetError as exc:
        assert " object at 0x" not in str(exc) and "Traceback" not in str(exc)
        assert sorted(p.name for p in root.iterdir()) == before  # nothing written beside OUT
    else:
        assert (root / "out" / "annotations.json").is_file()


@st.composite
def labelme_docs(draw) -> dict:
    shape = {"label": "cat", "points": [[2, 2], [20, 2], [20, 20]], "shape_type": "polygon", "group_id": None}
    _mutate(draw, shape, {"label": TEXT, "points": POINTS, "shape_type": st.sampled_from(
        ["polygon", "rectangle", "circle", "oriented_rectangle", "mask", "line", "point"]), "group_id": JSON, "mask": TEXT})
    doc = {"shapes": [shape], "imagePath": "a.png", "imageWidth": 40, "imageHeight": 30}
    if draw(st.booleans()):
        _mutate(draw, doc, {"shapes": JSON, "imagePath": TEXT, "imageWidth": NUMBERS, "imageHeight": NUMBERS, "imageData": TEXT})
    return doc


@SETTINGS
@given(doc=labelme_docs())
def test_labelme(tmp_path_factory, doc):
    root = tmp_path_factory.mktemp("lm")
    (root / "src").mkdir()
    (root / "src" / "a.png").write_bytes(_png())
    (root / "src" / "a.json").write_text(json.dumps(doc))
    _answer("labelme", root / "src", root)


@st.composite
def labelstudio_tasks(draw) -> list:
    value = {"points": [[5, 5], [50, 5], [50, 50]], "polygonlabels": ["cat"], "x": 10, "y": 10, "width": 20, "height": 20,
             "rotation": 0, "rectanglelabels": ["cat"], "format": "rle", "rle": [0, 0, 0, 0], "brushlabels": ["cat"]}
    _mutate(draw, value, {"points": POINTS, "x": NUMBERS, "width": NUMBERS, "rotation": NUMBERS, "rle": st.lists(NUMBERS, max_size=8),
                          "polygonlabels": JSON, "format": TEXT})
    region = {"type": draw(st.sampled_from(["polygonlabels", "rectanglelabels", "brushlabels", "keypointlabels"])),
              "value": value, "original_width": 40, "original_height": 30}
    _mutate(draw, region, {"type": TEXT, "value": JSON, "original_width": NUMBERS | st.lists(NUMBERS, max_size=2)})
    task = {"id": 1, "data": {"image": "/data/upload/1/a.png"}, "annotations": [{"result": [region]}]}
    if draw(st.booleans()):
        _mutate(draw, task, {"data": st.fixed_dictionaries({"image": TEXT | JSON}), "annotations": JSON, "id": JSON})
    return [task]


@SETTINGS
@given(tasks=labelstudio_tasks())
def test_labelstudio(tmp_path_factory, tasks):
    root = _with_image(tmp_path_factory.mktemp("ls"))
    (root / "src" / "export.json").write_text(json.dumps(tasks))
    _answer("labelstudio", root / "src", root)


@st.composite
def cvat_coco_docs(draw) -> dict:
    image = {"id": 1, "file_name": "a.png", "width": 40, "height": 30}
    ann = {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[2, 2, 20, 2, 20, 20]], "bbox": [2, 2, 18, 18], "iscrowd": 0}
    cat = {"id": 1, "name": "cat"}
    _mutate(draw, draw(st.sampled_from([image, ann, cat])), {
        "id": JSON, "file_name": TEXT, "width": NUMBERS, "image_id": JSON, "category_id": JSON, "name": TEXT, "iscrowd": JSON,
        "segmentation": st.lists(st.lists(NUMBERS, max_size=8), max_size=2) | st.just([])
        | st.fixed_dictionaries({"size": st.lists(NUMBERS, max_size=3), "counts": TEXT | st.lists(NUMBERS, max_size=5)}),
        "bbox": st.lists(NUMBERS, max_size=5)})
    doc = {"images": [image], "annotations": [ann], "categories": [cat]}
    if draw(st.integers(0, 5)) == 0:
        _mutate(draw, doc, {"images": JSON, "annotations": JSON, "categories": JSON})
    return doc


@SETTINGS
@given(doc=cvat_coco_docs())
def test_cvat_coco(tmp_path_factory, doc):
    root = _with_image(tmp_path_factory.mktemp("cc"))
    (root / "src" / "annotations").mkdir()
    (root / "src" / "annotations" / "instances_default.json").write_text(json.dumps(doc))
    _answer("cvat-coco", root / "src", root)


ATTR = st.one_of(TEXT, NUMBERS.map(str), st.lists(NUMBERS, max_size=6).map(lambda v: ",".join(map(str, v))),
                 st.lists(st.tuples(NUMBERS, NUMBERS), max_size=5).map(lambda v: ";".join(f"{x},{y}" for x, y in v)))
XML_SHAPES = {
    "polygon": {"label": "cat", "points": "2,2;20,2;20,20"},
    "box": {"label": "cat", "xtl": "1", "ytl": "1", "xbr": "9", "ybr": "9", "rotation": "10"},
    "mask": {"label": "cat", "rle": "3,4,9", "left": "1", "top": "1", "width": "4", "height": "4"},
}


@st.composite
def cvat_xml_docs(draw) -> str:
    from xml.sax.saxutils import quoteattr

    tag = draw(st.sampled_from(sorted(XML_SHAPES)))
    attrs = dict(XML_SHAPES[tag])
    for _ in range(draw(st.integers(1, 3))):
        attrs[draw(st.sampled_from([*sorted(attrs), "group_id"]))] = draw(ATTR)
    image = {"name": "a.png", "width": "40", "height": "30"}
    if draw(st.booleans()):
        image[draw(st.sampled_from(sorted(image)))] = draw(ATTR)
    clean = lambda v: "".join(c for c in str(v) if c in "\t\n\r" or 32 <= ord(c) < 0xD800)  # noqa: E731 (what XML can carry)
    body = " ".join(f"{k}={quoteattr(clean(v))}" for k, v in attrs.items())
    head = " ".join(f"{k}={quoteattr(clean(v))}" for k, v in image.items())
    return f"<annotations><version>1.1</version><image {head}><{tag} {body}/></image></annotations>"


@SETTINGS
@given(xml=cvat_xml_docs())
def test_cvat_xml(tmp_path_factory, xml):
    root = _with_image(tmp_path_factory.mktemp("cx"))
    (root / "src" / "annotations.xml").write_text(xml)
    _answer("cvat-xml", root / "src", root)


LINE = st.lists(st.one_of(NUMBERS.map(str), TEXT.filter(lambda t: t.strip() and "\n" not in t and "\r" not in t)), max_size=9)


@SETTINGS
@given(lines=st.lists(LINE.map(" ".join), max_size=3), names=JSON, train=JSON, use=st.integers(0, 2))
def test_yolo(tmp_path_factory, lines, names, train, use):
    import yaml

    root = tmp_path_factory.mktemp("yo")
    for d in ("images", "labels"):
        (root / "src" / d).mkdir(parents=True)
    (root / "src" / "images" / "a.png").write_bytes(_png())
    (root / "src" / "labels" / "a.txt").write_text("\n".join(lines))
    config = {"train": "images", "names": ["cat", "dog"]}
    if use == 1:
        config["names"] = names
    elif use == 2:
        config["train"] = train
    (root / "src" / "data.yaml").write_text(yaml.safe_dump(config))
    _answer("yolo", root / "src", root)


@SETTINGS
@given(labelmap=st.lists(TEXT, max_size=4), listing=st.lists(TEXT, max_size=3), values=st.lists(st.integers(0, 255), min_size=1, max_size=4))
def test_voc(tmp_path_factory, labelmap, listing, values):
    root = tmp_path_factory.mktemp("voc")
    src = root / "src"
    for d in ("JPEGImages", "SegmentationObject", "SegmentationClass", "ImageSets/Segmentation"):
        (src / d).mkdir(parents=True)
    (src / "JPEGImages" / "a.png").write_bytes(_png())
    objects = np.zeros((30, 40), np.uint8)
    for i, v in enumerate(values):
        objects[2 + 5 * i:6 + 5 * i, 2:9] = v
    Image.fromarray(objects).save(src / "SegmentationObject" / "a.png")
    Image.fromarray((objects > 0).astype(np.uint8) * (len(labelmap) or 1)).save(src / "SegmentationClass" / "a.png")
    if labelmap:
        (src / "labelmap.txt").write_text("\n".join(f"{n}:0,0,0::" for n in ["background", *labelmap]))
    (src / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(["a", *listing]))
    try:
        convert("voc", src, root / "out", {"split": "train"})
    except DatasetError:
        pass


@pytest.mark.parametrize("values", [[0, 255], [0, 1, 2], [7], [0, 0]])
def test_masks_pngs_of_any_values(tmp_path, values):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "images" / "a.png").write_bytes(_png())
    (src / "masks" / "a" / "cat").mkdir(parents=True)
    mask = np.zeros((30, 40), np.uint8)
    for i, v in enumerate(values):
        mask[2 + 5 * i:6 + 5 * i, 2:9] = v
    Image.fromarray(mask).save(src / "masks" / "a" / "cat" / "0.png")
    _answer("masks", src, tmp_path)
