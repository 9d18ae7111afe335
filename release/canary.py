"""Judge a canary on live metrics: the canary model against the stable one, as Prometheus saw them serve.

Once KServe routes the canary's share of the traffic, `judge_canary` queries Prometheus every
`interval_s` for both models' series (told apart by the `model_version` label the predictor puts on
every metric, see serving.observe), until each has served `min_requests` requests and `min_duration_s`
has passed, then compares them over that time (at most `window_s`):

- error ratio: the canary's share of answers that were not 2xx (5xx, but also 4xx refusals and 499 for
  clients that gave up: everything the client saw fail) is at most the stable model's plus
  `max_error_ratio_increase`;
- restarts: the canary's request counter never reset in the window (a predictor that crashed or was
  OOM-killed loses the requests it had counted, and never counts those it dropped: a crash-looping
  canary must not be judged on the requests it survived);
- the serving path's error ratio, where Prometheus scrapes Knative's queue-proxy: the non-2xx share of the
  canary revision's requests as the sidecar in front of it counted them (`revision_app_request_count` by
  `response_code_class`), which includes the requests a crashing predictor never recorded;
- p95 latency of answered (2xx) requests: at most `max_latency_ratio` times the stable model's (differences
  under `latency_slack_s` never fail: 12 ms against 8 ms is noise);
- mean detection score: at least (1 - `max_score_drop`) times the stable model's; a canary that returns
  no detection at all where the stable model returns some has collapsed;
- detections per image: within `max_detections_change` (relative) of the stable model's, or 0.5 of it.

A check that fails on `min_requests` answers of any kind rolls back at once. To be promoted, both models
must have answered `min_requests` requests *successfully* (2xx) within `timeout_s` and every check must
pass; too little (successful) traffic, and a statistic that cannot be computed (NaN: nothing to compare
with), are rollbacks too: nothing was shown. The
result (`CanaryAnalysis`) is plain data: its JSON goes to the MLflow run and its numbers to the
pipeline's Metrics.

    bounds = CanaryBounds(min_requests=200)
    analysis = judge_canary(PrometheusApi("http://prometheus.monitoring:9090"), stable="3", canary="4",
                            bounds=bounds, selector='namespace="models"')
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from maskrcnn.waiting import connection_error, retry_call

log = logging.getLogger(__name__)

PROMOTE, ROLLBACK = "promote", "rollback"
ANALYSIS_FILE = "canary.json"
# label matchers: name="value" or name=~"regex", comma-separated (no braces); values without quotes inside
SELECTOR = re.compile(r'^\s*([a-zA-Z_][a-zA-Z0-9_]*\s*(=|!=|=~|!~)\s*"[^"\\{}]*"\s*)(,\s*[a-zA-Z_][a-zA-Z0-9_]*\s*(=|!=|=~|!~)\s*"[^"\\{}]*"\s*)*$')
VERSION = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MODEL_NAME = re.compile(r"^[A-Za-z0-9._-]{1,256}$")


class CanaryError(RuntimeError):
    """The analysis could not be made (Prometheus unreachable or answering errors)."""


@dataclass(frozen=True)
class CanaryBounds:
    """How a canary is judged. Every field is validated in `__post_init__` (the error names the field)."""

    min_requests: int = 100  # requests each model must have answered before anything is judged
    min_duration_s: float = 120.0  # the least time the canary is watched, even with enough requests
    window_s: float = 600.0  # the longest stretch of time compared (the newest), once the minimums are met
    timeout_s: float = 1800.0  # without enough requests by then: rolled back (nothing was shown)
    interval_s: float = 15.0  # between two looks at Prometheus (its scrape interval is 30 s on the cluster)
    max_error_ratio_increase: float = 0.01  # canary 5xx ratio <= stable's + this
    max_latency_ratio: float = 1.5  # canary p95 <= this x stable p95 ...
    latency_slack_s: float = 0.05  # ... or stable p95 + this, whichever is larger
    max_score_drop: float = 0.25  # canary mean score >= (1 - this) x stable's
    max_detections_change: float = 0.5  # |canary - stable| detections per image <= this x stable's, or 0.5

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "min_requests":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"canary bounds: min_requests must be an integer >= 1, got {value!r}")
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"canary bounds: {f.name} must be a finite number >= 0, got {value!r}")
        for name in ("window_s", "timeout_s", "interval_s", "max_latency_ratio"):
            if getattr(self, name) <= 0:
                raise ValueError(f"canary bounds: {name} must be > 0, got {getattr(self, name)!r}")
        if self.max_latency_ratio < 1:
            raise ValueError(f"canary bounds: max_latency_ratio must be >= 1, got {self.max_latency_ratio!r}")
        if not 0 <= self.max_score_drop <= 1:
            raise ValueError(f"canary bounds: max_score_drop must be in [0, 1], got {self.max_score_drop!r}")
        if self.min_duration_s > self.timeout_s:
            raise ValueError(f"canary bounds: min_duration_s ({self.min_duration_s}) must not exceed timeout_s "
                             f"({self.timeout_s})")

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "canary bounds") -> CanaryBounds:
        """From a mapping (the pipeline's parameter, a config file): unknown keys are an error that names them."""
        if not isinstance(values, dict):
            raise ValueError(f"{where}: expected a mapping of bound names to numbers, got {type(values).__name__}")
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{where}: unknown bound(s) {unknown}; known: {sorted(f.name for f in fields(cls))}")
        # a KFP dict parameter is a protobuf Struct, whose numbers are all doubles: 100.0 means 100
        ints = {f.name for f in fields(cls) if f.type in (int, "int")}
        return cls(**{k: int(v) if k in ints and isinstance(v, float) and v.is_integer() else v for k, v in values.items()})


@dataclass(frozen=True)
class Check:
    """One comparison: the canary's value, the stable model's, the limit it was held to, and the verdict."""

    name: str
    canary: float | None
    stable: float | None
    limit: str
    passed: bool
    detail: str = ""


@dataclass
class CanaryAnalysis:
    verdict: str  # "promote" or "rollback"
    reason: str
    stable_version: str
    canary_version: str
    requests: dict[str, float]  # per model, in the compared window: all ("canary", "stable") and 2xx ("canary_2xx", ...)
    window_s: float
    waited_s: float
    bounds: CanaryBounds
    checks: list[Check] = field(default_factory=list)

    @property
    def promote(self) -> bool:
        return self.verdict == PROMOTE

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (a missing value, NaN, becomes null)."""
        return _no_nan(asdict(self))

    def tags(self) -> dict[str, str]:
        """MLflow tags (short values): the verdict, the reason, each check's canary and stable values."""
        out = {"canary.verdict": self.verdict, "canary.reason": self.reason[:5000],
               "canary.stable_version": self.stable_version, "canary.window_s": f"{self.window_s:.0f}"}
        for check in self.checks:
            out[f"canary.{check.name}"] = f"{_fmt(check.canary)} (stable {_fmt(check.stable)}; {check.limit})"
        return out

    def metrics(self) -> dict[str, float]:
        """Numbers for the pipeline's Metrics: the verdict (1 promote, 0 roll back) and each check's values."""
        out = {"canary_promoted": 1.0 if self.promote else 0.0,
               "canary_requests": float(self.requests.get("canary", 0.0)),
               "stable_requests": float(self.requests.get("stable", 0.0))}
        for check in self.checks:
            for who in ("canary", "stable"):
                value = getattr(check, who)
                if value is not None and math.isfinite(value):
                    out[f"{who}_{check.name}"] = float(value)
        return out


def _no_nan(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_no_nan(v) for v in value]
    return value


def _fmt(value: float | None) -> str:
    return "none" if value is None or not math.isfinite(value) else f"{value:.4g}"


class PrometheusApi:
    """Instant queries through Prometheus' HTTP API (`/api/v1/query`), retried while the error is transient.
    `url`: http(s)://host:port[/prefix] of Prometheus (or a compatible frontend, e.g. GKE Managed
    Prometheus' frontend); `token`: a bearer token, when the frontend wants one."""

    def __init__(self, url: str, token: str = "", timeout: float = 30.0):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"Prometheus URL: expected http(s)://host[:port][/path], got {url!r}")
        self.url, self.token, self.timeout = url.rstrip("/"), token, timeout

    def _get(self, expr: str) -> dict[str, Any]:
        request = urllib.request.Request(f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:  # noqa: S310 - http(s) checked above
                return json.loads(answer.read(16 << 20))
        except urllib.error.HTTPError as exc:
            exc.status = exc.code  # for maskrcnn.waiting.connection_error: 5xx and 429 are transient
            raise
        except urllib.error.URLError as exc:  # refused, reset, unresolvable: worth another try
            raise ConnectionError(f"{self.url}: {exc.reason}") from exc

    def scalar(self, expr: str) -> float:
        """The value of a query that yields at most one series (NaN when it yields none)."""
        try:
            doc = retry_call(self._get, expr, what=f"Prometheus query {expr[:80]}", transient=connection_error)
        except Exception as exc:
            raise CanaryError(f"Prometheus at {self.url} could not answer {expr!r}: {exc}") from exc
        if doc.get("status") != "success":
            raise CanaryError(f"Prometheus at {self.url} refused {expr!r}: {doc.get('error', doc)}")
        result = doc["data"]["result"]
        if len(result) > 1:
            raise CanaryError(f"Prometheus query {expr!r} returned {len(result)} series; expected one")
        return float(result[0]["value"][1]) if result else math.nan


def selector_for(version: str, selector: str = "", extra: str = "") -> str:
    """`{model_version="<version>",<selector>,<extra>}`, validated (the version and selector come from outside)."""
    if not VERSION.match(version):
        raise ValueError(f"model version {version!r}: expected 1-64 of [A-Za-z0-9._-]")
    if selector and not SELECTOR.match(selector):
        raise ValueError(f'Prometheus selector {selector!r}: expected label matchers like namespace="models", '
                         f'comma-separated, without braces')
    return "{" + ",".join(p for p in (f'model_version="{version}"', selector.strip(), extra) if p) + "}"


def _queries(sel: str, window: str) -> dict[str, str]:
    ok = sel[:-1] + ',status=~"2.."}'
    errors = sel[:-1] + ',status!~"2.."}'

    def ratio(metric: str) -> str:
        return f"sum(increase({metric}_sum{sel}[{window}])) / sum(increase({metric}_count{sel}[{window}]))"

    return {"requests": f"sum(increase(maskrcnn_requests_total{sel}[{window}]))",
            "ok_requests": f"sum(increase(maskrcnn_requests_total{ok}[{window}]))",
            "restarts": f"sum(resets(maskrcnn_requests_total{sel}[{window}]))",
            # one expression, so that both counts are read at the same instant
            "error_ratio": f"(sum(increase(maskrcnn_requests_total{errors}[{window}])) or vector(0)) / "
                           f"sum(increase(maskrcnn_requests_total{sel}[{window}]))",
            "p95_latency_s": f"histogram_quantile(0.95, sum by (le) (increase(maskrcnn_request_seconds_bucket{ok}[{window}])))",
            "mean_score": ratio("maskrcnn_detection_score"),
            "detections_per_image": ratio("maskrcnn_detections_per_image")}


QUEUE_PROXY_METRIC = "revision_app_request_count"
"""Knative's queue-proxy (the sidecar in front of every revision's pods) counts each request it proxies by
`revision_name` and `response_code_class`, whether the predictor answered or died under it (then 502/503):
what the clients saw, even from a predictor that crashed before recording anything itself."""


def serving_path(prom: PrometheusApi, revision: str, namespace: str, window_s: float) -> tuple[float, float]:
    """(requests, non-2xx ratio) of a revision as its queue-proxy counted them (NaN, NaN when not scraped)."""
    for name, value in (("revision", revision), ("namespace", namespace)):
        if not VERSION.match(value):
            raise ValueError(f"{name} {value!r}: expected 1-64 of [A-Za-z0-9._-]")
    sel = f'{{revision_name="{revision}",namespace_name="{namespace}"}}'
    window = f"{max(1, math.ceil(window_s))}s"
    total = prom.scalar(f"sum(increase({QUEUE_PROXY_METRIC}{sel}[{window}]))")
    failed = prom.scalar(f"(sum(increase({QUEUE_PROXY_METRIC}{sel[:-1]},response_code_class!=\"2xx\"}}[{window}])) "
                         f"or vector(0)) / sum(increase({QUEUE_PROXY_METRIC}{sel}[{window}]))")
    if math.isnan(total) or not total:
        return (0.0 if not math.isnan(total) else math.nan), math.nan
    return total, min(1.0, max(0.0, failed)) if math.isfinite(failed) else math.nan


def measure(prom: PrometheusApi, version: str, window_s: float, selector: str = "") -> dict[str, float]:
    """One model's numbers over the last `window_s` seconds: requests (all, and 2xx), counter resets, the
    non-2xx ratio, p95 latency, mean score, detections per image (NaN where it has no data)."""
    window = f"{max(1, math.ceil(window_s))}s"
    values = {name: prom.scalar(expr) for name, expr in _queries(selector_for(version, selector), window).items()}
    requests = 0.0 if math.isnan(values["requests"]) else values["requests"]
    ok = 0.0 if math.isnan(values["ok_requests"]) else values["ok_requests"]
    ratio = values["error_ratio"]  # increase() extrapolates each series to the window's edges: keep it in [0, 1]
    return {"requests": requests, "ok_requests": ok, "restarts": 0.0 if math.isnan(values["restarts"]) else values["restarts"],
            "error_ratio": min(1.0, max(0.0, ratio)) if requests and math.isfinite(ratio) else math.nan,
            "p95_latency_s": values["p95_latency_s"], "mean_score": values["mean_score"],
            "detections_per_image": values["detections_per_image"]}


def compare(canary: dict[str, float], stable: dict[str, float], bounds: CanaryBounds) -> list[Check]:
    """The four checks (see the module's docstring) on two models' numbers from `measure`."""
    checks = []
    c, s = canary["error_ratio"], stable["error_ratio"]
    limit = (0.0 if math.isnan(s) else s) + bounds.max_error_ratio_increase
    checks.append(Check("error_ratio", c, s, f"<= {limit:.4g}", not math.isnan(c) and c <= limit,
                        "" if not math.isnan(c) else "the canary answered nothing"))
    if "path_error_ratio" in canary or "path_error_ratio" in stable:
        c, s = canary.get("path_error_ratio", math.nan), stable.get("path_error_ratio", math.nan)
        def counted(values: dict[str, float]) -> bool:
            n = values.get("path_requests", math.nan)
            return math.isfinite(n) and n > 0

        if not counted(canary) and not counted(stable):
            pass  # queue-proxy's series are not scraped here: the predictors' own counts decide
        elif math.isnan(c):
            checks.append(Check("serving_path_error_ratio", c, s, "", False, "the serving path counted no request to "
                                                                               "the canary's revision"))
        else:
            limit = (0.0 if math.isnan(s) else s) + bounds.max_error_ratio_increase
            checks.append(Check("serving_path_error_ratio", c, s, f"<= {limit:.4g}", c <= limit,
                                "" if c <= limit else "as the serving path (Knative's queue-proxy) counted what the "
                                                      "clients saw, including requests the predictor never answered"))
    restarts = canary.get("restarts", 0.0)
    checks.append(Check("restarts", restarts, stable.get("restarts", 0.0), "== 0", restarts == 0,
                        "" if restarts == 0 else "the canary's predictor restarted (crashed or was killed): the "
                                                 "requests it dropped were never counted"))
    c, s = canary["p95_latency_s"], stable["p95_latency_s"]
    if math.isnan(c):
        checks.append(Check("p95_latency_s", c, s, "", False, "the canary answered no request successfully"))
    elif math.isnan(s):
        checks.append(Check("p95_latency_s", c, s, "", False, "the stable model answered no request successfully: "
                                                               "nothing to compare with"))
    else:
        limit = max(s * bounds.max_latency_ratio, s + bounds.latency_slack_s)
        checks.append(Check("p95_latency_s", c, s, f"<= {limit:.4g}", c <= limit))
    c, s = canary["mean_score"], stable["mean_score"]
    if math.isnan(s):
        checks.append(Check("mean_score", c, s, "", False, "the stable model returned no detection: nothing to "
                                                           "compare with, so nothing shows the canary is as good"))
    else:
        limit = s * (1 - bounds.max_score_drop)
        collapsed = math.isnan(c)
        checks.append(Check("mean_score", c, s, f">= {limit:.4g}", not collapsed and c >= limit,
                            "the canary returned no detection at all" if collapsed else ""))
    c, s = canary["detections_per_image"], stable["detections_per_image"]
    if math.isnan(c) or math.isnan(s):
        checks.append(Check("detections_per_image", c, s, "", False, "no image answered by "
                            + ("the canary" if math.isnan(c) else "the stable model")))
    else:
        allowed = max(bounds.max_detections_change * s, 0.5)
        checks.append(Check("detections_per_image", c, s, f"in [{s - allowed:.4g}, {s + allowed:.4g}]",
                            abs(c - s) <= allowed))
    return checks


def model_selector(model_name: str, selector: str = "") -> str:
    """`model_name="<name>"` joined to the label matchers `selector`: the predictors label every series with
    the registered model's name (serving.observe.MODEL), so that another model serving the same version
    number is never counted in."""
    if not MODEL_NAME.match(model_name):
        raise ValueError(f"model name {model_name!r}: expected 1-256 of [A-Za-z0-9._-] to select its series")
    return ",".join(p for p in (f'model_name="{model_name}"', selector.strip()) if p)


def judge_canary(prom: PrometheusApi, *, stable: str, canary: str, bounds: CanaryBounds, selector: str = "",
                 model_name: str = "", revisions: dict[str, str] | None = None, namespace: str = "") -> CanaryAnalysis:
    """Watch the canary against the stable model until the minimums are met (or `bounds.timeout_s`
    passes), then compare them (see the module's docstring). `model_name` (the registered model) and
    `selector` (label matchers, e.g. the namespace) scope the series. `revisions` ({"canary": ...,
    "stable": ...}, Knative revision names in `namespace`) adds the serving path's own counts (queue-proxy's
    `revision_app_request_count`), where Prometheus scrapes them. Raises CanaryError when Prometheus cannot
    be asked; never promotes without evidence."""
    if stable == canary:
        raise ValueError(f"canary analysis: the canary and the stable model are the same version ({canary})")
    if model_name:
        selector = model_selector(model_name, selector)
    selector_for(stable, selector), selector_for(canary, selector)  # validated before any wait
    started = time.monotonic()
    while True:
        waited = time.monotonic() - started
        window = min(bounds.window_s, waited + bounds.interval_s)  # the canary's whole life so far, with a scrape's slack
        seen = {"canary": measure(prom, canary, window, selector), "stable": measure(prom, stable, window, selector)}
        for who, revision in (revisions or {}).items():
            seen[who]["path_requests"], seen[who]["path_error_ratio"] = serving_path(prom, revision, namespace, window)
        counts = {who: seen[who]["requests"] for who in seen}
        ok = {who: seen[who]["ok_requests"] for who in seen}
        requests = {**counts, **{f"{who}_2xx": n for who, n in ok.items()}}
        log.info("canary v%s: %.0f requests (%.0f 2xx), stable v%s: %.0f (%.0f 2xx), after %.0f s (judged at %d each "
                 "and %.0f s)", canary, counts["canary"], ok["canary"], stable, counts["stable"], ok["stable"], waited,
                 bounds.min_requests, bounds.min_duration_s)
        if all(n >= bounds.min_requests for n in counts.values()) and waited >= bounds.min_duration_s:
            checks = compare(seen["canary"], seen["stable"], bounds)
            failed = [c for c in checks if not c.passed]
            if failed:  # enough answers of any kind show it failing: no need to wait for successes
                reason = "; ".join(f"{c.name} {_fmt(c.canary)} against stable {_fmt(c.stable)} (limit "
                                   f"{c.limit or 'n/a'}{': ' + c.detail if c.detail else ''})" for c in failed)
                return CanaryAnalysis(ROLLBACK, "canary failed: " + reason, stable, canary, requests, window, waited,
                                      bounds, checks)
            if all(n >= bounds.min_requests for n in ok.values()):
                return CanaryAnalysis(PROMOTE, f"every check passed over {window:.0f} s and {ok['canary']:.0f} canary "
                                               f"requests answered 2xx", stable, canary, requests, window, waited,
                                      bounds, checks)
        if waited >= bounds.timeout_s:
            short = [f"{who} v{canary if who == 'canary' else stable} {ok[who]:.0f} of {counts[who]:.0f}"
                     for who in counts if ok[who] < bounds.min_requests]
            reason = (f"canary not judged: too little successful traffic after {waited:.0f} s ({', '.join(short)} "
                      f"requests answered 2xx; {bounds.min_requests} needed each)")
            return CanaryAnalysis(ROLLBACK, reason, stable, canary, requests, window, waited, bounds, [])
        time.sleep(min(bounds.interval_s, max(0.0, bounds.timeout_s - waited)))
