"""The package's `detector.onnx`: written by the package writer, checked against eager PyTorch on the
package's probe, run by a real ONNX Runtime; refused when it does not match its checksum; absent without
breaking serving."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.ops.poolers

from maskrcnn.config import CONFIG_DIR, load_config
from maskrcnn.labels import LabelMap
from maskrcnn.model import build_model
from maskrcnn.onnx_runtime import ONNX_FILE, OUTPUTS, OnnxDetector, detection_mismatch
from training.onnx_export import OnnxExportError, export_onnx
from maskrcnn.package import CHECKSUM_FILE, PackageError, open_package
from training.export import write_package


def _write(folder: Path, config_path: Path, onnx: bool = True) -> Path:
    """A package of a seeded, untrained model with the config at `config_path`, written to `folder`."""
    config = load_config(config_path, [])
    torch.manual_seed(0)
    labels = LabelMap([1, 2, 3], ["circle", "square", "triangle"])
    write_package(build_model(config.model, labels.num_classes), config, labels, {"epoch": 1}, folder, onnx=onnx)
    return folder


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    from helpers import TINY

    return _write(tmp_path_factory.mktemp("onnx") / "package", TINY)


def _run(graph: OnnxDetector, batch) -> dict[str, torch.Tensor]:
    """The graph on the first image of a transformed batch, as `model.roi_heads` returns detections."""
    size = np.asarray(batch.image_sizes[0], np.int64)
    return dict(zip(OUTPUTS, (torch.from_numpy(o) for o in graph.run(batch.tensors[:1].numpy(), size))))


def _picture(h: int, w: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 0.1, np.float32)
    img[h // 6:h // 2, w // 5:w // 2] = rng.uniform(0.5, 1.0, 3)
    img[h // 2:h - 4, w // 2:w - 3] = rng.uniform(0.5, 1.0, 3)
    return torch.from_numpy(img).permute(2, 0, 1).contiguous()


@pytest.mark.parametrize("config", ["tiny", "default"])
def test_the_graph_gives_the_eager_networks_detections(config, tmp_path):
    """For the tests' and the main job's architectures: ONNX Runtime returns eager PyTorch's boxes,
    labels, scores and mask probabilities, on a square image, on one padded to a multiple of 32 (size before
    padding != tensor size), and on a blank one (these random models find instances even there; an
    empty result is tested below)."""
    from helpers import TINY

    original_merge = torchvision.ops.poolers._onnx_merge_levels
    opened = open_package(_write(tmp_path / "pkg", TINY if config == "tiny" else CONFIG_DIR / "default.yaml"))
    assert torchvision.ops.poolers._onnx_merge_levels is original_merge  # the export's swap is undone
    model, cfg = opened.build_model(), opened.config
    graph = OnnxDetector(opened.graph, threads=2)
    assert graph.threads == 2
    side = cfg.model.max_size
    counts = []
    for image in (_picture(side, side, 0), _picture(side, side * 2 // 3 + 1, 1), torch.zeros(3, side, side)):
        batch, _ = model.transform([image])
        with torch.inference_mode():
            features = model.backbone(batch.tensors)
            proposals, _ = model.rpn(batch, features)
            (expected,), _ = model.roi_heads(features, proposals, batch.image_sizes)
        got = _run(graph, batch)
        counts.append(len(expected["boxes"]))
        assert detection_mismatch(got, expected) == ""
        if config == "tiny":  # its random scores are far apart: the same order too
            for key in ("boxes", "scores", "masks"):
                assert torch.allclose(got[key], expected[key], atol=1e-3), key
            assert torch.equal(got["labels"], expected["labels"])
    assert min(counts) > 0, counts


def test_a_graph_with_no_detections(tmp_path):
    """A model whose box score threshold nothing passes: the graph returns empty outputs of the right
    shapes, and `detect` an empty prediction."""
    from helpers import TINY
    from maskrcnn.processing import detect

    model = open_package(_write(tmp_path / "pkg", TINY, onnx=False)).build_model()
    model.roi_heads.score_thresh = 1.0
    export_onnx(model, tmp_path / ONNX_FILE)
    graph = OnnxDetector((tmp_path / ONNX_FILE).read_bytes(), threads=1)
    batch, _ = model.transform([_picture(64, 64, 0)])
    out = _run(graph, batch)
    assert out["boxes"].shape == (0, 4) and out["masks"].shape == (0, 1, 28, 28) and out["labels"].shape == (0,)
    pred = detect(graph.run, _picture(64, 48, 0).permute(1, 2, 0).numpy(), 64, 64, 0.5)
    assert len(pred["scores"]) == 0 and pred["masks"] == []


def test_an_image_with_nothing_after_one_with_detections_gives_none(package, tmp_path):
    """No stale or invented detection when the model finds nothing (OpenVINO 2026.4 returns the previous
    image's first detection in this case: benchmarks/RESULTS.md). The box score threshold is set between
    the tiny model's best score on a blank image and on a picture, so one has detections and the other none."""
    model = open_package(package).build_model()
    picture, blank = _picture(64, 64, 0), torch.zeros(3, 64, 64)
    with torch.inference_mode():
        best = [float(model([image])[0]["scores"].max()) for image in (picture, blank)]
    assert best[0] - best[1] > 1e-4, best
    model.roi_heads.score_thresh = (best[0] + best[1]) / 2
    export_onnx(model, tmp_path / ONNX_FILE)
    graph = OnnxDetector((tmp_path / ONNX_FILE).read_bytes(), threads=1)
    for image, found in ((picture, True), (blank, False), (picture, True), (blank, False)):
        out = _run(graph, model.transform([image])[0])
        assert (len(out["scores"]) > 0) == found and len(out["boxes"]) == len(out["scores"])


def test_a_changed_graph_is_refused(package, tmp_path):
    copy = shutil.copytree(package, tmp_path / "pkg")
    data = bytearray((copy / ONNX_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the weights
    (copy / ONNX_FILE).write_bytes(bytes(data))
    with pytest.raises(PackageError, match=r"detector\.onnx: sha256 .* does not match"):
        open_package(copy)


def test_a_package_without_the_graph_is_served_eagerly(tmp_path):
    """A package without a graph (its export failed, or `--no-onnx`): served by eager PyTorch with `auto`;
    refused with `onnxruntime`, which needs the graph."""
    from helpers import TINY
    from serving.predictor import MaskRCNNPredictor

    copy = _write(tmp_path / "pkg", TINY, onnx=False)
    assert ONNX_FILE not in open_package(copy).checksums
    auto = MaskRCNNPredictor("m", str(copy), score_threshold=0.0)
    assert auto.load() and auto.graph is None and auto.torch_threads >= 1
    (result,) = auto.infer([(_picture(64, 64, 0).permute(1, 2, 0).numpy() * 255).astype(np.uint8)], 0.0, 5, False)
    assert result["width"] == 64
    with pytest.raises(PackageError, match="backend onnxruntime needs the package's detector.onnx"):
        MaskRCNNPredictor("m", str(copy), backend="onnxruntime").load()
    with pytest.raises(ValueError, match="backend: expected one of"):
        MaskRCNNPredictor("m", str(copy), backend="tensorrt")


def test_a_graph_file_the_checksums_do_not_list_is_refused(package, tmp_path):
    """It used to be ignored with a warning; a file that nobody vouches for now refuses the package."""
    copy = shutil.copytree(package, tmp_path / "pkg")
    sums = (copy / CHECKSUM_FILE).read_text().splitlines()
    (copy / CHECKSUM_FILE).write_text("\n".join(line for line in sums if not line.endswith(ONNX_FILE)) + "\n")
    with pytest.raises(PackageError, match=r"pkg/detector\.onnx: not listed in SHA256SUMS"):
        open_package(copy)


def test_checksums_naming_other_files_are_refused(package, tmp_path):
    copy = shutil.copytree(package, tmp_path / "pkg")
    with (copy / CHECKSUM_FILE).open("a") as sums:
        sums.write(f"{'0' * 64}  ../../etc/passwd\n")
    with pytest.raises(PackageError, match=r"SHA256SUMS line 7: expected '<64 lowercase hex digits>  <file name>', "
                                           r"got '0{64}  \.\./\.\./etc/passwd'"):
        open_package(copy)


def test_a_failed_export_leaves_a_package_without_the_graph(tmp_path, monkeypatch, caplog):
    """Fault injected into the exporter (torch.onnx.export raises, as it does for operators it cannot
    export): the package is still written, without the graph, and the reason is logged."""
    from helpers import TINY

    def unsupported(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'custom::op' to ONNX opset version 17 is not supported")

    monkeypatch.setattr(torch.onnx, "export", unsupported)
    with caplog.at_level(logging.WARNING, logger="maskrcnn.package"):
        out = _write(tmp_path / "pkg", TINY)
    assert not (out / ONNX_FILE).exists() and ONNX_FILE not in open_package(out).checksums
    assert "will be served by eager PyTorch" in caplog.text and "custom::op" in caplog.text


def test_a_graph_that_disagrees_with_eager_is_not_kept(package, tmp_path, monkeypatch):
    """The export's check can fail: a runtime that returns other scores (injected) leaves no file."""
    model = open_package(package).build_model()
    run = OnnxDetector.run

    def shifted(self, images, size, timeout_s=None):
        boxes, labels, scores, masks = run(self, images, size, timeout_s)
        return boxes, labels, scores + 0.01, masks

    monkeypatch.setattr(OnnxDetector, "run", shifted)
    with pytest.raises(OnnxExportError, match=r"ONNX Runtime's detections differ from eager PyTorch's: probe input 0 "
                                              r"\(1x3x64x64\): detection 0 \(label \d, score 0\.\d+, box .*\) has no "
                                              r"counterpart within 0\.001"):
        export_onnx(model, tmp_path / ONNX_FILE)
    assert not (tmp_path / ONNX_FILE).exists()


def test_the_graph_is_not_a_pickle_and_reads_no_other_file(package):
    """The graph is a protobuf with its weights inside (no external data), read from verified bytes."""
    import onnx

    proto = onnx.load_from_string((package / ONNX_FILE).read_bytes())
    external = [t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external == [] and [i.name for i in proto.graph.input] == ["images", "image_size"]
    assert json.loads((package / "metadata.json").read_text())["epoch"] == 1


@pytest.mark.parametrize("device, available, gpu, providers, why", [
    ("cpu", ["CUDAExecutionProvider", "CPUExecutionProvider"], True, ["CPUExecutionProvider"], "--device cpu"),
    ("auto", ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], True,
     ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], "on the GPU"),
    ("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"], True, ["CUDAExecutionProvider", "CPUExecutionProvider"], "on the GPU"),
    ("auto", ["CPUExecutionProvider"], True, ["CPUExecutionProvider"], "no CUDAExecutionProvider"),
    ("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"], False, ["CPUExecutionProvider"], "no NVIDIA GPU is visible"),
    ("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"], True, ["CUDAExecutionProvider", "CPUExecutionProvider"], "on the GPU"),
])
def test_the_execution_providers_follow_the_device_and_what_is_there(device, available, gpu, providers, why):
    from maskrcnn.onnx_runtime import execution_providers

    chosen, reason = execution_providers(device, available, gpu)
    assert chosen == providers and why in reason, reason


def test_a_gpu_asked_for_and_not_there_is_refused_not_replaced_by_the_cpu(tmp_path):
    from maskrcnn.onnx_runtime import GraphError, execution_providers, gpu_visible

    with pytest.raises(GraphError, match="--device cuda: no NVIDIA GPU is visible"):
        execution_providers("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"], False)
    with pytest.raises(GraphError, match="--device cuda: this onnxruntime has no CUDAExecutionProvider .*onnxruntime-gpu"):
        execution_providers("cuda", ["CPUExecutionProvider"], True)
    with pytest.raises(GraphError, match="device: expected one of auto, cpu, cuda"):
        execution_providers("tpu", ["CPUExecutionProvider"], True)
    assert not gpu_visible(tmp_path)
    (tmp_path / "nvidiactl").touch()  # the control device alone is not a GPU
    assert not gpu_visible(tmp_path)
    (tmp_path / "nvidia0").touch()
    assert gpu_visible(tmp_path)


def test_the_predictor_on_this_machine_runs_the_graph_on_the_cpu_and_says_why(package, caplog):
    """No GPU here: auto falls back to the CPU and logs why; cuda is refused at load, so the pod never becomes
    ready on a node without the GPU it was meant to have."""
    from serving.predictor import MaskRCNNPredictor
    from maskrcnn.onnx_runtime import GraphError

    caplog.set_level(logging.INFO, logger="maskrcnn.onnx_runtime")
    model = MaskRCNNPredictor("maskrcnn", str(package), device="auto")
    assert model.load() and model.graph.providers == ["CPUExecutionProvider"]
    assert any("the graph runs on the CPU: no NVIDIA GPU is visible" in r.message for r in caplog.records)
    with pytest.raises(GraphError, match="--device cuda"):
        MaskRCNNPredictor("maskrcnn", str(package), device="cuda").load()
    # the eager network follows --device too: on the GPU when PyTorch sees one, refused without it
    with pytest.raises(GraphError, match="--device cuda: PyTorch sees no CUDA device"):
        MaskRCNNPredictor("maskrcnn", str(package), backend="eager", device="cuda").load()
    eager = MaskRCNNPredictor("maskrcnn", str(package), backend="eager", device="auto")
    assert eager.load() and eager.graph is None
