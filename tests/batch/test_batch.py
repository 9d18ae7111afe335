"""Batch inference (`uv run -m batch`) on Ray Data: the same detections as evaluation and the predictor,
COCO results per shard, resumed by skipping finished shards, refused when the output holds another run;
from a folder and from the real S3 gateway, with a registry alias, and as a Ray job on the two-node cluster
in containers through the Jobs API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from maskrcnn.images import decode_image

ENV = {"RAY_AUTH_MODE": "disabled"}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Ten synthetic images, two in a sub-folder, and a file that is not an image."""
    from maskrcnn.config import SyntheticConfig
    from training.data.synthetic import synthetic_dataset

    _, val = synthetic_dataset(SyntheticConfig(num_train=2, num_val=10, image_size=96, seed=5), tmp_path_factory.mktemp("c"))
    folder = tmp_path_factory.mktemp("images")
    for i, path in enumerate(sorted(val.glob("*.png"))):
        target = folder / ("sub" if i >= 8 else "") / path.name
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(path.read_bytes())
    (folder / "notes.txt").write_text("not an image")
    return folder


def _batch(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "batch", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **ENV, **(env or {})})


def _results(out: Path) -> tuple[list[dict], list[dict]]:
    images, results = [], []
    for path in sorted((out / "results").glob("shard-*.images.json")):
        images += json.loads(path.read_text())
        results += json.loads(path.with_name(path.name.replace(".images", "")).read_text())
    return images, results


def test_a_folder_gives_the_detections_of_the_package_shard_by_shard_and_resumes(images, serving_package, tmp_path):
    out = tmp_path / "out"
    done = _batch(str(images), str(out), "--package", str(serving_package), "--shard-size", "4", "--score-threshold",
                  "0", "--overlays", "--masks")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "10 images in 3 shards of 4: 0 done already, 3 to run" in done.stderr
    got_images, results = _results(out)
    names = sorted(p.relative_to(images).as_posix() for p in images.rglob("*.png"))
    assert [i["file_name"] for i in got_images] == names and [i["id"] for i in got_images] == list(range(1, 11))
    assert len(list((out / "overlays").rglob("*.png"))) == 10 and len(list((out / "masks").rglob("*.png"))) == 10
    # the same detections as evaluation and the predictor compute: the package's graph, the one post-processing
    from maskrcnn.onnx_runtime import OnnxDetector
    from training.metrics import to_coco_results
    from maskrcnn.package import open_package
    from maskrcnn.processing import detect

    package = open_package(serving_package)
    graph = OnnxDetector(package.graph, 2)
    expected = []
    for info in got_images:
        pred = detect(graph.run, decode_image(images / info["file_name"]), package.config.model.min_size,
                      package.config.model.max_size, package.config.eval.mask_threshold, 0.0, 100)
        expected += to_coco_results([{**pred, "image_id": info["id"]}], package.label_map)
    assert len(results) == len(expected) > 0
    for got, want in zip(results, expected):
        assert (got["image_id"], got["category_id"]) == (want["image_id"], want["category_id"])
        assert got["score"] == pytest.approx(want["score"], abs=1e-5)
        assert np.allclose(got["bbox"], want["bbox"], atol=1e-3)
        counts = want["segmentation"]["counts"]
        assert got["segmentation"]["counts"] == (counts.decode() if isinstance(counts, bytes) else counts)
    # COCO tools read the results with the images listed beside them
    from faster_coco_eval import COCO

    coco = COCO({"images": got_images, "annotations": [], "categories": [{"id": c, "name": n} for c, n in
                                                                         zip(package.label_map.category_ids, package.label_map.names)]})
    assert len(coco.loadRes(results).anns) == len(results)

    # resumed: a finished shard is skipped; a lost one is run again, with the same bytes
    lost = out / "results" / "shard-00001.json"
    before = lost.read_bytes()
    kept = (out / "results" / "shard-00000.json").stat().st_mtime_ns
    lost.unlink()
    again = _batch(str(images), str(out), "--package", str(serving_package), "--shard-size", "4", "--score-threshold",
                   "0", "--overlays", "--masks")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 done already, 1 to run" in again.stderr
    assert lost.read_bytes() == before and (out / "results" / "shard-00000.json").stat().st_mtime_ns == kept
    # a file that is no image stops nothing: listed with its error, counted, the other images predicted
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes((images / "sub").iterdir().__next__().read_bytes())
    (broken / "b.png").write_bytes(b"not a png")
    bad = _batch(str(broken), str(tmp_path / "out2"), "--package", str(serving_package), "--score-threshold", "0")
    assert bad.returncode == 0, bad.stderr[-3000:]
    assert "b.png: not a decodable image" in bad.stderr and '"failed_images": 1' in bad.stderr
    listed, _ = _results(tmp_path / "out2")
    assert [i["file_name"] for i in listed] == ["a.png", "b.png"]
    assert "width" in listed[0] and "not a decodable image" in listed[1]["error"]
    # another setting is another run: refused, nothing touched
    other = _batch(str(images), str(out), "--package", str(serving_package), "--shard-size", "4")
    assert other.returncode == 2 and "holds another run's results (settings differ)" in other.stderr
    assert lost.read_bytes() == before


def test_bad_input_is_refused_by_name(images, serving_package, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ([str(empty), str(tmp_path / "o1"), "--package", str(serving_package)], "no JPG, PNG or TIFF image found"),
        ([str(images), str(tmp_path / "o2"), "--package", str(tmp_path / "none")], "no such package folder"),
        ([str(images), str(tmp_path / "o3"), "--model", "maskrcnn@champion", "--tracking-uri", "http://x"],
         "expected models:/NAME@ALIAS"),
        ([str(images), str(tmp_path / "o4"), "--package", str(serving_package), "--shard-size", "0"], "--shard-size: expected 1"),
        ([str(images), "s3://b/out", "--package", str(serving_package), "--address", "http://127.0.0.1:1"],
         "SRC, --package: a Ray job on a cluster reads and writes object storage"),
    ]
    for args, message in cases:
        done = _batch(*args, env={"MLFLOW_TRACKING_URI": ""})
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr[-2000:])
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o4").exists()


def test_from_and_to_s3_with_a_registry_alias(images, serving_package, mlflow_stack, tmp_path):
    """The real S3 gateway in and out, and the model named by its alias in the real MLflow registry."""
    from mlflow.tracking import MlflowClient

    from maskrcnn.storage import list_objects, upload_object
    from training.registry import register_package, set_alias
    from maskrcnn.package import open_package
    from training.tracking import log_package

    env = {**mlflow_stack.env(), "MLFLOW_TRACKING_URI": mlflow_stack.tracking_uri}
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    client = MlflowClient(mlflow_stack.tracking_uri)
    name = f"batch-{time.time_ns()}"
    run_id = client.create_run(client.create_experiment(name)).info.run_id
    model_uri = log_package(client, run_id, serving_package)
    version = register_package(client, name, model_uri, open_package(serving_package))
    set_alias(client, name, "champion", version, reason="test")
    prefix = f"s3://{mlflow_stack.state.models_bucket}/{name}"
    for path in sorted(images.rglob("*.png")):
        upload_object(f"{prefix}/in/{path.relative_to(images).as_posix()}", path)
    done = _batch(f"{prefix}/in", f"{prefix}/out", "--model", f"models:/{name}@champion", "--shard-size", "5",
                  "--concurrency", "2", "--threads", "1", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    keys = sorted(o.key.removeprefix(f"{name}/out/") for o in list_objects(f"{prefix}/out"))
    assert keys == ["manifest.json", "results/shard-00000.images.json", "results/shard-00000.json",
                    "results/shard-00001.images.json", "results/shard-00001.json"]
    assert "10 images in 2 shards of 5" in done.stderr and '"images": 10' in done.stderr
    assert f"models:/{name}@champion is version {version}: " in done.stderr  # unpublished: MLflow's copy, checked

    # published: the signed, stamped copy at the version's storage URI is what runs, checked against its digest
    from training.registry import DIGEST_TAG, STORAGE_URI_TAG
    from maskrcnn.signature import generate_keypair, load_private_key

    generate_keypair(tmp_path / "key.pem", tmp_path / "key.pub")
    published = open_package(serving_package).stamped({"model_name": name, "model_version": version}).signed(
        load_private_key(tmp_path / "key.pem"))
    published.save(tmp_path / "published")
    for path in (tmp_path / "published").iterdir():
        upload_object(f"{prefix}/v{version}/{path.name}", path)
    client.set_model_version_tag(name, version, STORAGE_URI_TAG, f"{prefix}/v{version}")
    client.set_model_version_tag(name, version, DIGEST_TAG, "sha256:" + "0" * 64)
    wrong = _batch(f"{prefix}/in", f"{prefix}/out2", "--model", f"models:/{name}@champion", env=env)
    assert wrong.returncode == 2 and f"the version records {DIGEST_TAG}=sha256:000" in wrong.stderr, wrong.stderr[-2000:]
    assert f"the package at {prefix}/v{version}" in wrong.stderr
    client.set_model_version_tag(name, version, DIGEST_TAG, published.digest)
    generate_keypair(tmp_path / "other.pem", tmp_path / "other.pub")
    unsigned = _batch(f"{prefix}/in", f"{prefix}/out2", "--model", f"models:/{name}@champion", "--public-keys",
                      str(tmp_path / "other.pub"), env=env)
    assert unsigned.returncode == 2 and "signature" in unsigned.stderr.lower(), unsigned.stderr[-2000:]
    signed = _batch(f"{prefix}/in", f"{prefix}/out2", "--model", f"models:/{name}@champion", "--public-keys",
                    str(tmp_path / "key.pub"), "--shard-size", "10", env=env)
    assert signed.returncode == 0, signed.stderr[-3000:]
    assert f"is version {version}: {prefix}/v{version} (digest {published.digest})" in signed.stderr


def test_one_run_per_output_and_resume_keyed_by_sizes_and_etags(images, tmp_path):
    """No Ray: the plan's manifest is created with a conditional write (of two runs, one starts), and images
    changed under the same names make another run."""
    import shutil
    import threading

    from batch import store
    from batch.runner import pending
    from batch.shards import BatchError, Plan, Settings, list_images

    folder = Path(shutil.copytree(images, tmp_path / "images"))
    names, versions = list_images(str(folder))
    plan = lambda package, out: Plan(str(folder), str(out), package, Settings(shard_size=4), names, versions)  # noqa: E731
    assert len(pending(plan("a" * 64, tmp_path / "out"))) == 3
    with pytest.raises(BatchError, match="holds another run's results \\(package_sha256sums differ\\)"):
        pending(plan("b" * 64, tmp_path / "out"))
    assert len(pending(plan("a" * 64, tmp_path / "out"))) == 3  # the same run resumes
    # one image rewritten under its name: its size or mtime differ, so it is another run
    target = sorted(folder.rglob("*.png"))[0]
    target.write_bytes(target.read_bytes() + b"\0")
    changed = Plan(str(folder), str(tmp_path / "out"), "a" * 64, Settings(shard_size=4), *list_images(str(folder)))
    with pytest.raises(BatchError, match="images were added, removed or changed under the same names"):
        pending(changed)
    # the manifest's create is conditional: of 8 writers at once, exactly one wins
    for trial in range(3):
        wins, barrier = [], threading.Barrier(8)

        def race(i: int) -> None:
            barrier.wait()
            wins.append(store.create(str(tmp_path / f"race{trial}"), "manifest.json", f"{i}".encode()))

        threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(wins) == [False] * 7 + [True]
        assert sorted(p.name for p in (tmp_path / f"race{trial}").iterdir()) == ["manifest.json"]


def test_overlays_keep_the_source_suffix(tmp_path):
    """a.jpg and a.png are two images: two overlay files, not one overwritten."""
    from batch.runner import ShardRunner
    from batch.shards import Settings
    from maskrcnn.labels import LabelMap

    runner = object.__new__(ShardRunner)
    runner.output, runner.settings, runner.label_map = str(tmp_path), Settings(overlays=True, masks=True), LabelMap([1], ["a"])
    pred = {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32), "labels": np.zeros(0, np.int64), "masks": []}
    for name, value in (("a.jpg", 10), ("a.png", 200)):
        runner._pictures(name, np.full((8, 8, 3), value, np.uint8), pred)
    assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == ["a.jpg.png", "a.png.png"]
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["a.jpg.png", "a.png.png"]


@pytest.mark.slow
def test_as_a_ray_job_on_the_two_node_cluster(ray_nodes, images, serving_package, mlflow_stack):
    """Submitted through the Jobs API with the token, as training is; the job's driver runs on the head and
    its actors on the cluster's nodes, reading and writing S3."""
    from maskrcnn.storage import list_objects, upload_object

    env = {**mlflow_stack.env(), **ray_nodes.client_env()}
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    prefix = f"s3://{mlflow_stack.state.models_bucket}/batch-job-{time.time_ns()}"
    for path in sorted(images.rglob("*.png")):
        upload_object(f"{prefix}/in/{path.relative_to(images).as_posix()}", path)
    for path in serving_package.iterdir():
        upload_object(f"{prefix}/package/{path.name}", path)
    done = _batch(f"{prefix}/in", f"{prefix}/out", "--package", f"{prefix}/package", "--shard-size", "5",
                  "--concurrency", "2", "--threads", "1", "--address", ray_nodes.jobs_url, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "submitted Ray job maskrcnn-batch-" in done.stderr and "done: " in done.stderr
    keys = {o.key.rsplit("/", 1)[-1] for o in list_objects(f"{prefix}/out")}
    assert {"manifest.json", "shard-00000.json", "shard-00001.json"} <= keys
