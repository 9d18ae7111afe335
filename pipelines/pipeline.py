"""The Mask R-CNN pipeline: prepare data -> train -> evaluate (candidate and champion) -> gate ->
promote (register, publish, point KServe at it) or reject (recorded, and the run stays green)."""


from kfp import dsl, kubernetes

from maskrcnn.names import BATCH_PIPELINE_NAME, MODEL_NAME, PIPELINE_NAME  # noqa: F401  (re-exported: the pipelines' names)
from pipelines.components import DEFAULT_IMAGE, make_batch_component, make_components
from release.gate import Thresholds

DESCRIPTION = __doc__
GATE = Thresholds()  # the gate's defaults, written once in release.gate

BATCH_DESCRIPTION = ("Batch inference on Ray Data: a registered model (default the champion) or a serving package over "
                     "every image under an s3:// or gs:// prefix, COCO results per shard to an output prefix; resumable.")

# Per step: (CPU request, memory request = limit). The train step trains in its own pod when
# ray_address is empty (local Ray), and only submits and waits when it names a Ray cluster.
RESOURCES = {"prepare-data": ("1", "4Gi"), "train": ("4", "16Gi"), "evaluate": ("2", "8Gi"), "gate": ("100m", "512Mi"),
             "promote": ("1", "4Gi"), "reject": ("100m", "512Mi"), "batch-predict": ("4", "16Gi")}
DEFAULT_ACCELERATOR = "nvidia.com/gpu"
"""The GPU resource name of the train step's pod when it has GPUs (`--accelerator`)."""
SHM_SIZE = "2Gi"
"""The train and evaluate steps' /dev/shm (a memory emptyDir): Kubernetes gives 64 MiB, too little for
PyTorch's data loader workers and Ray's object store."""
STORAGE_SECRET = "maskrcnn-storage"
"""Secret in the pipeline's namespace with the object-storage keys (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY);
optional (GKE Workload Identity needs none)."""
RAY_SECRET = "maskrcnn-ray-auth"
"""Secret in the pipeline's namespace with the Ray cluster's token (key auth_token, copied from the
RayCluster's own Secret); optional (a local Ray needs none)."""
SIGNING_SECRET = "maskrcnn-signing-key"
"""Secret in the pipeline's namespace with the Ed25519 private key (key `private.pem`) that signs the packages
the promote step publishes; optional (without it packages are published unsigned, which a predictor with
public keys configured refuses). `uv run -m release keygen` makes the pair; see the README."""
SIGNING_MOUNT = "/var/run/secrets/maskrcnn-signing"


def _harden(task: dsl.PipelineTask, step: str, storage: bool = False, shm: bool = False) -> dsl.PipelineTask:
    """The image's uid 1000 (non-root; KFP drops every capability), its requests, and its secrets by reference."""
    cpu, memory = RESOURCES[step]
    task.set_cpu_request(cpu).set_memory_request(memory).set_memory_limit(memory)
    kubernetes.set_security_context(task, run_as_user=1000, run_as_group=1000, run_as_non_root=True)
    if storage:
        kubernetes.use_secret_as_env(task, STORAGE_SECRET, {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
                                                            "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}, optional=True)
    if shm:
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=SHM_SIZE)
    return task


def build_pipeline(image: str = DEFAULT_IMAGE, train_gpus: int = 0, accelerator: str = DEFAULT_ACCELERATOR,
                   signing_key: str = ""):
    """The pipeline (a KFP `@dsl.pipeline` function) with every step on `image`, and `train_gpus` GPUs of
    `accelerator` for the train step's own pod (when it trains there: an empty `ray_address`)."""
    if train_gpus < 0:
        raise ValueError(f"train_gpus: expected an integer >= 0, got {train_gpus}")
    steps = make_components(image)

    @dsl.pipeline(name=PIPELINE_NAME, description=DESCRIPTION)
    def maskrcnn_pipeline(
        tracking_uri: str,
        storage_prefix: str,
        config: str = "default",
        overrides: list = [],  # noqa: B006  (KFP parameters are declared with their defaults)
        data: str = "",
        val_data: str = "",
        data_format: str = "",
        ray_address: str = "",
        model_name: str = MODEL_NAME,
        min_segm_map: float = GATE.min_segm_map,
        min_mask_iou: float = GATE.min_mask_iou,
        margin: float = GATE.margin,
        require_lower_bound: bool = GATE.require_lower_bound,
        isvc_name: str = MODEL_NAME,
        namespace: str = "models",
        canary_percent: int = 0,
        ready_timeout: float = 600.0,
        kubeconfig: str = "",
        prometheus_url: str = "",
        prometheus_selector: str = "",
        canary_bounds: dict = {},  # noqa: B006
        data_hash: str = "",
        promoter_service_account: str = "maskrcnn-promoter",
    ):
        prepared = _harden(steps.prepare_data(config=config, overrides=overrides, data=data, val_data=val_data,
                                              data_format=data_format, data_hash=data_hash),
                           "prepare-data", storage=True)
        trained = _harden(steps.train(config=config, overrides=overrides, dataset=prepared.outputs["dataset"],
                                      ray_address=ray_address, tracking_uri=tracking_uri), "train", storage=True, shm=True)
        kubernetes.use_secret_as_env(trained, RAY_SECRET, {"auth_token": "RAY_AUTH_TOKEN"}, optional=True)
        if train_gpus:
            trained.set_accelerator_type(accelerator).set_accelerator_limit(train_gpus)
        trained.set_caching_options(False)
        scored = _harden(steps.evaluate(dataset=prepared.outputs["dataset"], model=trained.outputs["model"],
                                        tracking_uri=tracking_uri, model_name=model_name,
                                        run_id=trained.outputs["run_id"]), "evaluate", shm=True)
        scored.set_caching_options(False)  # the champion may have changed since
        decided = steps.gate(evidence=scored.outputs["evidence"], min_segm_map=min_segm_map, min_mask_iou=min_mask_iou,
                             margin=margin, require_lower_bound=require_lower_bound, run_id=trained.outputs["run_id"],
                             tracking_uri=tracking_uri)
        _harden(decided, "gate").set_caching_options(False)
        with dsl.If(decided.outputs["decision"] == "promote", name="passed-the-gate"):
            promoted = steps.promote(model=trained.outputs["model"], model_uri=trained.outputs["model_uri"],
                                     tracking_uri=tracking_uri, model_name=model_name, reason=decided.outputs["reason"],
                                     evidence=decided.outputs["evidence"],
                                     storage_prefix=storage_prefix, isvc_name=isvc_name, namespace=namespace,
                                     canary_percent=canary_percent, ready_timeout=ready_timeout, kubeconfig=kubeconfig,
                                     prometheus_url=prometheus_url, prometheus_selector=prometheus_selector,
                                     canary_bounds=canary_bounds, scored_digest=scored.outputs["package_digest"],
                                     promoter_service_account=promoter_service_account)
            _harden(promoted, "promote", storage=True).set_caching_options(False)
            if signing_key:  # a Cloud KMS key version: no key material in the cluster at all
                if not signing_key.startswith("gcpkms://"):
                    raise ValueError(f"signing_key: expected gcpkms://projects/.../cryptoKeyVersions/N, got {signing_key!r}")
                promoted.set_env_variable("MASKRCNN_SIGNING_KEY_FILE", signing_key)
            else:
                kubernetes.use_secret_as_volume(promoted, SIGNING_SECRET, mount_path=SIGNING_MOUNT, optional=True)
                promoted.set_env_variable("MASKRCNN_SIGNING_KEY_FILE", f"{SIGNING_MOUNT}/private.pem")
        with dsl.Else(name="rejected"):
            rejected = steps.reject(reason=decided.outputs["reason"])
            _harden(rejected, "reject").set_caching_options(False)

    return maskrcnn_pipeline


def build_batch_pipeline(image: str = DEFAULT_IMAGE):
    """The batch inference pipeline (one step, `batch.job.run_batch`) on `image`, for the Kubeflow UI."""
    step = make_batch_component(image)

    @dsl.pipeline(name=BATCH_PIPELINE_NAME, description=BATCH_DESCRIPTION)
    def maskrcnn_batch_inference(
        source: str,
        output: str,
        tracking_uri: str = "",
        model: str = f"models:/{MODEL_NAME}@champion",
        package: str = "",
        shard_size: int = 64,
        score_threshold: float = 0.05,
        overlays: bool = False,
        masks: bool = False,
        concurrency: int = 1,
        ray_address: str = "",
    ):
        task = _harden(step(source=source, output=output, model=model, package=package, tracking_uri=tracking_uri,
                            shard_size=shard_size, score_threshold=score_threshold, overlays=overlays, masks=masks,
                            concurrency=concurrency, ray_address=ray_address), "batch-predict", storage=True, shm=True)
        kubernetes.use_secret_as_env(task, RAY_SECRET, {"auth_token": "RAY_AUTH_TOKEN"}, optional=True)
        task.set_caching_options(False)  # a run again resumes from the output, which caching would skip

    return maskrcnn_batch_inference
