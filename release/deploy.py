"""Point a KServe InferenceService at a new model, wait for it to be Ready, roll back if it is not.

Uses the real `kubernetes` client: in a pod, the in-cluster ServiceAccount (RBAC: get and patch on
`inferenceservices` in one namespace, see deployment/); elsewhere, a kubeconfig.

Readiness after the patch: when the API server bumped `metadata.generation` (a real one does on every
spec change), the InferenceService must report `Ready=True` with `status.observedGeneration` at least
that generation. When it did not (an API emulator), the `Ready` condition must have turned True after
the patch (`lastTransitionTime`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"


class DeployError(RuntimeError):
    """The InferenceService could not be updated, or did not become Ready (and was rolled back)."""


@dataclass(frozen=True)
class DeployResult:
    name: str
    namespace: str
    storage_uri: str
    previous_uri: str | None


def custom_objects_api(kubeconfig: str = "") -> Any:
    from kubernetes import client, config

    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig)
    else:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
    return client.CustomObjectsApi()


def _predictor(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("spec", {}).get("predictor", {})


def storage_uri_of(obj: dict[str, Any]) -> str | None:
    return _predictor(obj).get("model", {}).get("storageUri")


def _ready_condition(obj: dict[str, Any]) -> dict[str, Any] | None:
    for cond in obj.get("status", {}).get("conditions", []) or []:
        if cond.get("type") == "Ready":
            return cond
    return None


def _parse_time(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def is_ready_after(obj: dict[str, Any], generation: int | None, patched_at: float) -> bool:
    cond = _ready_condition(obj)
    if cond is None or cond.get("status") != "True":
        return False
    if generation is not None:
        return int(obj.get("status", {}).get("observedGeneration") or 0) >= generation
    changed = _parse_time(cond.get("lastTransitionTime"))
    return changed is not None and changed >= int(patched_at)  # RFC 3339 times have whole seconds


def _patch(api: Any, name: str, namespace: str, uri: str | None, canary: int | None, set_canary: bool) -> dict[str, Any]:
    predictor: dict[str, Any] = {"model": {"storageUri": uri}}
    if set_canary:
        predictor["canaryTrafficPercent"] = canary  # None removes it (merge patch)
    return api.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, {"spec": {"predictor": predictor}})


def update_storage_uri(name: str, namespace: str, uri: str, *, canary_percent: int | None = None,
                       timeout: float = 600, poll: float = 2.0, api: Any = None, kubeconfig: str = "") -> DeployResult:
    """Patch `spec.predictor.model.storageUri` (and `canaryTrafficPercent` when given), wait for Ready,
    and restore the previous URI (and canary setting) if it is not Ready within `timeout` seconds."""
    from kubernetes.client.exceptions import ApiException

    api = api or custom_objects_api(kubeconfig)
    try:
        before = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as exc:
        raise DeployError(f"InferenceService {namespace}/{name}: cannot read it ({exc.status} {exc.reason})") from exc
    if "model" not in _predictor(before):
        raise DeployError(f"InferenceService {namespace}/{name}: spec.predictor.model is missing; this step patches "
                          f"spec.predictor.model.storageUri")
    previous_uri = storage_uri_of(before)
    previous_canary = _predictor(before).get("canaryTrafficPercent")
    generation_before = before.get("metadata", {}).get("generation")
    patched_at = time.time()
    try:
        after = _patch(api, name, namespace, uri, canary_percent, canary_percent is not None)
    except ApiException as exc:
        raise DeployError(f"InferenceService {namespace}/{name}: patch refused ({exc.status} {exc.reason})") from exc
    generation = after.get("metadata", {}).get("generation")
    if not (generation and generation_before and generation > generation_before):
        generation = None
    log.info("InferenceService %s/%s: storageUri %s -> %s%s; waiting up to %.0f s for Ready", namespace, name,
             previous_uri, uri, f" (canary {canary_percent}%)" if canary_percent is not None else "", timeout)
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = after
    while time.monotonic() < deadline:
        last = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        if storage_uri_of(last) != uri:
            raise DeployError(f"InferenceService {namespace}/{name}: storageUri changed to {storage_uri_of(last)} "
                              f"by someone else while waiting; not rolling back")
        if is_ready_after(last, generation, patched_at):
            log.info("InferenceService %s/%s is Ready on %s", namespace, name, uri)
            return DeployResult(name, namespace, uri, previous_uri)
        time.sleep(poll)
    cond = _ready_condition(last) or {}
    _patch(api, name, namespace, previous_uri, previous_canary, canary_percent is not None)
    raise DeployError(f"InferenceService {namespace}/{name} was not Ready within {timeout:.0f} s on {uri} "
                      f"(Ready={cond.get('status', 'absent')}: {cond.get('message', '')}); rolled back to {previous_uri}")
