"""The rules live: a real Prometheus scrapes the real predictor (`python -m serving` on 127.0.0.1) and
evaluates deployment/monitoring/rules.yaml, a real Alertmanager posts what fires to a local webhook.

The rules' windows are time-scaled in a copy (`devstack.monitoring.time_scaled_rules`: 30 min -> 20 s,
5 min -> 10 s, `for: 10m` -> 3 s, at least 5 images instead of 100), so that an alert comes in seconds; the
expressions are the same. Traffic is bounded (a few dozen small images) and targets 127.0.0.1 only."""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from helpers import encode_image

from devstack import monitoring
from devstack.load import predict, predictor

pytestmark = pytest.mark.slow

SCALE = {"30m": "20s", "5m": "10s", "10m": "3s"}


def scene(seed: int) -> np.ndarray:
    """A dark scene with a few brighter shapes: brightness about 0.2-0.25 (one reference bucket)."""
    rng = np.random.default_rng(seed)
    img = np.full((48, 48, 3), 50, np.uint8)
    for _ in range(2):
        x, y = rng.integers(0, 36, 2)
        img[y:y + 8, x:x + 8] = rng.integers(90, 140, 3)
    return img


def body(image: np.ndarray) -> bytes:
    return json.dumps({"instances": [{"image": {"b64": base64.b64encode(encode_image(image)).decode()}}]}).encode()


@pytest.fixture
def webhook():
    """A local Alertmanager webhook receiver: the alerts it was sent, in order."""
    received: list[dict] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            received.extend(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["alerts"])
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", received
    server.shutdown()


def reference_package(serving_package, folder):
    """The tiny package with a reference computed on `scene` images, with its own predictions (as served)."""
    from serving.predictor import MaskRCNNPredictor
    from maskrcnn.package import open_package
    from maskrcnn.reference import compute_reference

    images = [scene(seed) for seed in range(20)]
    model = MaskRCNNPredictor("maskrcnn", str(serving_package))
    assert model.load()
    results = model.infer(images, 0.5, 100, False)
    names = model.label_map.names
    predictions = [{"scores": np.array([d["score"] for d in r["detections"]]),
                    "labels": np.array([names.index(d["label"]) + 1 for d in r["detections"]], int)} for r in results]
    reference = compute_reference(images, predictions, names)
    package = open_package(serving_package).stamped({"model_version": "drift-1"}).with_reference(reference)
    return package.save(folder)


def test_shifted_images_fire_the_input_drift_alert_through_alertmanager_and_normal_traffic_does_not(
        serving_package, tmp_path, webhook):
    url, received = webhook
    package = reference_package(serving_package, tmp_path / "package")
    rules = monitoring.time_scaled_rules(monitoring.RULES, tmp_path / "rules.yaml", SCALE, min_count=5)
    with predictor(package, tmp_path / "serving.log") as srv:
        mon = monitoring.start(tmp_path / "mon", [srv.url.removeprefix("http://")], [rules], webhook=url)
        try:
            deadline = time.monotonic() + 30
            while not mon.targets_up():
                assert time.monotonic() < deadline, "Prometheus never scraped the predictor"
                time.sleep(0.5)
            for seed in range(100, 112):  # normal traffic: scenes like the reference's
                assert predict(srv.url, body(scene(seed))).status == 200
                time.sleep(0.2)
            time.sleep(8)  # past every scaled `for:` and several evaluations
            (brightness,) = [v for labels, v in mon.query("maskrcnn:drift:ks30m") if labels["statistic"] == "brightness"]
            assert brightness < 0.25, brightness
            assert received == [] and mon.alerts() == [], (received, mon.alerts())

            for seed in range(200, 220):  # the same scenes inverted: bright images
                assert predict(srv.url, body(255 - scene(seed))).status == 200
                time.sleep(0.2)
            deadline = time.monotonic() + 60
            while not any(a["labels"]["alertname"] == "MaskrcnnInputDrift" for a in received):
                assert time.monotonic() < deadline, f"no drift alert reached the webhook; Alertmanager holds {mon.alerts()}"
                time.sleep(0.5)
        finally:
            mon.stop()
    fired = {(a["labels"]["alertname"], a["labels"].get("statistic")) for a in received if a["status"] == "firing"}
    assert ("MaskrcnnInputDrift", "brightness") in fired, fired
    alert = next(a for a in received if a["labels"]["alertname"] == "MaskrcnnInputDrift")
    assert alert["labels"]["model_version"] == "drift-1" and alert["labels"]["severity"] == "warning"
    assert "input brightness has drifted" in alert["annotations"]["summary"]
    assert not {name for name, _ in fired} - {"MaskrcnnInputDrift"}, fired  # nothing else fired
