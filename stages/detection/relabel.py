"""Self-training labels: merge a detector's predictions with the previous round's pseudo-masks."""

from __future__ import annotations

from stages.common import rle


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
    iou = rle.iou([a["segmentation"] for a in previous], [p["segmentation"] for p in kept])
    survivors = [old for old, best in zip(previous, iou.max(axis=1), strict=True) if best < max_iou]
    return kept + survivors
