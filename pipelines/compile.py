"""`uv run -m pipelines.compile [--image IMAGE] [--output PATH]`: write the pipeline YAML for the Kubeflow UI.

The committed `pipelines/maskrcnn_pipeline.yaml` is compiled with the default image name; compile
again with `--image` (or $MASKRCNN_IMAGE) naming the image you pushed.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

from training.logs import setup_logging

DEFAULT_OUTPUT = Path(__file__).with_name("maskrcnn_pipeline.yaml")
log = logging.getLogger("pipelines.compile")


def compile_pipeline(output: Path = DEFAULT_OUTPUT, image: str | None = None, train_gpus: int | None = None,
                     accelerator: str | None = None) -> Path:
    """Compile with the given image, and GPUs for the train step's own pod (read when the modules load)."""
    if image:
        os.environ["MASKRCNN_IMAGE"] = image
    if train_gpus is not None:
        os.environ["MASKRCNN_TRAIN_GPUS"] = str(train_gpus)
    if accelerator:
        os.environ["MASKRCNN_ACCELERATOR"] = accelerator
    import pipelines.components
    import pipelines.pipeline

    importlib.reload(pipelines.components)  # the image is read when the components are defined
    importlib.reload(pipelines.pipeline)
    from kfp import compiler

    compiler.Compiler().compile(pipelines.pipeline.maskrcnn_pipeline, str(output))
    return output


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = argparse.ArgumentParser(prog="python -m pipelines.compile", description=__doc__)
    parser.add_argument("--image", default=None, help="base image of every step (default $MASKRCNN_IMAGE or maskrcnn-platform:0.1.0)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--train-gpus", type=int, default=None,
                        help="GPUs for the train step's pod when it trains there (empty ray_address); default 0")
    parser.add_argument("--accelerator", default=None, help="the GPU resource name (default nvidia.com/gpu)")
    args = parser.parse_args(argv)
    path = compile_pipeline(args.output, args.image, args.train_gpus, args.accelerator)
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
