"""`uv run -m pipelines.run_local ...`: run the whole pipeline on this machine with KFP's local runner.

Each step runs as a subprocess of this environment (`kfp.local.SubprocessRunner`), with a local Ray,
the MLflow server of $MLFLOW_TRACKING_URI (e.g. from `uv run -m training.stack up`), object storage
from the usual variables (`AWS_ENDPOINT_URL_S3`, keys; or `STORAGE_EMULATOR_HOST` for gs://), and the
Kubernetes API of `--kubeconfig` (empty `--isvc-name`: no deployment, the alias still moves).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

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


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.run_local", description=__doc__)
    p.add_argument("--config", default="tiny", help="config name in training/configs or a YAML path (default tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("--data", default="")
    p.add_argument("--val-data", default="")
    p.add_argument("--ray-address", default="")
    p.add_argument("--tracking-uri", default="", help="default $MLFLOW_TRACKING_URI")
    p.add_argument("--model-name", default="maskrcnn")
    p.add_argument("--min-segm-map", type=float, default=0.5)
    p.add_argument("--min-mask-iou", type=float, default=0.7)
    p.add_argument("--margin", type=float, default=0.0)
    p.add_argument("--storage-prefix", default="s3://models", help="where serving packages go (s3:// or gs://)")
    p.add_argument("--isvc-name", default="", help="InferenceService to point at the new model (empty: none)")
    p.add_argument("--namespace", default="default")
    p.add_argument("--canary-percent", type=int, default=0)
    p.add_argument("--ready-timeout", type=float, default=600.0)
    p.add_argument("--kubeconfig", default="")
    p.add_argument("--pipeline-root", default="./pipeline_runs", help="where step artifacts are written")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
