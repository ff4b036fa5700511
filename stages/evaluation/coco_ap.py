"""Class-agnostic COCO AP / AR with pycocotools: every ground-truth category counts as one class."""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from stages.common.export import CATEGORIES


def class_agnostic(gt: dict) -> dict:
    """A copy of a COCO ground-truth dict with every category mapped to the single class 1 ('fg')."""
    out = copy.deepcopy(gt)
    out["categories"] = CATEGORIES
    for ann in out["annotations"]:
        ann["category_id"] = 1
    return out


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints every step
        return fn(*args)


def evaluate_ap(gt: dict, detections: list[dict], max_dets: int) -> dict[str, dict[str, float]]:
    """AP, AP50, AP75 and AR@max_dets for boxes and masks.

    gt: COCO ground truth as ``stages.data.datasets.ground_truth_coco`` returns it (iscrowd, area and bbox on
    every annotation; any categories: mapped to one class). detections: COCO results with image_id, bbox
    [x, y, w, h], score and, for masks, an RLE 'segmentation' (str or bytes counts).
    Images of ``gt`` without detections count as misses; mask AP needs a mask on every detection and on
    every ground-truth annotation (VOC has boxes only: box AP only).
    """
    coco_gt = COCO()
    coco_gt.dataset = class_agnostic(gt)
    _quiet(coco_gt.createIndex)
    dets = [{**d, "category_id": 1} for d in detections]
    masks = all("segmentation" in d for d in dets) and all("segmentation" in a for a in gt["annotations"])
    kinds = ["bbox"] + (["segm"] if masks else [])
    results = {}
    for kind in kinds:
        if not dets:
            results[kind] = {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, f"AR{max_dets}": 0.0}
            continue
        coco_dt = _quiet(coco_gt.loadRes, [_without(d, "bbox") if kind == "segm" else d for d in dets])
        ev = COCOeval(coco_gt, coco_dt, kind)
        ev.params.maxDets = [1, 10, max_dets]
        for step in (ev.evaluate, ev.accumulate):
            _quiet(step)
        results[kind] = _summary(ev, max_dets)
    return {k: {m: float(v) for m, v in r.items()} for k, r in results.items()}


def _summary(ev: COCOeval, max_dets: int) -> dict[str, float]:
    """AP (IoU 0.50:0.95), AP50, AP75 and AR of an accumulated COCOeval, all areas, at ``max_dets``.

    Read from ``ev.eval`` as ``COCOeval.summarize`` does, because summarize looks up 100 detections
    whatever ``params.maxDets`` holds (it reports -1 for any other count)."""
    p = ev.params
    area, m = p.areaRngLbl.index("all"), p.maxDets.index(max_dets)
    precision = ev.eval["precision"][:, :, :, area, m]  # (IoU thresholds, recall points, categories)
    recall = ev.eval["recall"][:, :, area, m]  # (IoU thresholds, categories)

    def mean(values: np.ndarray) -> float:
        values = values[values > -1]  # -1: no ground truth for that entry
        return float(values.mean()) if values.size else -1.0

    at = {iou: int(np.argmin(np.abs(p.iouThrs - iou))) for iou in (0.5, 0.75)}
    return {
        "AP": mean(precision),
        "AP50": mean(precision[at[0.5]]),
        "AP75": mean(precision[at[0.75]]),
        f"AR{max_dets}": mean(recall),
    }


def _without(d: dict, key: str) -> dict:
    # loadRes recomputes a mask result's bbox from its segmentation only when no bbox is given
    return {k: v for k, v in d.items() if k != key}


def ground_truth_as_detections(gt: dict) -> list[dict]:
    """The ground truth's own non-crowd annotations as scored detections with RLE masks (for checks)."""
    coco = COCO()
    coco.dataset = copy.deepcopy(gt)
    _quiet(coco.createIndex)
    dets = []
    for ann in gt["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        rle = coco.annToRLE(ann)
        counts = rle["counts"]
        rle = {"size": rle["size"], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}
        dets.append({"image_id": ann["image_id"], "bbox": ann["bbox"], "segmentation": rle, "score": 1.0})
    return dets
