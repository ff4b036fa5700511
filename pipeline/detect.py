"""Detector inference over a dataset on Ray (re-labelling and evaluation share it), through the driver."""

from __future__ import annotations

import functools
import time
from pathlib import Path

from pipeline.config import Config
from pipeline.driver import ShardedStage, ShardOutput, iter_shards, run_stage
from pipeline.runs import shard_records
from stages import detect as det
from stages.common.export import validate_shard
from stages.data.datasets import ImageRecord
from stages.features.backbone import resolve_device


def make_detection_worker(d2cfg, device: str, max_dets: int):
    """Built inside each Ray actor: loads the detector once (its weights are the only file it reads) on
    ``device`` as resolved on the actor's node, then runs shards."""
    d2cfg = d2cfg.clone()
    d2cfg.MODEL.DEVICE = resolve_device(device).type
    detector = det.Detector(d2cfg, max_dets)

    def work(index: int, records: list[ImageRecord]) -> ShardOutput:
        start = time.perf_counter()
        data = det.run_shard(detector, records)
        return ShardOutput(data, stats={"images": len(records), "seconds": time.perf_counter() - start})

    return work


def predict(model_dir: Path, records: list[ImageRecord], out_dir: Path, max_dets: int, cfg: Config) -> dict:
    """Predictions of a detector directory on ``records``: {"images", "annotations", "failures"}.
    Shards are kept in ``out_dir``: an interrupted pass resumes."""
    d2cfg = det.detector_cfg(Path(model_dir))  # read here: the workers get the config, not the directory
    stage = ShardedStage(
        name="detect",
        shards=shard_records(records, cfg.run.shard_size),
        factory=functools.partial(make_detection_worker, d2cfg, cfg.backbone.device, max_dets),
        shard_dir=out_dir,
        check=validate_shard,
        item_name=lambda r: r.file_name,
    )
    run_stage(stage, cfg.run, cfg.backbone.device)
    merged = {"images": [], "annotations": [], "failures": []}
    for shard in iter_shards(stage):
        for key, values in shard.items():
            merged[key] += values
    return merged


def detections_for_ap(predictions: dict) -> list[dict]:
    """Prediction annotations as COCO results, scored with the detector's own boxes."""
    return [{**a, "bbox": a["det_bbox"]} for a in predictions["annotations"]]
