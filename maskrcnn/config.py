"""Typed configuration: dataclasses loaded from YAML, with dotted command-line overrides.

Every field carries its meaning in the docstring below it (a test fails on an undocumented field);
The root `Config` reaches every Ray Train worker inside a `WorkerConfig`; `asdict()` of it feeds
(flattened) MLflow's params, and is saved beside every checkpoint and in every serving package.

`option_overrides` is the one mapping from named options (the CLI's flags, the pipeline's
parameters) to `section.field=value` overrides.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, get_args, get_origin, get_type_hints

import yaml

from maskrcnn.names import MODEL_NAME, cache_dir
"""The default name of everything one model is: its MLflow experiment and registered model, its Ray run,
its InferenceService and the name the predictor serves it under."""
CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"


class ConfigError(ValueError):
    """A config file or override names an unknown field or holds a value of the wrong type."""


@dataclass
class SyntheticConfig:
    """The embedded shapes dataset, generated deterministically from `seed`."""

    seed: int = 0
    """Generator seed: the same seed and sizes give the same images, byte for byte."""
    num_train: int = 400
    """Training images."""
    num_val: int = 50
    """Validation images (generated with another seed stream, never seen in training)."""
    image_size: int = 128
    """Side of the square images in pixels."""
    min_objects: int = 1
    """Fewest shapes per image."""
    max_objects: int = 4
    """Most shapes per image."""
    min_size: int = 16
    """Smallest shape extent in pixels."""
    max_size: int = 48
    """Largest shape extent in pixels (below `image_size`)."""
    noise: float = 8.0
    """Std of Gaussian pixel noise added to the background (0-255 scale)."""

    def __post_init__(self) -> None:
        if self.num_train < 1 or self.num_val < 1:
            raise ConfigError(f"data.synthetic: num_train and num_val must be >= 1, got {self.num_train}, {self.num_val}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ConfigError(f"data.synthetic: need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if not 4 <= self.min_size <= self.max_size < self.image_size:
            raise ConfigError(
                f"data.synthetic: need 4 <= min_size <= max_size < image_size, got {self.min_size}, {self.max_size}, {self.image_size}"
            )


@dataclass
class AugmentConfig:
    """Albumentations applied to training images only (masks and boxes stay consistent)."""

    enabled: bool = True
    """Augment at all (false: training images go in as they are)."""
    hflip: float = 0.5
    """Probability of a horizontal flip."""
    vflip: float = 0.0
    """Probability of a vertical flip."""
    scale_min: float = 0.75
    """Random scale range for the scale/crop step (1.0 and 1.0 disables it)."""
    scale_max: float = 1.25
    """Upper end of the random scale range."""
    scale_p: float = 0.5
    """Probability of the scale/crop step."""
    color_jitter: float = 0.2
    """Strength of brightness/contrast/saturation jitter (0 disables it)."""
    color_p: float = 0.5
    """Probability of the colour jitter."""


@dataclass
class DataConfig:
    """Where the dataset comes from. With `train` empty, the synthetic dataset is generated."""

    train: str = ""
    """Training split: a folder holding `annotations.json` and the images, or `s3://` / `gs://` prefix."""
    val: str = ""
    """Validation split, same forms as `train`. Empty with `train` set: `val_fraction` of train is held out."""
    format: DataFormat = "coco"
    """The splits' annotation format: `coco`, or an annotation tool's export read by `training.data.formats`
    (labelme, cvat-xml, cvat-coco, labelstudio, yolo, voc, masks), converted once into the cache. With yolo
    and `val` empty, data.yaml's `val` split is the validation split."""
    train_annotations: str = "annotations.json"
    """Annotation file name inside the split folder."""
    val_annotations: str = "annotations.json"
    """Annotation file name inside the validation folder."""
    val_fraction: float = 0.1
    """Share of the training images held out for validation when `val` is empty (a fixed split)."""
    skip_invalid: bool = False
    """Drop invalid annotations/images (counted in the log) instead of failing on the first problem."""
    cache_dir: str = ""
    """Where remote datasets and the synthetic dataset are stored. Default: $MASKRCNN_CACHE or ~/.cache/maskrcnn-platform."""
    max_image_pixels: int = 64_000_000
    """Images above this many pixels are rejected (decompression bombs)."""
    num_workers: int = 0
    """DataLoader worker processes per training worker."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """The embedded synthetic dataset, used when `train` is empty."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Training-time augmentation."""

    def __post_init__(self) -> None:
        check_choices("data", self)

    def resolved_cache_dir(self) -> Path:
        base = str(cache_dir(self.cache_dir))
        return Path(base).expanduser()


# The documented range of every bounded numeric field (inclusive; a list field bounds each item and its
# length). A config outside them is refused by field name at load, so that neither a typo in a training
# config nor a hostile serving package can ask for a 100000-pixel resize or a billion-wide head.
MODEL_RANGES: dict[str, tuple[float, float]] = {
    "trainable_backbone_layers": (-1, 5), "min_size": (32, 4096), "max_size": (32, 8192),
    "fpn_channels": (8, 1024), "fpn_levels": (1, 4), "representation_size": (8, 16384),
    "mask_head_channels": (8, 1024), "mask_head_layers": (1, 8), "roi_sampling_ratio": (1, 8),
    "anchor_sizes": (1, 2048), "aspect_ratios": (0.05, 20.0),
    "rpn_pre_nms_top_n_train": (1, 10000), "rpn_post_nms_top_n_train": (1, 10000),
    "rpn_pre_nms_top_n_test": (1, 10000), "rpn_post_nms_top_n_test": (1, 10000),
    "rpn_batch_size_per_image": (1, 4096), "box_batch_size_per_image": (1, 4096),
    "box_detections_per_img": (1, 1000), "box_score_thresh": (0.0, 1.0),
}
EVAL_RANGES: dict[str, tuple[float, float]] = {
    "mask_threshold": (0.001, 0.999), "iou_match": (0.01, 1.0), "score_threshold": (0.0, 1.0),
    "num_sample_images": (0, 100), "bootstrap_resamples": (100, 100_000), "bootstrap_seed": (0, 2**32 - 1),
}
MAX_LIST_ITEMS = 8


def check_ranges(section: str, obj: Any, ranges: dict[str, tuple[float, float]]) -> None:
    """Refuse, by field name, a value outside its documented range (NaN included)."""
    for name, (low, high) in ranges.items():
        value = getattr(obj, name)
        items = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not 1 <= len(value) <= MAX_LIST_ITEMS:
            raise ConfigError(f"{section}.{name}: expected 1 to {MAX_LIST_ITEMS} items, got {len(value)}")
        for item in items:
            if not (isinstance(item, (int, float)) and low <= item <= high):  # NaN fails both comparisons
                raise ConfigError(f"{section}.{name}: expected {low:g} to {high:g}, got {item!r}")


DataFormat = Literal["coco", "labelme", "cvat-xml", "cvat-coco", "labelstudio", "yolo", "voc", "masks"]
Backbone = Literal["resnet50_fpn", "resnet50_fpn_v2", "resnet18_fpn", "mobilenet_v3_large_fpn", "mobilenet_v3_small_fpn"]
BACKBONES: tuple[str, ...] = get_args(Backbone)  # each has one row in maskrcnn.model.BACKBONE_TABLE
Optimizer = Literal["sgd", "adamw"]
LrSchedule = Literal["cosine", "step", "constant"]
UseGpu = Literal["auto", "true", "false"]


def check_choices(section: str, obj: Any) -> None:
    """Every `Literal` field of `obj` holds one of its choices (also when built directly, not loaded)."""
    for name, typ in get_type_hints(type(obj)).items():
        if get_origin(typ) is Literal and getattr(obj, name) not in get_args(typ):
            raise ConfigError(f"{section}.{name}: expected one of {', '.join(get_args(typ))}, got {getattr(obj, name)!r}")


@dataclass
class ModelConfig:
    """torchvision Mask R-CNN: backbone, input sizes and head sizes, and where initial weights come from.

    `maskrcnn.model.build_model` builds the architecture from these fields and reads no file;
    `weights`, `backbone_weights` and `trainable_backbone_layers` are applied afterwards, by training
    only (`training.initialize`), so a checkpoint or serving package loads without them."""

    backbone: Backbone = "mobilenet_v3_large_fpn"
    """One of resnet50_fpn, resnet50_fpn_v2, resnet18_fpn, mobilenet_v3_large_fpn, mobilenet_v3_small_fpn."""
    weights: str = "none"
    """Whole-model weights: `none`, or a local path / s3:// / gs:// / http(s):// URI of a state dict."""
    backbone_weights: str = "none"
    """Backbone-only weights (e.g. ImageNet), same forms as `weights`."""
    trainable_backbone_layers: int = -1
    """Backbone stages left trainable (0-5); -1: all when training from scratch, 3 when weights are loaded."""
    frozen_batchnorm: bool = False
    """Backbone BatchNorm as torchvision's FrozenBatchNorm2d (fixed statistics): the usual choice when
    fine-tuning from pretrained weights with small batches. From scratch it must stay false."""
    min_size: int = 128
    """Shorter image side after the model's internal resize (32-4096)."""
    max_size: int = 128
    """Longer image side cap after the model's internal resize (32-8192, at least `min_size`)."""
    fpn_channels: int = 256
    """FPN output channels (8-1024; light backbones only: the ResNet-50 variants keep torchvision's 256)."""
    fpn_levels: int = 4
    """Backbone stages feeding the FPN (1-4; light backbones): 4 means strides 4, 8, 16, 32 (plus a pooled level)."""
    representation_size: int = 1024
    """Box head MLP width (8-16384; light backbones only)."""
    mask_head_channels: int = 256
    """Mask head convolution width (8-1024; light backbones only)."""
    mask_head_layers: int = 4
    """Mask head convolutions (1-8; light backbones only)."""
    roi_sampling_ratio: int = 2
    """Bilinear samples per RoIAlign bin side for the box and mask heads (1-8; torchvision: 2). On CPU the backward
    pass of RoIAlign costs ~this squared; 1 samples each bin's centre."""
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    """Anchor size in pixels per feature level, finest first (one per level is used; 1-2048 each, at most 8)."""
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    """Anchor aspect ratios (height / width, 0.05-20 each, at most 8), the same at every level."""
    rpn_pre_nms_top_n_train: int = 2000
    """Proposals per level kept before NMS while training (1-10000; so are the three below)."""
    rpn_post_nms_top_n_train: int = 2000
    """Proposals kept after NMS while training."""
    rpn_pre_nms_top_n_test: int = 1000
    """Proposals per level kept before NMS at inference."""
    rpn_post_nms_top_n_test: int = 1000
    """Proposals kept after NMS at inference."""
    rpn_batch_size_per_image: int = 256
    """Anchors sampled per image for the RPN loss (1-4096)."""
    box_batch_size_per_image: int = 512
    """Proposals sampled per image for the box and mask losses (1-4096)."""
    box_detections_per_img: int = 100
    """Most detections the model returns per image (1-1000)."""
    box_score_thresh: float = 0.05
    """Detections below this score are dropped inside the model (0-1; evaluation and serving filter further)."""

    def __post_init__(self) -> None:
        check_choices("model", self)
        check_ranges("model", self, MODEL_RANGES)
        if self.max_size < self.min_size:
            raise ConfigError(f"model: need min_size <= max_size, got {self.min_size}, {self.max_size}")

    @property
    def pretrained(self) -> bool:
        """Whether initial weights are named (they are loaded by training only)."""
        return self.weights != "none" or self.backbone_weights != "none"


@dataclass
class TrainConfig:
    """Optimisation schedule; every rank steps the same schedule."""

    epochs: int = 10
    """Passes over the training split."""
    batch_size: int = 4
    """Images per worker per step."""
    optimizer: Optimizer = "sgd"
    """sgd or adamw."""
    lr: float = 0.02
    """Learning rate for the global batch (not scaled further by the number of workers)."""
    momentum: float = 0.9
    """SGD momentum (unused by adamw)."""
    weight_decay: float = 1e-4
    """L2 penalty (decoupled for adamw)."""
    warmup_steps: int = 100
    """Steps of linear warmup from 0.1% of `lr`; from-scratch training diverges without it."""
    lr_schedule: LrSchedule = "cosine"
    """cosine or step (x0.1 at 2/3 and 8/9 of training) or constant, after the linear warmup."""
    grad_clip: float = 10.0
    """Max gradient norm (0 disables clipping)."""
    amp: bool = True
    """Mixed precision; used on GPU only."""
    seed: int = 42
    """Seed of weights, sampling, shuffling and augmentation (per epoch and rank, so resume replays exactly)."""
    log_every: int = 10
    """Steps between progress lines."""
    eval_every: int = 1
    """Epochs between evaluations on the validation split (the last epoch is always evaluated)."""
    max_steps_per_epoch: int = 0
    """Cap on steps per epoch (0: the whole split). For smoke tests."""
    threads_per_worker: int = 0
    """torch intra-op threads per worker (0: the worker's CPU share)."""

    def __post_init__(self) -> None:
        check_choices("train", self)
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError(f"train: need epochs >= 1, batch_size >= 1, lr > 0; got {self.epochs}, {self.batch_size}, {self.lr}")


@dataclass
class EvalConfig:
    """Evaluation on the validation split."""

    mask_threshold: float = 0.5
    """Probability above which a predicted mask pixel is foreground (0.001-0.999; evaluation and the predictor alike)."""
    iou_match: float = 0.5
    """IoU needed to match a prediction with a ground-truth instance for the mask IoU metric (0.01-1)."""
    score_threshold: float = 0.5
    """Predictions below this score are ignored by the mask IoU metric (0-1; COCO mAP uses all)."""
    num_sample_images: int = 4
    """Validation images with predicted masks drawn, logged to MLflow (0-100)."""
    bootstrap_resamples: int = 1000
    """Resamples of the validation images in the paired bootstrap of candidate - champion segm mAP, whose 95%
    interval is the gate's evidence (100-100000; `training.bootstrap`)."""
    bootstrap_seed: int = 0
    """Seed of that bootstrap's resampling, so that the interval is reproducible (0 to 2^32-1)."""

    def __post_init__(self) -> None:
        check_ranges("eval", self, EVAL_RANGES)


@dataclass
class RayConfig:
    """Where and how wide Ray Train runs."""

    address: str = ""
    """Where Ray Train runs. Empty: a local Ray. `http://HEAD:8265` (KubeRay: `http://<cluster>-head-svc.<ns>.svc:8265`):
    submit the run as a Ray job through the Jobs API (data, storage_path and tracking must then be remote).
    `auto` or `ray://host:10001`: join as a driver (the job's own driver; Ray Client is not advised for Ray Train)."""
    num_workers: int = 2
    """Ray Train workers (DDP ranks)."""
    use_gpu: UseGpu = "auto"
    """auto (GPU when the cluster has one), true or false (anything else is refused)."""
    cpus_per_worker: int = 1
    """CPUs Ray reserves for each worker (and its torch threads unless train.threads_per_worker is set)."""
    storage_path: str = ""
    """Where Ray keeps checkpoints: a folder or s3:// URI. Default: ./ray_results."""
    name: str = MODEL_NAME
    """Run name: checkpoints go to <storage_path>/<name>."""
    num_to_keep: int = 2
    """Checkpoints kept, the best by `checkpoint_metric`."""
    checkpoint_metric: str = "segm_mAP"
    """Metric (higher is better) that ranks checkpoints; the best one is evaluated and logged as the model."""
    max_failures: int = 1
    """Worker-group restarts from the last checkpoint before the run fails."""

    def __post_init__(self) -> None:
        check_choices("ray", self)


@dataclass
class TuneConfig:
    """Ray Tune search (ASHA) over learning rate and weight decay."""

    num_samples: int = 4
    """Trials (points sampled from the search space)."""
    lr_min: float = 0.002
    """Lower end of the log-uniform learning-rate range."""
    lr_max: float = 0.05
    """Upper end of the log-uniform learning-rate range."""
    weight_decay_min: float = 1e-5
    """Lower end of the log-uniform weight-decay range."""
    weight_decay_max: float = 1e-3
    """Upper end of the log-uniform weight-decay range."""
    max_concurrent: int = 1
    """Trials running at once (each takes `workers_per_trial` workers)."""
    grace_period: int = 1
    """Epochs each trial runs before ASHA may stop it."""
    workers_per_trial: int = 1
    """Ray Train workers of each trial."""


@dataclass
class TrackingConfig:
    """MLflow tracking and the model registry."""

    tracking_uri: str = ""
    """Empty: $MLFLOW_TRACKING_URI, else a local SQLite store ./mlflow.db (open it with `mlflow ui`)."""
    experiment: str = MODEL_NAME
    """MLflow experiment of the runs."""
    model_name: str = MODEL_NAME
    """Registered model name."""
    register: bool = True
    """Register the logged model as a new version (the pipeline registers only what passes its gate)."""
    alias: str = "challenger"
    """Alias moved to each newly registered version (empty: none). The pipeline's gate moves `champion`."""
    log_model: bool = True
    """Log the serving package of the best checkpoint as the run's MLflow model (weights only, no pickle)."""


@dataclass
class Config:
    """Everything one training run needs; saved with every checkpoint."""

    data: DataConfig = field(default_factory=DataConfig)
    """The dataset."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The architecture and its initial weights."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The optimisation schedule."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation, and the mask threshold serving uses too."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Ray Train: cluster, workers, checkpoints."""
    tune: TuneConfig = field(default_factory=TuneConfig)
    """Ray Tune search space (with `--tune`)."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow tracking and registration."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **sections: dict[str, Any]) -> Config:
        """A copy with fields of some sections replaced: `cfg.replace(train={"epochs": 1})`."""
        return dataclasses.replace(self, **{k: dataclasses.replace(getattr(self, k), **v) for k, v in sections.items()})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        return _build(cls, values, "")


@dataclass
class WorkerConfig:
    """What each Ray Train worker receives (as `train_loop_config={"worker": WorkerConfig(...)}`, the dict
    Ray requires): the run's config, the MLflow run it logs to (rank 0), the checkpoint it resumes from,
    and an optional `on_epoch_start(epoch, rank, world_size)` callback (the tests inject faults with it)."""

    config: Config
    """The run's validated configuration."""
    mlflow_run_id: str = ""
    """The MLflow run that rank 0 logs per-epoch metrics to (empty: none)."""
    tracking_uri: str = ""
    """The MLflow tracking server of that run."""
    resume_from: str = ""
    """A checkpoint (folder or s3:// URI) to resume from when Ray has none of its own (empty: start afresh)."""
    on_epoch_start: Callable[[int, int, int], None] | None = None
    """Called as each epoch starts with (epoch, rank, world size); tests inject faults with it."""


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = getattr(typ, "__origin__", None)
    if get_origin(typ) is Literal:  # checked by the section's `check_choices`; YAML's `use_gpu: true` is a bool
        return str(value).lower() if isinstance(value, bool) else value
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(typ, value, where)
    if origin is list:
        (inner,) = typ.__args__
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if typ is str:
        return "" if value is None else str(value)
    return value


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"{prefix or 'config'}: unknown field(s) {sorted(unknown)}; expected some of {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in values.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key!r} is not a section")
    node[keys[-1]] = yaml.safe_load(raw) if raw != "" else ""


# Named options (CLI flags and pipeline parameters, by the CLI's spelling) -> the field each one sets.
OPTION_FIELDS = {
    "data": "data.train",
    "val_data": "data.val",
    "skip_invalid": "data.skip_invalid",
    "data_format": "data.format",
    "epochs": "train.epochs",
    "num_workers": "ray.num_workers",
    "address": "ray.address",
    "storage_path": "ray.storage_path",
    "tracking_uri": "tracking.tracking_uri",
    "register": "tracking.register",
}


def option_overrides(**options: Any) -> list[str]:
    """`section.field=value` strings for the named options that are set; None and "" leave a field alone.

    `option_overrides(data="s3://b/train", epochs=5, register=False)` ->
    `["data.train=s3://b/train", "train.epochs=5", "tracking.register=false"]`.
    """
    out = []
    for name, value in options.items():
        if name not in OPTION_FIELDS:
            raise ConfigError(f"unknown option {name!r}; expected one of {sorted(OPTION_FIELDS)}")
        if value is None or value == "":
            continue
        out.append(f"{OPTION_FIELDS[name]}={str(value).lower() if isinstance(value, bool) else value}")
    return out


def config_path(name_or_path: str | Path | None) -> Path:
    """A config file: a name in maskrcnn/configs (`default`, `tiny`, `gpu`) or a YAML path; None: the default."""
    if not name_or_path:
        return DEFAULT_CONFIG
    text = str(name_or_path)
    return Path(text) if text.endswith((".yaml", ".yml")) or "/" in text else CONFIG_DIR / f"{text}.yaml"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (a path or a name in maskrcnn/configs; the default one when None) and apply
    `key.sub=value` overrides."""
    path = config_path(path)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.sub=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), raw.strip())
    try:
        return Config.from_dict(tree)
    except TypeError as exc:  # a scalar where a section was expected, and the like
        raise ConfigError(f"config file {path}: {exc}") from None


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`; lists become comma-joined strings (MLflow params are strings)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(flatten(value, name))
        elif isinstance(value, list):
            out[name] = ",".join(str(v) for v in value)
        else:
            out[name] = value
    return out


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
