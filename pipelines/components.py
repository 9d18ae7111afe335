"""The pipeline's steps as KFP v2 lightweight components: thin, typed adapters over the library.
(No `from __future__ import annotations` here: KFP reads the real types.)

Each body imports the project (installed in the image, or the uv environment for the local runner),
so `install_kfp_package=False`. The docstrings are the step descriptions in the Kubeflow UI. The
functions here are the steps' sources; `make_components(image)` makes them components on an image.
"""


from dataclasses import dataclass
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

DEFAULT_IMAGE = "maskrcnn-platform:0.1.0"
"""The image the committed pipeline YAML names (compile with --image for the one you pushed)."""


def prepare_data(config: str, overrides: list, data: str, val_data: str, data_format: str,
                 dataset: Output[Dataset], data_hash: str = "") -> NamedTuple("PreparedOutputs", content_hash=str,
                                                                               train_images=int, val_images=int):
    """Validate the dataset (the same checks as training), split it, and write both splits as COCO with
    their statistics and content hash. Empty `data`: the embedded synthetic dataset. `data_format`: coco,
    or an annotation tool's export (labelme, cvat-xml, cvat-coco, labelstudio, yolo, voc, masks).
    `data_hash`: the content hash the data must have (the retrain trigger's, for the copy it staged); a
    dataset that differs is refused, so a run never trains on data other than what started it."""
    from collections import namedtuple

    from pipelines.steps import load_step_config
    from training.data.prepare import export_prepared, prepare_data as prepare

    cfg = load_step_config(config, overrides, data=data, val_data=val_data, data_format=data_format)
    prepared = prepare(cfg.data, validate=True)
    if data_hash and prepared.content_hash != data_hash:
        from training.data.coco import DatasetError

        raise DatasetError([f"content hash {prepared.content_hash} differs from the data_hash {data_hash} this run was "
                            f"started for: the data changed since it was hashed; nothing was trained"], data or "data")
    export_prepared(prepared, dataset.path)
    dataset.metadata.update({"content_hash": prepared.content_hash, "classes": prepared.label_map.names})
    out = namedtuple("PreparedOutputs", ["content_hash", "train_images", "val_images"])
    return out(prepared.content_hash, prepared.stats["train"]["images"], prepared.stats["val"]["images"])


def train(config: str, overrides: list, dataset: Input[Dataset], ray_address: str, tracking_uri: str,
          model: Output[Model]) -> NamedTuple("TrainOutputs", run_id=str, model_uri=str):
    """Train Mask R-CNN with Ray Train, on the Ray cluster at `ray_address` (e.g. KubeRay's
    `ray://raycluster-head-svc:10001`) or on a local Ray when empty. The model artifact is the serving
    package of the best checkpoint (weights, config, label map, metadata, checksums), the same files
    the run logs to MLflow as its model; it is registered only if promoted."""
    from collections import namedtuple

    from pipelines.steps import load_step_config
    from training.data.prepare import load_prepared
    from training.trainer import train as train_model

    cfg = load_step_config(config, overrides, dataset=dataset.path, ray_address=ray_address, tracking_uri=tracking_uri)
    data = load_prepared(dataset.path, cfg.data.max_image_pixels)  # the hash the prepare step computed
    result = train_model(cfg, data=data, package_dir=model.path)
    model.metadata.update({"mlflow_run_id": result.run_id, "tracking_uri": result.tracking_uri,
                           "model_uri": result.model_uri, "dataset_hash": data.content_hash,
                           "segm_mAP": result.metrics["segm_mAP"]})
    return namedtuple("TrainOutputs", ["run_id", "model_uri"])(result.run_id, result.model_uri)


def evaluate(dataset: Input[Dataset], model: Input[Model], tracking_uri: str, model_name: str, run_id: str,
             metrics: Output[Metrics], report: Output[HTML]) -> NamedTuple("EvalOutputs", segm_map=float, mask_iou=float, bbox_map=float,
                                                     evidence=dict, package_digest=str):
    """COCO mAP (bbox, segm) and mask IoU of the candidate's serving package on the held-out split, and of
    the current `champion`'s package from the MLflow registry on the same split, with the paired bootstrap
    interval of their segm mAP difference: the gate's `evidence` (`release.gate.Evidence.to_dict()`; its
    `champion` and `interval` are absent when there is no champion). The evaluation report (per-class AP/AR,
    precision-recall curves, confusion matrix, threshold sweep, worst images, against the champion) is the
    step's HTML output, shown in the KFP UI, and goes to the candidate's MLflow run as gate/report.html.
    `package_digest`: the digest of the package scored (its SHA256SUMS); promote refuses any other."""
    from collections import namedtuple

    from release.scoring import score_candidate_and_champion
    from training.data.prepare import load_prepared
    from maskrcnn.package import open_package
    from training.tracking import resolve_tracking_uri

    import os
    import shutil
    import tempfile

    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    package = open_package(model.path)
    evidence = score_candidate_and_champion(package, load_prepared(dataset.path).val, uri, model_name, report=report.path)
    with tempfile.TemporaryDirectory() as tmp:  # named .html, so that MLflow's UI shows it as a page
        MlflowClient(uri).log_artifact(run_id, shutil.copy(report.path, os.path.join(tmp, "report.html")), "gate")
    for key in ("segm_map", "mask_iou", "bbox_map", "segm_ap50", "mask_recall"):
        metrics.log_metric(key, getattr(evidence, key))
    if evidence.champion is not None:
        metrics.log_metric("champion_segm_map", evidence.champion.segm_map)
        metrics.log_metric("champion_mask_iou", evidence.champion.mask_iou)
    if evidence.interval is not None:
        for name, value in (("segm_map_delta", evidence.interval.delta), ("segm_map_delta_low", evidence.interval.low),
                            ("segm_map_delta_high", evidence.interval.high)):
            metrics.log_metric(name, value)
    return namedtuple("EvalOutputs", ["segm_map", "mask_iou", "bbox_map", "evidence", "package_digest"])(
        evidence.segm_map, evidence.mask_iou, evidence.bbox_map, evidence.to_dict(), package.digest)


def gate(evidence: dict, min_segm_map: float, min_mask_iou: float, margin: float, require_lower_bound: bool, run_id: str,
         tracking_uri: str, metrics: Output[Metrics]) -> NamedTuple("GateOutputs", decision=str, reason=str, evidence=dict):
    """Promote only if segm mAP and mask IoU pass their thresholds and segm mAP beats the champion's by
    `margin` (with `require_lower_bound`, the lower bound of the bootstrap interval too), as `release.gate.judge`
    reads the evaluate step's `evidence`. The decision,
    its reason and the interval go to the Metrics and to the MLflow run (tags gate.*); `evidence` is the
    interval as the registry's gate.* tags, for the promote step."""
    from collections import namedtuple

    from mlflow.tracking import MlflowClient

    from release.gate import Evidence, Thresholds, judge, record_gate
    from training.tracking import resolve_tracking_uri

    result = judge(Evidence.from_dict(dict(evidence)), Thresholds(min_segm_map, min_mask_iou, margin, require_lower_bound))
    record_gate(MlflowClient(resolve_tracking_uri(tracking_uri)), run_id, result)
    metrics.log_metric("promote", 1.0 if result.promote else 0.0)
    metrics.metadata["reason"] = result.reason
    return namedtuple("GateOutputs", ["decision", "reason", "evidence"])(result.decision, result.reason, result.evidence)


def promote(model: Input[Model], model_uri: str, tracking_uri: str, model_name: str, reason: str, evidence: dict,
            storage_prefix: str, isvc_name: str, namespace: str, canary_percent: int, ready_timeout: float,
            kubeconfig: str, prometheus_url: str, prometheus_selector: str, canary_bounds: dict,
            metrics: Output[Metrics], scored_digest: str = "", promoter_service_account: str = "") -> str:
    """Register the version in MLflow with its evidence (metrics, dataset hash, git commit, config, run,
    the gate's decision), upload its serving package to `storage_prefix` and verify it, patch the
    InferenceService's storageUri, wait for Ready or roll back, then move the `champion` alias. Returns
    the URI. With canary_percent > 0 the version serves that share first and is judged on live metrics
    against the champion (Prometheus at `prometheus_url`; `canary_bounds`: release.canary.CanaryBounds'
    fields), then takes all the traffic or is rolled back (the step fails); the analysis goes to the
    Metrics, the MLflow run and the version. The package is signed with the key in the file named by
    $MASKRCNN_SIGNING_KEY_FILE (the pipeline mounts the maskrcnn-signing-key Secret there) when it exists.
    `scored_digest`: the evaluate step's `package_digest`; a model artifact with another digest is refused
    before anything is registered (what is promoted is what was scored). `promoter_service_account`: the
    ServiceAccount in `namespace` the step acts as (a short-lived token it requests; the pipeline's own
    account may do nothing else there: deployment/base/rbac-promote.yaml); empty: the step's own account."""
    import os

    from release.deploy import PROMOTER_ENV

    from release.canary import CanaryBounds
    from release.gate import GateDecision
    from release.interrupt import unwind_on_signals
    from release.promote import CanaryPlan, CanaryRejected, promote as run_promote, signing_key_from_env
    from training.tracking import resolve_tracking_uri

    if promoter_service_account:
        os.environ[PROMOTER_ENV] = f"{namespace}/{promoter_service_account}"
    plan = None
    if canary_percent > 0:
        plan = CanaryPlan(prometheus_url, CanaryBounds.from_dict(dict(canary_bounds), "canary_bounds"), prometheus_selector)
    try:  # a cancelled run, a drain or an eviction (SIGTERM) unwinds the release instead of leaving it half-way
        with unwind_on_signals():
            result = run_promote(package_dir=model.path, model_uri=model_uri, tracking_uri=resolve_tracking_uri(tracking_uri),
                                 model_name=model_name, storage_prefix=storage_prefix,
                                 gate=GateDecision(True, reason, {k: str(v) for k, v in evidence.items()}),
                                 isvc_name=isvc_name, namespace=namespace,
                                 canary_percent=canary_percent if canary_percent > 0 else None, canary_plan=plan,
                                 ready_timeout=ready_timeout, kubeconfig=kubeconfig, signing_key=signing_key_from_env(),
                                 scored_digest=scored_digest)
    except CanaryRejected as exc:
        for key, value in exc.analysis.metrics().items():
            metrics.log_metric(key, value)
        metrics.metadata["canary_reason"] = exc.analysis.reason
        raise
    metrics.log_metric("promoted", 1.0)
    if result.canary is not None:
        for key, value in result.canary.metrics().items():
            metrics.log_metric(key, value)
        metrics.metadata["canary_reason"] = result.canary.reason
    return result.storage_uri


def reject(reason: str, metrics: Output[Metrics]) -> str:
    """Record that the candidate was not promoted, and why (the gate step already tagged the MLflow run
    and logged gate.json); nothing is registered or deployed."""
    metrics.log_metric("promoted", 0.0)
    metrics.metadata["reason"] = reason
    return reason


@dataclass(frozen=True)
class Components:
    """The six steps as KFP components on one image."""

    prepare_data: dsl.base_component.BaseComponent
    train: dsl.base_component.BaseComponent
    evaluate: dsl.base_component.BaseComponent
    gate: dsl.base_component.BaseComponent
    promote: dsl.base_component.BaseComponent
    reject: dsl.base_component.BaseComponent


def batch_predict(source: str, output: str, model: str, package: str, tracking_uri: str, shard_size: int,
                  score_threshold: float, overlays: bool, masks: bool, concurrency: int, ray_address: str,
                  summary: Output[Metrics]) -> int:
    """Batch inference over every image under `source` (s3://, gs://) with a registered model (`model`,
    models:/NAME@ALIAS, from `tracking_uri`) or a serving package (`package`), on Ray Data: COCO results
    (RLE masks) per shard of `shard_size` images to `output`, with overlays and mask PNGs when asked; a run
    again resumes. Empty `ray_address`: a local Ray in this step's pod; a Jobs API address: a Ray job on
    that cluster. Returns the images predicted (0 when submitted: the counts are in the job's log)."""
    from batch.job import Request, run_batch
    from batch.shards import Settings
    from training.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri) if model else ""
    totals = run_batch(Request(source, output, package, model, uri, Settings(shard_size, score_threshold, 100, overlays, masks),
                               concurrency, 0, ray_address))
    for key in ("images", "detections", "shards", "skipped_shards", "seconds"):
        if key in totals:
            summary.log_metric(key, float(totals[key]))
    return int(totals.get("images", 0))


def make_batch_component(image: str = DEFAULT_IMAGE):
    """The batch inference step as a KFP lightweight component on `image`."""
    return dsl.component(batch_predict, base_image=image, install_kfp_package=False)


def make_components(image: str = DEFAULT_IMAGE) -> Components:
    """Every step as a KFP lightweight component whose container runs `image`."""
    return Components(*(dsl.component(step, base_image=image, install_kfp_package=False)
                        for step in (prepare_data, train, evaluate, gate, promote, reject)))
