"""Detector inference over a dataset on Ray (re-labelling and evaluation share it)."""

from __future__ import annotations

import functools
from pathlib import Path

from pipeline.config import Config
from pipeline.ray_runner import run_configured
from pipeline.runs import RunError, shard_records
from stages import detector as det
from stages.datasets import ImageRecord
from stages.io import read_json


def make_detection_worker(model_dir: Path, device: str, max_dets: int, out_dir: Path):
    """Built inside each Ray actor: loads the detector once, then runs shards."""
    detector = det.load_detector(model_dir, device, max_dets)
    return lambda index, records: det.run_shard(detector, records, out_dir / f"shard-{index:05d}.json")


def predict(model_dir: Path, records: list[ImageRecord], out_dir: Path, max_dets: int, cfg: Config) -> dict:
    """Predictions of a detector directory on ``records``: {"images", "annotations", "failures"}.
    Shards are kept in ``out_dir``: an interrupted pass resumes."""
    shards = shard_records(records, cfg.run.shard_size)
    factory = functools.partial(make_detection_worker, model_dir, cfg.backbone.device, max_dets, out_dir)
    shard_file = lambda i: out_dir / f"shard-{i:05d}.json"  # noqa: E731
    report = run_configured(cfg.run, cfg.backbone.device, factory, shards, shard_file, "detect")
    if report.failed:
        raise RunError(f"{len(report.failed)} inference shards failed (re-run to retry): {report.failed}")
    merged = {"images": [], "annotations": [], "failures": []}
    for i in range(len(shards)):
        for key, values in read_json(shard_file(i)).items():
            merged[key] += values
    return merged


def detections_for_ap(predictions: dict) -> list[dict]:
    """Prediction annotations as COCO results, scored with the detector's own boxes."""
    return [{**a, "bbox": a["det_bbox"]} for a in predictions["annotations"]]
