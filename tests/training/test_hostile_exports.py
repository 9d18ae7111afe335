"""Importers under hostile and careless exports (`training.data.convert`): the safe-file rule (no link
followed, nothing read outside the export, nothing written or removed in it, OUT a copy), bounded reading
(coordinates in the image before anything is drawn, instances kept as RLE, limits named), the semantic
refusals and the valid exports the tools' own readers accept, and one conversion shared by concurrent
workers. Every refusal names the export's file, record and field."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data.coco import DatasetError, load_coco
from training.data.convert import convert, converted, main as convert_main


def _png(size=(40, 30), colour=(90, 90, 90)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _problems(fmt: str, src: Path, out: Path, options: dict | None = None) -> str:
    with pytest.raises(DatasetError) as info:
        convert(fmt, src, out, options)
    assert not out.exists()  # nothing written
    return str(info.value)


def _cvat(src: Path, body: str, name: str = "a.png", size=(40, 30)) -> Path:
    (src / "images").mkdir(parents=True, exist_ok=True)
    (src / "images" / name).write_bytes(_png(size))
    (src / "annotations.xml").write_text(f"<annotations><version>1.1</version>{body}</annotations>")
    return src


def _labelme(src: Path, shapes: list, **extra) -> Path:
    src.mkdir(parents=True, exist_ok=True)
    (src / "a.png").write_bytes(_png())
    doc = {"shapes": shapes, "imagePath": "a.png", "imageWidth": 40, "imageHeight": 30, **extra}
    (src / "a.json").write_text(json.dumps(doc))
    return src


def _yolo(src: Path, labels: str = "0 0.1 0.1 0.5 0.1 0.5 0.5\n", yaml: str = "train: images\nnames: [cat]\n") -> Path:
    (src / "images").mkdir(parents=True, exist_ok=True)
    (src / "labels").mkdir(exist_ok=True)
    (src / "images" / "a.png").write_bytes(_png())
    (src / "labels" / "a.txt").write_text(labels)
    (src / "data.yaml").write_text(yaml)
    return src


def _labelstudio(src: Path, results: list, url: str = "/data/upload/1/a.png") -> Path:
    (src / "images").mkdir(parents=True, exist_ok=True)
    (src / "images" / "a.png").write_bytes(_png())
    (src / "export.json").write_text(json.dumps([{"id": 7, "data": {"image": url}, "annotations": [{"result": results}]}]))
    return src


def _cvat_coco(src: Path, file_name: str, annotations: list) -> Path:
    (src / "images").mkdir(parents=True)
    (src / "images" / "a.png").write_bytes(_png())
    (src / "annotations").mkdir()
    (src / "annotations" / "instances_default.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": file_name, "width": 40, "height": 30}], "categories": [{"id": 1, "name": "cat"}],
        "annotations": annotations}))
    return src


POLY = '<polygon label="cat" points="2,2;20,2;20,20"/>'


# --- 1. the safe-file rule -------------------------------------------------------------------------------


def test_a_name_that_climbs_out_and_back_in_is_refused_and_nothing_lands_beside_out(tmp_path):
    src = _cvat(tmp_path / "exp", f'<image name="../../exp/images/a.png" width="40" height="30">{POLY}</image>')
    text = _problems("cvat-xml", src, tmp_path / "work" / "out")
    assert "image[0] (name='../../exp/images/a.png'), attribute 'name': '../../exp/images/a.png' is not a relative name" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp", "work"] and not list((tmp_path / "work").iterdir())
    # climbing to the root: the source image named by its absolute path stays where it is
    src = _cvat(tmp_path / "exp2", f'<image name="{"../" * 12}{tmp_path}/exp2/images/a.png" width="40" height="30">{POLY}</image>')
    _problems("cvat-xml", src, tmp_path / "out2")
    assert (src / "images" / "a.png").read_bytes() == _png()
    # cvat-coco's file_name too
    coco = _cvat_coco(tmp_path / "cc", "../images/a.png", [{"id": 1, "image_id": 1, "category_id": 1,
                                                            "segmentation": [[2, 2, 20, 2, 20, 20]], "iscrowd": 0}])
    assert "field 'file_name': '../images/a.png' is not a relative name inside the export" in _problems("cvat-coco", coco, tmp_path / "o3")


def test_no_link_is_followed_out_of_the_export(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "b.png").write_bytes(_png())
    (outside / "private.txt").write_text("MARKER-outside-the-export-1\nMARKER-outside-the-export-2\n")  # stands for a key
    # YOLO: an image linked to a file outside, a label file linked to a private key
    yolo = _yolo(tmp_path / "yolo")
    (yolo / "images" / "b.png").symlink_to(outside / "b.png")
    (yolo / "labels" / "a.txt").unlink()
    (yolo / "labels" / "a.txt").symlink_to(outside / "private.txt")
    text = _problems("yolo", yolo, tmp_path / "o1")
    assert "images/b.png: a symbolic link" in text and "labels/a.txt: a symbolic link" in text
    assert "MARKER-outside" not in text
    # a link inside the export is refused too (the rule is about the file, not only where it points)
    yolo2 = _yolo(tmp_path / "yolo2")
    (yolo2 / "images" / "c.png").symlink_to(yolo2 / "images" / "a.png")
    assert "images/c.png: a symbolic link" in _problems("yolo", yolo2, tmp_path / "o2")
    # a linked folder leading out
    yolo3 = _yolo(tmp_path / "yolo3")
    (yolo3 / "images" / "sub").symlink_to(outside, target_is_directory=True)
    (yolo3 / "list.txt").write_text("images/a.png\nimages/sub/b.png\n")
    (yolo3 / "data.yaml").write_text("train: list.txt\nnames: [cat]\n")
    assert "outside the export folder" in _problems("yolo", yolo3, tmp_path / "o3")
    # LabelMe: a JSON linked outside
    lm = _labelme(tmp_path / "lm", [{"label": "cat", "points": [[2, 2], [20, 2], [20, 20]], "shape_type": "polygon"}])
    (outside / "evil.json").write_text(json.dumps({"shapes": [{"label": "stolen", "points": [[1, 1], [9, 1], [9, 9]]}],
                                                   "imagePath": str(lm / "a.png")}))
    (lm / "b.json").symlink_to(outside / "evil.json")
    text = _problems("labelme", lm, tmp_path / "o4")
    assert "b.json: b.json: a symbolic link" in text and "stolen" not in text
    # masks and VOC: an image linked outside
    masks = tmp_path / "masks"
    (masks / "images").mkdir(parents=True)
    (masks / "images" / "b.png").symlink_to(outside / "b.png")
    assert "images/b.png: images/b.png: a symbolic link" in _problems("masks", masks, tmp_path / "o5")
    voc = tmp_path / "voc"
    for d in ("JPEGImages", "SegmentationObject"):
        (voc / d).mkdir(parents=True)
    (voc / "JPEGImages" / "a.png").symlink_to(outside / "b.png")
    Image.fromarray(np.pad(np.ones((5, 5), np.uint8), ((2, 23), (2, 33)))).save(voc / "SegmentationObject" / "a.png")
    assert "JPEGImages/a.png: JPEGImages/a.png: a symbolic link" in _problems("voc", voc, tmp_path / "o6")


def test_out_is_a_copy_the_source_is_never_written_and_out_may_not_lie_in_it(tmp_path):
    src = _yolo(tmp_path / "yolo")
    split = convert("yolo", src, tmp_path / "out")
    (image,) = split.coco["images"]
    written = tmp_path / "out" / image["file_name"]
    assert image["file_name"] == "images/000001-a.png"  # generated, the export's path kept as source_file
    assert json.loads((tmp_path / "out" / "annotations.json").read_text())["images"][0]["source_file"] == "images/a.png"
    assert written.stat().st_ino != (src / "images" / "a.png").stat().st_ino
    written.write_bytes(b"changed")
    assert (src / "images" / "a.png").read_bytes() == _png()
    # hard links only when asked
    assert convert_main(["--from", "yolo", "--link", str(src), str(tmp_path / "linked")]) == 0
    assert (tmp_path / "linked" / "images" / "000001-a.png").stat().st_ino == (src / "images" / "a.png").stat().st_ino
    # OUT inside SRC (its writes would land in the export) is refused, and SRC is untouched
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    assert "is inside the export" in _problems("yolo", src, src / "coco")
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before


def test_the_coco_validator_refuses_a_linked_image(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "a.png").write_bytes(_png())
    (tmp_path / "d" / "a.png").symlink_to(tmp_path / "a.png")
    (tmp_path / "d" / "annotations.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}], "categories": [{"id": 1, "name": "cat"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[2, 2, 20, 2, 20, 20]], "iscrowd": 0}]}))
    with pytest.raises(DatasetError, match=r"images\[0\] .*a.png: a symbolic link"):
        load_coco(tmp_path / "d")


# --- 2. typed, bounded reading ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,make,expected", [
    ("cvat-xml", lambda s: _cvat(s, '<image name="a.png" width="40" height="30"><mask label="cat" rle="1,1" left="inf" top="0" '
                                    'width="1" height="2"/></image>'), "field 'left': Input should be a valid integer"),
    ("cvat-xml", lambda s: _cvat(s, '<image name="a.png" width="40" height="30"><polygon label="cat" '
                                    'points="1e308,1;1e308,1e308;1,1e308"/></image>'), "is outside the 40x30 image"),
    ("cvat-xml", lambda s: _cvat(s, '<image name="a.png" width="40" height="30"><polygon label="cat" '
                                    'points="-1e7,-1e7;1e7,-1e7;1e7,1e7"/></image>'), "x in [-1e+07, 1e+07]"),
    ("cvat-xml", lambda s: _cvat(s, '<image name="a.png" width="40" height="30"><box label="cat" xtl="nan" ytl="1" xbr="5" '
                                    'ybr="5"/></image>'), "field 'xtl': Input should be a finite number"),
    ("cvat-xml", lambda s: _cvat(s, '<image name="a.png" width="40" height="30"><box label="cat" xtl="1" ytl="1" xbr="5" '
                                    'ybr="5" rotation="inf"/></image>'), "field 'rotation': Input should be a finite number"),
    ("cvat-xml", lambda s: _cvat(s, '<image name="a.png" width="40" height="30"><box label="cat" xtl="9" ytl="1" xbr="5" '
                                    'ybr="5"/></image>'), "bottom-right (5, 5) is above or left of its top-left (9, 1)"),
    ("labelme", lambda s: _labelme(s, [{"label": "cat", "points": {"x": 1}}]), "shapes[0], field 'points': Input should be a valid list"),
    ("labelme", lambda s: _labelme(s, [{"label": "cat", "points": [[1, 1], 5, [9, 9]]}]), "field 'points[1]': Input should be a valid list"),
    ("labelme", lambda s: _labelme(s, [{"label": "cat", "points": [[1, 1], [9, 1], [9, 9]], "group_id": [1]}]),
     "field 'group_id': Input should be a valid integer"),
    ("labelme", lambda s: _labelme(s, [{"label": "cat", "points": [[1, 1], [1e308, 1], [9, 9]]}]), "is outside the 40x30 image"),
    ("labelme", lambda s: _labelme(s, [{"label": "cat", "points": [[10, 10], [2e8, 10]], "shape_type": "circle"}]),
     "is outside the 40x30 image"),
    ("labelstudio", lambda s: _labelstudio(s, [{"type": "polygonlabels", "value": {"points": [[1, 1], [1e308, 1], [9, 9]],
                                                                                  "polygonlabels": ["cat"]}}]), "outside the 40x30 image"),
    ("labelstudio", lambda s: _labelstudio(s, [{"type": "brushlabels", "value": {"format": "rle", "rle": [0, 0, 0, 8, 256],
                                                                                "brushlabels": ["cat"]}}]),
     "field 'value.rle[4]': Input should be less than or equal to 255"),
    ("labelstudio", lambda s: _labelstudio(s, [], url="http://[::1/a.png"), "field 'data.image': 'http://[::1/a.png' is not a URL"),
    ("labelstudio", lambda s: _labelstudio(s, [{"type": "rectanglelabels", "original_width": [40], "value": {
        "x": 1, "y": 1, "width": 5, "height": 5, "rectanglelabels": ["cat"]}}]), "field 'original_width': Input should be a valid integer"),
    ("labelstudio", lambda s: _labelstudio(s, [{"type": "rectanglelabels", "value": {
        "x": 50, "y": 50, "width": -20, "height": 5, "rectanglelabels": ["cat"]}}]), "field 'value.width': Input should be greater than or equal to 0"),
    ("yolo", lambda s: _yolo(s, "0 0.1 0.1 nan 0.1 0.5 0.5\n"), "labels/a.txt line 1: coordinates must be finite numbers"),
])
def test_hostile_values_are_named_problems_not_tracebacks(fmt, make, expected, tmp_path):
    assert expected in _problems(fmt, make(tmp_path / "src"), tmp_path / "out")


def test_a_label_studio_brush_of_words_past_8_bits_is_refused():
    from training.data.formats.labelstudio import decode_brush

    bits = f"{8:032b}" + f"{15:05b}" + "0" * 16
    with pytest.raises(ValueError, match="words of 16 bits"):
        decode_brush([int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)], 2, 1)


def test_instances_are_kept_as_rle_so_memory_follows_the_export_not_the_images(tmp_path):
    """60 small CVAT masks over a 2000x2000 image: as full-image masks 240 MB, as RLE a few kB each."""
    masks = "".join(f'<mask label="cat" rle="{i},{i + 1},{100 - 2 * i - 1}" left="{i}" top="{i}" width="10" height="10"/>'
                    for i in range(1, 61) if 100 - 2 * i - 1 > 0) + \
        "".join(f'<mask label="cat" rle="3,4,3" left="{10 * i}" top="500" width="10" height="1"/>' for i in range(60))
    src = _cvat(tmp_path / "src", f'<image name="a.png" width="2000" height="2000">{masks}</image>', size=(2000, 2000))
    tracemalloc.start()
    split = convert("cvat-xml", src, tmp_path / "out")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(split.coco["annotations"]) > 60
    assert peak < 60e6, peak  # a few image-sized buffers at a time, never one per instance


def test_each_limit_is_named(tmp_path, monkeypatch):
    import training.data.formats as formats

    monkeypatch.setattr(formats, "MAX_INSTANCES_PER_IMAGE", 2)
    src = _cvat(tmp_path / "src", f'<image name="a.png" width="40" height="30">{POLY * 3}</image>')
    assert "<polygon>[2] (label='cat'): more than 2 instances in one image (the limit)" in _problems("cvat-xml", src, tmp_path / "o")
    monkeypatch.setattr(formats, "MAX_POINTS_PER_IMAGE", 5)
    src = _cvat(tmp_path / "src2", f'<image name="a.png" width="40" height="30">{POLY * 2}</image>')
    assert "more than 5 polygon vertices in one image (the limit)" in _problems("cvat-xml", src, tmp_path / "o2")


# --- 3. semantic refusals and acceptances ----------------------------------------------------------------


def test_broken_input_is_refused_naming_the_exports_file(tmp_path):
    # category names with a newline, or 10 kB long
    src = _cvat(tmp_path / "c1", '<image name="a.png" width="40" height="30"><polygon label="ca&#10;t" points="2,2;20,2;20,20"/>'
                                 f'<polygon label="{"x" * 10_000}" points="2,2;20,2;20,20"/></image>')
    text = _problems("cvat-xml", src, tmp_path / "o1")
    assert "attribute 'label': the category name 'ca\\nt' must be 1 to 200 printable characters" in text
    assert "(label='xxxxxxxx" in text and "(10002 characters)" in text and "x" * 200 not in text
    # one file annotated by two records (a.png and ./a.png)
    yolo = _yolo(tmp_path / "y")
    (yolo / "list.txt").write_text("images/a.png\n./images/a.png\n")
    (yolo / "data.yaml").write_text("train: list.txt\nnames: [cat]\n")
    assert "'images/a.png': annotated by more than one record" in _problems("yolo", yolo, tmp_path / "o2")
    # masks/a/ with images a.png and a.jpg
    masks = tmp_path / "m"
    (masks / "images").mkdir(parents=True)
    (masks / "images" / "a.png").write_bytes(_png())
    Image.new("RGB", (40, 30)).save(masks / "images" / "a.jpg")
    (masks / "masks" / "a" / "cat").mkdir(parents=True)
    Image.fromarray(np.pad(np.full((5, 5), 255, np.uint8), ((2, 23), (2, 33)))).save(masks / "masks" / "a" / "cat" / "0.png")
    assert "masks/'a': the images a.jpg, a.png share its name" in _problems("masks", masks, tmp_path / "o3")
    # a mask PNG holding 0, 1 and 2 (an instance-index map) is not one instance
    (masks / "images" / "a.jpg").unlink()
    two = np.zeros((30, 40), np.uint8)
    two[2:8, 2:8], two[20:25, 20:25] = 1, 2
    Image.fromarray(two).save(masks / "masks" / "a" / "cat" / "0.png")
    assert "masks/a/cat/0.png: holds 2 non-zero values (1, 2)" in _problems("masks", masks, tmp_path / "o4")
    # a box past the image: refused by the importer, naming the export's file, not by the validator on a staged copy
    coco = _cvat_coco(tmp_path / "cc", "a.png", [
        {"id": 5, "image_id": 1, "category_id": 1, "segmentation": [], "bbox": [30, 20, 50, 5], "iscrowd": 0},
        {"id": 6, "image_id": 1, "category_id": 1, "segmentation": [], "bbox": [3, 2, -5, 5], "iscrowd": 0}])
    text = _problems("cvat-coco", coco, tmp_path / "o5")
    assert "annotations/instances_default.json: annotations[0] (id=5), field 'bbox': x in [30, 80]" in text
    assert "annotations[1] (id=6), field 'bbox': a negative width or height (-5x5)" in text and "staged" not in text


def test_valid_exports_are_read_as_the_tools_read_them(tmp_path):
    # LabelMe: imageData wins over a stale imagePath (labelme loads the embedded image first)
    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / "other.png").write_bytes(_png((64, 64)))
    (lm / "a.json").write_text(json.dumps({"shapes": [{"label": "cat", "points": [[2, 2], [12, 2], [12, 12]]}],
                                           "imagePath": "other.png", "imageData": base64.b64encode(_png()).decode()}))
    split = convert("labelme", lm, tmp_path / "o1")
    assert (split.coco["images"][0]["width"], split.coco["images"][0]["height"]) == (40, 30)
    # Label Studio: a local-storage URL names the file by its path under the storage root
    ls = _labelstudio(tmp_path / "ls", [{"type": "polygonlabels", "value": {"points": [[5, 5], [50, 5], [50, 50]],
                                                                              "polygonlabels": ["cat"]}}],
                      url="/data/local-files/?d=sub/b.png")
    (ls / "sub").mkdir()
    (ls / "sub" / "b.png").write_bytes(_png((80, 60)))
    split = convert("labelstudio", ls, tmp_path / "o2")
    assert split.coco["images"][0]["width"] == 80  # sub/b.png, not images/a.png
    # YOLO: a list of image folders, and names keyed by the index's text
    yolo = _yolo(tmp_path / "y", yaml='train: [images/set1, images/set2]\nnames: {"0": cat}\n')
    for part in ("set1", "set2"):
        (yolo / "images" / part).mkdir()
        (yolo / "labels" / part).mkdir()
        (yolo / "images" / part / f"{part}.png").write_bytes(_png())
        (yolo / "labels" / part / f"{part}.txt").write_text("0 0.1 0.1 0.5 0.1 0.5 0.5\n")
    split = convert("yolo", yolo, tmp_path / "o3")
    assert len(split.coco["images"]) == 2 and split.label_map.names == ["cat"]
    # a list file's ./ lines are relative to its own folder (Ultralytics' get_img_files), others to the dataset
    (yolo / "lists").mkdir()
    (yolo / "lists" / "train.txt").write_text("./../images/set1/set1.png\nimages/set2/set2.png\n")
    (yolo / "data.yaml").write_text('train: lists/train.txt\nnames: {"0": cat}\n')
    split = convert("yolo", yolo, tmp_path / "o4")
    sources = [i["source_file"] for i in json.loads((tmp_path / "o4" / "annotations.json").read_text())["images"]]
    assert sources == ["images/set1/set1.png", "images/set2/set2.png"]


# --- 4. one conversion shared by concurrent workers -------------------------------------------------------


def test_concurrent_workers_on_a_cold_cache_share_one_conversion(tmp_path):
    src = _yolo(tmp_path / "yolo")
    code = ("import sys; from pathlib import Path; from training.data.convert import converted; "
            "print(converted('yolo', Path(sys.argv[1]), Path(sys.argv[2])))")
    for trial in range(3):
        cache = tmp_path / f"cache{trial}"
        workers = [subprocess.Popen([sys.executable, "-c", code, str(src), str(cache)], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2]) for _ in range(3)]
        results = [w.communicate(timeout=120) + (w.returncode,) for w in workers]
        assert all(rc == 0 for *_, rc in results), [err[-2000:] for _, err, _ in results]
        assert len({out.strip() for out, *_ in results}) == 1
        folders = [p for p in (cache / "converted").iterdir() if p.is_dir()]
        assert len(folders) == 1 and (folders[0] / "annotations.json").is_file()  # no private folder left
    assert converted("yolo", src, tmp_path / "cache0") == folders[0].parent.parent.parent / "cache0" / "converted" / folders[0].name
    # a worker killed half-way (SIGKILL: no clean-up) leaves its private folder; the next conversion removes it
    import shutil

    published = converted("yolo", src, tmp_path / "cache0")
    shutil.rmtree(published)
    (published.parent / f"{published.name}.partial-dead").mkdir()
    assert converted("yolo", src, tmp_path / "cache0") == published and (published / "annotations.json").is_file()
    assert [p.name for p in published.parent.iterdir() if p.is_dir()] == [published.name]
    os.utime(src / "labels" / "a.txt", ns=(1, 1))  # changed: converted again
    assert converted("yolo", src, tmp_path / "cache0").name != folders[0].name
