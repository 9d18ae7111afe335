"""Importers (training.data.formats, `uv run -m training.data.convert`): each tool's export, written by that
tool's own library (tests/tool_exports.py, run in an environment of its own), converted to a COCO folder
that the COCO validator passes, whose masks match the tool's own reading of the export at IoU >= 0.99;
broken inputs refused with the file, the record and the field; training reading a format directly."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import UVX
from training.data.coco import DatasetError, load_coco
from training.data.convert import FORMATS, convert, main as convert_main
from training.data.formats.labelstudio import decode_brush
from maskrcnn.masks import decode_segmentation

HERE = Path(__file__).resolve().parents[1]  # tests/: tool_exports.py
TOOLS = ["--with", "datumaro==1.13.12", "--with", "label-studio-converter==0.0.59", "--with", "labelme==6.3.1"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> Path:
    """The tools' exports and their own readings (tests/tool_exports.py), made once per session."""
    out = tmp_path_factory.mktemp("exports")
    uv = UVX[0]
    done = subprocess.run([uv, "run", "--no-project", "--python", sys.executable, *TOOLS, "python", str(HERE / "tool_exports.py"),
                           str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _instances(split) -> list[tuple[str, str, np.ndarray, int]]:
    names = {c["id"]: c["name"] for c in split.coco["categories"]}
    images = {i["id"]: i for i in split.coco["images"]}
    sources = {i["id"]: i["source_file"] for i in json.loads(split.annotation_file.read_text())["images"]}
    return [(Path(sources[a["image_id"]]).name, names[a["category_id"]],
             decode_segmentation(a["segmentation"], images[a["image_id"]]["height"], images[a["image_id"]]["width"]).astype(bool),
             a["iscrowd"]) for a in split.coco["annotations"]]


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_tools_export_becomes_the_masks_the_tool_reads(fmt, exports, tmp_path):
    split = convert(fmt, exports / fmt, tmp_path / "coco")
    reference = json.loads((exports / f"{fmt}.reference.json").read_text())
    masks = np.load(exports / f"{fmt}.reference.npz")
    ours = _instances(split)
    assert len(ours) == len(reference) > 0
    assert {r["category"] for r in reference} <= set(split.label_map.names) == {"cat", "dog", "bird"}
    taken = set()
    for ref in reference:
        want = masks[ref["key"]]
        best, index = 0.0, None
        for i, (image, category, mask, _) in enumerate(ours):
            if i in taken or image != Path(ref["image"]).name or category != ref["category"]:
                continue
            iou = (mask & want).sum() / max((mask | want).sum(), 1)
            best, index = max((best, index), (iou, i))
        assert best >= 0.99, (ref, best)
        taken.add(index)
    assert all(crowd == 0 for *_, crowd in ours)  # CVAT's masks, marked iscrowd=1 by its COCO writer, are instances
    # the folder is a COCO split the loader (and so training) reads, images included
    again = load_coco(tmp_path / "coco")
    assert len(again.coco["images"]) == 4 and (tmp_path / "coco" / "images").is_dir()


def test_cvat_coco_keeps_its_crowd_marks_when_asked(exports, tmp_path):
    split = convert("cvat-coco", exports / "cvat-coco", tmp_path / "coco", {"keep_crowd": True})
    crowd = [c for *_, c in _instances(split)]
    assert 0 < sum(crowd) < len(crowd)  # the masks are crowd regions again; polygons and boxes are not


def test_the_label_studio_brush_decoder_agrees_with_label_studios_on_hand_bits():
    """Two runs, by hand: 2x1 RGBA = 8 values; a repeat run of 4 zeros, then a literal run of 4 values."""
    bits = f"{8:032b}" + f"{7:05b}" + "".join(f"{s - 1:04b}" for s in (3, 4, 8, 16))
    bits += "1" + "00" + f"{3:03b}" + f"{0:08b}"  # repeat: 4 x 0 (the first pixel, RGBA)
    bits += "0" + "00" + f"{3:03b}" + "".join(f"{v:08b}" for v in (255, 0, 0, 255))  # literal: the second pixel
    bits += "0" * (-len(bits) % 8)
    rle = [int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)]
    assert decode_brush(rle, 2, 1).tolist() == [[False, True]]
    with pytest.raises(ValueError, match="encodes 8 values, a 3x1 RGBA brush image has 12"):
        decode_brush(rle, 3, 1)
    with pytest.raises(ValueError, match="ends early"):
        decode_brush(rle[:6], 2, 1)


def _labelme(folder: Path, shapes: list, image: str = "a.png") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30)).save(folder / image)
    path = folder / "a.json"
    path.write_text(json.dumps({"version": "6.3.1", "shapes": shapes, "imagePath": image, "imageHeight": 30, "imageWidth": 40}))
    return path


def _problems(fmt: str, src: Path, tmp_path: Path, options: dict | None = None) -> str:
    with pytest.raises(DatasetError) as info:
        convert(fmt, src, tmp_path / "out", options)
    assert not (tmp_path / "out").exists()  # nothing written
    return str(info.value)


def test_broken_inputs_name_the_file_the_record_and_the_field(tmp_path):
    # LabelMe: a line has no area, a polygon of two points, a mask that does not fill its box
    src = tmp_path / "lm"
    _labelme(src, [{"label": "cat", "points": [[1, 1], [9, 9]], "shape_type": "line"},
                   {"label": "cat", "points": [[1, 1], [9, 9]], "shape_type": "polygon"},
                   {"label": "dog", "points": [[0, 0], [9, 9]], "shape_type": "mask",
                    "mask": base64.b64encode(_png(np.ones((3, 3), np.uint8))).decode()}])
    text = _problems("labelme", src, tmp_path)
    assert "a.json: shapes[0] (label 'cat'), field 'shape_type': 'line' has no area" in text
    assert "a.json: shapes[1] (label 'cat'), field 'points': 2 point(s), expected 3 to" in text
    assert "a.json: shapes[2] (label 'dog'), field 'mask': 3x3 does not fill the box 0,0-9,9" in text
    # CVAT XML: a mask whose runs do not cover its box, a polygon with a bad point
    cvat = tmp_path / "cvat"
    (cvat / "images").mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(cvat / "images" / "a.png")
    (cvat / "annotations.xml").write_text(
        '<annotations><version>1.1</version><image id="0" name="a.png" width="40" height="30">'
        '<mask label="cat" rle="5, 5" left="0" top="0" width="4" height="4"/>'
        '<polygon label="dog" points="1,1;5;9,9"/></image></annotations>')
    text = _problems("cvat-xml", cvat, tmp_path)
    assert "annotations.xml: image[0] (name='a.png'): <mask>[0] (label='cat'), attribute 'rle': its runs cover 10 pixels" in text
    assert "<polygon>[1] (label='dog'), attribute 'points': expected 'x,y;x,y;...'" in text
    # the declared size disagrees with the image
    (cvat / "annotations.xml").write_text('<annotations><image id="0" name="a.png" width="41" height="30"/></annotations>')
    assert "the annotation says 41x30, the image file is 40x30" in _problems("cvat-xml", cvat, tmp_path)
    # an XML bomb is refused before it expands
    (cvat / "annotations.xml").write_text('<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "xxxxxxxx">'
                                          '<!ENTITY y "&x;&x;&x;&x;">]><annotations>&y;</annotations>')
    assert "refused XML construct" in _problems("cvat-xml", cvat, tmp_path)
    # YOLO: a detection line, a class out of range, an image outside the dataset
    yolo = tmp_path / "yolo"
    (yolo / "images").mkdir(parents=True)
    (yolo / "labels").mkdir()
    Image.new("RGB", (40, 30)).save(yolo / "images" / "a.png")
    (yolo / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n3 0.1 0.1 0.5 0.1 0.5 0.5\n")
    (yolo / "data.yaml").write_text("train: images\nnames: [cat, dog]\n")
    text = _problems("yolo", yolo, tmp_path)
    assert "labels/a.txt line 1: a detection box (class x y w h), not a polygon" in text
    assert "labels/a.txt line 2: class 3 is not in names (0-1)" in text
    (yolo / "data.yaml").write_text("train: ../../etc\nnames: [cat]\n")
    assert "field 'train': '../../etc' is outside the dataset folder" in _problems("yolo", yolo, tmp_path)
    # Label Studio: a brush of the wrong size
    ls = tmp_path / "ls"
    (ls / "images").mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(ls / "images" / "a.png")
    (ls / "export.json").write_text(json.dumps([{"id": 7, "data": {"image": "/data/upload/1/a.png"}, "annotations": [
        {"result": [{"type": "brushlabels", "original_width": 40, "original_height": 30,
                     "value": {"format": "rle", "rle": [0, 0, 0, 8, 0], "brushlabels": ["cat"]}}]}]}]))
    text = _problems("labelstudio", ls, tmp_path)
    assert "export.json: tasks[0] (id=7): annotations[0].result[0] (brushlabels 'cat'), field 'value.rle': encodes" in text
    # the output must be new
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep me")
    with pytest.raises(DatasetError, match="exists and is not empty"):
        convert("masks", tmp_path, tmp_path / "taken")
    assert (tmp_path / "taken" / "x").read_text() == "keep me"


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array * 255).save(buf, format="PNG")
    return buf.getvalue()


def test_the_command_converts_and_exits_1_on_a_broken_export(exports, tmp_path, capsys):
    assert convert_main(["--from", "yolo", str(exports / "yolo"), str(tmp_path / "coco")]) == 0
    assert capsys.readouterr().out.startswith(f"OK {tmp_path / 'coco'}: 4 images, 8 instances")
    broken = shutil.copytree(exports / "yolo", tmp_path / "broken")
    (broken / "labels" / "train" / "img_000.txt").write_text("0 0.1 0.1\n")
    assert convert_main(["--from", "yolo", str(broken), str(tmp_path / "coco2")]) == 1
    assert not (tmp_path / "coco2").exists()


def test_training_reads_a_tools_export_directly(exports, tmp_path):
    """`data.format` (`--data-format` on the command line): prepare_data converts once into the cache and
    reads the result; the dataset's hash is the converted COCO's, and the val split of a YOLO data.yaml is its own."""
    from maskrcnn.config import load_config
    from training.data.prepare import prepare_data

    cfg = load_config(HERE.parent / "maskrcnn" / "configs" / "tiny.yaml",
                      [f"data.train={exports / 'yolo'}", "data.format=yolo", f"data.cache_dir={tmp_path / 'cache'}"])
    data = prepare_data(cfg.data)
    assert len(data.train.coco["images"]) == 4 and len(data.val.coco["images"]) == 4  # data.yaml's val
    assert data.label_map.names == ["cat", "dog", "bird"] and len(data.content_hash) == 64
    assert prepare_data(cfg.data).content_hash == data.content_hash  # converted once, read again
    assert len([p for p in (tmp_path / "cache" / "converted").iterdir() if p.is_dir()]) == 2
    done = subprocess.run([sys.executable, "-m", "training.ray_main", "--help"], capture_output=True, text=True)
    assert "--data-format" in done.stdout


def test_labelme_reads_an_embedded_image_and_label_studio_a_rotated_box(tmp_path):
    # LabelMe: the image file is gone, its bytes are embedded in imageData
    src = tmp_path / "lm"
    src.mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (9, 9, 9)).save(buf, format="PNG")
    (src / "a.json").write_text(json.dumps({"shapes": [{"label": "cat", "points": [[2, 2], [12, 2], [12, 12]],
                                                        "shape_type": "polygon"}], "imagePath": "gone.png",
                                            "imageData": base64.b64encode(buf.getvalue()).decode()}))
    split = convert("labelme", src, tmp_path / "out1")
    assert split.coco["images"][0]["width"] == 40 and (tmp_path / "out1" / "images" / "000001-a.png").is_file()
    # Label Studio: a 20x10 % box rotated by 90 degrees about its top-left corner (x=50%, y=20% of 100x100)
    ls = tmp_path / "ls"
    (ls / "images").mkdir(parents=True)
    Image.new("RGB", (100, 100)).save(ls / "images" / "b.png")
    (ls / "export.json").write_text(json.dumps([{"id": 1, "data": {"image": "s3://bucket/b.png"}, "annotations": [
        {"result": [{"type": "rectanglelabels", "original_width": 100, "original_height": 100, "value": {
            "x": 50, "y": 20, "width": 20, "height": 10, "rotation": 90, "rectanglelabels": ["dog"]}}]}]}]))
    split = convert("labelstudio", ls, tmp_path / "out2")
    (ann,) = split.coco["annotations"]
    x, y, w, h = ann["bbox"]  # rotated clockwise in image coordinates: 10 wide to the left, 20 down
    assert (round(x), round(y), round(w), round(h)) == (40, 20, 10, 20)
