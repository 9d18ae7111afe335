"""Canaries judged on live metrics (`release.canary`), with a real Prometheus scraping real predictors
(`python -m serving` on 127.0.0.1) under a bounded load: a stable model (v1) and canaries beside it. The
faults are real processes misbehaving: a forward pass that raises (5xx) or takes 0.6 s longer (the test
hook `tests/hooked_serving.py`), and a model whose scores collapse (its own weights: the classifier's
background logit raised, so that it finds nothing). The load plays Knative's traffic split: one request
in four to the canary."""

from __future__ import annotations

import base64
import json
import math
import sys
import threading
import time
from collections import defaultdict
import shutil
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY, encode_image
from maskrcnn.config import load_config

from devstack import monitoring
from devstack.load import predict, predictor
from release.canary import PROMOTE, ROLLBACK, CanaryBounds, PrometheusApi, judge_canary

pytestmark = pytest.mark.slow

HOOKED = [sys.executable, str(Path(__file__).resolve().parents[1] / "hooked_serving.py")]
# small numbers for a test: judged after 3 s and 12 requests each, the windows of a few seconds
BOUNDS = CanaryBounds(min_requests=12, min_duration_s=3, window_s=120, timeout_s=60, interval_s=1,
                      max_latency_ratio=2.0, latency_slack_s=0.25)


def scene(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((48, 48, 3), 60, np.uint8)
    for _ in range(3):
        x, y = rng.integers(0, 36, 2)
        img[y:y + 10, x:x + 10] = rng.integers(120, 230, 3)
    return img


BODIES = [json.dumps({"instances": [{"image": {"b64": base64.b64encode(encode_image(scene(i))).decode()}}]}).encode()
          for i in range(16)]


def collapsed_package(folder: Path) -> Path:
    """The tiny model with its classifier's background logit raised by 20: every object scores ~0."""
    import torch

    from maskrcnn.labels import LabelMap
    from maskrcnn.model import build_model
    from training.export import write_package

    cfg = load_config(TINY, [])
    torch.manual_seed(0)
    labels = LabelMap([1, 2, 3], ["circle", "square", "triangle"])
    model = build_model(cfg.model, labels.num_classes)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias[0] += 20.0
    write_package(model, cfg, labels, {"epoch": 0, "metrics": {}, "mlflow_run_id": "r1", "model_version": "5"}, folder)
    return folder


def stamped(serving_package: Path, folder: Path, version: str, model_name: str = "") -> Path:
    from maskrcnn.package import open_package

    names = {"model_name": model_name} if model_name else {}
    return open_package(serving_package).stamped({"model_version": version, **names}).save(folder)


class QueueProxyStandIn:
    """A stand-in for Knative's queue-proxy metrics (Knative cannot run here): the sidecar in front of each
    revision counts every request it proxies as `revision_app_request_count{namespace_name, revision_name,
    response_code, response_code_class}` (read from Knative Serving's queue-proxy metrics), including those
    the predictor never answered: a refused or reset connection is the 502 queue-proxy returns then.
    `revisions` maps a predictor's URL to its revision name; Prometheus scrapes `url`."""

    NAME = "revision_app_request_count"  # as Knative names it (prometheus_client would add _total to a counter)

    def __init__(self, revisions: dict[str, str], namespace: str = "models"):
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.core import Metric

        self.revisions, self.namespace = revisions, namespace
        self.counts: dict[tuple[str, str], int] = defaultdict(int)  # (revision, code) -> requests
        self._lock = threading.Lock()
        stand_in = self

        class Collector:
            def collect(self):
                metric = Metric(stand_in.NAME, "Requests the queue-proxy proxied to the app", "unknown")
                with stand_in._lock:
                    for (revision, code), n in stand_in.counts.items():
                        metric.add_sample(stand_in.NAME, {"namespace_name": stand_in.namespace, "revision_name": revision,
                                                          "response_code": code, "response_code_class": f"{code[0]}xx"}, n)
                yield metric

        self.registry = CollectorRegistry()
        self.registry.register(Collector())
        self.server, _ = start_http_server(0, addr="127.0.0.1", registry=self.registry)
        self.url = f"127.0.0.1:{self.server.server_address[1]}"

    def record(self, url: str, status: int | None) -> None:
        if url in self.revisions:
            with self._lock:
                self.counts[(self.revisions[url], str(status if status is not None else 502))] += 1


class Router:
    """Bounded load split between predictors as Knative splits it: `split` maps each URL to its percent of
    the requests (in steps of 5; `route` changes it); 4 clients, at most `rate` requests a second and
    `limit` in all, stopped on exit. `sent`: the statuses each URL answered."""

    def __init__(self, split: dict[str, int] | None = None, limit: int = 3000, rate: float = 25,
                 queue_proxy: QueueProxyStandIn | None = None):
        self.limit, self.interval, self.sent, self.queue_proxy = limit, 4 / rate, defaultdict(list), queue_proxy
        self._slots: list[str] = []
        self._per_url: dict[str, int] = {}
        self._n, self._lock, self._stop = 0, threading.Lock(), threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(4)]
        self.route(split or {})

    def route(self, split: dict[str, int]) -> None:
        with self._lock:
            self._slots = [url for url, percent in split.items() for _ in range(round(percent / 5))]

    def _client(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if self._n >= self.limit:
                    return
                slots, n = self._slots, self._n
                if slots:
                    self._n += 1
            if not slots:
                time.sleep(0.05)
                continue
            url, began = slots[n % len(slots)], time.monotonic()
            with self._lock:  # each predictor sees the same images in the same order: their statistics compare
                k = self._per_url[url] = self._per_url.get(url, -1) + 1
            status = predict(url, BODIES[k % len(BODIES)], timeout=30).status
            self.sent[url].append(status)
            if self.queue_proxy is not None:
                self.queue_proxy.record(url, status)
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - began)))

    def __enter__(self) -> Router:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


@pytest.fixture(scope="module")
def fleet(serving_package, tmp_path_factory):
    """Eight predictors (stable v1; canaries v2 good, v3 failing, v4 slow, v5 collapsed, v6 refusing 9
    requests in 10 with 400, v7 crash-looping: killed in every 8th forward pass and restarted; and another
    registered model, `other`, whose v2 fails) and a Prometheus scraping them every second."""
    root = tmp_path_factory.mktemp("canary")
    packages = {"1": stamped(serving_package, root / "v1", "1"), "2": stamped(serving_package, root / "v2", "2"),
                "3": stamped(serving_package, root / "v3", "3"), "4": stamped(serving_package, root / "v4", "4"),
                "5": collapsed_package(root / "v5"), "6": stamped(serving_package, root / "v6", "6"),
                "7": stamped(serving_package, root / "v7", "7"),
                "other-2": stamped(serving_package, root / "other-v2", "2", model_name="other")}
    faults = {"3": "error", "4": "slow:0.6", "6": "refuse", "7": "crash:8", "other-2": "error"}
    with ExitStack() as stack:
        urls = {}
        for version, package in packages.items():
            env = {"HOOK_FAULT": faults[version]} if version in faults else None
            srv = stack.enter_context(predictor(package, root / f"v{version}.log", "--score-threshold", "0.05",
                                                launcher=HOOKED, env=env))
            urls[version] = srv.url
        queue_proxy = QueueProxyStandIn({url: f"maskrcnn-predictor-{version}" for version, url in urls.items()})
        stack.callback(queue_proxy.server.shutdown)
        mon = monitoring.start(root / "prometheus", [*(u.removeprefix("http://") for u in urls.values()), queue_proxy.url], [])
        stack.callback(mon.stop)
        yield urls, mon, queue_proxy


@pytest.mark.parametrize("canary, verdict, failed", [
    ("2", PROMOTE, set()),
    ("3", ROLLBACK, {"error_ratio", "serving_path_error_ratio", "p95_latency_s", "mean_score",
                     "detections_per_image"}),  # it answered nothing
    ("4", ROLLBACK, {"p95_latency_s"}),
    ("5", ROLLBACK, {"mean_score", "detections_per_image"}),
    ("6", ROLLBACK, {"error_ratio", "serving_path_error_ratio"}),  # 4xx: counted as the client saw them
    ("7", ROLLBACK, {"restarts", "serving_path_error_ratio"}),  # and the requests it dropped, 502 in the serving path
], ids=["good", "5xx", "slow", "collapsed", "4xx", "crash-looping"])
def test_a_canary_is_judged_against_the_stable_model_on_live_metrics(fleet, canary, verdict, failed):
    urls, mon, queue_proxy = fleet
    prom = PrometheusApi(mon.prometheus_url)
    revisions = {"canary": f"maskrcnn-predictor-{canary}", "stable": "maskrcnn-predictor-1"}
    with Router({urls["1"]: 75, urls[canary]: 25}, queue_proxy=queue_proxy) as load:
        analysis = judge_canary(prom, stable="1", canary=canary, bounds=BOUNDS, revisions=revisions, namespace="models")
    assert analysis.verdict == verdict, analysis.reason
    failed_checks = {c.name for c in analysis.checks if not c.passed}
    if canary in ("6", "7"):  # what else they break depends on timing (the first success, the kills); these always show
        assert failed <= failed_checks, analysis.checks
    else:
        assert failed_checks == failed, analysis.checks
    assert analysis.requests["canary"] >= BOUNDS.min_requests and analysis.requests["stable"] >= BOUNDS.min_requests
    assert analysis.waited_s >= BOUNDS.min_duration_s
    assert set(load.sent[urls["1"]]) == {200}, load.sent  # the stable model served throughout
    seen = set(load.sent[urls[canary]])
    assert seen == {"3": {500}, "6": seen & {200, 400}}.get(canary, seen if canary == "7" else {200}), load.sent
    assert canary != "6" or 400 in seen, load.sent
    if verdict == PROMOTE:  # promoted only on enough successes
        assert analysis.requests["canary_2xx"] >= BOUNDS.min_requests <= analysis.requests["stable_2xx"]
    checks = {c.name: c for c in analysis.checks}
    if canary == "3":
        assert checks["error_ratio"].canary == 1.0 and checks["error_ratio"].stable == 0.0
    if canary == "4":
        assert checks["p95_latency_s"].canary > 3 * checks["p95_latency_s"].stable
    if canary == "6":  # 9 in 10 refused: a non-2xx ratio far past the stable model's 0
        assert checks["error_ratio"].canary > 0.5 and checks["error_ratio"].stable == 0.0
    if canary == "7":
        assert checks["restarts"].canary >= 1 and "restarted" in checks["restarts"].detail
        assert 200 in seen and seen - {200}, load.sent  # it answered some, and dropped others mid-request
    if canary == "5":
        assert checks["detections_per_image"].canary == 0.0 < checks["detections_per_image"].stable
        assert math.isnan(checks["mean_score"].canary) and "no detection at all" in checks["mean_score"].detail
    record = analysis.to_dict()
    assert json.loads(json.dumps(record, allow_nan=False))["verdict"] == verdict  # plain JSON, no NaN
    assert analysis.tags()["canary.verdict"] == verdict and analysis.metrics()["canary_promoted"] == (verdict == PROMOTE)


def test_another_model_serving_the_same_version_number_is_never_counted_in(fleet):
    """`other` v2 (failing) is served beside `maskrcnn` v2 (good): judged by model name, maskrcnn's canary is
    promoted; summed over both (what the analysis did before series carried model_name), it would not be."""
    urls, mon, _ = fleet
    prom = PrometheusApi(mon.prometheus_url)
    with Router({urls["1"]: 70, urls["2"]: 20, urls["other-2"]: 10}):
        named = judge_canary(prom, stable="1", canary="2", bounds=BOUNDS, model_name="maskrcnn")
        summed = judge_canary(prom, stable="1", canary="2", bounds=BOUNDS)
    assert named.verdict == PROMOTE, named.reason
    assert summed.verdict == ROLLBACK and "error_ratio" in summed.reason, summed.reason
    with pytest.raises(ValueError, match="model name"):
        judge_canary(prom, stable="1", canary="2", bounds=BOUNDS, model_name='x"} or vector(1)')


def test_too_little_traffic_is_a_rollback_not_a_promotion(fleet):
    """No request reaches the canary within the time-out: rolled back, saying how many it had."""
    urls, mon, _ = fleet
    bounds = CanaryBounds(min_requests=12, min_duration_s=1, window_s=60, timeout_s=3, interval_s=1)
    with Router({urls["1"]: 100}, limit=40):  # v9: a canary no request ever reached
        analysis = judge_canary(PrometheusApi(mon.prometheus_url), stable="1", canary="9", bounds=bounds)
    assert analysis.verdict == ROLLBACK and analysis.checks == []
    assert "too little successful traffic" in analysis.reason and "canary v9 0 of 0 requests" in analysis.reason, \
        analysis.reason


def test_bad_bounds_selectors_and_urls_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="min_requests must be an integer >= 1"):
        CanaryBounds(min_requests=0)
    with pytest.raises(ValueError, match="max_score_drop must be in"):
        CanaryBounds(max_score_drop=1.5)
    with pytest.raises(ValueError, match="window_s must be a finite number"):
        CanaryBounds(window_s=float("inf"))
    with pytest.raises(ValueError, match=r"canary_bounds: unknown bound\(s\) \['min_request'\]"):
        CanaryBounds.from_dict({"min_request": 5}, "canary_bounds")
    assert CanaryBounds.from_dict({"min_requests": 50.0}).min_requests == 50  # a KFP Struct's numbers are doubles
    with pytest.raises(ValueError, match="min_requests must be an integer"):
        CanaryBounds.from_dict({"min_requests": 50.5})
    with pytest.raises(ValueError, match="Prometheus URL: expected http"):
        PrometheusApi("file:///etc/passwd")
    from release.canary import selector_for

    with pytest.raises(ValueError, match="Prometheus selector"):
        selector_for("1", 'namespace="models"} or vector(1) #')
    with pytest.raises(ValueError, match="model version"):
        selector_for('1"} or vector(1', "")
    assert selector_for("7", 'namespace="models", pod=~"maskrcnn-.*"') == \
        '{model_version="7",namespace="models", pod=~"maskrcnn-.*"}'


def test_an_unreachable_prometheus_is_an_error_not_a_verdict(tmp_path):
    from devstack.procs import free_port
    from release.canary import CanaryError

    prom = PrometheusApi(f"http://127.0.0.1:{free_port()}", timeout=2)
    with pytest.raises(CanaryError, match="could not answer"):
        judge_canary(prom, stable="1", canary="2", bounds=BOUNDS)


def test_promote_with_a_canary_serves_a_good_one_to_all_and_rolls_a_failing_one_back_kserve_stand_in(
        mlflow_stack, serving_package, k8s, tmp_path, monkeypatch):
    """The whole release with canaries, on the real MLflow stack, S3 server and Kubernetes API server, a real
    Prometheus and real predictors started from the published packages as KServe would (the stand-in calls
    back when a revision starts, and its traffic split drives the load). v1 is promoted outright; v2 goes
    out as a 25% canary, is judged good and gets all the traffic; v3 (`release promote`, whose forward pass
    fails) is judged bad and rolled back: v2 serves everything, v3 is tagged with why."""
    from kserve_stand_in import IsvcController
    from mlflow.tracking import MlflowClient
    from helpers import ISVC, logged_run

    from release.__main__ import CANARY_ROLLED_BACK, logged_model_of, main
    from kfp.dsl import Metrics, Model

    from pipelines.components import promote as promote_step
    from release.promote import promote
    from maskrcnn.package import open_package

    for key, value in mlflow_stack.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_stack.tracking_uri)
    client = MlflowClient(mlflow_stack.tracking_uri)
    name = f"canary-{time.time_ns()}"
    prefix = f"s3://{mlflow_stack.state.models_bucket}/canary"
    runs = [logged_run(client, name, shutil.copytree(serving_package, tmp_path / f"run{i}")) for i in (1, 2, 3)]
    model_uri = lambda run_id: logged_model_of(client, run_id)  # noqa: E731

    with ExitStack() as stack:
        mon = monitoring.start(tmp_path / "prometheus", [], [])
        stack.callback(mon.stop)
        router = stack.enter_context(Router())
        served: dict[str, str] = {}  # storageUri -> the URL of the predictor serving it
        revisions: dict[str, str] = {}  # revision -> URL

        def start_revision(revision: str, uri: str) -> None:  # KServe: storage initializer, then the predictor
            if uri not in served:
                folder = open_package(uri, cache_dir=tmp_path / "cache").save(tmp_path / "pods" / revision)
                fault = {"HOOK_FAULT": "error"} if uri.endswith("/v3") else None
                srv = stack.enter_context(predictor(folder, tmp_path / f"{revision}.log", "--score-threshold", "0.05",
                                                    launcher=HOOKED, env=fault))
                served[uri] = srv.url
                # the namespace label, as PodMonitoring adds it: promote's default selector matches on it
                mon.set_targets([u.removeprefix("http://") for u in served.values()], {"namespace": k8s.namespace})
            revisions[revision] = served[uri]

        def route(traffic: list[dict]) -> None:  # Knative: the traffic split, as the status reports it
            router.route({revisions[t["revisionName"]]: t["percent"] for t in traffic if t["revisionName"] in revisions})

        ctl = IsvcController(k8s.admin, ISVC, k8s.namespace, on_revision=start_revision, on_traffic=route)
        ctl.create(f"{prefix}/previous")
        isvc = lambda: ctl.get()["spec"]["predictor"]  # noqa: E731
        with ctl:
            common = dict(tracking_uri=mlflow_stack.tracking_uri, model_name=name, storage_prefix=prefix,
                          isvc_name=ISVC, namespace=k8s.namespace, ready_timeout=60, kubeconfig=k8s.kubeconfig)
            first = promote(package_dir=tmp_path / "run1", model_uri=model_uri(runs[0]), **common)
            assert first.version == "1" and first.canary is None

            # v2 through the pipeline's promote step (the function KFP runs), its analysis in the step's Metrics
            metrics = Metrics(uri=str(tmp_path / "metrics"))
            second = promote_step(model=Model(uri=str(tmp_path / "run2")), model_uri=model_uri(runs[1]), reason="gate",
                                  evidence={"segm_map_delta_low": "0.010000"}, canary_percent=25, kubeconfig=k8s.kubeconfig, prometheus_url=mon.prometheus_url,
                                  prometheus_selector="", canary_bounds={**vars(BOUNDS), "min_requests": 12.0},
                                  metrics=metrics, **{k: v for k, v in common.items() if k != "kubeconfig"})
            assert metrics.metadata["canary_promoted"] == 1.0 and metrics.metadata["promoted"] == 1.0, metrics.metadata
            assert metrics.metadata["canary_requests"] >= 12 and "every check passed" in metrics.metadata["canary_reason"]
            assert {"canary_error_ratio", "stable_p95_latency_s", "canary_mean_score"} <= set(metrics.metadata)
            assert second == f"{prefix}/{name}/v2"
            from mlflow.tracking import MlflowClient

            assert MlflowClient(mlflow_stack.tracking_uri).get_model_version(name, "2").tags["gate.segm_map_delta_low"] == "0.010000"
            assert isvc()["model"]["storageUri"] == second and "canaryTrafficPercent" not in isvc()
            traffic = ctl.get()["status"]["components"]["predictor"]["traffic"]
            assert [(t["percent"], t["latestRevision"]) for t in traffic] == [(100, True)]
            assert client.get_model_version_by_alias(name, "champion").version == "2"
            tags = client.get_run(runs[1]).data.tags
            assert tags["canary.verdict"] == PROMOTE and tags["canary.stable_version"] == "1"
            record = json.loads((Path(client.download_artifacts(runs[1], "canary.json", str(tmp_path)))).read_text())
            assert record["verdict"] == PROMOTE and record["requests"]["canary"] >= BOUNDS.min_requests
            assert {c["name"] for c in record["checks"]} == {"error_ratio", "restarts", "p95_latency_s", "mean_score",
                                                               "detections_per_image"}

            flags = [f"--canary-{k.replace('_', '-')}={v}" for k, v in vars(BOUNDS).items()]
            code = main(["--model-name", name, "--isvc-name", ISVC, "--namespace", k8s.namespace, "--kubeconfig",
                         k8s.kubeconfig, "--ready-timeout", "60", "promote", runs[2], "--storage-prefix", prefix,
                         "--min-segm-map", "0", "--min-mask-iou", "0", "--margin", "-1", "--canary-percent", "25",
                         "--prometheus-url", mon.prometheus_url, *flags])
            assert code == CANARY_ROLLED_BACK
            assert isvc()["model"]["storageUri"] == second and "canaryTrafficPercent" not in isvc()
            traffic = ctl.get()["status"]["components"]["predictor"]["traffic"]
            assert [(t["percent"], revisions[t["revisionName"]]) for t in traffic] == [(100, served[second])]
        failed = client.get_model_version(name, "3").tags
        assert failed["canary.verdict"] == ROLLBACK
        assert failed["promotion.failed"].startswith("canary failed: error_ratio 1 against stable 0")
        assert f"storageUri rolled back to {second}" in failed["promotion.failed"]
        assert client.get_model_version_by_alias(name, "champion").version == "2"
        assert client.get_run(runs[2]).data.tags["canary.verdict"] == ROLLBACK
        assert set(router.sent[served[second]]) == {200}  # the good model answered every request
        assert set(router.sent[served[f"{prefix}/{name}/v3"]]) == {500}
    assert ctl.seen == [f"{prefix}/{name}/v1", f"{prefix}/{name}/v2", f"{prefix}/{name}/v3", f"{prefix}/{name}/v2"]


def test_a_canary_without_prometheus_or_champion_is_refused_before_anything_is_registered(mlflow_stack, serving_package,
                                                                                          tmp_path):
    from mlflow.tracking import MlflowClient
    from helpers import logged_run

    from release.promote import CanaryPlan, promote

    client = MlflowClient(mlflow_stack.tracking_uri)
    name = f"canary-refused-{time.time_ns()}"
    run_id = logged_run(client, name, shutil.copytree(serving_package, tmp_path / "pkg"))
    common = dict(package_dir=tmp_path / "pkg", model_uri="models:/unused", tracking_uri=mlflow_stack.tracking_uri,
                  model_name=name, storage_prefix="s3://unused", isvc_name=ISVC_NAME)
    with pytest.raises(ValueError, match="give the Prometheus"):
        promote(**common, canary_percent=10)
    with pytest.raises(ValueError, match=r"canary_percent must be an integer in \[1, 99\]"):
        promote(**common, canary_percent=100, canary_plan=CanaryPlan("http://127.0.0.1:9"))
    with pytest.raises(ValueError, match="has no champion yet"):
        promote(**common, canary_percent=10, canary_plan=CanaryPlan("http://127.0.0.1:9"))
    assert client.search_model_versions(f"name = '{name}'") == [] and run_id


ISVC_NAME = "maskrcnn"
