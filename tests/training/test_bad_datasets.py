"""A corpus of broken datasets: each is refused before training with a message that names the file, the
record and the field, through the library and through `uv run -m training.data.validate` (no traceback)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from helpers import square
from PIL import Image

from training.data.coco import DatasetError, load_coco
from training.data.validate import main as validate

W = H = 32


def base() -> dict[str, Any]:
    """Two valid images, two categories, two valid polygon annotations."""
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": W, "height": H},
                   {"id": 2, "file_name": "b.png", "width": W, "height": H}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "segmentation": square(2, 2, 10), "iscrowd": 0},
                        {"id": 2, "image_id": 2, "category_id": 17, "segmentation": square(4, 4, 12), "iscrowd": 0}],
        "categories": [{"id": 3, "name": "cat"}, {"id": 17, "name": "dog"}],
    }


def write(root: Path, coco: Any, raw: bytes | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((H, W, 3), 127, np.uint8)).save(root / name)
    (root / "annotations.json").write_bytes(raw if raw is not None else json.dumps(coco).encode())
    return root


def edit(change: Callable[[dict], None]) -> dict:
    coco = base()
    change(coco)
    return coco


def ann(i: int, **fields):
    return lambda c: c["annotations"][i].update(fields)


def img(i: int, **fields):
    return lambda c: c["images"][i].update(fields)


# name -> (annotation file contents, or a dict to serialise; side effect on the folder or None; expected substrings)
CASES: dict[str, tuple[Any, Callable[[Path], None] | None, list[str]]] = {
    "not-json": (b"{not json", None, ["annotations.json", "not valid JSON at line 1 column 2"]),
    "not-utf8": (b"\xff\xfe\x00{", None, ["annotations.json", "not UTF-8 text"]),
    "top-level-list": ([], None, ["annotations.json", "top level is a list"]),
    "images-missing": (edit(lambda c: c.pop("images")), None, ["annotations.json", "field 'images' is missing"]),
    "annotations-not-list": (edit(lambda c: c.update(annotations={})), None, ["field 'annotations' is missing or not a list"]),
    "categories-empty": (edit(lambda c: c.update(categories=[])), None, ["field 'categories' is empty"]),
    "category-without-name": (edit(lambda c: c["categories"][0].pop("name")), None, ["annotations.json: categories[0]", "'name'"]),
    "category-duplicate": (edit(lambda c: c["categories"].append({"id": 3, "name": "again"})), None,
                           ["categories[2], field 'id'", "duplicate category id 3"]),
    "category-id-zero": (edit(lambda c: c["categories"].append({"id": 0, "name": "bg"})), None,
                         ["categories[2], field 'id'", "must be a positive integer"]),
    "image-not-object": (edit(lambda c: c["images"].append(7)), None, ["images[2]", "expected an object"]),
    "image-id-string": (edit(img(0, id="one")), None, ["images[0]", "field 'id': expected an integer"]),
    "image-id-duplicate": (edit(img(1, id=1)), None, ["images[1]", "field 'id': duplicate image id"]),
    "file-name-missing": (edit(lambda c: c["images"][0].pop("file_name")), None, ["images[0]", "field 'file_name'"]),
    "file-name-dotdot": (edit(img(0, file_name="../outside.png")), None,
                         ["images[0]", "field 'file_name': escapes the dataset folder"]),
    "file-name-absolute": (edit(img(0, file_name="/etc/hostname")), None,
                           ["images[0]", "field 'file_name': escapes the dataset folder"]),
    "width-zero": (edit(img(0, width=0)), None, ["images[0]", "fields 'width'/'height'"]),
    "image-file-missing": (edit(img(0, file_name="gone.png")), None, ["images[0]", "image file not found"]),
    "image-not-an-image": (base(), lambda root: (root / "a.png").write_text("hello"), ["images[0]", "a.png", "expected JPG, PNG or TIFF"]),
    "image-truncated": (base(), lambda root: (root / "b.png").write_bytes((root / "b.png").read_bytes()[:60]),
                        ["images[1]", "b.png"]),
    "image-size-mismatch": (edit(img(1, width=40)), None, ["images[1]", "the JSON says 40x32, the image file is 32x32"]),
    "annotation-not-object": (edit(lambda c: c["annotations"].append("x")), None, ["annotations[2]", "expected an object"]),
    "annotation-id-missing": (edit(lambda c: c["annotations"][0].pop("id")), None, ["annotations[0]", "field 'id'"]),
    "annotation-id-duplicate": (edit(ann(1, id=1)), None, ["annotations[1]", "field 'id': duplicate annotation id"]),
    "unknown-image-id": (edit(ann(0, image_id=99)), None, ["annotations[0]", "field 'image_id': 99 is not the id of any image"]),
    "unknown-category-id": (edit(ann(0, category_id=5)), None,
                            ["annotations[0]", "field 'category_id': 5 is not a known category (known: 3, 17)"]),
    "iscrowd-two": (edit(ann(0, iscrowd=2)), None, ["annotations[0]", "field 'iscrowd': expected 0 or 1"]),
    "segmentation-missing": (edit(lambda c: c["annotations"][0].pop("segmentation")), None,
                             ["annotations[0]", "field 'segmentation': missing"]),
    "segmentation-number": (edit(ann(0, segmentation=5)), None, ["annotations[0]", "field 'segmentation'", "got int"]),
    "polygon-not-flat": (edit(ann(0, segmentation=[[[1, 2], [3, 4], [5, 6]]])), None,
                         ["annotations[0]", "polygon 0 is not a flat list of numbers"]),
    "polygon-odd": (edit(ann(0, segmentation=[[1, 2, 3, 4, 5, 6, 7]])), None, ["annotations[0]", "polygon 0 has 7 coordinates"]),
    "polygon-nan": (b'{"images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}], "annotations": [{"id": 1, '
                    b'"image_id": 1, "category_id": 3, "segmentation": [[1, 2, NaN, 4, 5, 6]], "iscrowd": 0}], '
                    b'"categories": [{"id": 3, "name": "cat"}]}', None, ["annotations[0]", "not a flat list of numbers"]),
    "polygon-out-of-bounds": (edit(ann(0, segmentation=square(20, 20, 30))), None,
                              ["annotations[0]", "polygon 0 is out of bounds", "within the image's 32x32"]),
    "polygon-zero-area": (edit(ann(0, segmentation=[[1, 1, 5, 5, 9, 9]])), None, ["annotations[0]", "polygon 0 is empty (zero area)"]),
    "polygon-parts-all-degenerate": (edit(ann(0, segmentation=[[1, 1, 5, 5, 9, 9], [1, 1, 2, 2]])), None,
                                     ["annotations[0]", "all 2 polygons are degenerate"]),
    "crowd-polygon": (edit(ann(0, iscrowd=1)), None, ["annotations[0]", "crowd annotations (iscrowd=1) must use RLE"]),
    "rle-size-mismatch": (edit(ann(0, segmentation={"size": [16, 16], "counts": [256]})), None,
                          ["annotations[0]", "RLE size [16, 16] does not match"]),
    "rle-sum-mismatch": (edit(ann(0, segmentation={"size": [32, 32], "counts": [10, 10]})), None,
                         ["annotations[0]", "uncompressed RLE counts sum to 20, expected height*width = 1024"]),
    "rle-compressed-garbage": (edit(ann(0, segmentation={"size": [32, 32], "counts": "héllo~"})), None,
                               ["annotations[0]", "compressed RLE 'counts' is malformed"]),
    "rle-compressed-truncated": (edit(ann(0, segmentation={"size": [32, 32], "counts": "oooo"})), None,
                                 ["annotations[0]", "compressed RLE 'counts' is malformed, it cannot be decoded"]),
    "rle-compressed-overflow": (edit(ann(0, segmentation={"size": [32, 32], "counts": "1" * 60})), None,
                                ["annotations[0]", "compressed RLE 'counts' is malformed"]),
    "bbox-negative": (edit(ann(0, bbox=[1, 1, -3, 4])), None, ["annotations[0]", "field 'bbox'"]),
    # found by tests/serving/test_fuzz.py: both raised a bare TypeError before
    "area-not-a-number": (edit(ann(0, area=[1])), None, ["annotations[0]", "field 'area': expected a number >= 0"]),
    "image-id-list": (edit(img(0, id=[1])), None, ["images[0]", "field 'id': expected an integer"]),
    "no-annotations": (edit(lambda c: c.update(annotations=[])), None, ["annotations.json: no annotations"]),
    "crowd-only": (edit(lambda c: c.update(annotations=[{"id": 1, "image_id": 1, "category_id": 3, "iscrowd": 1,
                                                         "segmentation": {"size": [32, 32], "counts": [0, 1024]}}])), None,
                   ["annotations.json: no annotations", "crowd regions only"]),
}


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_broken_dataset_is_refused_with_file_record_and_field(name, tmp_path, capsys):
    contents, damage, expected = CASES[name]
    root = write(tmp_path / name, contents, contents if isinstance(contents, bytes) else None)
    if damage:
        damage(root)
    with pytest.raises(DatasetError) as info:
        load_coco(root)
    message = str(info.value)
    assert str(root / "annotations.json") in message  # the file
    for text in expected:
        assert text in message, (text, message)
    assert " object at 0x" not in message
    # the validate command prints the same report, exits 1, and shows no traceback
    assert validate([str(root)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("INVALID ") and all(text in err for text in expected) and "Traceback" not in err


def test_a_degenerate_part_is_dropped_and_its_instance_kept(tmp_path, capsys):
    parts = [square(2, 2, 10)[0], [1, 1, 5, 5, 9, 9], [20, 20, 20.5, 20, 20.5, 20.5], [3, 3, 4, 4]]
    root = write(tmp_path / "parts", edit(ann(0, segmentation=parts)))
    split = load_coco(root)
    assert len(split.coco["annotations"]) == 2 and split.dropped["polygon_parts"] == 3
    assert split.coco["annotations"][0]["segmentation"] == [parts[0]]  # the real part, alone
    assert validate([str(root)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK ") and "2 instances" in out and "dropped: 3 polygon parts" in out


def test_a_dataset_with_no_annotations_is_refused_before_training(tmp_path, caplog):
    from training.ray_main import main

    root = write(tmp_path / "empty", edit(lambda c: c.update(annotations=[])))
    assert main(["--data", str(root), "--val-data", str(root)]) == 2
    assert "no annotations" in caplog.text


def test_object_keys_that_escape_the_prefix_are_refused(s3_emulator, tmp_path):
    from maskrcnn.storage import SourceError, fetch_prefix, s3_client

    s3 = s3_client()
    s3.create_bucket(Bucket="hostile")
    s3.put_object(Bucket="hostile", Key="ds/annotations.json", Body=b"{}")
    s3.put_object(Bucket="hostile", Key="ds/../../escaped.txt", Body=b"x")
    with pytest.raises(SourceError, match=r"ds/\.\./\.\./escaped\.txt: the object key escapes the prefix"):
        fetch_prefix("s3://hostile/ds", tmp_path / "cache")
    assert not list(tmp_path.rglob("escaped.txt"))  # nothing was written, inside the cache or out
