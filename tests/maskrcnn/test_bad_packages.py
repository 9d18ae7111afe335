"""A corpus of hostile serving packages, each built from a good one the way anyone who can write the bucket
or the MLflow artifacts could plant it (with SHA256SUMS recomputed to match, unless the case is about the
checksums). Each is refused by the one reader with the file and the rule named, and the predictor never
becomes ready on it; the legitimate oddities are served."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper

from serving.predictor import MaskRCNNPredictor
from maskrcnn.onnx_runtime import ONNX_FILE, OUTPUTS
from maskrcnn.package import CHECKSUM_FILE, FILES, PackageError, open_package


def resum(folder: Path) -> None:
    """Recompute SHA256SUMS over the listed files present, as an attacker with write access would."""
    names = [n for n in FILES if (folder / n).exists()]
    (folder / CHECKSUM_FILE).write_text("".join(f"{hashlib.sha256((folder / n).read_bytes()).hexdigest()}  {n}\n"
                                                for n in names))


def edit_yaml(folder: Path, change: Callable[[dict], None]) -> None:
    tree = yaml.safe_load((folder / "config.yaml").read_text())
    change(tree)
    (folder / "config.yaml").write_text(yaml.safe_dump(tree))
    resum(folder)


def edit_json(folder: Path, name: str, value) -> None:
    (folder / name).write_text(json.dumps(value))
    resum(folder)


def constant_graph(label: int = 1, score: float = 0.99, slow: int = 0, external: str = "", domain: str = "",
                   loop: bool = False) -> bytes:
    """A graph with the detector's inputs and outputs that answers one fixed detection for every image
    ("circle 0.99 everywhere"); `slow` chains that many 2048x2048 matrix products first; `external` keeps
    a tensor's bytes in that file; `domain` adds a node of a custom operator domain; `loop` adds a Loop."""
    nodes, inits = [], []
    consts = {"boxes": np.array([[0, 0, 10, 10]], np.float32), "labels": np.array([label], np.int64),
              "scores": np.array([score], np.float32), "masks": np.ones((1, 1, 28, 28), np.float32)}
    for name, value in consts.items():
        nodes.append(helper.make_node("Constant", [], [f"{name}_c"], value=onnx.numpy_helper.from_array(value)))
    if slow:  # the chain starts from the image, so that ONNX Runtime cannot fold it into a constant at load
        nodes.append(helper.make_node("ConstantOfShape", ["side"], ["ones"],
                                      value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1e-4])))
        nodes.append(helper.make_node("ReduceMax", ["images"], ["pixel"], keepdims=0))
        nodes.append(helper.make_node("Mul", ["ones", "pixel"], ["m0"]))
        inits.append(onnx.numpy_helper.from_array(np.array([2048, 2048], np.int64), "side"))
        for i in range(slow):
            nodes.append(helper.make_node("MatMul", [f"m{i}", f"m{i}"], [f"m{i + 1}"]))
        nodes.append(helper.make_node("ReduceMax", [f"m{slow}"], ["mx"], keepdims=0))
        nodes.append(helper.make_node("Mul", ["mx", "zero"], ["z"]))
        inits.append(onnx.numpy_helper.from_array(np.array(0, np.float32), "zero"))
        nodes.append(helper.make_node("Add", ["scores_c", "z"], ["scores_s"]))
    outputs = {n: f"{n}_c" for n in OUTPUTS} | ({"scores": "scores_s"} if slow else {})
    for name in OUTPUTS:
        nodes.append(helper.make_node("Identity", [outputs[name]], [name]))
    if external:
        tensor = onnx.numpy_helper.from_array(np.zeros(4, np.float32), "leak")
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        tensor.external_data.add(key="location", value=external)
        inits.append(tensor)
    if domain:
        nodes.append(helper.make_node("Leak", ["images"], ["leaked"], domain=domain))
    if loop:
        body = helper.make_graph([helper.make_node("Identity", ["cond_in"], ["cond_out"])], "body",
                                 [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                                  helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
                                 [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, [])])
        nodes.append(helper.make_node("Loop", ["", "true"], [], body=body))
        inits.append(onnx.numpy_helper.from_array(np.array(True), "true"))
    graph = helper.make_graph(
        nodes, "detector",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, "h", "w"]),
         helper.make_tensor_value_info("image_size", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info(n, {"labels": TensorProto.INT64}.get(n, TensorProto.FLOAT), None) for n in OUTPUTS],
        inits)
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def put_graph(folder: Path, graph: bytes) -> None:
    (folder / ONNX_FILE).write_bytes(graph)
    resum(folder)


def compressed_weights(folder: Path) -> None:
    """model.pt re-zipped with deflate: the same tensors, 1000x smaller for a zero-filled bomb."""
    src = zipfile.ZipFile(folder / "model.pt")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            out.writestr(info.filename, src.read(info))
    (folder / "model.pt").write_bytes(buf.getvalue())
    resum(folder)


def pickled_weights(folder: Path) -> None:
    import torch

    torch.save({"payload": Path("/etc/passwd")}, folder / "model.pt")  # a class outside the weights allow-list
    resum(folder)


def pickled_probe(folder: Path) -> None:
    arrays = dict(np.load(folder / "probe.npz"))
    arrays["images_0"] = np.array([{"code": "x"}], dtype=object)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    (folder / "probe.npz").write_bytes(buf.getvalue())
    resum(folder)


def duplicate_line(folder: Path) -> None:
    """A second line for model.pt naming the digest of other bytes: `sha256sum -c` rejects the file; the old
    loader took the last line."""
    good = (folder / CHECKSUM_FILE).read_text()
    (folder / "model.pt").write_bytes((folder / "model.pt").read_bytes() + b"x")
    digest = hashlib.sha256((folder / "model.pt").read_bytes()).hexdigest()
    (folder / CHECKSUM_FILE).write_text(good + f"{digest}  model.pt\n")


def symlink(name: str, target: str) -> Callable[[Path], None]:
    def plant(folder: Path) -> None:
        outside = folder.parent / f"outside-{name}"
        shutil.copy(folder / name if target == "copy" else target, outside)
        (folder / name).unlink()
        (folder / name).symlink_to(outside)
    return plant


def fifo(folder: Path) -> None:
    (folder / "label_map.json").unlink()
    os.mkfifo(folder / "label_map.json")


def folder_for_file(folder: Path) -> None:
    (folder / "config.yaml").unlink()
    (folder / "config.yaml").mkdir()


def extra_file(folder: Path) -> None:
    (folder / ".env").write_text("AWS_SECRET_ACCESS_KEY=x\n")


def alias_bomb(folder: Path) -> None:
    """2 KB of YAML aliases that expand to hundreds of MB (a billion-laughs document)."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [{', '.join(['*' + prev] * 9)}]")
    (folder / "config.yaml").write_text("\n".join(lines) + "\n")
    resum(folder)


def oversized_config(folder: Path) -> None:
    (folder / "config.yaml").write_text((folder / "config.yaml").read_text() + "#" * (70 << 10) + "\n")
    resum(folder)


def labels(cats: list[tuple[int, int, str]]) -> Callable[[Path], None]:
    return lambda folder: edit_json(folder, "label_map.json",
                                    {"categories": [{"label": l, "id": i, "name": n} for l, i, n in cats]})


def metadata(**updates) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        meta = json.loads((folder / "metadata.json").read_text())
        meta.update(updates)
        edit_json(folder, "metadata.json", {k: v for k, v in meta.items() if v is not None})
    return change


def config(section: str, field: str, value) -> Callable[[Path], None]:
    return lambda folder: edit_yaml(folder, lambda tree: tree[section].__setitem__(field, value))


# (case, how to plant it, what the error must say: file and rule)
REFUSED = [
    ("graph answering circle 0.99 everywhere", lambda f: put_graph(f, constant_graph()),
     r"does not answer the package's probe as its weights did at export.*probe input 0"),
    ("graph answering background (label 0)", lambda f: put_graph(f, constant_graph(label=0)),
     r"does not answer the package's probe"),
    ("graph with a loop", lambda f: put_graph(f, constant_graph(loop=True)),
     r"detector\.onnx: node '' is a Loop; loops are not allowed"),
    ("graph reading .env as external data", lambda f: put_graph(f, constant_graph(external=".env")),
     r"detector\.onnx: tensor 'leak' keeps its data in an external file \(\['\.env'\]\)"),
    ("graph reading an absolute path", lambda f: put_graph(f, constant_graph(external="/etc/passwd")),
     r"detector\.onnx: tensor 'leak' keeps its data in an external file"),
    ("graph with a custom operator domain", lambda f: put_graph(f, constant_graph(domain="com.evil")),
     r"detector\.onnx: imports operator domain 'com\.evil'"),
    ("graph that is not ONNX", lambda f: put_graph(f, b"\x08\x07not a graph" * 10), r"detector\.onnx: not an ONNX model"),
    ("duplicate SHA256SUMS line", duplicate_line, r"SHA256SUMS line 7: model\.pt is listed twice"),
    ("malformed SHA256SUMS line", lambda f: (f / CHECKSUM_FILE).write_text("abc  model.pt\n"),
     r"SHA256SUMS line 1: expected '<64 lowercase hex digits>  <file name>'"),
    ("SHA256SUMS without a trailing newline", lambda f: (f / CHECKSUM_FILE).write_text((f / CHECKSUM_FILE).read_text()[:-1]),
     r"SHA256SUMS: expected lines ending in a newline"),
    ("SHA256SUMS missing the probe", lambda f: (f / CHECKSUM_FILE).write_text(
        "".join(l + "\n" for l in (f / CHECKSUM_FILE).read_text().splitlines() if "probe" not in l)),
     r"SHA256SUMS: no checksum for probe\.npz"),
    ("model.pt a symlink out of the package", symlink("model.pt", "copy"),
     r"model\.pt: a symbolic link; a package holds regular files only"),
    ("label_map.json a symlink to /etc/hostname", symlink("label_map.json", "/etc/hostname"),
     r"label_map\.json: a symbolic link; a package holds regular files only"),
    ("label_map.json a FIFO", fifo, r"label_map\.json: not a regular file"),
    ("config.yaml a folder", folder_for_file, r"config\.yaml: .*a package holds regular files only"),
    ("an unlisted .env beside the files", extra_file, r"/\.env: not part of a serving package"),
    ("deflate-compressed model.pt", compressed_weights,
     r"model\.pt: record .* is compressed; records must be stored uncompressed"),
    ("model.pt with pickled code", pickled_weights, r"model\.pt: not a weights-only state_dict"),
    ("probe.npz with a pickled object array", pickled_probe, r"probe\.npz: .*(pickle|Object arrays)"),
    ("YAML alias bomb", alias_bomb, r"config\.yaml: \d+ YAML alias\(es\); at most 0 are allowed"),
    ("config.yaml over its size limit", oversized_config, r"config\.yaml: \d+ bytes; at most 65536 are allowed"),
    ("min_size 100000", config("model", "min_size", 100000), r"config\.yaml: model\.min_size: expected 32 to 4096, got 100000"),
    ("max_size 100000", config("model", "max_size", 100000), r"config\.yaml: model\.max_size: expected 32 to 8192"),
    ("mask_threshold -1", config("eval", "mask_threshold", -1), r"config\.yaml: eval\.mask_threshold: expected 0\.001 to 0\.999, got -1"),
    ("mask_threshold NaN", config("eval", "mask_threshold", float("nan")), r"eval\.mask_threshold: expected 0\.001 to 0\.999, got nan"),
    ("representation_size 1e9", config("model", "representation_size", 1_000_000_000),
     r"config\.yaml: model\.representation_size: expected 8 to 16384, got 1000000000"),
    ("a backbone nobody knows", config("model", "backbone", "evilnet"), r"config\.yaml: model\.backbone: expected one of resnet50_fpn, .*, got 'evilnet'"),
    ("label map with gaps", labels([(1, 1, "circle"), (5, 2, "square"), (9, 3, "triangle")]),
     r"label_map\.json: labels \[1, 5, 9\]: expected exactly 1 to 3"),
    ("label map with a background label", labels([(0, 1, "bg"), (1, 2, "square"), (2, 3, "triangle")]),
     r"label_map\.json: labels \[0, 1, 2\]: expected exactly 1 to 3"),
    ("label map one class short of the head", labels([(1, 1, "circle"), (2, 2, "square")]),
     r"label_map\.json: 2 categories need a head of 3 outputs .* has 4"),
    ("label map with repeated names", labels([(1, 1, "circle"), (2, 2, "circle"), (3, 3, "triangle")]),
     r"label_map\.json: category names must be unique"),
    ("label map that is a list", lambda f: edit_json(f, "label_map.json", [1, 2]), r"label_map\.json: expected \{"),
    ("metadata without format_version", metadata(format_version=None),
     r"metadata\.json: format_version None is not supported.*export it again"),
    ("metadata of a future format", metadata(format_version=2), r"metadata\.json: format_version 2 is not supported"),
    ("metadata that is not JSON", lambda f: (f / "metadata.json").write_text("{") and resum(f),
     r"metadata\.json: not valid JSON"),
]


@pytest.fixture
def copy(serving_package, tmp_path) -> Path:
    return Path(shutil.copytree(serving_package, tmp_path / "pkg", symlinks=True))


@pytest.mark.parametrize("case, plant, rule", REFUSED, ids=[c[0] for c in REFUSED])
def test_a_hostile_package_is_refused_and_never_served(copy, case, plant, rule):
    plant(copy)
    if "answer the package's probe" not in rule:  # the reader itself refuses it (the probe's run is the predictor's)
        with pytest.raises(PackageError, match=rule):
            open_package(copy)
    predictor = MaskRCNNPredictor("maskrcnn", str(copy))
    with pytest.raises(PackageError, match=rule):
        predictor.load()
    assert not predictor.ready and predictor.network is None and predictor.graph is None and predictor.wide_graph is None


def test_a_graph_that_never_returns_is_stopped_and_refused(copy):
    """No loop, only a long chain of products (minutes on 2 cores): the probe's run is stopped at the probe
    timeout, and the predictor never becomes ready. The only inference thread is not held."""
    import time

    put_graph(copy, constant_graph(slow=400))
    predictor = MaskRCNNPredictor("maskrcnn", str(copy), probe_timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(PackageError, match=r"does not answer the package's probe .*ran longer than 0\.5 s and was stopped"):
        predictor.load()
    assert 0.5 <= time.monotonic() - started < 20 and not predictor.ready


def picture() -> np.ndarray:
    image = np.full((64, 64, 3), 30, np.uint8)
    image[16:40, 20:44] = (220, 60, 60)
    return image


# Legitimate oddities: served, and served correctly.
def unicode_names(folder: Path) -> None:
    labels([(1, 1, "cercle rouge"), (2, 2, "carré"), (3, 3, "三角形")])(folder)


def eager_only(folder: Path) -> None:
    (folder / ONNX_FILE).unlink()
    resum(folder)


def unknown_metadata(folder: Path) -> None:
    metadata(notes="retrained after incident 42", extra={"nested": [1, 2]})(folder)


@pytest.mark.parametrize("plant", [unicode_names, eager_only, unknown_metadata])
def test_a_legitimate_oddity_is_served(copy, plant):
    plant(copy)
    predictor = MaskRCNNPredictor("maskrcnn", str(copy), score_threshold=0.0)
    assert predictor.load() and predictor.ready
    (result,) = predictor.infer([picture()], 0.0, 5, False)
    names = set(predictor.label_map.names)
    assert result["detections"] and all(d["label"] in names for d in result["detections"])
    assert (predictor.graph is None) == (plant is eager_only)


def test_a_label_outside_the_label_map_is_a_model_failure(serving_predictor, monkeypatch):
    """Should a network past every check answer background (0) or a label beyond the map, the predictor
    answers 500, never some class (the old lookup served label 0 as the last class)."""
    from kserve.errors import InferenceError

    from maskrcnn.labels import LabelError, LabelMap

    run = serving_predictor.graph.run

    def relabelled(images, size, timeout_s=None):
        boxes, labels_, scores, masks = run(images, size, timeout_s)
        return boxes, np.zeros_like(labels_), scores, masks

    monkeypatch.setattr(serving_predictor, "network", relabelled)
    if serving_predictor.wide_graph is not None:  # several workers: a lone image runs on the wide session
        monkeypatch.setattr(serving_predictor.wide_graph, "run", relabelled)
    with pytest.raises(InferenceError, match=r"label 0 is outside the label map \(1 to 3\)"):
        serving_predictor.infer([picture()], 0.0, 5, False)
    with pytest.raises(LabelError, match=r"label 4 is outside the label map \(1 to 3\)"):
        LabelMap([1, 2, 3], ["a", "b", "c"]).name_of(4)
    with pytest.raises(LabelError, match=r"label -1 is outside"):
        LabelMap([1, 2, 3], ["a", "b", "c"]).category_of(-1)


def test_the_reader_reads_each_file_once(serving_package, monkeypatch):
    """Each file is opened once, and what is hashed is what is parsed (no hash-then-reopen window)."""
    import builtins

    opened: list[str] = []
    real_open = os.open

    def counting_open(path, *args, **kwargs):
        opened.append(Path(path).name)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", counting_open)
    monkeypatch.setattr(builtins, "open", lambda *a, **k: pytest.fail(f"open() of {a[0]} outside the reader"))
    package = open_package(serving_package)
    assert sorted(opened) == sorted(package.files) == sorted([*package.checksums, CHECKSUM_FILE])


def test_the_probe_check_needs_no_torch(serving_package):
    """A later serving image has no torch: reading the graph and its probe, checking the graph's rules and
    running the probe through ONNX Runtime work in a process where importing torch fails."""
    import subprocess
    import sys

    code = f"""
import builtins, io, sys, zipfile
real = builtins.__import__
def guarded(name, *args, **kwargs):
    if name.split(".")[0] in ("torch", "torchvision"):
        raise ImportError("no torch in this image: " + name)
    return real(name, *args, **kwargs)
builtins.__import__ = guarded
import numpy as np
from maskrcnn.onnx_runtime import ONNX_FILE, OnnxDetector, Probe, check_graph
folder = {str(serving_package)!r}
graph = open(folder + "/" + ONNX_FILE, "rb").read()
check_graph(graph, ONNX_FILE)
with np.load(folder + "/probe.npz", allow_pickle=False) as npz:
    probe = Probe.from_arrays({{k: npz[k] for k in npz.files}})
assert probe.mismatch(OnnxDetector(graph, 1).run, 60) == ""
print("ok", "torch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["ok", "False"]


@pytest.mark.parametrize("protocol, opcode", [(2, r"GLOBAL posix system"), (4, "STACK_GLOBAL")])
def test_weights_are_checked_without_torch_and_without_unpickling(serving_package, protocol, opcode):
    """The serving image (no torch) checks model.pt by reading its pickle's opcodes: torch.save's own
    tensors pass, a pickle naming any other callable is refused, and nothing is ever unpickled."""
    import os
    import pickle
    import zipfile

    from maskrcnn.package import check_weights_pickle

    check_weights_pickle((serving_package / "model.pt").read_bytes(), "model.pt")  # real weights pass
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(os.system, protocol=protocol))
    with pytest.raises(PackageError, match=rf"model\.pt: not a weights-only state_dict \(its pickle uses {opcode}"):
        check_weights_pickle(buf.getvalue(), "model.pt")


def test_weights_loaded_after_opening_are_checked_as_at_opening(copy):
    """Opened for its graph (no weights), a package whose model.pt disagrees with the label map is refused
    when the weights are loaded after all (`build_model`), with the message opening them would give."""
    import torch

    state = torch.load(copy / "model.pt", weights_only=True)
    state["roi_heads.box_predictor.cls_score.weight"] = state["roi_heads.box_predictor.cls_score.weight"][:3]
    torch.save(state, copy / "model.pt")
    resum(copy)
    package = open_package(copy, weights=None)  # the graph's head matches the label map
    assert package.weights is None
    with pytest.raises(PackageError, match=r"pkg/label_map\.json: 3 categories need a head of 4 outputs \(background "
                                           r"included\), but model\.pt's roi_heads\.box_predictor\.cls_score\.weight has 3"):
        package.build_model()
