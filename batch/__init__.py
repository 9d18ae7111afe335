"""Batch inference: a serving package over a folder or bucket of images, on Ray Data.

`uv run -m batch SRC OUT --package PACKAGE` (or `--model models:/NAME@ALIAS`) runs the package's network
(its ONNX graph when it has one, checked against the package's probe first, as the predictor does) over
every image under SRC, with the pre- and post-processing of evaluation and serving (`training.inference`),
and writes COCO results (RLE masks) per shard of images to OUT, optionally with overlays and mask PNGs.
Imports `training` only.
"""
