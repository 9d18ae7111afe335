"""The model's reference (`maskrcnn.reference`): computed from images and predictions as the predictor counts
them, carried in the package (checksummed), refused with the file, field and rule when it is wrong, and
exposed by the predictor as gauges whose `le` labels join the live histograms'."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from maskrcnn.reference import BUCKETS, REFERENCE_FILE, ReferenceError, compute_reference, parse_reference

NAMES = ["circle", "square", "triangle"]


def small_reference():
    white, black = np.full((40, 50, 3), 255, np.uint8), np.zeros((40, 50, 3), np.uint8)
    predictions = [{"scores": np.array([0.3, 0.9, 0.6]), "labels": np.array([1, 1, 2])},  # 0.3: under the threshold
                   {"scores": np.array([]), "labels": np.array([], int)}]
    return compute_reference([white, black], predictions, NAMES)


def test_the_reference_counts_what_the_predictor_returns():
    ref = small_reference()
    assert ref.images == 2 and ref.detections == 2 and ref.score_threshold == 0.5
    assert ref.stats["brightness"].mean == pytest.approx(0.5)
    fractions = dict(zip(BUCKETS["brightness"], ref.stats["brightness"].fractions))
    assert fractions[0.05] == 0.5 and fractions[0.95] == 0.5 and fractions[1.0] == 1.0  # black <= 0.05, white at 1
    assert ref.stats["detections_per_image"].mean == 1.0
    assert dict(zip(BUCKETS["detections_per_image"], ref.stats["detections_per_image"].fractions))[0.0] == 0.5
    assert ref.stats["score"].mean == pytest.approx(0.75)
    assert dict(zip(BUCKETS["score"], ref.stats["score"].fractions))[0.6] == 0.5
    assert ref.classes == {"circle": 0.5, "square": 0.5}
    assert ref.stats["megapixels"].mean == pytest.approx(0.002)
    top = compute_reference([np.zeros((8, 8, 3), np.uint8)], [{"scores": np.linspace(1, 0.6, 150), "labels": np.ones(150, int)}],
                            NAMES)
    assert top.detections == 100  # at most MAX_DETECTIONS per image, as served


def test_the_reference_round_trips_through_its_json():
    ref = small_reference()
    assert parse_reference(ref.to_json(), REFERENCE_FILE, NAMES) == ref


def broken(change) -> bytes:
    doc = json.loads(small_reference().to_json())
    change(doc)
    return json.dumps(doc).encode()


@pytest.mark.parametrize("change, message", [
    (lambda d: d["stats"]["brightness"].update(mean=math.nan), "stats.brightness.mean: nan is not a number in"),
    (lambda d: d["stats"]["score"]["fractions"].__setitem__(3, 1.5), r"stats.score.fractions\[3\]: 1.5 is not a number"),
    (lambda d: d["stats"]["contrast"]["fractions"].__setitem__(-1, 0.0), "stats.contrast.fractions: must not decrease"),
    (lambda d: d["stats"]["score"].update(fractions=[1.0]), "stats.score.fractions: expected 20 numbers"),
    (lambda d: d["buckets"]["score"].pop(), "buckets differ from this reader's"),
    (lambda d: d["classes"].update(dog=0.1), r"classes \['dog'\] are not in the label map"),
    (lambda d: d["classes"].update(circle=0.9), "class shares sum to 1.400000, expected 1"),
    (lambda d: d.pop("stats"), "expected an object with images, detections"),
    (lambda d: d.update(images=0), "images: 0 is not a number in"),
    (lambda d: d.update(images=True), "images: True is not a number"),
    (lambda d: d["stats"].pop("score"), "stats must have exactly"),
])
def test_a_bad_reference_is_refused_naming_the_field(change, message):
    with pytest.raises(ReferenceError, match=f"reference.json: .*{message}"):
        parse_reference(broken(change), REFERENCE_FILE, NAMES)


def test_a_package_carries_its_reference_checksummed_and_refuses_a_bad_one(serving_package, tmp_path):
    from maskrcnn.package import CHECKSUM_FILE, PackageError, with_checksums, open_package

    package = open_package(serving_package)
    assert package.reference is None  # optional: older packages have none
    with_ref = package.with_reference(small_reference())
    folder = with_ref.save(tmp_path / "pkg")
    read = open_package(folder)
    assert read.reference == small_reference() and REFERENCE_FILE in read.checksums
    assert {n: read.files[n] for n in ("model.pt", "probe.npz")} == {n: package.files[n] for n in ("model.pt", "probe.npz")}
    (folder / REFERENCE_FILE).write_bytes(broken(lambda d: d["classes"].update(dog=0.1)))
    with pytest.raises(PackageError, match="reference.json: sha256"):  # changed after it was listed
        open_package(folder)
    files = with_checksums({**read.files, REFERENCE_FILE: (folder / REFERENCE_FILE).read_bytes()})
    (folder / CHECKSUM_FILE).write_bytes(files[CHECKSUM_FILE])
    with pytest.raises(PackageError, match=r"pkg/reference.json: classes \['dog'\] are not in the label map"):
        open_package(folder)


def test_the_predictor_exposes_the_reference_beside_the_live_histograms(serving_package, tmp_path):
    from devstack.load import parse_metrics
    from prometheus_client import generate_latest
    from serving.predictor import MaskRCNNPredictor
    from maskrcnn.package import open_package

    folder = open_package(serving_package).stamped({"model_version": "ref-1"}).with_reference(small_reference()).save(tmp_path / "p")
    predictor = MaskRCNNPredictor("maskrcnn", str(folder), score_threshold=0.0)
    assert predictor.load()
    predictor.infer([np.full((32, 32, 3), 200, np.uint8)], 0.0, 5, False)
    samples = parse_metrics(generate_latest().decode())
    mine = {k: v for k, v in samples.items() if ("model_version", "ref-1") in k[1]}
    name = ("model_name", "maskrcnn")
    assert mine[("maskrcnn_reference_images", (name, ("model_version", "ref-1")))] == 2
    assert mine[("maskrcnn_reference_mean", (name, ("model_version", "ref-1"), ("statistic", "brightness")))] == pytest.approx(0.5)
    assert mine[("maskrcnn_reference_class_share", (("label", "circle"), name, ("model_version", "ref-1")))] == 0.5
    live = {(n, dict(ls)["le"]) for n, ls in mine if n.endswith("_bucket") and n != "maskrcnn_reference_bucket"}
    for statistic, histogram in (("brightness", "maskrcnn_input_brightness_bucket"), ("score", "maskrcnn_detection_score_bucket"),
                                 ("detections_per_image", "maskrcnn_detections_per_image_bucket")):
        reference_les = {dict(ls)["le"] for n, ls in mine if n == "maskrcnn_reference_bucket" and dict(ls)["statistic"] == statistic}
        assert reference_les == {le for n, le in live if n == histogram}, statistic  # one `le` each side: rules can join
