"""`uv run -m pipelines.compile [--image IMAGE] [--output PATH] [--batch-output PATH]`: write the pipelines'
YAML for the Kubeflow UI: the training pipeline and the batch inference pipeline.

The committed `pipelines/maskrcnn_pipeline.yaml` and `pipelines/batch_pipeline.yaml` are compiled with the
default image name; compile again with `--image` (or $MASKRCNN_IMAGE) naming the image you pushed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pipelines.components import DEFAULT_IMAGE
from pipelines.pipeline import DEFAULT_ACCELERATOR, build_batch_pipeline, build_pipeline
from maskrcnn.logs import setup_logging

DEFAULT_OUTPUT = Path(__file__).with_name("maskrcnn_pipeline.yaml")
BATCH_OUTPUT = Path(__file__).with_name("batch_pipeline.yaml")
log = logging.getLogger("pipelines.compile")


def compile_pipeline(output: Path = DEFAULT_OUTPUT, image: str = DEFAULT_IMAGE, train_gpus: int = 0,
                     accelerator: str = DEFAULT_ACCELERATOR, signing_key: str = "") -> Path:
    """Compile the pipeline with every step on `image`, and GPUs for the train step's own pod.
    `signing_key`: `gcpkms://...` to sign with a Cloud KMS key version; empty: the maskrcnn-signing-key Secret."""
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(image, train_gpus, accelerator, signing_key), str(output))
    return output


def compile_batch_pipeline(output: Path = BATCH_OUTPUT, image: str = DEFAULT_IMAGE) -> Path:
    """Compile the batch inference pipeline with its step on `image`."""
    from kfp import compiler

    compiler.Compiler().compile(build_batch_pipeline(image), str(output))
    return output


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = argparse.ArgumentParser(prog="python -m pipelines.compile", description=__doc__)
    parser.add_argument("--image", default=os.environ.get("MASKRCNN_IMAGE", DEFAULT_IMAGE),
                        help=f"base image of every step (default $MASKRCNN_IMAGE, else {DEFAULT_IMAGE})")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--batch-output", type=Path, default=BATCH_OUTPUT, help="the batch inference pipeline's YAML")
    parser.add_argument("--train-gpus", type=int, default=0,
                        help="GPUs for the train step's pod when it trains there (empty ray_address); default 0")
    parser.add_argument("--accelerator", default=DEFAULT_ACCELERATOR, help=f"the GPU resource name (default {DEFAULT_ACCELERATOR})")
    parser.add_argument("--signing-key", default="", metavar="gcpkms://...",
                        help="sign published packages with this Cloud KMS key version (Terraform's package_signing_key "
                             "output); default: the key in the maskrcnn-signing-key Secret")
    args = parser.parse_args(argv)
    path = compile_pipeline(args.output, args.image, args.train_gpus, args.accelerator, args.signing_key)
    log.info("wrote %s", path)
    log.info("wrote %s", compile_batch_pipeline(args.batch_output, args.image))
    return 0


if __name__ == "__main__":
    sys.exit(main())
