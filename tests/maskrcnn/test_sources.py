"""Remote datasets against local emulators: moto's S3 server and gcp-storage-emulator (GCS).

These are the fast tier; the real S3-compatible server comes with the tracking stack. Both servers
listen on 127.0.0.1 only.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import square, write_coco
from maskrcnn.storage import SourceError, fetch_file, fetch_prefix


def _dataset(tmp_path: Path) -> Path:
    return write_coco(tmp_path / "src", [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}],
                      [{"id": 1, "image_id": 1, "category_id": 3, "segmentation": square(2, 2, 8), "iscrowd": 0}])


def test_s3_prefix_downloads_once_and_again_when_changed_emulator(s3_emulator, tmp_path):
    from training.data.coco import load_coco
    from maskrcnn.storage import s3_client

    src = _dataset(tmp_path)
    s3 = s3_client()
    s3.create_bucket(Bucket="data")
    for f in src.iterdir():
        s3.upload_file(str(f), "data", f"sets/train/{f.name}")
    s3.put_object(Bucket="data", Key="sets/other/x.txt", Body=b"not part of the prefix")
    cache = tmp_path / "cache"
    local = fetch_prefix("s3://data/sets/train", cache)
    assert sorted(p.name for p in local.iterdir() if not p.name.startswith(".")) == ["a.png", "annotations.json"]
    assert load_coco(local).label_map.category_ids == [3, 17]
    assert fetch_prefix("s3://data/sets/train", cache) == local  # same content: the cache answers
    s3.put_object(Bucket="data", Key="sets/train/notes.txt", Body=b"new")
    changed = fetch_prefix("s3://data/sets/train", cache)
    assert changed != local and (changed / "notes.txt").read_bytes() == b"new"
    weights = fetch_file("s3://data/sets/train/notes.txt", cache)
    assert weights.read_bytes() == b"new"


def test_s3_errors_name_the_uri_emulator(s3_emulator, tmp_path):
    with pytest.raises(SourceError, match="s3://missing-bucket/x: cannot list objects"):
        fetch_prefix("s3://missing-bucket/x", tmp_path)
    from maskrcnn.storage import s3_client

    s3_client().create_bucket(Bucket="empty")
    with pytest.raises(SourceError, match="s3://empty/nothing: no objects under this prefix"):
        fetch_prefix("s3://empty/nothing", tmp_path)


def test_gcs_prefix_downloads_emulator(gcs_emulator, tmp_path):
    from maskrcnn.storage import gcs_client

    src = _dataset(tmp_path)
    client = gcs_client()
    bucket = client.create_bucket("gdata")
    for f in src.iterdir():
        bucket.blob(f"train/{f.name}").upload_from_filename(str(f))
    local = fetch_prefix("gs://gdata/train", tmp_path / "cache")
    assert (local / "annotations.json").read_bytes() == (src / "annotations.json").read_bytes()
    assert (local / "a.png").read_bytes() == (src / "a.png").read_bytes()


def test_unsupported_and_missing_locations(tmp_path):
    with pytest.raises(SourceError, match="unsupported scheme 'ftp'"):
        fetch_prefix("ftp://host/data", tmp_path)
    with pytest.raises(SourceError, match="no such file or folder"):
        fetch_prefix(str(tmp_path / "absent"), tmp_path)
