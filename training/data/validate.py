"""`uv run -m training.data.validate PATH|URI`: check a COCO dataset without starting a training run.

Runs the same validation as training (every image decoded, every annotation checked) on a folder, an
`s3://` or a `gs://` prefix, and prints the same report: each problem with its file, record and field,
then the counts per class. Exit status: 0 usable, 1 problems found, 2 the dataset could not be read.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from maskrcnn.config import DataConfig
from training.data.coco import CocoSplit, DatasetError, load_coco
from maskrcnn.storage import SourceError, fetch_prefix
from maskrcnn.logs import setup_logging


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.data.validate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="dataset folder, s3://bucket/prefix or gs://bucket/prefix")
    p.add_argument("--annotations", default="annotations.json", help="annotation file inside the folder")
    p.add_argument("--skip-invalid", action="store_true",
                   help="report what training with data.skip_invalid=true would drop, and succeed if anything is left")
    p.add_argument("--max-pixels", type=int, default=DataConfig.max_image_pixels, help="largest image accepted")
    return p


def report(split: CocoSplit) -> str:
    """Images, instances, crowd regions, and instances per class, as a small table."""
    anns = split.coco["annotations"]
    per_class = Counter(a["category_id"] for a in anns if not a["iscrowd"])
    lines = [f"{len(split.coco['images'])} images, {sum(not a['iscrowd'] for a in anns)} instances, "
             f"{sum(a['iscrowd'] for a in anns)} crowd regions, {len(split.label_map.names)} classes"]
    lines += [f"  {name:<24} {per_class.get(cat, 0):>8}" for cat, name in zip(split.label_map.category_ids, split.label_map.names)]
    dropped = {k: v for k, v in split.dropped.items() if v}
    if dropped:
        lines.append("dropped: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in dropped.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = get_args_parser().parse_args(argv)
    try:
        folder = fetch_prefix(args.source, DataConfig().resolved_cache_dir())
        split = load_coco(folder, args.annotations, skip_invalid=args.skip_invalid, max_pixels=args.max_pixels)
    except DatasetError as exc:
        print(f"INVALID {exc}", file=sys.stderr)
        return 1
    except SourceError as exc:
        print(f"UNREADABLE {exc}", file=sys.stderr)
        return 2
    print(f"OK {args.source if '://' in args.source else Path(args.source).resolve()}\n{report(split)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
