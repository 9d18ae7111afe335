"""Promote a candidate that passed the gate: register it, publish its serving package, point KServe at
it, and only then make it the `champion`.

Order, and why:
1. register the version in MLflow (its number names the package),
2. export the serving package and upload it to `<storage>/<model>/v<version>`, then read it back and
   verify the checksums: an InferenceService never points at a partial package,
3. patch the InferenceService's storageUri (optional canary), wait for Ready, roll back if not,
4. move `champion` to the version, so the alias always names what is served.
A failure in 2 or 3 tags the version `promotion.failed` with the reason and raises.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from pipelines.deploy import DeployError, update_storage_uri
from pipelines.publish import PublishError, publish_package
from serving.package import export_package
from training.registry import CHAMPION, register_model, set_alias

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromoteResult:
    version: str
    storage_uri: str
    previous_storage_uri: str | None


def promote(*, checkpoint_dir: str | Path, run_id: str, model_uri: str, tracking_uri: str, model_name: str,
            storage_prefix: str, reason: str, tags: dict[str, Any] | None = None, isvc_name: str = "",
            namespace: str = "default", canary_percent: int | None = None, ready_timeout: float = 600,
            kubeconfig: str = "") -> PromoteResult:
    client = MlflowClient(tracking_uri)
    version = register_model(client, model_name, model_uri, run_id, {**(tags or {}), "gate.reason": reason})
    previous = None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            package = export_package(checkpoint_dir, Path(tmp) / "package",
                                     {"model_name": model_name, "model_version": version, "model_uri": model_uri})
            uri = publish_package(package, f"{storage_prefix.rstrip('/')}/{model_name}/v{version}")
        client.set_model_version_tag(model_name, version, "serving.storage_uri", uri)
        if isvc_name:
            result = update_storage_uri(isvc_name, namespace, uri, canary_percent=canary_percent,
                                        timeout=ready_timeout, kubeconfig=kubeconfig)
            previous = result.previous_uri
    except (PublishError, DeployError) as exc:
        client.set_model_version_tag(model_name, version, "promotion.failed", str(exc)[:5000])
        raise
    set_alias(client, model_name, CHAMPION, version, reason=f"{reason}; serving {uri}")
    return PromoteResult(version, uri, previous)
