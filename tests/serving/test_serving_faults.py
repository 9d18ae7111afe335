"""The predictor under load and faults, as an operator meets them: `python -m serving` in its own process
on 127.0.0.1, driven by bounded clients (`devstack.load`). Concurrency 1/4/16/64, saturation beyond the
queue, clients that leave, slow clients up to the open-file limit, a forward pass that never returns,
and SIGTERM with requests in flight. Heavy and stuck requests come from a test hook in the forward pass
(`tests/hooked_serving.py`: an image 17 px wide takes 0.5 s, one 13 px wide never returns). Timings
are not asserted here; `benchmarks/serving_load.py` measures them."""

from __future__ import annotations

import base64
import json
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from helpers import encode_image

from devstack import load
from devstack.load import abandon, metric, metrics, predict, predictor, read_status, request, run_load, slow_clients

pytestmark = pytest.mark.slow

HOOKED = [sys.executable, str(Path(__file__).resolve().parents[1] / "hooked_serving.py")]
FD_LIMIT = 256  # the server's hard open-file limit in these tests (soft: 64, raised at start): 128 client connections
WORKERS = 2  # images inferred at once (--inference-workers): the default on a 2-core machine, pinned for any machine


def body(width: int = 32, height: int = 32, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return json.dumps({"instances": [{"image": {"b64": base64.b64encode(encode_image(pixels)).decode()}}]}).encode()


SLOW, STUCK = body(17), body(13)


@pytest.fixture(scope="module")
def server(serving_package, tmp_path_factory):
    """Queue of 4, two inference workers, 3 s deadline, 5 s header and 1 s body time-outs, open-file limits
    64 (soft) and 256 (hard). The header time-out is long enough for the slow-client test to open its 300 connections and
    make a prediction before the first of them is timed out (on a loaded 2-core machine, 1 s was not)."""
    with predictor(serving_package, tmp_path_factory.mktemp("faults") / "serving.log", "--max-queue", "4",
                   "--request-timeout-s", "3", "--header-timeout-s", "5", "--body-timeout-s", "1",
                   "--score-threshold", "0.0", "--max-detections", "5", "--inference-workers", str(WORKERS),
                   launcher=HOOKED, fd_limit=(64, FD_LIMIT)) as srv:
        yield srv


def settled(url: str, before: dict, name: str, count: int, timeout: float = 10, **labels: str) -> dict:
    """/metrics once `name{labels}` has grown by `count` since `before` and no request is admitted (the
    server has seen every client leave), or after `timeout` seconds, whichever comes first."""
    deadline = time.monotonic() + timeout
    while True:
        now = metrics(url)
        grown = metric(now, name, **labels) - metric(before, name, **labels)
        if (grown >= count and metric(now, "maskrcnn_queue_depth") == 0) or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


def test_load_at_concurrency_1_4_16_64_is_answered_or_refused_cleanly(server):
    """Every request gets an HTTP answer: 200 while the queue has room, 503 with Retry-After beyond it;
    no other status, no reset. Up to the queue's depth (4), every request is served."""
    rows = []
    for concurrency in (1, 4, 16, 64):
        result = run_load(server.url, [body(seed=i) for i in range(max(8, concurrency))], concurrency)
        rows.append(load.summary(result))
        assert result.errors == 0, [(a.status, a.error, a.body[:100]) for a in result.answers if a.status not in (200, 503)]
        assert all(a.headers.get("retry-after") == "1" for a in result.answers if a.status == 503)
        if concurrency <= 4:
            assert result.statuses == {200: len(result.answers)}, rows[-1]
        else:
            assert result.statuses[200] >= 4, rows[-1]
    print("\n".join(map(str, rows)))
    assert server.proc.poll() is None


def test_saturation_is_refused_before_the_body_is_read_and_memory_stays_bounded(server):
    """24 clients at once with 8 MB bodies, against a queue of 4: 4 admitted, the rest refused with 503 and
    Retry-After; the process grows by about the admitted requests' worth, not 24 requests'."""
    big = json.dumps({"instances": [{"image": {"b64": "A" * (8 << 20)}}]}).encode()  # not an image: 400 once read
    before = metrics(server.url)

    def send() -> list:
        with ThreadPoolExecutor(12) as pool:  # 12 senders, 2 rounds: some of each round find the queue full
            return list(pool.map(lambda _: predict(server.url, big), range(24)))

    growth, answers = load.peak_rss_growth(server.proc.pid, send, interval=0.02)
    statuses = sorted(a.status for a in answers)
    assert set(statuses) <= {400, 503}, statuses
    refused = [a for a in answers if a.status == 503]
    assert refused and all(a.headers["retry-after"] == "1" and "limit of 4 queued requests" in a.json()["error"] for a in refused)
    after = metrics(server.url)
    assert metric(after, "maskrcnn_requests_rejected_total", reason="queue_full") - \
        metric(before, "maskrcnn_requests_rejected_total", reason="queue_full") == len(refused)
    # admitted at most 4 at once, each about 4x its 8 MB body while parsed
    assert growth < 4 * 4 * 8 + 96, f"RSS grew {growth:.0f} MB with 24 concurrent 8 MB bodies and a queue of 4"
    assert predict(server.url, body()).status == 200


def test_a_request_past_its_deadline_is_dropped_before_its_forward_pass(server):
    """Three requests of eight heavy images each (0.5 s an image) against a 3 s deadline, on two inference
    workers: all answered 504 at the deadline, and counted dropped (deadline); images not started by then
    are never computed (the two running requests compute 5 to 7 images each, the third, queued behind
    them, at most one)."""
    slow = json.loads(SLOW)["instances"][0]
    eight = json.dumps({"instances": [slow] * 8}).encode()
    before = metrics(server.url)
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: predict(server.url, eight), range(3)))
    assert [a.status for a in answers] == [504, 504, 504], answers
    for a in answers:
        assert "deadline of 3 s passed before its forward pass" in a.json()["error"]
    time.sleep(0.6)  # the image running at the deadline finishes; nothing after it starts
    after = metrics(server.url)
    assert metric(after, "maskrcnn_requests_dropped_total", reason="deadline") - \
        metric(before, "maskrcnn_requests_dropped_total", reason="deadline") == 3
    forwards = metric(after, "maskrcnn_detections_per_image_count") - metric(before, "maskrcnn_detections_per_image_count")
    assert 10 <= forwards <= 15, f"{forwards:.0f} of the 24 images computed; expected those started within 3 s"
    assert predict(server.url, body()).status == 200


def test_work_for_clients_that_left_is_dropped_and_counted(server):
    """Twelve heavy requests whose clients leave at once (the last four before the server has read their
    bodies): the next request does not wait for them, and /metrics counts them dropped (client_left), not
    answered."""
    before = metrics(server.url)
    forwards_before = metric(before, "maskrcnn_detections_per_image_count")
    for round_, linger in enumerate((0.05, 0.05, 0.0), 1):  # 3 rounds of 4 (the queue's depth); the last
        with ThreadPoolExecutor(4) as pool:                     # closes before the server has read its body
            list(pool.map(lambda _: abandon(server.url, SLOW, linger), range(4)))
        # the next round starts once this one is dropped, so none of them is refused for a full queue
        settled(server.url, before, "maskrcnn_requests_dropped_total", 4 * round_, reason="client_left")
    answer = predict(server.url, body())
    assert answer.status == 200, (answer.status, answer.error, answer.body[:200])
    after = metrics(server.url)
    left = metric(after, "maskrcnn_requests_dropped_total", reason="client_left") - \
        metric(before, "maskrcnn_requests_dropped_total", reason="client_left")
    answered_499 = metric(after, "maskrcnn_requests_total", status="499") - metric(before, "maskrcnn_requests_total", status="499")
    forwards = metric(after, "maskrcnn_detections_per_image_count") - forwards_before - 1  # less the good request
    full = metric(after, "maskrcnn_requests_rejected_total", reason="queue_full") - \
        metric(before, "maskrcnn_requests_rejected_total", reason="queue_full")
    assert left == 12 and answered_499 == 12, {"client_left": left, "499": answered_499, "queue_full": full}
    # at most one forward pass per worker and round had started before its client was seen to leave
    assert forwards <= 3 * WORKERS, f"{forwards:.0f} forward passes computed for 12 clients that left"


def test_slow_clients_up_to_the_descriptor_limit(server):
    """100 clients that send headers slowly do not stop a good client; 200 more, past the connection limit
    (128 under an open-file limit of 256), get a clean 503 at once; the slow ones get 408 after the header
    time-out; a body that stalls is cut after the body time-out; the process never reaches its limit."""
    assert load.fd_limits(server.proc.pid) == (FD_LIMIT, FD_LIMIT)  # the soft limit was raised to the hard one
    held = slow_clients(server.url, 100)
    try:
        assert predict(server.url, body()).status == 200  # served while 100 slow clients are held
        more = slow_clients(server.url, 200)
        try:
            peak_fds = load.open_fds(server.proc.pid)
            over = [read_status(s, timeout=5) for s in more[40:]]  # the last 160 are over the limit
        finally:
            for s in more:
                s.close()
        assert set(over) == {503}, {x: over.count(x) for x in set(over)}
        assert peak_fds < FD_LIMIT
        timed_out = [read_status(s, timeout=10) for s in held]  # 408 at 5 s after each opened
        assert set(timed_out) == {408}, {x: timed_out.count(x) for x in set(timed_out)}
    finally:
        for s in held:
            s.close()
    stalled = slow_clients(server.url, 1, f"POST {load.V1_PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{{".encode())[0]
    try:
        assert read_status(stalled, timeout=5) in ("closed", "reset")  # cut after 1 s without body
    finally:
        stalled.close()
    trickle = slow_clients(server.url, 1, f"POST {load.V1_PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n".encode())[0]
    began = time.monotonic()
    try:  # a byte every 0.5 s never pauses 1 s, but the body is still incomplete at the 3 s deadline
        while time.monotonic() - began < 8:
            try:
                trickle.sendall(b" ")
            except OSError:
                break
            time.sleep(0.5)
        assert time.monotonic() - began < 6, "a client trickling its body was never cut"
    finally:
        trickle.close()
    samples = metrics(server.url)
    assert metric(samples, "maskrcnn_connections_refused_total", reason="over_limit") >= 160
    assert metric(samples, "maskrcnn_connections_refused_total", reason="header_timeout") >= 100
    assert metric(samples, "maskrcnn_connections_refused_total", reason="body_timeout") >= 2
    assert predict(server.url, body()).status == 200 and server.proc.poll() is None


def test_a_stuck_forward_pass_fails_readiness_then_liveness_and_sigterm_still_ends_it(serving_package, tmp_path):
    """A forward pass that never returns: the other inference worker still answers; readiness fails past half
    the limit (traffic moves away), then liveness past the limit (Kubernetes restarts the pod); SIGTERM ends
    the process within the grace period."""
    with predictor(serving_package, tmp_path / "serving.log", "--forward-limit-s", "2", "--grace-period-s", "2",
                   "--drain-delay-s", "0", "--inference-workers", str(WORKERS), launcher=HOOKED) as srv:
        for path in ("/", "/v2/health/live", "/v2/health/ready", "/v1/models/maskrcnn", "/v2/models/maskrcnn/ready"):
            assert request(srv.url, "GET", path).status == 200, path
        with ThreadPoolExecutor(1) as pool:
            stuck = pool.submit(predict, srv.url, STUCK, 30)
            began = time.monotonic()
            time.sleep(0.2)  # the stuck request reaches its worker first
            answer = predict(srv.url, body(), 5)  # on the other worker, while the first is stuck
            assert answer.status == 200 and time.monotonic() - began < 0.9, answer
            time.sleep(1.3 - (time.monotonic() - began))
            for path in ("/v2/health/ready", "/v1/models/maskrcnn", "/v2/models/maskrcnn/ready"):
                answer = request(srv.url, "GET", path)
                assert answer.status == 503 and "past half the limit of 2 s" in answer.body.decode(), (path, answer)
            assert request(srv.url, "GET", "/v2/health/live").status == 200  # readiness fails first
            time.sleep(1.2)
            for path in ("/", "/v2/health/live"):
                answer = request(srv.url, "GET", path)
                assert answer.status == 503 and "an inference thread is stuck" in answer.body.decode(), (path, answer)
            srv.proc.send_signal(signal.SIGTERM)
            assert srv.proc.wait(10) == 1  # it does not wait for the stuck thread
            answer = stuck.result()  # answered when the grace period ended, not left hanging
            assert answer.status == 503 and "grace period ended before this request's answer" in answer.json()["error"]
        assert "exiting with a forward pass still running" in srv.tail()


def test_sigterm_drains_in_flight_requests_refuses_new_ones_with_503_and_exits_0(serving_package, tmp_path):
    with predictor(serving_package, tmp_path / "serving.log", "--drain-delay-s", "0.5", launcher=HOOKED) as srv:
        with ThreadPoolExecutor(3) as pool:
            in_flight = [pool.submit(predict, srv.url, SLOW) for _ in range(3)]  # 1.5 s of work
            time.sleep(0.3)
            srv.proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            ready = request(srv.url, "GET", "/v2/health/ready")
            assert ready.status == 503 and "shutting down" in ready.body.decode()
            assert request(srv.url, "GET", "/v2/health/live").status == 200  # draining, not dead
            refused = predict(srv.url, body())
            assert refused.status == 503 and refused.headers["retry-after"] == "1", refused
            assert "shutting down" in refused.json()["error"]
            assert [f.result().status for f in in_flight] == [200, 200, 200]
        assert srv.proc.wait(15) == 0, srv.tail()
    assert "drained after" in srv.tail()


def _noise_request(side: int, **params) -> bytes:
    """A V1 request of one noise PNG (stored uncompressed: the largest body for its pixels)."""
    import io

    from PIL import Image

    pixels = np.random.default_rng(side).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=0)
    return json.dumps({"instances": [{"image": {"b64": base64.b64encode(buf.getvalue()).decode()}}],
                       "parameters": params}).encode()


def test_liveness_answers_while_the_queue_holds_the_largest_bodies(server):
    """Issue 32: 8 clients keep the queue (4) full of 19 MB bodies for 6 s while liveness is probed every
    50 ms: every probe is answered 200 within Kubernetes' default 1 s time-out (bodies are parsed and
    decoded on worker threads, not on the event loop). `benchmarks/serving_liveness.py` measures the
    latencies."""
    big = _noise_request(2200)
    assert len(big) > 18e6
    stop = time.monotonic() + 6
    answers: list[int] = []

    def client() -> None:
        while time.monotonic() < stop:
            answers.append(predict(server.url, big, timeout=60).status)

    with ThreadPoolExecutor(8) as pool:
        for _ in range(8):
            pool.submit(client)
        time.sleep(1)
        probes = []
        while time.monotonic() < stop:
            began = time.perf_counter()
            status = request(server.url, "GET", "/", timeout=10).status
            probes.append((status, time.perf_counter() - began))
            time.sleep(0.05)
    assert len(probes) > 20 and all(status == 200 for status, _ in probes), probes
    slowest = max(seconds for _, seconds in probes)
    assert slowest < 1.0, f"a liveness probe took {slowest:.2f} s with the queue full of 19 MB bodies"
    assert set(answers) <= {200, 503} and 200 in answers, sorted(set(answers))


def test_an_answer_its_client_never_reads_is_dropped_after_the_body_timeout(server):
    """An overlay answer (megabytes) to a client that sends its request and never reads: the connection is
    closed once the answer has waited unread for --body-timeout-s (1 s here), counted as write_timeout,
    and the server goes on serving."""
    import socket

    before = metrics(server.url)
    host, port = load.loopback(server.url)
    data = _noise_request(1600, overlay=True)
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    try:
        sock.sendall(b"POST /v1/models/maskrcnn:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        after = settled(server.url, before, "maskrcnn_connections_refused_total", 1, timeout=30, reason="write_timeout")
        assert metric(after, "maskrcnn_connections_refused_total", reason="write_timeout") - \
            metric(before, "maskrcnn_connections_refused_total", reason="write_timeout") == 1
    finally:
        sock.close()
    assert predict(server.url, body()).status == 200


def test_the_connection_guard_is_built_only_on_the_uvicorn_it_was_tested_against():
    """The guard's one private dependency (uvicorn's `H11Protocol`) is checked: here it is all there; a
    protocol that lost a method or an attribute, or another uvicorn series, is named, and the guard refuses."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from serving.connections import guarded_protocol, private_api_problems
    from serving.limits import ServingLimits

    assert private_api_problems() == []
    assert issubclass(guarded_protocol(ServingLimits()), H11Protocol)

    class Changed(H11Protocol):
        pause_writing = None  # a method gone

    assert private_api_problems(Changed) == ["H11Protocol.pause_writing() is gone"]
    assert private_api_problems(version="0.99.0") == ["uvicorn 0.99.0 is not the tested 0.54.x: check "
                                                      "serving/connections.py against it"]

    class Stub:
        def __init__(self):
            self.connections = set()
            self.cycle = None
            self.loop = None
            self.transport = None

    for name in ("connection_made", "data_received", "on_response_complete", "connection_lost", "pause_writing",
                 "resume_writing"):
        setattr(Stub, name, lambda self: None)
    assert private_api_problems(Stub) == ["H11Protocol no longer sets self.client"]
