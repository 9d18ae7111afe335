"""The predictor as users run it: `python -m serving` in its own process on 127.0.0.1, a bounded load
of concurrent clients, and the web page driven in a real headless Chromium (Debian's, via Playwright)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from helpers import encode_image

from devstack.procs import free_port

pytestmark = pytest.mark.slow


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def server(serving_package, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "serving.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "serving", "--model-dir", str(serving_package), "--host", "127.0.0.1",
                                 "--http-port", str(port), "--score-threshold", "0.0", "--max-detections", "5"],
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{url}/v1/models/maskrcnn", timeout=2) as resp:
                if json.loads(resp.read())["ready"]:
                    break
        except OSError:
            time.sleep(0.3)
    else:
        pytest.fail("server not ready: " + log.read_text()[-3000:])
    yield url, proc
    proc.terminate()
    proc.wait(20)


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"{url}/v1/models/maskrcnn:predict", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_bounded_load_has_no_errors_and_memory_levels_off(server):
    url, proc = server
    rng = np.random.default_rng(0)
    images = [base64.b64encode(encode_image(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))).decode() for _ in range(4)]
    bodies = [{"instances": [{"image": {"b64": images[i % 4]}}]} for i in range(100)]

    def round_of_requests() -> list[int]:
        with ThreadPoolExecutor(8) as pool:  # 8 concurrent clients
            return [status for status, _ in pool.map(lambda b: post(url, b), bodies)]

    statuses = round_of_requests()  # warm-up round
    after_warmup = rss_mb(proc.pid)
    for _ in range(2):
        statuses += round_of_requests()
    assert statuses.count(200) == len(statuses) == 300, {s: statuses.count(s) for s in set(statuses)}
    growth = rss_mb(proc.pid) - after_warmup
    assert growth < 64, f"RSS grew {growth:.0f} MB over 200 requests after warm-up"
    # bad input in the middle of it all does not take the server down
    assert post(url, {"instances": [{"image": {"b64": "aGVsbG8="}}]})[0] == 400
    assert post(url, bodies[0])[0] == 200


def test_web_page_uploads_an_image_and_shows_the_overlay(server, tmp_path):
    from playwright.sync_api import sync_playwright

    url, _ = server
    image = tmp_path / "shapes.png"
    pixels = np.full((64, 64, 3), 30, np.uint8)
    pixels[10:40, 12:44] = (220, 80, 40)
    image.write_bytes(encode_image(pixels))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page()
        page.goto(f"{url}/ui")
        assert "circle, square, triangle" in page.text_content("#classes")
        # this untrained test model scores below the page's default 0.5: start from 0
        page.eval_on_selector("#threshold", "el => { el.value = '0'; el.dispatchEvent(new Event('change')); }")
        page.set_input_files("#file", str(image))
        page.wait_for_function("document.getElementById('overlay').src.startsWith('data:image/png')", timeout=60_000)
        shown = page.locator("#rows tr").count()
        assert 0 < shown <= 5
        assert page.get_attribute("#download-mask", "href").startswith("data:image/png;base64,")
        assert page.get_attribute("#download-json", "href").startswith("blob:")
        first = page.text_content("#status")
        assert "detection(s), model version 7" in first
        shot = tmp_path / "web-page.png"
        page.screenshot(path=str(shot), full_page=True)
        # a higher threshold: fewer (or no) rows
        page.eval_on_selector("#threshold", "el => { el.value = '0.95'; el.dispatchEvent(new Event('change')); }")
        page.wait_for_function("document.getElementById('status').textContent !== '' && "
                               "document.getElementById('status').textContent !== 'predicting...'", timeout=60_000)
        page.wait_for_timeout(300)
        assert page.locator("#rows tr").count() < shown
        assert page.text_content("#threshold-value") == "0.95"
        browser.close()
    assert shot.stat().st_size > 5_000
    print(f"screenshot: {shot}")


def test_an_oversized_body_is_a_400_that_a_plain_client_can_read(server):
    """The server drains the refused upload before answering: urllib sees the 400, not a connection reset."""
    url, _ = server
    body = b'{"instances": [{"image": {"b64": "' + b"A" * (40 << 20) + b'"}}]}'  # 40 MB, above the 32 MB default
    for headers in ({"Content-Type": "application/json"}, {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}):
        data = body if "Transfer-Encoding" not in headers else iter([body[i:i + (1 << 20)] for i in range(0, len(body), 1 << 20)])
        req = urllib.request.Request(f"{url}/v1/models/maskrcnn:predict", data, headers)
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=60)
        assert info.value.code == 400
        assert "request body above the limit of 33554432 bytes" in json.loads(info.value.read())["error"]
    assert post(url, {"instances": [{"image": {"b64": base64.b64encode(encode_image(np.zeros((32, 32, 3), np.uint8))).decode()}}]})[0] == 200


def test_kserve_inference_client_drives_both_protocols_and_reads_the_model_metadata(server):
    """KServe's own `InferenceRESTClient`, as a client application would use it: health, model readiness
    and inference over V1 and V2; the Open Inference Protocol's model metadata names the `image` input,
    the `detections` output and the served version."""
    import asyncio

    from kserve import InferenceRESTClient, RESTConfig
    from kserve.protocol.infer_type import InferInput, InferRequest

    url, _ = server
    image = base64.b64encode(encode_image(np.full((48, 48, 3), 90, np.uint8))).decode()

    async def drive() -> None:
        async with InferenceRESTClient(RESTConfig(protocol="v1", timeout=60)) as v1:
            assert await v1.is_server_live(url) and await v1.is_model_ready(url, "maskrcnn")
            out = await v1.infer(url, {"instances": [{"image": {"b64": image}}]}, model_name="maskrcnn")
            assert out["predictions"][0]["model_version"] == "7" and out["predictions"][0]["width"] == 48
        async with InferenceRESTClient(RESTConfig(protocol="v2", timeout=60)) as v2:
            assert await v2.is_server_live(url) and await v2.is_server_ready(url)
            assert await v2.is_model_ready(url, "maskrcnn")
            assert not await v2.is_model_ready(url, "other")  # an unknown model is not ready (404)
            request = InferRequest("maskrcnn", [InferInput("image", [1], "BYTES", [image])], request_id="r1")
            response = await v2.infer(url, request, model_name="maskrcnn")
            # (kserve's client drops the response's model_version when it parses it: each result carries it)
            assert response.outputs[0].name == "detections" and response.outputs[0].shape == [1]
            result = json.loads(response.outputs[0].data[0])
            assert result["width"] == 48 and result["model_version"] == "7" and isinstance(result["detections"], list)

    asyncio.run(drive())
    with urllib.request.urlopen(f"{url}/v2/models/maskrcnn", timeout=10) as resp:
        metadata = json.loads(resp.read())
    assert metadata == {"name": "maskrcnn", "versions": ["7"], "platform": "onnxruntime_onnx",
                        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]}],
                        "outputs": [{"name": "detections", "datatype": "BYTES", "shape": [-1]}]}
    with urllib.request.urlopen(f"{url}/v2", timeout=10) as resp:
        assert json.loads(resp.read())["extensions"] == []  # no model repository extension
