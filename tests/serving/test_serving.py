"""The KServe predictor, in-process: load() and predict() directly, then the HTTP app (kserve's own
routes and error handlers) through FastAPI's TestClient, both protocols, every bad-input case."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch
from helpers import SERVING_MAX_BODY, encode_image
from faster_coco_eval.core import mask as mask_util

from maskrcnn.package import CHECKSUM_FILE, PackageError
from serving.limits import RESIDENT_RESERVE, image_working_set, queue_for_memory, workers_for_memory
from serving.predictor import MAX_INFERENCE_WORKERS, MAX_PIXELS, MaskRCNNPredictor
from maskrcnn.images import decode_image, to_tensor

MAX_BODY = SERVING_MAX_BODY


def picture(seed: int = 0, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 30, np.uint8)
    img[10:40, 12:44] = rng.integers(120, 255, 3, dtype=np.uint8)
    return img


@pytest.fixture(scope="module")
def predictor(serving_predictor):
    return serving_predictor


@pytest.fixture(scope="module")
def client(serving_client):
    return serving_client


def v1(image: bytes, **params) -> dict:
    return {"instances": [{"image": {"b64": base64.b64encode(image).decode()}}], "parameters": params}


def test_load_refuses_a_package_that_does_not_match_its_checksums(serving_package, tmp_path):
    import shutil

    copy = shutil.copytree(serving_package, tmp_path / "pkg")
    (copy / "model.pt").write_bytes((copy / "model.pt").read_bytes()[:-10])
    model = MaskRCNNPredictor("m", str(copy))
    with pytest.raises(PackageError, match=r"model\.pt: sha256"):
        model.load()
    assert not model.ready
    (copy / CHECKSUM_FILE).unlink()
    with pytest.raises(PackageError, match="SHA256SUMS: missing"):
        MaskRCNNPredictor("m", str(copy)).load()


@pytest.fixture(scope="module")
def eager(serving_package):
    """torchvision's own model with the package's weights (the predictor itself never builds it)."""
    from maskrcnn.package import open_package

    return open_package(serving_package).build_model()


def test_infer_matches_the_model_run_directly(predictor, eager):
    """The served detections (the package's graph in ONNX Runtime) are the eager model's."""
    assert predictor.graph is not None
    img = picture()
    (result,) = predictor.infer([img], threshold=0.0, max_det=100, overlay=False)
    with torch.inference_mode():
        (direct,) = eager([to_tensor(img)])
    assert len(result["detections"]) == len(direct["scores"]) > 0
    for det, box, score in zip(result["detections"], direct["boxes"], direct["scores"]):
        assert det["box"] == pytest.approx(box.tolist(), abs=0.01) and det["score"] == pytest.approx(float(score), abs=1e-4)
        assert det["label"] in ("circle", "square", "triangle") and det["category_id"] in (1, 2, 3)
        assert mask_util.decode({"size": det["mask"]["size"], "counts": det["mask"]["counts"].encode()}).shape == (64, 64)
    assert result["width"] == result["height"] == 64 and result["model_version"] == "7"


def test_predictor_and_evaluation_share_post_processing(predictor, eager, serving_package, tmp_path):
    """Serving's masks are evaluation's masks (one post-processing function), at the mask threshold of
    the package's config: a package evaluated at 0.8 is served at 0.8."""
    from training.inference import predict
    from maskrcnn.package import open_package
    from training.export import write_package

    img = picture()
    image_tensor = to_tensor(img)
    (evaluated,) = predict(eager, [([image_tensor], [{"image_id": torch.tensor(1)}])], torch.device("cpu"),
                           predictor.config.eval.mask_threshold, predictor.graph)
    (served,) = predictor.infer([img], threshold=0.0, max_det=100, overlay=False)
    assert [d["mask"] for d in served["detections"]] == evaluated["masks"]

    # the same weights, written with a config that evaluates masks at 0.8
    package = open_package(serving_package)
    write_package(package.build_model(), package.config.replace(eval={"mask_threshold": 0.8}), package.label_map,
                  package.metadata, tmp_path / "strict")
    strict_predictor = MaskRCNNPredictor("strict", str(tmp_path / "strict"), score_threshold=0.0)
    strict_predictor.load()
    assert strict_predictor.mask_threshold == 0.8
    (tight,) = strict_predictor.infer([img], threshold=0.0, max_det=100, overlay=False)
    area = lambda r: sum(mask_util.area({"size": d["mask"]["size"], "counts": d["mask"]["counts"].encode()})  # noqa: E731
                         for d in r["detections"])
    assert area(tight) < area(served)


def test_threshold_and_max_detections_filter(predictor):
    (everything,) = predictor.infer([picture()], 0.0, 100, False)
    scores = sorted((d["score"] for d in everything["detections"]), reverse=True)
    cut = scores[len(scores) // 2]
    (some,) = predictor.infer([picture()], cut, 100, False)
    assert all(d["score"] >= cut for d in some["detections"]) and len(some["detections"]) < len(scores)
    (two,) = predictor.infer([picture()], 0.0, 2, False)
    assert [d["score"] for d in two["detections"]] == scores[:2]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF"])
def test_v1_predict_over_http(client, fmt):
    resp = client.post("/v1/models/maskrcnn:predict", json=v1(encode_image(picture(), fmt), max_detections=3))
    assert resp.status_code == 200, resp.text
    (pred,) = resp.json()["predictions"]
    assert 0 < len(pred["detections"]) <= 3
    assert set(pred["detections"][0]) == {"label", "category_id", "score", "box", "mask"}
    assert isinstance(pred["detections"][0]["mask"]["counts"], str)  # RLE, not dense lists
    assert 0 < float(resp.headers["x-forward-ms"]) <= float(resp.headers["x-server-ms"]) < 60_000


def test_overlay_and_mask_png_are_images(client):
    resp = client.post("/v1/models/maskrcnn:predict", json=v1(encode_image(picture()), overlay=True, max_detections=2))
    pred = resp.json()["predictions"][0]
    overlay = decode_image(base64.b64decode(pred["overlay_png"]))
    masks = decode_image(base64.b64decode(pred["mask_png"]))
    assert overlay.shape[0] >= 64 and masks.shape == (64, 64, 3) and masks.any()


def _v2(image: bytes, with_id: bool) -> dict:
    body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(image).decode()]}],
            "parameters": {"max_detections": 2}}
    if with_id:
        body["id"] = "req-1"
    return body


@pytest.mark.parametrize("with_id", [True, False])
def test_v2_infer_with_and_without_a_request_id(client, with_id):
    resp = client.post("/v2/models/maskrcnn/infer", json=_v2(encode_image(picture()), with_id))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["id"] == "req-1" if with_id else len(body["id"]) == 36  # generated
    (output,) = body["outputs"]
    assert output["name"] == "detections" and output["datatype"] == "BYTES"
    result = json.loads(output["data"][0])
    assert len(result["detections"]) == 2 and result["model_version"] == "7"


@pytest.mark.parametrize("body, status, message", [
    (v1(b"this is not an image"), 400, "not a decodable image"),
    (v1(encode_image(picture())[:60]), 400, "corrupt image data"),
    (v1(encode_image(np.zeros((1100, 1000, 3), np.uint8))), 400, "above the limit of 1000000"),
    ({"instances": []}, 400, "field 'instances': expected a non-empty list"),
    ({"images": ["x"]}, 400, "missing field 'instances'"),
    ({"instances": [{"picture": "x"}]}, 400, "expected an object with 'image' or 'b64'"),
    ({"instances": [{"b64": "%%%"}]}, 400, "not valid base64"),
    (v1(encode_image(picture()), score_threshold=2), 400, "score_threshold: expected a number in [0, 1]"),
    ({"inputs": [{"name": "pixels", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}, 400, "missing input 'image'"),
])
def test_bad_input_is_a_400_and_the_server_keeps_serving(client, body, status, message):
    path = "/v2/models/maskrcnn/infer" if "inputs" in body else "/v1/models/maskrcnn:predict"
    resp = client.post(path, json=body)
    assert resp.status_code == status, resp.text
    assert message in resp.json()["error"]
    assert client.post("/v1/models/maskrcnn:predict", json=v1(encode_image(picture()))).status_code == 200


def test_large_images_are_answered_as_the_model_sees_them_on_both_protocols(client, predictor):
    """An image whose base64 is longer than `LIFT_AT` is lifted out of the body before parsing
    (`serving.bodies`): V1, V1 as a data URL and V2 answer what the model gives for the image."""
    from serving.bodies import LIFT_AT

    img = picture(size=64)
    img = np.concatenate([img, np.random.default_rng(1).integers(0, 255, (400, 64, 3), dtype=np.uint8)])
    png = encode_image(img, "PNG")
    text = base64.b64encode(png).decode()
    assert len(text) >= LIFT_AT
    (expected,) = predictor.infer([decode_image(png)], threshold=0.0, max_det=5, overlay=False)
    answers = [client.post("/v1/models/maskrcnn:predict", json=v1(png, score_threshold=0.0, max_detections=5)),
               client.post("/v1/models/maskrcnn:predict", json={"instances": [{"b64": "data:image/png;base64," + text}],
                                                               "parameters": {"score_threshold": 0.0, "max_detections": 5}}),
               client.post("/v2/models/maskrcnn/infer", json={**_v2(png, False), "parameters": {"score_threshold": 0.0,
                                                                                                 "max_detections": 5}})]
    assert [a.status_code for a in answers] == [200, 200, 200], answers[-1].text[:300]
    got = [a.json()["predictions"][0] for a in answers[:2]] + [json.loads(answers[2].json()["outputs"][0]["data"][0])]
    assert expected["detections"] and all(g["detections"] == expected["detections"] for g in got)
    broken = client.post("/v1/models/maskrcnn:predict", json={"instances": [{"b64": text[:-8] + "!!!!" + text[-4:]}]})
    assert broken.status_code == 400 and "instances[0]: not valid base64" in broken.json()["error"]


def test_oversized_body_is_refused_before_it_is_read(client):
    resp = client.post("/v1/models/maskrcnn:predict", content=b"x" * (MAX_BODY + 1),
                       headers={"content-type": "application/json"})
    assert resp.status_code == 400 and f"above the limit of {MAX_BODY} bytes" in resp.json()["error"]
    assert client.post("/v1/models/maskrcnn:predict", json=v1(encode_image(picture()))).status_code == 200


def test_a_model_failure_is_a_500_with_a_json_error(client, predictor, monkeypatch):
    import serving.predictor

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert")

    monkeypatch.setattr(serving.predictor, "detect", broken)
    resp = client.post("/v1/models/maskrcnn:predict", json=v1(encode_image(picture())))
    assert resp.status_code == 500 and "model failure: RuntimeError: CUDA error" in resp.json()["error"]


def test_metrics_count_requests_by_status_and_version(client):
    client.post("/v1/models/maskrcnn:predict", json={"instances": []})
    client.post("/v1/models/maskrcnn:predict", json=v1(encode_image(picture())))
    text = client.get("/metrics").text
    # the registered name (the package's metadata; this one has none: the served name) and the version on every series
    assert 'maskrcnn_requests_total{model_name="maskrcnn",model_version="7",protocol="v1",status="400"}' in text
    assert 'maskrcnn_requests_total{model_name="maskrcnn",model_version="7",protocol="v1",status="200"}' in text
    assert 'maskrcnn_detections_per_image_count{model_name="maskrcnn",model_version="7"}' in text
    assert 'request_predict_seconds_count{model_name="maskrcnn"}' in text  # kserve's own metrics too


def test_metrics_describe_the_model_by_version(client, predictor):
    """Latency, forward passes, detections, scores, classes and the inputs' statistics, each labelled with
    the served version; an all-white and an all-black image move the brightness histogram's sum by 1 and 0."""
    from devstack.load import metric, parse_metrics
    from serving.observe import MAX_CLASS_LABELS, ModelMetrics
    from maskrcnn.images import image_statistics

    before = parse_metrics(client.get("/metrics").text)
    white, black = np.full((40, 50, 3), 255, np.uint8), np.zeros((40, 50, 3), np.uint8)
    for image in (white, black):
        assert client.post("/v1/models/maskrcnn:predict", json=v1(encode_image(image), score_threshold=0.0)).status_code == 200
    answer = client.post("/v1/models/maskrcnn:predict", json=v1(encode_image(picture()), score_threshold=0.0)).json()
    after = parse_metrics(client.get("/metrics").text)

    def grew(name: str, **labels: str) -> float:
        return metric(after, name, model_version="7", **labels) - metric(before, name, model_version="7", **labels)

    assert grew("maskrcnn_request_seconds_count", protocol="v1", status="200") == 3
    assert grew("maskrcnn_forward_seconds_count") == 3 and grew("maskrcnn_forward_seconds_sum") > 0
    assert grew("maskrcnn_input_brightness_count") == 3 and grew("maskrcnn_input_contrast_count") == 3
    expected = 1.0 + 0.0 + image_statistics(picture()).brightness  # white, black, the picture (PNG: the same pixels)
    assert grew("maskrcnn_input_brightness_sum") == pytest.approx(expected, abs=1e-5)
    assert grew("maskrcnn_input_megapixels_sum") == pytest.approx(2 * 40 * 50 / 1e6 + 64 * 64 / 1e6)
    detections = answer["predictions"][0]["detections"]
    assert detections  # threshold 0: the untrained model's detections show
    assert grew("maskrcnn_detection_score_count") >= len(detections)
    for name in {d["label"] for d in detections}:
        assert grew("maskrcnn_detections_total", label=name) >= sum(d["label"] == name for d in detections)
    assert metric(after, "maskrcnn_inflight_requests", model_version="7") == 0
    assert ("maskrcnn_queue_depth", (("model_name", "maskrcnn"), ("model_version", "7"))) in after
    assert metric(after, "maskrcnn_ready", model_version="7") == 1  # read from the health check at scrape time
    assert metric(after, "maskrcnn_queue_limit", model_version="7") == client.app.state.admission.max_queue
    # a label map larger than the cap: its classes beyond it are counted as "other", not as new series
    many = ModelMetrics(("maskrcnn", "cap-test"), [f"c{i}" for i in range(MAX_CLASS_LABELS + 50)])
    many.detections([{"label": f"c{i}", "score": 0.9} for i in range(MAX_CLASS_LABELS + 50)])
    capped = parse_metrics(client.get("/metrics").text)
    assert metric(capped, "maskrcnn_detections_total", model_version="cap-test", label="other") == 50
    assert len([k for k in capped if k[0] == "maskrcnn_detections_total" and ("model_version", "cap-test") in k[1]]) == \
        MAX_CLASS_LABELS + 1


def test_health_and_model_ready(client):
    assert client.get("/v1/models/maskrcnn").json() == {"name": "maskrcnn", "ready": True}
    assert client.get("/v2/health/ready").status_code == 200
    page = client.get("/ui")
    assert page.status_code == 200 and "circle, square, triangle" not in page.text and '"circle"' in page.text


def test_predict_called_directly_for_both_protocols(predictor):
    import asyncio

    from kserve.protocol.infer_type import InferInput, InferRequest

    b64 = base64.b64encode(encode_image(picture())).decode()
    headers: dict[str, str] = {}
    out = asyncio.run(predictor.predict({"instances": [{"b64": b64}], "parameters": {"max_detections": 1}}, None, headers))
    assert len(out["predictions"][0]["detections"]) == 1 and float(headers["x-forward-ms"]) > 0
    request = InferRequest("maskrcnn", [InferInput("image", [1], "BYTES", [b64])], request_id=None)
    response = asyncio.run(predictor.predict(request))
    assert response.id and response.model_version == "7"
    assert json.loads(response.outputs[0].data[0])["width"] == 64


def test_liveness_answers_within_a_second_during_a_long_request(client, monkeypatch):
    """Inference runs off the event loop: a 3 s forward pass does not stall the probes Kubernetes sends."""
    import threading
    import time

    import serving.predictor

    real = serving.predictor.detect

    def slow(*args, **kwargs):
        time.sleep(3)  # CPU-bound in reality; a sleeping thread holds the inference thread all the same
        return real(*args, **kwargs)

    monkeypatch.setattr(serving.predictor, "detect", slow)
    answer = {}
    worker = threading.Thread(target=lambda: answer.update(resp=client.post("/v1/models/maskrcnn:predict",
                                                                            json=v1(encode_image(picture())))))
    worker.start()
    time.sleep(0.5)
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/maskrcnn/ready"):
        began = time.perf_counter()
        resp = client.get(path)
        assert resp.status_code == 200 and time.perf_counter() - began < 1.0, path
    assert worker.is_alive()  # the long request was still running while the probes were answered
    worker.join(30)
    assert answer["resp"].status_code == 200


def test_masks_are_pasted_within_the_memory_budget_and_match_torchvision(predictor, eager, monkeypatch):
    """`detect` pastes a few masks at a time (the budget bounds memory) and gives exactly torchvision's masks."""
    import maskrcnn.processing as transform
    from maskrcnn.processing import detect
    from training.inference import network_of
    from maskrcnn.model import input_sizes

    pixels = np.random.default_rng(3).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    with torch.inference_mode():
        (reference,) = eager([to_tensor(pixels)])  # torchvision: every mask pasted at full resolution at once
    chunks = []
    real = transform.encode_masks
    monkeypatch.setattr(transform, "encode_masks", lambda m: chunks.append(len(m)) or real(m))
    budget = 300 * 400 * 3  # room for three binary masks at 400x300
    pred = detect(network_of(eager), pixels, *input_sizes(eager), 0.5, mask_budget_bytes=budget)
    n = len(reference["scores"])
    assert n > 3 and sum(chunks) == n and max(chunks) == 3
    expected = mask_util.encode(np.asfortranarray((reference["masks"][:, 0] > 0.5).numpy().astype(np.uint8).transpose(1, 2, 0)))
    assert [m["counts"] for m in pred["masks"]] == [e["counts"].decode() for e in expected]
    assert np.allclose(pred["boxes"], reference["boxes"].numpy())


def test_the_web_page_escapes_names_from_the_package(serving_predictor, monkeypatch):
    """Label names come from the package: a crafted one cannot close the script element or inject markup."""
    import json
    import re

    from serving.app import render_page

    evil = ["</script><script>alert(1)</script>", "<img src=x onerror=alert(2)>", "a&b"]
    page = render_page('x"</title><script>alert(3)</script>', evil)
    assert "<script>alert" not in page and "<img src=x" not in page and "</title><script>" not in page
    classes = re.search(r"textContent = (.*)\.join", page).group(1)
    assert json.loads(classes) == evil  # the names still display as they are


def test_threads_follow_the_containers_cpu_limit(tmp_path, serving_package):
    """A Kubernetes CPU limit reaches the process as a CFS quota (cgroup v2 `cpu.max`, v1
    `cpu.cfs_quota_us`); the predictor runs that many threads, rounded up. The real quota, in a container
    with `--cpus 1`, is checked in tests/serving/test_containers_serving.py."""
    import os

    from serving.predictor import cpu_budget

    cores = len(os.sched_getaffinity(0))
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cpu_budget(v2) == min(cores, 2)
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cpu_budget(v2) == cores
    v1 = tmp_path / "v1" / "cpu,cpuacct"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_budget(tmp_path / "v1") == 1
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_budget(tmp_path / "v1") == cores
    assert cpu_budget(tmp_path / "nothing") == cores
    one = MaskRCNNPredictor("m", str(serving_package), threads=1)
    assert one.load() and one.graph.threads == 1 and one.torch_threads is None  # torch is not used
    assert one.workers == 1 and one._executor._max_workers == 1 and one.wide_graph is None  # one session
    eager = MaskRCNNPredictor("m", str(serving_package), threads=1, backend="eager")
    assert eager.load() and eager.graph is None and eager.torch_threads == 1
    with pytest.raises(ValueError, match="threads: expected an integer >= 1, got 0"):
        MaskRCNNPredictor("m", str(serving_package), threads=0)


def test_inference_workers_one_image_per_core_with_the_graph_on_the_cpu(serving_package):
    """With the graph on the CPU, each core infers its own image on one intra-op thread (the default, at
    most 8 at once); `--inference-workers` sets it, each image then getting threads/N; eager PyTorch
    infers one image at a time, and asking it for more is refused naming the flag."""
    four = MaskRCNNPredictor("m", str(serving_package), threads=4, device="cpu")
    assert four.load() and four.workers == 4 and four.graph.threads == 1 and four._executor._max_workers == 4
    assert four._workers_for(4, graph=True, graph_on_cpu=False) == 1  # the graph on the GPU: one image at a time
    assert four.wide_graph.threads == 4  # an image that starts alone: every thread
    many = MaskRCNNPredictor("m", str(serving_package), threads=12, device="cpu", memory_budget_bytes=64 << 30)
    assert many.load() and many.workers == MAX_INFERENCE_WORKERS == 8 and many.graph.threads == 1
    two = MaskRCNNPredictor("m", str(serving_package), threads=4, workers=2, device="cpu")
    assert two.load() and two.workers == 2 and two.graph.threads == 2
    # the memory budget bounds them too: beyond the reserve, half of it for images of max_pixels each
    budget = RESIDENT_RESERVE + 2 * image_working_set(MAX_PIXELS)
    assert workers_for_memory(budget, MAX_PIXELS) == 2 and workers_for_memory(RESIDENT_RESERVE, MAX_PIXELS) == 1
    tight = MaskRCNNPredictor("m", str(serving_package), threads=4, device="cpu", memory_budget_bytes=budget)
    assert tight.load() and tight.workers == 2 and tight.graph.threads == 2
    # and each image in flight beyond the first is taken from the queue's share
    assert queue_for_memory(6 << 30, 32 << 20) == 32 and queue_for_memory(6 << 30, 32 << 20, 2, MAX_PIXELS) == 27
    eager = MaskRCNNPredictor("m", str(serving_package), threads=4, backend="eager")
    assert eager.load() and eager.workers == 1 and eager.torch_threads == 4
    with pytest.raises(PackageError, match="--inference-workers 2 needs the package's graph in ONNX Runtime; eager "
                                           "PyTorch \\(backend eager\\) runs one image at a time"):
        MaskRCNNPredictor("m", str(serving_package), workers=2, backend="eager").load()
    with pytest.raises(ValueError, match="inference workers: expected an integer >= 1, got 0"):
        MaskRCNNPredictor("m", str(serving_package), workers=0)


def test_an_image_that_starts_alone_runs_on_every_thread_and_one_beside_another_on_its_share(serving_package):
    """Light traffic keeps one image's latency on all cores (the wide session); an image that starts while
    another runs takes one worker's share (the single-thread session), so two run side by side."""
    import threading
    import time

    predictor = MaskRCNNPredictor("m", str(serving_package), threads=2, workers=2, device="cpu")
    assert predictor.load() and predictor.graph.threads == 1 and predictor.wide_graph.threads == 2
    ran, beside = [], threading.Event()
    wide_run, narrow_run = predictor.wide_graph.run, predictor.network

    def wide(*args, **kwargs):
        ran.append("wide")
        if len(ran) == 3:  # the third image waits, running, until the fourth has started beside it
            assert beside.wait(10), "the image started beside it never ran"
        return wide_run(*args, **kwargs)

    def narrow(*args, **kwargs):
        ran.append("narrow")
        beside.set()
        return narrow_run(*args, **kwargs)

    predictor.wide_graph.run, predictor.network = wide, narrow
    image = np.zeros((64, 64, 3), np.uint8)
    for _ in range(2):  # one after the other: each alone
        predictor.infer([image], 0.5, 10, False)
    assert ran == ["wide", "wide"]
    first = threading.Thread(target=predictor.infer, args=([image], 0.5, 10, False))
    first.start()
    while len(ran) < 3:
        time.sleep(0.01)
    predictor.infer([image], 0.5, 10, False)  # starts while the third runs
    first.join(10)
    assert ran == ["wide", "wide", "wide", "narrow"]


SERVED_ROUTES = {
    ("GET", "/"), ("GET", "/metrics"), ("GET", "/ui"),
    ("GET", "/v1/models"), ("GET", "/v1/models/{model_name}"), ("POST", "/v1/models/{model_name}:predict"),
    ("GET", "/v2"), ("GET", "/v2/health/live"), ("GET", "/v2/health/ready"), ("GET", "/v2/models"),
    ("GET", "/v2/models/{model_name}"), ("GET", "/v2/models/{model_name}/ready"), ("POST", "/v2/models/{model_name}/infer"),
}


def test_the_app_serves_only_the_routes_we_mean(client):
    """V1 and V2 inference and metadata, health, /metrics and /ui; nothing else (no model repository
    extension, no :explain, no OpenAPI pages)."""
    routes = {(method, route.path) for route in client.app.routes for method in getattr(route, "methods", {"?"})}
    assert routes == SERVED_ROUTES
    # what took a replica out for good: unload answered 200, then every prediction 404
    for path in ("/v2/repository/models/maskrcnn/unload", "/v2/repository/models/maskrcnn/load"):
        assert client.post(path).status_code == 404
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert client.get(path).status_code == 404
    # :explain matches only the GET route /v1/models/{model_name}: not served (405)
    assert client.post("/v1/models/maskrcnn:explain", json={"instances": []}).status_code == 405
    assert client.get("/v2/models/maskrcnn/ready").json() == {"name": "maskrcnn", "ready": True}
    assert client.get("/v1/models/maskrcnn").json() == {"name": "maskrcnn", "ready": True}
    assert client.get("/v2/models/other").status_code == 404


def test_health_follows_the_forward_pass_watchdog_and_the_drain(serving_predictor, client, monkeypatch):
    """Readiness fails when a forward pass has run past half the limit, liveness past the limit; readiness
    fails while draining, liveness does not."""
    import time

    monkeypatch.setattr(serving_predictor, "forward_limit_s", 10.0)
    now = time.monotonic()
    monkeypatch.setattr(serving_predictor, "_running", {1: now - 1, 2: now - 6})  # the longest-running counts
    assert client.get("/v2/health/ready").status_code == 503
    assert client.get("/v1/models/maskrcnn").status_code == 503
    assert client.get("/v2/health/live").status_code == 200
    monkeypatch.setattr(serving_predictor, "_running", {1: now - 2, 2: now - 11})
    answer = client.get("/")
    assert answer.status_code == 503 and "an inference thread is stuck" in answer.json()["error"]
    monkeypatch.setattr(serving_predictor, "_running", {})
    admission = client.app.state.admission
    admission.draining = True
    try:
        assert client.get("/v2/health/ready").json() == {"error": "shutting down"}
        assert client.get("/v2/health/live").status_code == 200
        refused = client.post("/v1/models/maskrcnn:predict", json=v1(encode_image(picture())))
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    finally:
        admission.draining = False
    assert client.get("/v2/health/ready").json() == {"ready": True}


def test_a_dropped_requests_data_is_released_while_its_work_still_waits_in_the_queue(predictor):
    """Issue 32: the inference threads' queue holds cancelled work until a thread reaches it; the request's
    data must not be reachable from there once the request is answered (else clients that send a large
    body and leave grow the server past its admission bound)."""
    import asyncio
    import gc
    import threading
    import weakref

    from serving.admission import CLIENT_LEFT, TICKET, RequestDropped, Ticket

    class Body:  # stands for the parsed payload and its images
        pass

    gate = threading.Event()
    blockers = [predictor._executor.submit(gate.wait) for _ in range(predictor.workers)]  # every inference thread busy
    try:
        body = Body()
        alive = weakref.ref(body)

        async def request() -> None:
            ticket = Ticket(30)
            TICKET.set(ticket)
            asyncio.get_running_loop().call_later(0.1, ticket.stop, CLIENT_LEFT)
            held = body
            with pytest.raises(RequestDropped):
                await predictor._queued(lambda: ([], {"body": held}))

        asyncio.run(request())
        del body
        gc.collect()
        assert alive() is None  # freed, though its cancelled work is still in the executor's queue
    finally:
        gate.set()
        for blocker in blockers:
            blocker.result(10)


def test_overlay_answers_are_capped(serving_package):
    """An overlay answer is about 23x its request: past the answer cap the request is a 400 naming the cap,
    not an answer held in memory outside the admission bound."""
    from fastapi.testclient import TestClient

    from serving.app import build_app
    from serving.limits import ServingLimits
    from serving.predictor import MaskRCNNPredictor

    model = MaskRCNNPredictor("maskrcnn", str(serving_package), score_threshold=0.0, max_answer_bytes=2000)
    assert model.load()
    with TestClient(build_app(model, ServingLimits(max_body_bytes=SERVING_MAX_BODY)), raise_server_exceptions=False) as c:
        plain = c.post("/v1/models/maskrcnn:predict", json=v1(encode_image(picture())))
        capped = c.post("/v1/models/maskrcnn:predict", json=v1(encode_image(picture()), overlay=True))
    assert plain.status_code == 200
    assert capped.status_code == 400 and "above the limit of 2000 for one answer; ask without 'overlay'" in capped.json()["error"]


def test_prediction_bodies_are_parsed_off_the_event_loop(client, monkeypatch):
    """The JSON (V1) and the Open Inference Protocol's schema (V2) are parsed on worker threads: a parse
    that takes 2 s does not stall liveness."""
    import threading
    import time

    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.rest.v2_datamodels import InferenceRequest

    real_decode, real_validate = DataPlane.decode, InferenceRequest.model_validate_json.__func__

    def slow_decode(self, *args, **kwargs):
        time.sleep(2)
        return real_decode(self, *args, **kwargs)

    def slow_validate(cls, *args, **kwargs):
        time.sleep(2)
        return real_validate(cls, *args, **kwargs)

    monkeypatch.setattr(DataPlane, "decode", slow_decode)
    monkeypatch.setattr(InferenceRequest, "model_validate_json", classmethod(slow_validate))
    for path, body in (("/v1/models/maskrcnn:predict", v1(encode_image(picture()))),
                       ("/v2/models/maskrcnn/infer", _v2(encode_image(picture()), True))):
        answer = {}
        worker = threading.Thread(target=lambda: answer.update(resp=client.post(path, json=body)))
        worker.start()
        time.sleep(0.5)
        began = time.perf_counter()
        assert client.get("/").status_code == 200
        assert time.perf_counter() - began < 1.0, path  # the loop answered while the body was being parsed
        assert worker.is_alive()
        worker.join(30)
        assert answer["resp"].status_code == 200, (path, answer["resp"].text[:300])
