"""Evaluation entry points that read a finished run and the dataset's ground truth."""

from __future__ import annotations

import sys

import numpy as np

from pipeline.config import Config
from pipeline.pseudolabels import OUTPUT
from pipeline.runs import RunDir, RunError, resolve_backbone
from stages.corloc import corloc
from stages.datasets import ground_truth_boxes
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
