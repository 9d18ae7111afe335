"""The baseline: Mask R-CNN behind Flask as the usual tutorials write it. Not for production.

Same model and weights as the predictor (loaded from the same serving package), one JSON image per
request, every output as dense nested lists (`masks.tolist()`), Flask's threaded server.
`python benchmarks/naive_flask_server.py PACKAGE_DIR PORT [DEVICE]` (DEVICE: cpu, the default, or cuda)
"""

import base64
import io
import sys
import time

import torch
from flask import Flask, jsonify, request
from PIL import Image
from torchvision.transforms.functional import to_tensor

from maskrcnn.package import open_package

app = Flask(__name__)
device = torch.device(sys.argv[3] if len(sys.argv) > 3 else "cpu")
model = open_package(sys.argv[1]).build_model().to(device)


@app.route("/ready")
def ready():
    return "ok"


@app.before_request
def started():
    request.environ["bench.start"] = time.perf_counter()


@app.after_request
def server_time(response):
    response.headers["x-server-ms"] = f"{(time.perf_counter() - request.environ['bench.start']) * 1000:.2f}"
    return response


@app.route("/predict", methods=["POST"])
def predict():
    image = Image.open(io.BytesIO(base64.b64decode(request.json["image"]))).convert("RGB")
    start = time.perf_counter()
    with torch.no_grad():
        out = {k: v.cpu() for k, v in model([to_tensor(image).to(device)])[0].items()}
    forward_ms = (time.perf_counter() - start) * 1000
    response = jsonify({"boxes": out["boxes"].tolist(), "labels": out["labels"].tolist(),
                        "scores": out["scores"].tolist(), "masks": out["masks"].tolist()})
    response.headers["x-forward-ms"] = f"{forward_ms:.2f}"
    return response


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(sys.argv[2]), threaded=True)
