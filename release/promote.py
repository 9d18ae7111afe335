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
`promotion.failed` with the reason. A release is a transaction on its InferenceService:

- one at a time: it holds the service's Lease (`release.lease`) from before it registers anything to its
  end; a second release is refused before it changes anything, naming the one in flight;
- its intent (the version, the URI it moves to, what was served before, how far it got) is written into
  the Lease and onto the version (tag `promotion.intent`) before the first patch;
- every patch is conditional on the resourceVersion it read (`release.deploy.conditional_patch`), and the
  unwind only undoes what this release set: a storageUri someone else wrote meanwhile stands;
- SIGTERM and SIGINT raise into the unwind (`release.interrupt`, entered by the CLI and the KFP step);
- a process killed outright leaves the intent behind; `uv run -m release recover` (`recover` below)
  finishes it (the new version already served all the traffic) or undoes it, from the intent.

A plain promote (and a rollback) clears a leftover `canaryTrafficPercent`, so all the traffic goes to
the version the champion names. Transient errors of the API and the stores are retried by one policy
(`maskrcnn.waiting`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mlflow.tracking import MlflowClient

from release.canary import ANALYSIS_FILE, CanaryAnalysis, CanaryBounds, PrometheusApi, judge_canary, model_selector
from release.deploy import DeployError, read_service, restore_storage_uri, serving_revisions, update_storage_uri
from release.gate import GateDecision
from release.interrupt import Interrupted
from release.lease import DEFAULT_DURATION_S, Intent, ReleaseLease
from release.publish import publish_package
from maskrcnn.package import DIGEST_ANNOTATION, VERSION_ANNOTATION, Package, open_package
from training.registry import (CHAMPION, DIGEST_TAG, SCORED_DIGEST_TAG, STORAGE_URI_TAG, get_alias,  # noqa: F401 (tags re-exported)
                               register_package, set_alias)
from maskrcnn.waiting import describe, retry_call
from maskrcnn.names import SIGNING_KEY_ENV

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

log = logging.getLogger(__name__)

FAILED_TAG = "promotion.failed"
INTENT_TAG = "promotion.intent"
SIGNER_TAG = "serving.signed_by"


class CanaryRejected(DeployError):
    """The canary's live metrics were out of bounds (or too few): it was rolled back. `analysis` says why."""

    def __init__(self, analysis: CanaryAnalysis):
        super().__init__(analysis.reason)
        self.analysis = analysis


@dataclass(frozen=True)
class CanaryPlan:
    """How a canary is judged: the Prometheus that scrapes the predictors, the bounds, and label matchers
    that scope the series to this InferenceService (default: `namespace="<its namespace>"`, the label
    PodMonitoring and PodMonitor add; the registered model's `model_name` is always matched, and the
    versions are told apart by `model_version`). `token`: a bearer token for Prometheus, when its frontend
    wants one."""

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
            kubeconfig: str = "", signing_key: Ed25519PrivateKey | None = None,
            lease_s: int = DEFAULT_DURATION_S, scored_digest: str = "") -> PromoteResult:
    """Register, sign, publish, deploy (and judge the canary), then move `champion` (see the module's
    docstring for the order and the transaction). A canary needs `canary_plan`, an InferenceService and a
    champion to compare with; without them nothing is registered. Raises CanaryRejected (a DeployError)
    when the canary is rolled back, and ReleaseInFlight (before anything changes) while another release
    of the InferenceService is in flight or an interrupted one awaits `recover`. `lease_s`: how long the
    Lease outlives this process if it is killed (it is renewed every third of it while it runs).
    `scored_digest`: the digest (`Package.digest`) of the package the gate scored; a different package is
    refused before anything is registered."""
    client = MlflowClient(tracking_uri)
    stable = None
    if canary_percent is not None:
        stable = _canary_preconditions(client, model_name, canary_percent, canary_plan, isvc_name)
    package = package_dir if isinstance(package_dir, Package) else open_package(package_dir)
    if scored_digest and package.digest != scored_digest:
        raise DeployError(f"{package.where}: its digest {package.digest} is not the {scored_digest} the gate scored: "
                          f"only what was scored is promoted; nothing was registered")
    lease = intent = None
    if isvc_name:
        lease = ReleaseLease(isvc_name, namespace, kubeconfig=kubeconfig, duration_s=lease_s)
        intent = Intent("promote", model_name, isvc_name, namespace, lease.holder, canary_percent=canary_percent)
        lease.acquire(intent)
    version, reason, deployed, analysis = "", gate.reason if gate else "promoted by hand", None, None
    try:
        version = register_package(client, model_name, model_uri, package, gate.tags() if gate else None)
        _tag(client, model_name, version, SCORED_DIGEST_TAG, package.digest)
        if lease is not None:
            lease.record(intent := intent.at("registering", version=version))
        served = package.stamped({"model_name": model_name, "model_version": version, "model_uri": model_uri})
        if signing_key is not None:
            served = served.signed(signing_key)
        uri = publish_package(served, f"{storage_prefix.rstrip('/')}/{model_name}/v{version}")
        _tag(client, model_name, version, STORAGE_URI_TAG, uri)
        _tag(client, model_name, version, DIGEST_TAG, served.digest)
        if served.signer:
            _tag(client, model_name, version, SIGNER_TAG, served.signer)
        if lease is not None:
            previous_uri, previous_canary, previous_annotations = read_service(isvc_name, namespace, kubeconfig=kubeconfig)
            intent = intent.at("deploying", storage_uri=uri, previous_uri=previous_uri, previous_canary=previous_canary,
                               previous_annotations=previous_annotations)
            lease.record(intent)  # before the first patch, in the cluster and on the version
            _tag(client, model_name, version, INTENT_TAG, intent.to_json())
            deployed = update_storage_uri(isvc_name, namespace, uri, canary_percent=canary_percent,
                                          clear_canary=canary_percent is None, timeout=ready_timeout,
                                          kubeconfig=kubeconfig, annotations=promised(version, served.digest))
        if stable is not None and canary_plan is not None and lease is not None:
            lease.record(intent := intent.at("canary"))
            analysis = judge_canary(PrometheusApi(canary_plan.prometheus_url, canary_plan.token), stable=stable,
                                    canary=version, bounds=canary_plan.bounds, model_name=model_name,
                                    selector=canary_plan.selector or f'namespace="{namespace}"',
                                    revisions=serving_revisions(isvc_name, namespace, kubeconfig=kubeconfig),
                                    namespace=namespace)
            record_canary(client, model_name, version, package.metadata.get("mlflow_run_id", ""), analysis)
            if not analysis.promote:
                raise CanaryRejected(analysis)
            log.info("canary v%s promoted to all the traffic: %s", version, analysis.reason)
            update_storage_uri(isvc_name, namespace, uri, clear_canary=True, timeout=ready_timeout, kubeconfig=kubeconfig)
        if lease is not None:
            lease.record(intent := intent.at("serving"))
        move_champion(client, model_name, version, f"{reason}; serving {uri}")
    except BaseException as exc:
        keep, why = _unwind(client, model_name, version, exc, intent, ready_timeout, kubeconfig)
        if lease is not None:
            lease.release(keep_intent=keep)
        if isinstance(exc, DeployError) and not isinstance(exc, CanaryRejected):
            raise DeployError(why) from exc  # the whole story: what failed, then what the unwind did
        raise
    if lease is not None:
        lease.release()
    return PromoteResult(version, uri, deployed.previous_uri if deployed else None, analysis)


def promised(version: str, digest: str | None) -> dict[str, str | None]:
    """The release annotations that tell the predictor which package to serve (maskrcnn.package)."""
    return {VERSION_ANNOTATION: str(version), DIGEST_ANNOTATION: digest}


def move_champion(client: MlflowClient, model_name: str, version: str, reason: str) -> None:
    """Point `champion` at `version`, retried while MLflow fails for a moment. When the last try fails,
    the alias is read again: a move that landed although its answer was lost counts as done."""
    try:
        retry_call(set_alias, client, model_name, CHAMPION, version, reason=reason,
                   what=f"moving {CHAMPION} to {model_name} v{version}")
    except Exception:
        current = retry_call(get_alias, client, model_name, CHAMPION, what=f"reading {model_name}@{CHAMPION}")
        if current is None or str(current.version) != str(version):
            raise
        log.warning("%s@%s names v%s although the move reported an error: taken as done", model_name, CHAMPION, version)


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
    model_selector(model_name, plan.selector)  # the analysis selects the series by name: checked before anything changes
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
    """The signing key in the file $MASKRCNN_SIGNING_KEY_FILE names (a mounted Secret), or the Cloud KMS key
    version it names (`gcpkms://...`), or None (logged) when the variable is unset or the file absent: the
    package is then published unsigned."""
    import os

    from maskrcnn.signature import load_private_key

    path = os.environ.get(SIGNING_KEY_ENV, "")
    if path.startswith("gcpkms://"):  # a key version in Cloud KMS (README: signing with Cloud KMS)
        return load_private_key(path)
    if not path or not Path(path).exists():
        log.warning("no signing key (%s=%s): the package is published unsigned, and a predictor configured with "
                    "public keys will refuse it", SIGNING_KEY_ENV, path or "unset")
        return None
    return load_private_key(path)


def _tag(client: MlflowClient, name: str, version: str, key: str, value: str) -> None:
    retry_call(client.set_model_version_tag, name, version, key, value, what=f"tagging {name} v{version} {key}")


def _unwind(client: MlflowClient, name: str, version: str, exc: BaseException, intent: Intent | None,
            ready_timeout: float, kubeconfig: str) -> tuple[bool, str]:
    """After a failure or a signal: put back the storageUri and traffic split this release set (from its
    intent; only if the service still points where this release put it), and tag the version
    `promotion.failed` with the reason. After a signal it does not wait for readiness (the pod's grace
    period is short). Returns (whether the service could not be restored, so that the intent is kept for
    `release recover`; the reason as tagged)."""
    why = str(exc) if isinstance(exc, CanaryRejected) else describe(exc)
    if isinstance(exc, Interrupted) and intent is not None:
        why = f"{exc} in the {intent.phase} phase"
    keep = False
    if intent is not None and intent.phase != "registering" and intent.previous_uri \
            and intent.previous_uri != intent.storage_uri:
        try:
            why += "; " + restore_storage_uri(intent.isvc, intent.namespace, expect_uri=intent.storage_uri,
                                              uri=intent.previous_uri, canary=intent.previous_canary,
                                              annotations=intent.previous_annotations or None,
                                              wait=not isinstance(exc, Interrupted), timeout=ready_timeout,
                                              kubeconfig=kubeconfig)
        except Exception as undo:  # noqa: BLE001 - the original failure is what the caller must see
            keep = True
            why += (f"; rolling the storageUri back FAILED ({describe(undo)}): run `uv run -m release recover "
                    f"--isvc-name {intent.isvc} --namespace {intent.namespace}`")
    log.error("%s v%s not promoted: %s", name, version or "?", why)
    if version:
        try:
            _tag(client, name, version, FAILED_TAG, why[:5000])
        except Exception as tag_exc:  # noqa: BLE001 - the original failure is what the caller must see
            log.error("could not tag %s v%s %s (%s): %s", name, version, FAILED_TAG, tag_exc, why)
    return keep, why


def rollback(*, tracking_uri: str, model_name: str, version: str, reason: str, isvc_name: str = "",
             namespace: str = "models", ready_timeout: float = 600, kubeconfig: str = "",
             lease_s: int = DEFAULT_DURATION_S) -> PromoteResult:
    """Serve an earlier, already published version again (all the traffic: a leftover canary split is
    cleared), wait for it, then move `champion` back to it (retried). If the alias cannot be moved, the
    InferenceService is put back as it was, so that service and champion never disagree. Holds the
    InferenceService's Lease, as promote does."""
    client = MlflowClient(tracking_uri)
    version = str(version)
    tags = retry_call(client.get_model_version, model_name, version, what=f"reading {model_name} v{version}").tags or {}
    uri = tags.get(STORAGE_URI_TAG)
    if not uri:
        raise DeployError(f"{model_name} v{version} was never published (no {STORAGE_URI_TAG} tag); promote it instead")
    lease = intent = None
    if isvc_name:
        lease = ReleaseLease(isvc_name, namespace, kubeconfig=kubeconfig, duration_s=lease_s)
        intent = Intent("rollback", model_name, isvc_name, namespace, lease.holder, version=version, storage_uri=uri)
        lease.acquire(intent)
    previous = None
    try:
        if lease is not None:
            previous, previous_canary, previous_annotations = read_service(isvc_name, namespace, kubeconfig=kubeconfig)
            lease.record(intent := intent.at("deploying", previous_uri=previous, previous_canary=previous_canary,
                                             previous_annotations=previous_annotations))
            # versions published before digests were recorded have none: the predictor then checks the version
            update_storage_uri(isvc_name, namespace, uri, clear_canary=True, timeout=ready_timeout, kubeconfig=kubeconfig,
                               annotations=promised(version, tags.get(DIGEST_TAG)))
            lease.record(intent := intent.at("serving"))
        move_champion(client, model_name, version, f"rollback: {reason}; serving {uri}")
    except BaseException as exc:
        keep, undone = False, ""
        if intent is not None and intent.phase != "registering" and intent.previous_uri:
            try:
                undone = "; " + restore_storage_uri(isvc_name, namespace, expect_uri=uri, uri=intent.previous_uri,
                                                    canary=intent.previous_canary,
                                                    annotations=intent.previous_annotations or None,
                                                    wait=not isinstance(exc, Interrupted), timeout=ready_timeout,
                                                    kubeconfig=kubeconfig)
            except Exception as undo:  # noqa: BLE001
                keep, undone = True, f"; putting the InferenceService back FAILED ({describe(undo)}): run recover"
        if lease is not None:
            lease.release(keep_intent=keep)
        if not isinstance(exc, Exception):
            raise
        raise DeployError(f"rollback to {model_name} v{version}: {describe(exc)}{undone}") from exc
    if lease is not None:
        lease.release()
    return PromoteResult(version, uri, previous)


def recover(*, tracking_uri: str, isvc_name: str, namespace: str = "models", ready_timeout: float = 600,
            kubeconfig: str = "") -> str:
    """Finish or undo a release that was killed before it ended (its intent is still on the Lease and
    nobody renews it). A promotion or rollback whose new version already served all the traffic is
    finished (the champion moved to it); anything earlier is undone (the storageUri and traffic split put
    back, if still where that release put them) and a promotion's version tagged `promotion.failed`.
    Returns what was done; ReleaseInFlight while the release is still alive."""
    lease = ReleaseLease(isvc_name, namespace, kubeconfig=kubeconfig)
    intent = lease.take_over()
    if intent is None:
        return f"nothing to recover: no release left its intent on {lease.where}"
    log.info("recovering the interrupted %s", intent.describe())
    client = MlflowClient(tracking_uri)
    keep = True
    try:
        current, canary, _ = read_service(isvc_name, namespace, kubeconfig=kubeconfig)
        if intent.phase == "serving" and current == intent.storage_uri and canary is None:
            note = "rollback" if intent.action == "rollback" else "promoted"
            move_champion(client, intent.model_name, intent.version,
                          f"{note}: finished by recover after an interruption; serving {intent.storage_uri}")
            outcome = f"finished: {intent.model_name} v{intent.version} is the champion, serving {intent.storage_uri}"
        else:
            done = "nothing had been patched"
            if intent.phase != "registering" and intent.previous_uri:
                done = restore_storage_uri(isvc_name, namespace, expect_uri=intent.storage_uri, uri=intent.previous_uri,
                                           canary=intent.previous_canary, annotations=intent.previous_annotations or None,
                                           timeout=ready_timeout, kubeconfig=kubeconfig)
            if intent.action == "promote" and intent.version:
                _tag(client, intent.model_name, intent.version, FAILED_TAG,
                     f"interrupted in the {intent.phase} phase ({intent.holder}, since {intent.started_at}); undone by "
                     f"release recover: {done}")
            outcome = f"undone: {done}"
        keep = False
    finally:
        lease.release(keep_intent=keep)
    log.info("recover: %s", outcome)
    return outcome
