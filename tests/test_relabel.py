"""Label merging between self-training rounds."""

import numpy as np

from stages.common.export import mask_annotation
from stages.detection.relabel import merge_labels


def ann(y0, x0, y1, x1, score=None):
    m = np.zeros((50, 50), bool)
    m[y0:y1, x0:x1] = True
    return mask_annotation(m, 1, score)


def test_predictions_above_threshold_are_kept():
    preds = [ann(0, 0, 10, 10, 0.9), ann(20, 20, 30, 30, 0.7), ann(40, 40, 45, 45, 0.69)]
    assert [p["score"] for p in merge_labels(preds, [], 0.7, 0.5)] == [0.9, 0.7]


def test_old_masks_survive_only_without_overlap():
    preds = [ann(0, 0, 10, 10, 0.9), ann(30, 30, 40, 40, 0.2)]  # the second is below threshold
    same = ann(0, 0, 10, 10)  # IoU 1 with a kept prediction: replaced
    half = ann(0, 0, 10, 20)  # IoU exactly 0.5: dropped (only < 0.5 survives)
    shifted = ann(0, 0, 10, 21)  # IoU 100/210 < 0.5: survives
    lone = ann(30, 30, 40, 40)  # overlaps only the rejected prediction: survives
    merged = merge_labels(preds, [same, half, shifted, lone], 0.7, 0.5)
    assert merged == [preds[0], shifted, lone]


def test_no_kept_predictions_keeps_every_old_mask():
    old = [ann(0, 0, 5, 5), ann(10, 10, 20, 20)]
    assert merge_labels([ann(0, 0, 5, 5, 0.1)], old, 0.7, 0.5) == old


def mask_ann(mask, score=None):
    return mask_annotation(mask, 1, score)


def test_overlap_is_mask_iou_not_box_iou():
    yy, xx = np.mgrid[0:50, 0:50]
    # Two triangles of one square: their boxes coincide (box IoU 1), their masks do not overlap at all.
    upper = mask_ann((yy < xx) & (yy < 40) & (xx < 40))
    lower = mask_ann((yy > xx) & (yy < 40) & (xx < 40), 0.9)
    # A shared 20x20 core with thin spurs in opposite directions: boxes overlap little (box IoU 0.195),
    # masks a lot (mask IoU 400 / 460 = 0.87).
    core = (yy >= 15) & (yy < 35) & (xx >= 15) & (xx < 35)
    left = mask_ann(core | ((yy == 15) & (xx < 15)) | ((xx == 15) & (yy < 15)))
    right = mask_ann(core | ((yy == 34) & (xx >= 35)) | ((xx == 34) & (yy >= 35)), 0.8)
    assert merge_labels([lower], [upper], 0.7, 0.5) == [lower, upper]  # no mask overlap: the old one stays
    assert merge_labels([right], [left], 0.7, 0.5) == [right]  # mask IoU 0.87: replaced
