"""The promotion gate's arithmetic."""

import math

import pytest

from release.gate import decide
from training.bootstrap import Interval


def test_thresholds_and_no_champion_promote():
    d = decide(0.6, 0.8, min_segm_map=0.5, min_mask_iou=0.7, margin=0.01)
    assert d.promote and "no champion yet" in d.reason


def test_each_failed_threshold_is_named():
    d = decide(0.4, 0.6, min_segm_map=0.5, min_mask_iou=0.7, margin=0.0)
    assert not d.promote
    assert "segm mAP 0.4000 < threshold 0.5000" in d.reason and "mask IoU 0.6000 < threshold 0.7000" in d.reason


def test_candidate_must_beat_the_champion_by_the_margin():
    assert not decide(0.605, 0.8, min_segm_map=0.5, min_mask_iou=0.7, margin=0.01, champion_segm_map=0.6,
                      champion_version="3").promote
    d = decide(0.62, 0.8, min_segm_map=0.5, min_mask_iou=0.7, margin=0.01, champion_segm_map=0.6, champion_version="3")
    assert d.promote and "beats champion v3 (0.6000) by +0.0200" in d.reason
    # a negative margin tolerates a small regression (e.g. to ship a faster model)
    assert decide(0.59, 0.8, min_segm_map=0.5, min_mask_iou=0.7, margin=-0.02, champion_segm_map=0.6).promote


@pytest.mark.parametrize("field", ["segm_map", "mask_iou", "champion_segm_map", "interval_low", "interval_high",
                                   "min_segm_map", "margin"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_number_never_promotes_and_is_named(field, bad):
    """NaN compares false with everything: without the check, a broken evaluation passed every threshold."""
    values = dict(segm_map=0.9, mask_iou=0.9, min_segm_map=0.5, min_mask_iou=0.7, margin=0.0, champion_segm_map=0.1,
                  champion_version="3")
    low, high = 0.2, 0.4
    if field.startswith("interval_"):
        low, high = (bad, high) if field == "interval_low" else (low, bad)
    else:
        values[field] = bad
    interval = Interval(delta=0.3, low=low, high=high, level=0.95, resamples=100, seed=0, images=10)
    d = decide(values.pop("segm_map"), values.pop("mask_iou"), interval=interval, require_lower_bound=True, **values)
    assert not d.promote and "not a finite number" in d.reason, d.reason
    named = {"segm_map": "segm mAP", "champion_segm_map": "the champion's segm mAP", "interval_low": "lower bound",
             "interval_high": "upper bound", "min_segm_map": "min_segm_map", "margin": "margin"}
    assert f"{named.get(field, 'mask IoU')}" in d.reason and repr(bad) in d.reason
    # the same numbers, finite, promote: the refusal is the non-finite value's
    assert decide(0.9, 0.9, min_segm_map=0.5, min_mask_iou=0.7, margin=0.0, champion_segm_map=0.1, champion_version="3",
                  interval=Interval(0.3, 0.2, 0.4, 0.95, 100, 0, 10), require_lower_bound=True).promote


def test_the_gate_judges_the_scoring_steps_typed_evidence():
    """`judge` reads `Evidence` (no sentinel for "no champion": `champion` is None) with `Thresholds` whose
    defaults the CLI and the pipeline read; the evidence survives the JSON trip a Kubeflow output makes."""
    import json

    from release.gate import Champion, Evidence, Thresholds, judge

    interval = Interval(delta=0.03, low=0.01, high=0.05, level=0.95, resamples=200, seed=0, images=40)
    alone = Evidence(0.6, 0.8, 0.65, 0.9, 0.7)
    versus = Evidence(0.6, 0.8, 0.65, 0.9, 0.7, Champion("3", 0.57, 0.78), interval)
    for evidence in (alone, versus):
        plain = evidence.to_dict()
        assert None not in plain.values()  # KFP's outputs may hold no null
        assert Evidence.from_dict(json.loads(json.dumps(plain))) == evidence
    assert "champion" not in alone.to_dict() and versus.to_dict()["champion"]["version"] == "3"
    assert Thresholds() == Thresholds(0.5, 0.7, 0.0, False)
    assert judge(alone, Thresholds()).promote and "no champion yet" in judge(alone, Thresholds()).reason
    assert judge(versus, Thresholds(margin=0.02)).promote
    assert not judge(versus, Thresholds(margin=0.04)).promote  # 0.60 < 0.57 + 0.04
    strict = judge(versus, Thresholds(margin=0.02, require_lower_bound=True))
    assert not strict.promote and "lower bound +0.0100 does not exceed the margin +0.0200" in strict.reason
    from pipelines.pipeline import GATE

    assert GATE == Thresholds()
