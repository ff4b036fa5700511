"""CorLoc: the fraction of images whose predicted box overlaps some ground-truth box with IoU >= 0.5."""

from __future__ import annotations

import numpy as np


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one [x0, y0, x1, y1] box with each row of a (k, 4) array."""
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area + areas - inter)


def corloc(predictions: dict[str, np.ndarray | None], ground_truth: dict[str, np.ndarray]) -> dict:
    """predictions: image key -> one [x0, y0, x1, y1] box, or None when the method found nothing.
    ground_truth: image key -> (k, 4) boxes. Images without ground truth are not counted; an image with
    ground truth but no prediction counts as a miss, and ``absent`` counts those missing from
    ``predictions`` altogether (e.g. an image the run could not read)."""
    hits = 0
    counted = [key for key, boxes in ground_truth.items() if len(boxes)]
    for key in counted:
        box = predictions.get(key)
        if box is not None and (box_iou(np.asarray(box, float), ground_truth[key]) >= 0.5).any():
            hits += 1
    n = len(counted)
    absent = sum(key not in predictions for key in counted)
    return {"corloc": hits / n if n else float("nan"), "hits": hits, "images": n, "absent": absent}
