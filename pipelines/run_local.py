"""`uv run -m pipelines.run_local ...`: run the whole pipeline on this machine with KFP's local runner.

Each step runs as a subprocess of this environment (`kfp.local.SubprocessRunner`), with a local Ray,
the MLflow server of $MLFLOW_TRACKING_URI (e.g. from `uv run -m devstack up`), object storage
from the usual variables (`AWS_ENDPOINT_URL_S3`, keys; or `STORAGE_EMULATOR_HOST` for gs://), and the
Kubernetes API of `--kubeconfig` (empty `--isvc-name`: no deployment, the alias still moves).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from training.logs import setup_logging

log = logging.getLogger("pipelines.run_local")


def run_local(pipeline_root: str | Path, **params: Any) -> None:
    """Run the pipeline with KFP's SubprocessRunner; raises RuntimeError when a step fails."""
    from kfp import local

    from pipelines.pipeline import maskrcnn_pipeline

    import warnings

    # The SubprocessRunner runs the steps in this environment, not in their image: intended here.
    warnings.filterwarnings("ignore", message="You may be attemping to run a task that uses custom")
    Path(pipeline_root).mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True)
    maskrcnn_pipeline(**params)


# Where a local run differs from the pipeline's own defaults: the tiny config, the local stack's bucket,
# and no InferenceService unless one is named.
LOCAL_DEFAULTS = {"config": "tiny", "storage_prefix": "s3://models", "isvc_name": ""}
HELP = {
    "config": "config name in training/configs or a YAML path",
    "overrides": "override a config field, SECTION.FIELD=VALUE (repeatable)",
    "tracking_uri": "default $MLFLOW_TRACKING_URI",
    "storage_prefix": "where serving packages go (s3:// or gs://)",
    "isvc_name": "InferenceService to point at the new model (empty: none)",
}


def get_args_parser() -> argparse.ArgumentParser:
    """One flag per pipeline parameter, with the pipeline's own types and defaults (but LOCAL_DEFAULTS)."""
    import inspect

    from pipelines.pipeline import maskrcnn_pipeline

    p = argparse.ArgumentParser(prog="python -m pipelines.run_local", description=__doc__)
    for name, param in inspect.signature(maskrcnn_pipeline.pipeline_func).parameters.items():
        default = LOCAL_DEFAULTS.get(name, param.default)
        text = f"{HELP.get(name, '')} (default: {default!r})".strip()
        if param.annotation in (list, "list"):
            p.add_argument("--set", dest=name, action="append", default=list(default), metavar="SECTION.FIELD=VALUE", help=text)
        else:
            p.add_argument(f"--{name.replace('_', '-')}", type=param.annotation, default=default, help=text)
    p.add_argument("--pipeline-root", default="./pipeline_runs", help="where step artifacts are written")
    return p


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = vars(get_args_parser().parse_args(argv))
    root = args.pop("pipeline_root")
    try:
        run_local(root, **args)
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
