"""Self-training labels: merge a detector's predictions with the previous round's pseudo-masks."""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils


def _rles(anns: list[dict]) -> list[dict]:
    out = []
    for a in anns:
        seg = a["segmentation"]
        counts = seg["counts"].encode("ascii") if isinstance(seg["counts"], str) else seg["counts"]
        out.append({"size": seg["size"], "counts": counts})
    return out


def merge_labels(
    predictions: list[dict], previous: list[dict], score_thresh: float, max_iou: float
) -> list[dict]:
    """One image's new label set (SPEC "Self-training round r >= 1").

    Keep predictions with score >= ``score_thresh``; keep a previous pseudo-mask only when its largest mask
    IoU with the kept predictions is below ``max_iou``. Returns kept predictions, then surviving old masks.
    """
    kept = [p for p in predictions if p["score"] >= score_thresh]
    if not kept or not previous:
        return kept + list(previous)
    iou = mask_utils.iou(_rles(previous), _rles(kept), [0] * len(kept))  # (len(previous), len(kept))
    survivors = [
        old for old, best in zip(previous, np.asarray(iou).max(axis=1), strict=True) if best < max_iou
    ]
    return kept + survivors
