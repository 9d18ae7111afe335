"""The model card (training.model_card): what it says, what it names as limitations, how it travels in the
package (listed in SHA256SUMS, refused when it is not text) and how it fits MLflow's version description.
The card of a real training run, and the registered version's description, are checked in test_train_ray."""

from __future__ import annotations

import shutil

import pytest

from training.model_card import CARD_FILE, MAX_DESCRIPTION, CardInputs, limitations, render_card, version_description
from maskrcnn.package import PackageError, open_package


def _inputs(**changes) -> CardInputs:
    values = dict(
        name="maskrcnn", class_names=["circle", "square", "triangle"],
        metadata={"dataset_hash": "ab" * 32, "git_commit": "c" * 40, "mlflow_run_id": "r123"},
        config={"data": {"train": "gs://bucket/coco"}, "model": {"backbone": "resnet50_fpn", "min_size": 800, "max_size": 1333},
                "eval": {"mask_threshold": 0.5}, "train": {"epochs": 12}},
        metrics={"segm_mAP": 0.62, "segm_AP50": 0.85, "segm_AP75": 0.70, "bbox_mAP": 0.66, "mask_iou": 0.81,
                 "mask_recall": 0.77, "detections_per_image": 3.25, "segm_AP_circle": 0.8, "segm_AP_square": 0.75,
                 "segm_AP_triangle": 0.31, "bbox_AP_circle": 0.82, "bbox_AP_square": 0.7, "bbox_AP_triangle": 0.46},
        intervals={"segm_mAP": (0.58, 0.66), "segm_AP50": (0.8, 0.9), "segm_AP75": (0.64, 0.75)},
        stats={"train": {"images": 900, "instances": 4000, "crowd": 3, "per_class": {"circle": 1500, "square": 2488, "triangle": 12}},
               "val": {"images": 100, "instances": 450, "crowd": 0, "per_class": {"circle": 200, "square": 250, "triangle": 0}}},
        image_sizes=(320, 240, 1024, 768), resamples=1000, has_graph=True)
    values.update(changes)
    return CardInputs(**values)


def test_the_card_states_data_metrics_with_intervals_classes_config_and_commit():
    card = render_card(_inputs())
    for text in ("# Model card: maskrcnn", "## Intended use", "`circle`, `square`, `triangle`", f"`{'ab' * 32}`",
                 "Training: 900 images, 4000 instances (3 crowd); validation: 100 images, 450 instances (0 crowd)",
                 "320x240 to 1024x768 px", "`gs://bucket/coco`", "(1000 resamples)",
                 "| segm mAP | 0.620 [0.580, 0.660] |", "| segm AP50 | 0.850 [0.800, 0.900] |", "| bbox mAP | 0.660 |",
                 "| mask IoU (matched) | 0.810 |", "| detections per image | 3.2 |",
                 "| `circle` | 0.800 | 0.820 | 1500 | 200 |", "| `triangle` | 0.310 | 0.460 | 12 | 0 |",
                 f"Code commit: `{'c' * 40}`", "MLflow run: `r123`", "the ONNX graph", "## Training config",
                 "backbone: resnet50_fpn", "epochs: 12"):
        assert text in card, text


def test_limitations_follow_from_the_numbers():
    items = limitations(_inputs())
    text = "\n".join(items)
    assert "`triangle` has no validation instance: it is not evaluated." in text
    assert "`triangle` has only 12 training instances." in text
    assert "square" not in text and "circle" not in text  # good classes are not named
    assert "synthetic" not in text and "known only to within" not in text and "coarse" not in text
    assert "from 320x240 to 1024x768 px" in items[-1] and "shorter side of 800 px" in items[-1]
    weak = limitations(_inputs(intervals={"segm_mAP": (0.41, 0.83)}, config={"data": {"train": ""}, "model": {}},
                               metrics={**_inputs().metrics, "segm_AP_square": 0.2, "segm_AP75": 0.3}))
    text = "\n".join(weak)
    assert "embedded synthetic dataset" in text
    assert "known only to within [0.410, 0.830] (95%)" in text and "100 images" in text
    assert "`square` is weak: segm AP 0.200 against the mean 0.620" in text
    assert "Masks are coarse: AP75 0.300 is under half of AP50 0.850" in text


def test_the_reports_confusions_and_threshold_sweep_become_limitations():
    inputs = _inputs(confusions=[("circle", "square", 30, 200), ("square", "missed", 100, 250), ("circle", "missed", 5, 200)],
                     best_f1=(0.25, 0.81), score_threshold=0.5)
    text = "\n".join(limitations(inputs))
    assert "`circle` is taken for `square`: 30 of its 200 validation instances." in text
    assert "`square`: 100 of its 250 validation instances are missed at score 0.5." in text
    assert "5 of its 200" not in text  # under a tenth: not named
    assert "The best F1 (0.810) is at score threshold 0.25, not 0.5" in text
    assert "best F1" not in "\n".join(limitations(_inputs(best_f1=(0.45, 0.8))))


def test_card_inputs_read_the_report(split_and_report):
    inputs = split_and_report
    assert inputs.best_f1 is not None and all(c[3] > 0 for c in inputs.confusions)


@pytest.fixture
def split_and_report(serving_package, tmp_path):
    """The card's inputs from a real evaluation report (the untrained package on a synthetic split)."""
    from maskrcnn.config import EvalConfig, SyntheticConfig
    from training.data.coco import load_coco
    from training.data.synthetic import synthetic_dataset
    from training.evaluate import evaluate_package, write_report
    from training.model_card import card_inputs

    _, val = synthetic_dataset(SyntheticConfig(num_train=2, num_val=6, image_size=96, seed=2), tmp_path)
    split = load_coco(val)
    package = open_package(serving_package)
    metrics, predictions = evaluate_package(package, split, EvalConfig(score_threshold=0.0))
    report = write_report(tmp_path / "r.html", split, predictions, EvalConfig(score_threshold=0.0), "t")
    inputs = card_inputs(package, split, {}, metrics, {}, 100, report)
    k = len(split.label_map.names)
    assert sum(c[2] for c in inputs.confusions) == int(report.confusion[:k].sum() - report.confusion[:k, :k].trace())
    return inputs


def test_the_version_description_puts_the_gate_first_drops_the_config_and_fits_mlflow():
    card = render_card(_inputs())
    description = version_description(card, "promoted: segm mAP 0.62 >= 0.5")
    assert description.startswith("**Gate:** promoted: segm mAP 0.62 >= 0.5\n\n# Model card: maskrcnn")
    assert "## Training config" not in description and "## Provenance" in description
    many = _inputs(class_names=[f"class_{i}" for i in range(200)])
    long = version_description(render_card(many))
    assert len(long) <= MAX_DESCRIPTION and long.endswith(f"(cut: the whole card is {CARD_FILE} in the version's package)\n")
    assert long.count("\n| `class_") < 200


def test_the_card_travels_in_the_package_listed_and_checked(serving_package, tmp_path):
    package = open_package(serving_package)
    carded = package.with_card(render_card(_inputs()))
    folder = carded.save(tmp_path / "carded")
    reread = open_package(folder)
    assert reread.card == carded.card and CARD_FILE in reread.checksums
    assert reread.files["model.pt"] == package.files["model.pt"]  # nothing else changes
    # edited after the checksums were written: refused by name
    (folder / CARD_FILE).write_text(reread.card + "\nan edit\n")
    with pytest.raises(PackageError, match=f"{CARD_FILE}: sha256 .* does not match"):
        open_package(folder)
    # not text: refused by name, with the rule
    bad = shutil.copytree(serving_package, tmp_path / "bad")
    broken = package.with_card("x")
    files = {**broken.files, CARD_FILE: b"\xff\xfe not utf-8"}
    from maskrcnn.package import with_checksums

    for name, data in with_checksums(files).items():
        (bad / name).write_bytes(data)
    with pytest.raises(PackageError, match=f"{CARD_FILE}: not UTF-8 text"):
        open_package(bad)
    with pytest.raises(PackageError, match="contains a NUL character"):
        package.with_card("a\x00b")


def test_a_package_scores_the_same_on_its_graph_and_its_weights_and_is_built_once(serving_package, tmp_path, monkeypatch):
    """`evaluate_package` turns the package into a network through `Package.network` (probe-checked), on the
    graph (`auto`) or the weights (`eager`): the same predictions within the graph's tolerance, and the eager
    model is built once, not once for the network and again for the evaluation."""
    from maskrcnn.config import EvalConfig, SyntheticConfig
    from maskrcnn.package import Package
    from training.data.coco import load_coco
    from training.data.synthetic import synthetic_dataset
    from training.evaluate import evaluate_package

    _, val = synthetic_dataset(SyntheticConfig(num_train=2, num_val=4, image_size=96, seed=3), tmp_path)
    split, package, cfg = load_coco(val), open_package(serving_package), EvalConfig(score_threshold=0.0)
    built, real = [], Package.build_model
    monkeypatch.setattr(Package, "build_model", lambda self: built.append(1) or real(self))
    graph_metrics, graph_predictions = evaluate_package(package, split, cfg)
    assert len(built) == 1  # the graph's run: the model only for its input sizes
    eager_metrics, eager_predictions = evaluate_package(package, split, cfg, backend="eager")
    assert len(built) == 2  # the eager run: once
    assert [len(p["scores"]) for p in graph_predictions] == [len(p["scores"]) for p in eager_predictions]
    assert graph_metrics["segm_mAP"] == pytest.approx(eager_metrics["segm_mAP"], abs=0.01)
