"""`uv run -m release placeholders`: fill the manifests' placeholders with what Terraform made.

Reads `terraform output -json placeholders` on stdin ({"PROJECT": "...", "REGION": "...",
"MODELS_BUCKET": "...", ...}) and rewrites, in place, every YAML file under deployment/ (not the vendored
CRDs), ray/ and mlflow/k8s/ where a placeholder appears as a whole word. Logs each file it changed.

    terraform -chdir=infra/gke output -json placeholders | uv run -m release placeholders
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"^[A-Z][A-Z_]*$")
VALUE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")  # project ids, regions and bucket names


def manifests(root: Path) -> list[Path]:
    found = [*root.glob("deployment/**/*.yaml"), *root.glob("ray/*.yaml"), *root.glob("mlflow/k8s/**/*.yaml")]
    return sorted(p for p in found if "crds" not in p.relative_to(root).parts)


def fill(values: dict[str, str], root: Path = ROOT) -> list[Path]:
    """Replace each placeholder (a whole word) with its value in the manifests under `root`; the files changed."""
    for name, value in values.items():
        if not NAME.match(name) or not isinstance(value, str) or not VALUE.match(value):
            raise ValueError(f"placeholder {name!r}: expected NAME -> a lower-case id, got {value!r}")
    pattern = re.compile(r"\b(" + "|".join(sorted(map(re.escape, values), key=len, reverse=True)) + r")\b")
    changed = []
    for path in manifests(root):
        text = path.read_text()
        new = pattern.sub(lambda m: values[m.group(1)], text)
        if new != text:
            path.write_text(new)
            changed.append(path)
    return changed


def main(stream=sys.stdin) -> int:
    try:
        changed = fill(json.load(stream))
    except (ValueError, json.JSONDecodeError) as exc:
        log.error("placeholders: %s", exc)
        return 2
    for path in changed:
        log.info("filled %s", path.relative_to(ROOT))
    return 0
