"""The label map: contiguous model labels (1..K, 0 is background) <-> COCO category ids, strictly parsed.

No torch: the predictor, the package reader and evaluation use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MAX_CLASSES = 1000
MAX_NAME_CHARS = 200


class LabelError(ValueError):
    """A label map that is malformed, or a label outside it."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class LabelMap:
    """Contiguous model labels (1..K, 0 is background) <-> COCO category ids (any integers)."""

    category_ids: list[int]
    names: list[str]

    @property
    def num_classes(self) -> int:
        """Classes the model predicts, background included."""
        return len(self.category_ids) + 1

    def label_of(self, category_id: int) -> int:
        return self.category_ids.index(category_id) + 1

    def _index(self, label: int) -> int:
        if not 1 <= label <= len(self.category_ids):  # 0 is background, and a negative index is no class
            raise LabelError(f"label {label} is outside the label map (1 to {len(self.category_ids)})")
        return label - 1

    def category_of(self, label: int) -> int:
        return self.category_ids[self._index(label)]

    def name_of(self, label: int) -> str:
        return self.names[self._index(label)]

    def to_dict(self) -> dict[str, Any]:
        return {"categories": [{"label": i + 1, "id": c, "name": n} for i, (c, n) in enumerate(zip(self.category_ids, self.names))]}

    @classmethod
    def from_dict(cls, data: Any) -> LabelMap:
        """Parse `{"categories": [{"label", "id", "name"}, ...]}`: labels exactly 1..K (K <= MAX_CLASSES),
        integer ids and non-empty names, each unique. Raises LabelError naming the entry and the rule."""
        cats = data.get("categories") if isinstance(data, dict) else None
        if not isinstance(cats, list) or not 1 <= len(cats) <= MAX_CLASSES:
            raise LabelError(f"expected {{\"categories\": [...]}} with 1 to {MAX_CLASSES} entries")
        for i, c in enumerate(cats):
            if not (isinstance(c, dict) and set(c) == {"label", "id", "name"} and _is_int(c["label"]) and _is_int(c["id"])
                    and isinstance(c["name"], str) and 0 < len(c["name"]) <= MAX_NAME_CHARS):
                raise LabelError(f"categories[{i}]: expected {{\"label\": int, \"id\": int, \"name\": 1 to "
                                 f"{MAX_NAME_CHARS} characters}}, got {str(c)[:200]}")
        cats = sorted(cats, key=lambda c: c["label"])
        if [c["label"] for c in cats] != list(range(1, len(cats) + 1)):
            raise LabelError(f"labels {[c['label'] for c in cats][:50]}: expected exactly 1 to {len(cats)} (0 is background)")
        for key in ("id", "name"):
            values = [c[key] for c in cats]
            if len(set(values)) != len(values):
                raise LabelError(f"category {key}s must be unique, got {values[:50]}")
        return cls([int(c["id"]) for c in cats], [c["name"] for c in cats])

    @classmethod
    def from_categories(cls, categories: list[dict[str, Any]]) -> LabelMap:
        cats = sorted(categories, key=lambda c: c["id"])
        return cls([int(c["id"]) for c in cats], [str(c["name"]) for c in cats])
