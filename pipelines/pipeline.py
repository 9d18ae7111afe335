"""The Mask R-CNN pipeline: prepare data -> train -> evaluate (candidate and champion) -> gate ->
promote (register, publish, point KServe at it) or reject (recorded, and the run stays green)."""


from kfp import dsl

from pipelines.components import evaluate, gate, prepare_data, promote, reject, train

PIPELINE_NAME = "maskrcnn-train-gate-serve"


@dsl.pipeline(name=PIPELINE_NAME, description=__doc__)
def maskrcnn_pipeline(
    config: str = "default",
    overrides: list = [],  # noqa: B006  (KFP parameters are declared with their defaults)
    data: str = "",
    val_data: str = "",
    ray_address: str = "",
    tracking_uri: str = "",
    model_name: str = "maskrcnn",
    min_segm_map: float = 0.5,
    min_mask_iou: float = 0.7,
    margin: float = 0.0,
    storage_prefix: str = "gs://BUCKET/models",
    isvc_name: str = "maskrcnn",
    namespace: str = "default",
    canary_percent: int = 0,
    ready_timeout: float = 600.0,
    kubeconfig: str = "",
):
    prepared = prepare_data(config=config, overrides=overrides, data=data, val_data=val_data)
    trained = train(config=config, overrides=overrides, dataset=prepared.outputs["dataset"], ray_address=ray_address,
                    tracking_uri=tracking_uri)
    trained.set_caching_options(False)
    scored = evaluate(dataset=prepared.outputs["dataset"], model=trained.outputs["model"], tracking_uri=tracking_uri,
                      model_name=model_name)
    scored.set_caching_options(False)  # the champion may have changed since
    decided = gate(segm_map=scored.outputs["segm_map"], mask_iou=scored.outputs["mask_iou"],
                   champion_version=scored.outputs["champion_version"],
                   champion_segm_map=scored.outputs["champion_segm_map"], min_segm_map=min_segm_map,
                   min_mask_iou=min_mask_iou, margin=margin, run_id=trained.outputs["run_id"], tracking_uri=tracking_uri)
    decided.set_caching_options(False)
    with dsl.If(decided.outputs["decision"] == "promote", name="passed-the-gate"):
        promoted = promote(model=trained.outputs["model"], model_uri=trained.outputs["model_uri"], tracking_uri=tracking_uri, model_name=model_name,
                           reason=decided.outputs["reason"], storage_prefix=storage_prefix, isvc_name=isvc_name,
                           namespace=namespace, canary_percent=canary_percent, ready_timeout=ready_timeout,
                           kubeconfig=kubeconfig)
        promoted.set_caching_options(False)
    with dsl.Else(name="rejected"):
        rejected = reject(reason=decided.outputs["reason"])
        rejected.set_caching_options(False)
