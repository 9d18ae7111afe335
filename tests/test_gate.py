"""The promotion gate's arithmetic."""

from release.gate import decide


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
