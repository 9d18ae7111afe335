"""The promotion gate: thresholds on the candidate, and a margin over the current champion, optionally
required of the lower bound of the paired bootstrap's interval (`training.bootstrap`) rather than of the
point estimate; its decision is recorded on the candidate's MLflow run (tags `gate.decision`, `gate.reason`,
the interval as `gate.segm_map_delta*`; `gate.json` on rejection)."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from mlflow.tracking import MlflowClient

from training.bootstrap import Interval

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    evidence: dict[str, str] = field(default_factory=dict)
    """More of what the decision rests on (the bootstrap interval), as `gate.*` tags."""

    @property
    def decision(self) -> str:
        return "promote" if self.promote else "reject"

    def tags(self) -> dict[str, str]:
        """The decision as the registry's `gate.*` evidence."""
        return {"decision": self.decision, "reason": self.reason, **self.evidence}


@dataclass(frozen=True)
class Champion:
    """The registered champion, scored with the candidate's settings on the candidate's split."""

    version: str
    segm_map: float
    mask_iou: float


@dataclass(frozen=True)
class Evidence:
    """What the gate judges: the candidate's metrics and, when there is a comparable champion, the champion's
    on the same split with the paired bootstrap of candidate - champion segm mAP (`interval`)."""

    segm_map: float
    mask_iou: float
    bbox_map: float
    segm_ap50: float
    mask_recall: float
    champion: Champion | None = None
    interval: Interval | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (a Kubeflow step's output, which may hold no null): the champion and the interval
        as dicts, absent when there is none; `from_dict` reads them back."""
        return {key: value for key, value in asdict(self).items() if value is not None}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Evidence:
        values = dict(values)
        champion = values.pop("champion", None)
        interval = values.pop("interval", None)
        return cls(**values, champion=Champion(**champion) if champion else None,
                   interval=Interval.from_dict(interval) if interval else None)


@dataclass(frozen=True)
class Thresholds:
    """The gate's rule, its defaults written here once (the CLI's flags and the pipeline's parameters read them)."""

    min_segm_map: float = 0.5
    min_mask_iou: float = 0.7
    margin: float = 0.0
    """segm mAP the candidate must beat the champion by"""
    require_lower_bound: bool = False
    """the bootstrap interval's lower bound must exceed `margin` too"""


def judge(evidence: Evidence, thresholds: Thresholds) -> GateDecision:
    """`decide` on the scoring step's evidence (`release.scoring.Evidence`)."""
    champion = evidence.champion
    return decide(evidence.segm_map, evidence.mask_iou, min_segm_map=thresholds.min_segm_map,
                  min_mask_iou=thresholds.min_mask_iou, margin=thresholds.margin,
                  champion_segm_map=champion.segm_map if champion else None,
                  champion_version=champion.version if champion else "",
                  interval=evidence.interval if champion else None, require_lower_bound=thresholds.require_lower_bound)


def decide(segm_map: float, mask_iou: float, *, min_segm_map: float, min_mask_iou: float, margin: float,
           champion_segm_map: float | None = None, champion_version: str = "", interval: Interval | None = None,
           require_lower_bound: bool = False) -> GateDecision:
    """Promote only if segm mAP and mask IoU reach their thresholds and segm mAP beats the champion's
    (measured on the same split) by at least `margin`. With `require_lower_bound`, the lower bound of
    `interval` (the paired bootstrap of candidate - champion segm mAP) must also exceed `margin`: the
    candidate is better beyond the validation split's noise. With no champion, the thresholds decide."""
    failures = _non_finite({"min_segm_map": min_segm_map, "min_mask_iou": min_mask_iou, "margin": margin,
                            "segm mAP": segm_map, "mask IoU": mask_iou, "the champion's segm mAP": champion_segm_map,
                            "the interval's lower bound": interval.low if interval is not None else None,
                            "the interval's upper bound": interval.high if interval is not None else None,
                            "the interval's estimate": interval.delta if interval is not None else None})
    if failures:  # NaN passes no comparison and fails none: never let one decide
        return GateDecision(False, "rejected: " + "; ".join(failures), {})
    if segm_map < min_segm_map:
        failures.append(f"segm mAP {segm_map:.4f} < threshold {min_segm_map:.4f}")
    if mask_iou < min_mask_iou:
        failures.append(f"mask IoU {mask_iou:.4f} < threshold {min_mask_iou:.4f}")
    if champion_segm_map is not None and segm_map < champion_segm_map + margin:
        failures.append(f"segm mAP {segm_map:.4f} does not beat champion v{champion_version} "
                        f"({champion_segm_map:.4f}) by the margin {margin:+.4f}")
    if require_lower_bound and champion_segm_map is not None:
        if interval is None:
            failures.append("the gate requires a bootstrap interval against the champion, and none was computed")
        elif interval.low <= margin:
            failures.append(f"the {interval.level:.0%} interval's lower bound {interval.low:+.4f} does not exceed "
                            f"the margin {margin:+.4f}: the difference is within the split's noise")
    noise = f" [{interval.describe()}]" if interval is not None and champion_segm_map is not None else ""
    evidence = interval.tags() if interval is not None and champion_segm_map is not None else {}
    if failures:
        return GateDecision(False, "rejected: " + "; ".join(failures) + noise, evidence)
    versus = (f", beats champion v{champion_version} ({champion_segm_map:.4f}) by {segm_map - champion_segm_map:+.4f}"
              if champion_segm_map is not None else ", no champion yet")
    return GateDecision(True, f"promoted: segm mAP {segm_map:.4f} >= {min_segm_map:.4f}, "
                              f"mask IoU {mask_iou:.4f} >= {min_mask_iou:.4f}{versus}{noise}", evidence)


def _non_finite(values: dict[str, float | None]) -> list[str]:
    """A failure for each value that is not a finite number (None: not given, fine)."""
    out = []
    for what, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            out.append(f"{what} is {value!r}, not a finite number: the evaluation is broken, nothing can be decided")
    return out


def record_gate(client: MlflowClient, run_id: str, decision: GateDecision) -> None:
    """Tag the candidate's run with the decision and its reason; a rejection also logs `gate.json`."""
    client.set_tag(run_id, "gate.decision", decision.decision)
    client.set_tag(run_id, "gate.reason", decision.reason)
    for key, value in decision.evidence.items():
        client.set_tag(run_id, f"gate.{key}", value)
    if not decision.promote:
        client.set_tag(run_id, "promoted", "false")
        client.log_text(run_id, json.dumps({"promoted": False, "reason": decision.reason, **decision.evidence}, indent=2), "gate.json")
    log.info("gate: %s", decision.reason)
