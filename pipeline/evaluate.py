"""Evaluation entry points that read a finished run and the dataset's ground truth."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from pipeline.config import Config
from pipeline.detect import detections_for_ap, predict
from pipeline.pseudolabels import OUTPUT
from pipeline.runs import RunDir, RunError, resolve_backbone
from stages.coco_ap import evaluate_ap
from stages.corloc import corloc
from stages.datasets import coco_boxes, ground_truth_boxes, ground_truth_coco, list_images
from stages.io import atomic_write_json, read_json


def first_boxes(pseudolabels: dict) -> dict[str, np.ndarray | None]:
    """file_name -> the first discovered box [x0, y0, x1, y1] (MaskCut: its first mask's), None if none."""
    out = {}
    for image in pseudolabels["images"]:
        boxes = image.get("discovery_boxes") or []
        x, y, w, h = boxes[0] if boxes else (0, 0, 0, 0)
        out[image["file_name"]] = np.array([x, y, x + w, y + h]) if boxes else None
    return out


def eval_corloc(cfg: Config) -> dict:
    """CorLoc of the pseudo-label run of ``cfg`` against its dataset's ground truth; saved as corloc.json."""
    cfg = resolve_backbone(cfg)
    run_dir = RunDir.for_config(cfg, "pseudolabels")
    path = run_dir.path / OUTPUT
    if not path.exists():
        raise RunError(f"no pseudo-labels at {path}: run `make pseudolabels` with the same settings first")
    result = corloc(first_boxes(read_json(path)), ground_truth_boxes(cfg.dataset))
    result = {"dataset": cfg.dataset.name, "method": cfg.method.name, "backbone": cfg.backbone.arch, **result}
    atomic_write_json(run_dir.path / "corloc.json", result)
    print(
        f"CorLoc {cfg.method.name} ({cfg.backbone.arch}) on {cfg.dataset.name}: "
        f"{100 * result['corloc']:.1f}% ({result['hits']}/{result['images']} images)",
        file=sys.stderr,
    )
    return result


def top1_boxes(predictions: dict) -> dict[str, np.ndarray | None]:
    """file_name -> the detector's highest-scoring box [x0, y0, x1, y1] (None without detections)."""
    names = {im["id"]: im["file_name"] for im in predictions["images"]}
    best: dict[int, dict] = {}
    for a in predictions["annotations"]:
        if a["image_id"] not in best or a["score"] > best[a["image_id"]]["score"]:
            best[a["image_id"]] = a
    out = {name: None for name in names.values()}
    for image_id, a in best.items():
        x, y, w, h = a["det_bbox"]
        out[names[image_id]] = np.array([x, y, x + w, y + h])
    return out


def evaluate_detector(model_dir: Path, cfg: Config, gt: dict | None = None) -> dict:
    """Class-agnostic box and mask AP/AR (100 detections) and top-1-box CorLoc of a detector directory on
    ``cfg.dataset`` (``gt``: its ground_truth_coco, when the caller has it already); predictions
    (resumable) and metrics are kept under model_dir/eval/<dataset>/."""
    gt = gt if gt is not None else ground_truth_coco(cfg.dataset)
    if gt is None or not gt.get("annotations"):
        raise RunError(f"dataset '{cfg.dataset.name}' has no ground truth to evaluate against")
    out_dir = Path(model_dir) / "eval" / cfg.dataset.name
    preds = predict(Path(model_dir), list_images(cfg.dataset), out_dir / "shards", 100, cfg)
    metrics = {
        "ap": evaluate_ap(gt, detections_for_ap(preds), max_dets=100),
        "corloc": corloc(top1_boxes(preds), coco_boxes(gt)),
    }
    atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics


def format_detector_metrics(metrics: dict) -> str:
    lines = ["        AP    AP50  AP75  AR100"]
    for kind, m in metrics["ap"].items():
        lines.append(f"{kind:6s}" + "".join(f"{100 * m[k]:6.1f}" for k in ("AP", "AP50", "AP75", "AR100")))
    c = metrics["corloc"]
    lines.append(f"CorLoc (top-1 box) {100 * c['corloc']:.1f}% ({c['hits']}/{c['images']})")
    return "\n".join(lines)
