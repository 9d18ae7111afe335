"""The lean serving image against the platform image (issue 24): size, and container start to ready.

Both images are built from the Dockerfile by devstack (`serving` and `platform` targets; reused when
unchanged). Each run starts a predictor container the way the tests and KServe run it
(`devstack.kserve.start_predictor`: uid 1000, read-only root filesystem, the package read-only at
/mnt/models, `--cpus 2`) on the same package, and times `podman run` to the first 200 from
`/v2/health/ready` (polled every 20 ms). That time includes the container's start, Python's imports,
reading and verifying the package, the ONNX Runtime session and the probe. Rows alternate between the
images, `--runs` times each; the table gives medians and the spread.

`--before REF` adds the image as it was at REF (default 74259b3, before issue 24: one image, whose
predictor imported torch to pre- and post-process around the graph), built from a git worktree.

The package: a seeded, untrained model of `--config` (default: the main job's `default.yaml`) with its
graph, written by `write_package`.

    uv run python benchmarks/serving_image.py [--runs 5] [--config default] [--before REF]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

from devstack.kserve import start_predictor
from devstack.podman import Podman
from devstack.procs import free_port

log = logging.getLogger("benchmark")


def make_package(config: str, folder: Path) -> Path:
    import torch

    from maskrcnn.config import CONFIG_DIR, load_config
    from maskrcnn.labels import LabelMap
    from maskrcnn.model import build_model
    from training.export import write_package

    cfg = load_config(CONFIG_DIR / f"{config}.yaml", [])
    torch.manual_seed(0)
    labels = LabelMap([1, 2, 3], ["circle", "square", "triangle"])
    package = write_package(build_model(cfg.model, labels.num_classes).eval(), cfg, labels, {"model_version": "1"})
    if package.graph is None:
        raise SystemExit("the package has no graph: the serving image cannot serve it")
    package.save(folder)
    for path in (folder, *folder.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)  # readable by the containers' uid 1000
    return folder


def _before(podman: Podman, ref: str, worktree: Path) -> str:
    """The image at commit `ref`, built from a git worktree (its Dockerfile's default target)."""
    import subprocess

    from devstack.podman import ROOT

    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), ref], check=True,
                   capture_output=True)
    try:
        tag = f"localhost/maskrcnn-before:{ref}"
        podman._build(worktree, tag, None, {"GIT_COMMIT": ref})
        return tag
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], check=False)


def start_to_ready(podman: Podman, image: str, package: Path) -> float:
    started = time.perf_counter()
    name = start_predictor(podman, image, package, free_port(), cpus=2, interval=0.02)
    seconds = time.perf_counter() - started
    podman("rm", "-f", "-t", "0", name, check=False)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--config", default="default")
    parser.add_argument("--before", default="74259b3", help="a commit to build and time too ('' for none)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from training.tracking import git_commit

    with tempfile.TemporaryDirectory(prefix="serving-image-") as tmp:
        podman = Podman(Path(tmp) / "podman")
        images = {}
        if args.before:
            images[f"before ({args.before})"] = _before(podman, args.before, Path(tmp) / "before")
        images["platform"] = podman.build(git_commit=git_commit())[0]
        images["serving"] = podman.build_serving(git_commit=git_commit())[0]
        package = make_package(args.config, Path(tmp) / "package")
        for image in images.values():  # the first start reads the image's layers from disk: not counted
            start_to_ready(podman, image, package)
        times: dict[str, list[float]] = {name: [] for name in images}
        for _ in range(args.runs):
            for name, image in images.items():
                times[name].append(start_to_ready(podman, image, package))
        print(f"\npackage: {args.config}.yaml, {sum(p.stat().st_size for p in package.iterdir()) / 1e6:.0f} MB; "
              f"{args.runs} runs each, alternating\n")
        print("| image | size | start to ready, median | min-max |\n|---|---|---|---|")
        base = statistics.median(times[next(iter(images))])
        for name, image in images.items():
            median = statistics.median(times[name])
            print(f"| {name} (`{image}`) | {podman.size(image) / 1e9:.2f} GB | {median:.2f} s (x{base / median:.2f}) | "
                  f"{min(times[name]):.2f}-{max(times[name]):.2f} s |")


if __name__ == "__main__":
    main()
