"""Promote a candidate that passed the gate: register it, publish its serving package, point KServe at
it, and only then make it the `champion`. Also: roll the champion back to an earlier version.

Order, and why:
1. register the version in MLflow with the evidence tags and the gate's decision (its number names the
   package),
2. stamp the version into a copy of the package's metadata (weights, config and label map stay
   byte-identical to the model logged in MLflow) and upload it to `<storage>/<model>/v<version>`, then
   read it back and verify the checksums: an InferenceService never points at a partial package,
3. patch the InferenceService's storageUri (optional canary), wait for Ready, roll back if not,
4. move `champion` to the version, so the alias always names what is served.
A failure in 2 or 3 tags the version `promotion.failed` with the reason and raises.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient

from release.deploy import DeployError, update_storage_uri
from release.gate import GateDecision
from release.publish import PublishError, publish_package
from training.export import stamp_package
from training.registry import CHAMPION, register_package, set_alias

log = logging.getLogger(__name__)

STORAGE_URI_TAG = "serving.storage_uri"


@dataclass(frozen=True)
class PromoteResult:
    version: str
    storage_uri: str
    previous_storage_uri: str | None


def promote(*, package_dir: str | Path, model_uri: str, tracking_uri: str, model_name: str, storage_prefix: str,
            gate: GateDecision | None = None, isvc_name: str = "", namespace: str = "models",
            canary_percent: int | None = None, ready_timeout: float = 600, kubeconfig: str = "") -> PromoteResult:
    """Register, publish, deploy, then move `champion` (see the module's docstring for the order)."""
    client = MlflowClient(tracking_uri)
    version = register_package(client, model_name, model_uri, package_dir, gate.tags() if gate else None)
    reason = gate.reason if gate else "promoted by hand"
    previous = None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            package = Path(shutil.copytree(package_dir, Path(tmp) / "package"))
            stamp_package(package, {"model_name": model_name, "model_version": version, "model_uri": model_uri})
            uri = publish_package(package, f"{storage_prefix.rstrip('/')}/{model_name}/v{version}")
        client.set_model_version_tag(model_name, version, STORAGE_URI_TAG, uri)
        if isvc_name:
            result = update_storage_uri(isvc_name, namespace, uri, canary_percent=canary_percent,
                                        timeout=ready_timeout, kubeconfig=kubeconfig)
            previous = result.previous_uri
    except (PublishError, DeployError) as exc:
        client.set_model_version_tag(model_name, version, "promotion.failed", str(exc)[:5000])
        raise
    set_alias(client, model_name, CHAMPION, version, reason=f"{reason}; serving {uri}")
    return PromoteResult(version, uri, previous)


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
