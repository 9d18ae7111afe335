import json
from pathlib import Path

import numpy as np
import pytest

from helpers import square, write_coco
from maskrcnn.config import DataConfig, SyntheticConfig
from training.data.coco import DatasetError, load_coco
from training.data.dataset import CocoDataset
from maskrcnn.labels import LabelMap
from training.data.prepare import prepare_data
from training.data.synthetic import synthetic_dataset


def test_parses_polygon_rle_uncompressed_and_crowd(coco_folder: Path):
    split = load_coco(coco_folder)
    assert split.label_map.category_ids == [3, 17]
    ds = CocoDataset(split)
    image, target = ds[0]
    assert tuple(image.shape) == (3, 32, 32)
    assert target["labels"].tolist() == [1, 2]  # category 3 -> label 1, category 17 -> label 2
    assert target["masks"][0].sum() == 100  # the 10x10 polygon
    assert target["masks"][1].sum() == 80  # the 8x10 RLE
    assert target["boxes"][1].tolist() == [20, 4, 30, 12]
    _, target2 = ds[1]
    # the crowd region stays out of training targets but in the ground truth for evaluation
    assert target2["labels"].tolist() == [2] and target2["masks"][0].sum() == 32 * 32
    assert sum(a["iscrowd"] for a in split.coco["annotations"]) == 1


def test_label_map_round_trip_with_coco_style_ids():
    lm = LabelMap.from_categories([{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 44, "name": "bottle"}])
    assert lm.num_classes == 4
    assert [lm.label_of(c) for c in (1, 44, 90)] == [1, 2, 3]
    assert [lm.category_of(label) for label in (1, 2, 3)] == [1, 44, 90]
    assert LabelMap.from_dict(lm.to_dict()) == lm


def _one_image(tmp_path: Path, ann: dict, **kw) -> Path:
    return write_coco(tmp_path / "d", [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}],
                      [{"id": 1, "image_id": 1, "category_id": 3, "iscrowd": 0, **ann}], **kw)


@pytest.mark.parametrize("ann, message", [
    ({"category_id": 99, "segmentation": square(1, 1, 5)}, "annotations[0] (id=1), field 'category_id': 99 is not a known category (known: 3, 17)"),
    ({"image_id": 7, "segmentation": square(1, 1, 5)}, "field 'image_id': 7 is not the id of any image"),
    ({"segmentation": [[1, 1, 5, 1, 5]]}, "polygon 0 has 5 coordinates, expected an even number >= 6"),
    ({"segmentation": [[1, 1, 5, 5, 9, 9]]}, "polygon 0 is empty (zero area)"),
    ({"segmentation": []}, "empty polygon list"),
    ({"segmentation": square(20, 20, 30)}, "polygon 0 is out of bounds: x in [20, 50]"),
    ({"segmentation": {"size": [16, 16], "counts": "abc"}}, "RLE size [16, 16] does not match the image's [height, width] = [32, 32]"),
    ({"segmentation": {"size": [32, 32], "counts": [3, 4]}}, "uncompressed RLE counts sum to 7, expected height*width = 1024"),
    ({}, "field 'segmentation': missing"),
    ({"segmentation": square(1, 1, 5), "bbox": [1, 1, -3, 4]}, "field 'bbox': expected [x, y, width, height]"),
])
def test_bad_annotations_name_file_record_and_field(tmp_path: Path, ann, message):
    root = _one_image(tmp_path, ann)
    with pytest.raises(DatasetError) as err:
        load_coco(root)
    assert "annotations.json" in str(err.value)
    assert message in str(err.value)


def test_malformed_json_names_line_and_column(tmp_path: Path):
    (tmp_path / "annotations.json").write_text('{"images": [\n  {"id": 1,,}\n]}')
    with pytest.raises(DatasetError, match=r"(?s)annotations\.json: 1 problem.*not valid JSON at line 2 column 12"):
        load_coco(tmp_path)


def test_missing_sections_and_files(tmp_path: Path):
    (tmp_path / "annotations.json").write_text(json.dumps({"images": []}))
    with pytest.raises(DatasetError, match="field 'annotations' is missing or not a list"):
        load_coco(tmp_path)
    with pytest.raises(DatasetError, match="annotation file does not exist"):
        load_coco(tmp_path / "nowhere")


def test_missing_and_corrupt_images(tmp_path: Path):
    root = _one_image(tmp_path, {"segmentation": square(1, 1, 5)})
    (root / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DatasetError, match=r"images\[0\] \(id=1, file_name='a.png'\): .*a\.png: (corrupt|not a decodable)"):
        load_coco(root)
    (root / "a.png").unlink()
    with pytest.raises(DatasetError, match="image file not found at"):
        load_coco(root)


def test_size_mismatch_between_json_and_file(tmp_path: Path):
    root = write_coco(tmp_path / "d", [{"id": 1, "file_name": "a.png", "width": 32, "height": 32, "pixels": np.zeros((20, 32, 3), np.uint8)}],
                      [])
    with pytest.raises(DatasetError, match="the JSON says 32x32, the image file is 32x20"):
        load_coco(root)


def test_skip_invalid_drops_and_counts(tmp_path: Path, caplog):
    root = write_coco(tmp_path / "d", [{"id": 1, "file_name": "a.png", "width": 32, "height": 32},
                                       {"id": 2, "file_name": "b.png", "width": 32, "height": 32}], [
        {"id": 1, "image_id": 1, "category_id": 3, "segmentation": square(1, 1, 5), "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 99, "segmentation": square(1, 1, 5), "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 3, "segmentation": square(1, 1, 5), "iscrowd": 0},
    ])
    (root / "b.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="2 problem"):
        load_coco(root)
    split = load_coco(root, skip_invalid=True)
    assert [a["id"] for a in split.coco["annotations"]] == [1]
    assert split.dropped == {"images": 1, "annotations": 2, "polygon_parts": 0}
    assert "skipped 1 invalid image(s) and 2 invalid annotation(s)" in caplog.text


def test_synthetic_dataset_is_deterministic(tmp_path: Path):
    cfg = SyntheticConfig(seed=3, num_train=6, num_val=3, image_size=64, min_size=10, max_size=30)
    a_train, a_val = synthetic_dataset(cfg, tmp_path / "a")
    b_train, _ = synthetic_dataset(cfg, tmp_path / "b")
    assert (a_train / "annotations.json").read_bytes() == (b_train / "annotations.json").read_bytes()
    assert (a_train / "000001.png").read_bytes() == (b_train / "000001.png").read_bytes()
    split = load_coco(a_train)
    assert split.label_map.names == ["circle", "square", "triangle"]
    assert len(split.coco["images"]) == 6 and len(load_coco(a_val).coco["images"]) == 3
    forms = {type(a["segmentation"]).__name__ for a in split.coco["annotations"]}
    assert forms <= {"list", "dict"} and split.coco["annotations"]
    other = synthetic_dataset(SyntheticConfig(seed=4, num_train=6, num_val=3, image_size=64, min_size=10, max_size=30), tmp_path / "a")[0]
    assert (other / "annotations.json").read_bytes() != (a_train / "annotations.json").read_bytes()


def test_prepare_holds_out_a_fixed_val_fraction(tmp_path: Path):
    images = [{"id": i, "file_name": f"{i}.png", "width": 32, "height": 32} for i in range(1, 11)]
    anns = [{"id": i, "image_id": i, "category_id": 3, "segmentation": square(2, 2, 8), "iscrowd": 0} for i in range(1, 11)]
    root = write_coco(tmp_path / "d", images, anns)
    cfg = DataConfig(train=str(root), val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    first, second = prepare_data(cfg), prepare_data(cfg)
    assert len(first.val.coco["images"]) == 2 and len(first.train.coco["images"]) == 8
    assert first.val.image_ids == second.val.image_ids
    assert not set(first.val.image_ids) & set(first.train.image_ids)
    assert first.content_hash == second.content_hash and len(first.content_hash) == 64
    (root / "1.png").write_bytes((root / "2.png").read_bytes()[:40])  # truncated: the content check fails
    with pytest.raises(DatasetError):
        prepare_data(cfg)


def test_prepare_rejects_val_with_other_categories(tmp_path: Path):
    img = [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}]
    ann = [{"id": 1, "image_id": 1, "category_id": 3, "segmentation": square(2, 2, 8), "iscrowd": 0}]
    train = write_coco(tmp_path / "t", img, ann)
    val = write_coco(tmp_path / "v", img, ann, categories=[{"id": 3, "name": "cat"}])
    with pytest.raises(DatasetError, match="validation categories"):
        prepare_data(DataConfig(train=str(train), val=str(val), cache_dir=str(tmp_path / "c")))


def test_the_content_hash_is_the_datas_not_where_it_lies(tmp_path: Path):
    """A copy of the data elsewhere (a staged dataset, another cache) hashes the same, whichever of the two
    split folders sorts first; a changed byte does not."""
    import shutil

    img = [{"id": i, "file_name": f"{i}.png", "width": 32, "height": 32} for i in (1, 2)]
    ann = [{"id": i, "image_id": i, "category_id": 3, "segmentation": square(2, 2, 8), "iscrowd": 0} for i in (1, 2)]
    train, val = write_coco(tmp_path / "b-train", img, ann), write_coco(tmp_path / "a-val", img[:1], ann[:1])
    here = prepare_data(DataConfig(train=str(train), val=str(val), cache_dir=str(tmp_path / "c"))).content_hash
    copies = shutil.copytree(train, tmp_path / "z" / "train"), shutil.copytree(val, tmp_path / "z" / "val")
    there = prepare_data(DataConfig(train=str(copies[0]), val=str(copies[1]), cache_dir=str(tmp_path / "c"))).content_hash
    assert here == there
    with open(copies[1] / "1.png", "ab") as f:
        f.write(b"\0")
    assert prepare_data(DataConfig(train=str(copies[0]), val=str(copies[1]),
                                   cache_dir=str(tmp_path / "c"))).content_hash != here


def test_a_prepared_dataset_is_verified_against_its_manifest_on_load(tmp_path: Path):
    """The prepare step's output carries each file's size and SHA-256: a cut annotations.json or a changed
    image is refused by name, never trained on under the hash it was prepared with."""
    from training.data.prepare import PREPARED_FILE, export_prepared, load_prepared

    images = [{"id": i, "file_name": f"{i}.png", "width": 32, "height": 32} for i in range(1, 6)]
    anns = [{"id": i, "image_id": i, "category_id": 3, "segmentation": square(2, 2, 8), "iscrowd": 0} for i in range(1, 6)]
    root = write_coco(tmp_path / "d", images, anns)
    data = prepare_data(DataConfig(train=str(root), val_fraction=0.4, cache_dir=str(tmp_path / "cache")))
    folder = export_prepared(data, tmp_path / "prepared")
    assert load_prepared(folder).content_hash == data.content_hash
    listed = json.loads((folder / PREPARED_FILE).read_text())["files"]
    assert "train/annotations.json" in listed and len(listed) == 2 + 5
    annotations = folder / "train" / "annotations.json"
    original = annotations.read_bytes()
    annotations.write_bytes(original[: len(original) // 2])
    with pytest.raises(DatasetError, match=r"train/annotations\.json: \d+ bytes, dataset\.json says"):
        load_prepared(folder)
    annotations.write_bytes(original)
    image = next((folder / "val").glob("*.png"))
    image.write_bytes(image.read_bytes()[::-1])  # the same size, other bytes
    with pytest.raises(DatasetError, match=rf"val/{image.name}: its SHA-256 differs"):
        load_prepared(folder)
    image.unlink()
    with pytest.raises(DatasetError, match=rf"val/{image.name}: missing"):
        load_prepared(folder)
