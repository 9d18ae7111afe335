"""Promote a candidate that passed the gate: register it, sign and publish its serving package, point
KServe at it, and only then make it the `champion`. Also: roll the champion back to an earlier version.

Order, and why:
1. register the version in MLflow with the evidence tags and the gate's decision (its number names the
   package),
2. stamp the version into the package's metadata (weights, config, label map, graph and probe stay
   byte-identical to the model logged in MLflow and scored by the gate), sign its `SHA256SUMS` when a
   signing key is given, and publish it to `<storage>/<model>/v<version>` (immutable: the destination
   must be empty), read back and verified: an InferenceService never points at a partial package,
3. patch the InferenceService's storageUri, wait until KServe serves it, roll back if not,
4. with a canary: KServe serves the version to `canary_percent`% of the traffic; it is judged on live
   metrics against the champion (`release.canary`: error ratio, p95 latency, scores and detections, read
   from Prometheus), the analysis recorded on the run (tags `canary.*`, artifact `canary.json`) and the
   version; then the canary takes all the traffic, or it is rolled back,
5. move `champion` to the version, so the alias always names what is served.

It ends in one of two states, whatever fails in between: the new model is served (to all the traffic) and
`champion` moved, or the storageUri (and traffic split) is back where it was and the version is tagged
`promotion.failed` with the reason.
Transient errors of the API and the stores are retried by one policy (`training.waiting`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mlflow.tracking import MlflowClient

from release.canary import ANALYSIS_FILE, CanaryAnalysis, CanaryBounds, PrometheusApi, judge_canary
from release.deploy import DeployError, update_storage_uri
from release.gate import GateDecision
from release.publish import publish_package
from training.package import Package, open_package
from training.registry import CHAMPION, get_alias, register_package, set_alias
from training.waiting import describe, retry_call

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

log = logging.getLogger(__name__)

STORAGE_URI_TAG = "serving.storage_uri"
FAILED_TAG = "promotion.failed"
SIGNER_TAG = "serving.signed_by"
SIGNING_KEY_ENV = "MASKRCNN_SIGNING_KEY_FILE"


class CanaryRejected(DeployError):
    """The canary's live metrics were out of bounds (or too few): it was rolled back. `analysis` says why."""

    def __init__(self, analysis: CanaryAnalysis):
        super().__init__(analysis.reason)
        self.analysis = analysis


@dataclass(frozen=True)
class CanaryPlan:
    """How a canary is judged: the Prometheus that scrapes the predictors, the bounds, and label matchers
    that scope the series to this InferenceService (e.g. `namespace="models"`; the versions are told apart
    by `model_version`). `token`: a bearer token for Prometheus, when its frontend wants one."""

    prometheus_url: str
    bounds: CanaryBounds = CanaryBounds()
    selector: str = ""
    token: str = ""


@dataclass(frozen=True)
class PromoteResult:
    version: str
    storage_uri: str
    previous_storage_uri: str | None
    canary: CanaryAnalysis | None = None


def promote(*, package_dir: str | Path | Package, model_uri: str, tracking_uri: str, model_name: str,
            storage_prefix: str, gate: GateDecision | None = None, isvc_name: str = "", namespace: str = "models",
            canary_percent: int | None = None, canary_plan: CanaryPlan | None = None, ready_timeout: float = 600,
            kubeconfig: str = "", signing_key: Ed25519PrivateKey | None = None) -> PromoteResult:
    """Register, sign, publish, deploy (and judge the canary), then move `champion` (see the module's
    docstring for the order). A canary needs `canary_plan`, an InferenceService and a champion to compare
    with; without them nothing is registered. Raises CanaryRejected (a DeployError) when the canary is
    rolled back."""
    client = MlflowClient(tracking_uri)
    stable = None
    if canary_percent is not None:
        stable = _canary_preconditions(client, model_name, canary_percent, canary_plan, isvc_name)
    package = package_dir if isinstance(package_dir, Package) else open_package(package_dir)
    version = register_package(client, model_name, model_uri, package, gate.tags() if gate else None)
    reason = gate.reason if gate else "promoted by hand"
    deployed = analysis = None
    try:
        served = package.stamped({"model_name": model_name, "model_version": version, "model_uri": model_uri})
        if signing_key is not None:
            served = served.signed(signing_key)
        uri = publish_package(served, f"{storage_prefix.rstrip('/')}/{model_name}/v{version}")
        _tag(client, model_name, version, STORAGE_URI_TAG, uri)
        if served.signer:
            _tag(client, model_name, version, SIGNER_TAG, served.signer)
        if isvc_name:
            deployed = update_storage_uri(isvc_name, namespace, uri, canary_percent=canary_percent,
                                          timeout=ready_timeout, kubeconfig=kubeconfig)
        if stable is not None and canary_plan is not None:
            analysis = judge_canary(PrometheusApi(canary_plan.prometheus_url, canary_plan.token), stable=stable,
                                    canary=version, bounds=canary_plan.bounds, selector=canary_plan.selector)
            record_canary(client, model_name, version, package.metadata.get("mlflow_run_id", ""), analysis)
            if not analysis.promote:
                raise CanaryRejected(analysis)
            log.info("canary v%s promoted to all the traffic: %s", version, analysis.reason)
            update_storage_uri(isvc_name, namespace, uri, clear_canary=True, timeout=ready_timeout, kubeconfig=kubeconfig)
        retry_call(set_alias, client, model_name, CHAMPION, version, reason=f"{reason}; serving {uri}",
                   what=f"moving {CHAMPION} to {model_name} v{version}")
    except BaseException as exc:
        _unwind(client, model_name, version, exc, deployed, namespace, ready_timeout, kubeconfig)
        raise
    return PromoteResult(version, uri, deployed.previous_uri if deployed else None, analysis)


def _canary_preconditions(client: MlflowClient, model_name: str, percent: int, plan: CanaryPlan | None,
                          isvc_name: str) -> str:
    """The champion's version, which the canary is judged against; ValueError when a canary cannot run."""
    if isinstance(percent, bool) or not isinstance(percent, int) or not 1 <= percent <= 99:
        raise ValueError(f"canary_percent must be an integer in [1, 99], got {percent!r}")
    if plan is None:
        raise ValueError("a canary is judged on live metrics: give the Prometheus that scrapes the predictors "
                         "(--prometheus-url)")
    if not isvc_name:
        raise ValueError("a canary needs an InferenceService (--isvc-name)")
    champion = retry_call(get_alias, client, model_name, CHAMPION, what=f"reading {model_name}@{CHAMPION}")
    if champion is None:
        raise ValueError(f"a canary is judged against the champion, and {model_name} has no {CHAMPION} yet: promote "
                         f"the first version without --canary-percent")
    return champion.version


def record_canary(client: MlflowClient, model_name: str, version: str, run_id: str, analysis: CanaryAnalysis) -> None:
    """The analysis on the candidate's run (tags `canary.*`, artifact canary.json) and the version (tags)."""
    for key, value in analysis.tags().items():
        _tag(client, model_name, version, key, value)
    if run_id:
        for key, value in analysis.tags().items():
            retry_call(client.set_tag, run_id, key, value, what=f"tagging run {run_id} {key}")
        retry_call(client.log_dict, run_id, analysis.to_dict(), ANALYSIS_FILE, what=f"logging {ANALYSIS_FILE}")


def signing_key_from_env() -> Ed25519PrivateKey | None:
    """The signing key in the file $MASKRCNN_SIGNING_KEY_FILE names (a mounted Secret), or None (logged)
    when the variable is unset or the file absent: the package is then published unsigned."""
    import os

    from training.signature import load_private_key

    path = os.environ.get(SIGNING_KEY_ENV, "")
    if not path or not Path(path).exists():
        log.warning("no signing key (%s=%s): the package is published unsigned, and a predictor configured with "
                    "public keys will refuse it", SIGNING_KEY_ENV, path or "unset")
        return None
    return load_private_key(path)


def _tag(client: MlflowClient, name: str, version: str, key: str, value: str) -> None:
    retry_call(client.set_model_version_tag, name, version, key, value, what=f"tagging {name} v{version} {key}")


def _unwind(client: MlflowClient, name: str, version: str, exc: BaseException, deployed, namespace: str,
            ready_timeout: float, kubeconfig: str) -> None:
    """After a failure: put back the storageUri if this promotion had moved it (the deploy step rolls back
    its own failures), and tag the version `promotion.failed` with the reason."""
    why = str(exc) if isinstance(exc, CanaryRejected) else describe(exc)
    if deployed is not None and deployed.previous_uri and deployed.previous_uri != deployed.storage_uri:
        try:  # the previous URI, with the traffic split it had (none: all its traffic)
            update_storage_uri(deployed.name, namespace, deployed.previous_uri, canary_percent=deployed.previous_canary,
                               clear_canary=deployed.previous_canary is None, timeout=ready_timeout,
                               kubeconfig=kubeconfig)
            why += f"; storageUri rolled back to {deployed.previous_uri}"
        except DeployError as undo:
            why += f"; rolling the storageUri back FAILED: {undo}"
    try:
        _tag(client, name, version, FAILED_TAG, why[:5000])
    except Exception as tag_exc:  # the original failure is what the caller must see
        log.error("could not tag %s v%s %s (%s): %s", name, version, FAILED_TAG, tag_exc, why)


def rollback(*, tracking_uri: str, model_name: str, version: str, reason: str, isvc_name: str = "",
             namespace: str = "models", ready_timeout: float = 600, kubeconfig: str = "") -> PromoteResult:
    """Serve an earlier, already published version again: point the InferenceService at its package,
    wait for Ready, then move `champion` back to it."""
    client = MlflowClient(tracking_uri)
    uri = (client.get_model_version(model_name, version).tags or {}).get(STORAGE_URI_TAG)
    if not uri:
        raise DeployError(f"{model_name} v{version} was never published (no {STORAGE_URI_TAG} tag); promote it instead")
    previous = None
    if isvc_name:
        previous = update_storage_uri(isvc_name, namespace, uri, timeout=ready_timeout, kubeconfig=kubeconfig).previous_uri
    set_alias(client, model_name, CHAMPION, version, reason=f"rollback: {reason}; serving {uri}")
    return PromoteResult(str(version), uri, previous)
