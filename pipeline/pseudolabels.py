"""The image pseudo-label run: list images, run discovery shards on Ray, merge into one COCO file."""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

from pipeline.config import BackboneConfig, Config, MethodConfig, RefineConfig
from pipeline.driver import ShardedStage, ShardOutput, merge_coco, run_stage
from pipeline.runs import RunDir, RunError, load_backbone, resolve_backbone, shard_records
from stages.datasets import ImageRecord, image_listing
from stages.discover import Discoverer, run_shard
from stages.export import validate_shard
from stages.io import atomic_write_json

OUTPUT = "pseudolabels.json"
OVERLAYS = "overlays"


def make_worker(
    backbone: BackboneConfig,
    seed: int,
    method: MethodConfig,
    refine: RefineConfig,
    max_patches: int,
    overlay_ids: frozenset[int],
):
    """Built inside each Ray actor: loads the backbone once, then runs shards. It gets no output path: its
    results (shard data, overlay PNGs) go back to the driver."""
    discoverer = Discoverer(load_backbone(backbone, seed), method, refine, max_patches)

    def work(index: int, records: list[ImageRecord]) -> ShardOutput:
        start = time.perf_counter()
        data, overlays = run_shard(discoverer, records, backbone.batch_size, overlay_ids)
        files = {f"{OVERLAYS}/{name}": png for name, png in overlays.items()}
        return ShardOutput(data, files, {"images": len(records), "seconds": time.perf_counter() - start})

    return work


def image_stage(cfg: Config, run_dir: RunDir, records: list[ImageRecord]) -> ShardedStage:
    """The discovery stage of ``cfg`` over ``records``, writing into ``run_dir``."""
    overlay_ids = frozenset(r.id for r in records[: cfg.run.overlays])
    factory = functools.partial(
        make_worker, cfg.backbone, cfg.seed, cfg.method, cfg.refine, cfg.run.max_patches, overlay_ids
    )
    return ShardedStage(
        name=cfg.method.name,
        shards=shard_records(records, cfg.run.shard_size),
        factory=factory,
        shard_dir=run_dir.shards,
        files_dir=run_dir.path,
        check=validate_shard,
        item_name=lambda r: r.file_name,
    )


def run(cfg: Config) -> Path:
    """Produce (or finish) the pseudo-label file of ``cfg``; returns its path. Finished shards are kept."""
    if cfg.method.name == "ba":  # video discovery: tracks per video, also written as per-frame COCO
        from pipeline import video

        return video.run(cfg)
    cfg = resolve_backbone(cfg)
    listing = image_listing(cfg.dataset)
    records = listing.records
    if not records:
        raise RunError(f"dataset '{cfg.dataset.name}' has no images under {cfg.dataset.root}")
    run_dir = RunDir.for_config(cfg, "pseudolabels")
    run_dir.start(cfg, records)
    stage = image_stage(cfg, run_dir, records)
    print(
        f"{cfg.method.name} on {cfg.dataset.name}: {len(records)} images, {len(stage.shards)} shards, "
        f"backbone {cfg.backbone.arch} -> {run_dir.path}",
        file=sys.stderr,
    )
    start = time.perf_counter()
    run_stage(stage, cfg.run, cfg.backbone.device)
    return merge(stage, run_dir, time.perf_counter() - start, listing.skipped)


def merge(stage: ShardedStage, run_dir: RunDir, seconds: float, skipped: list[dict] = ()) -> Path:
    """Merge the shard files into one COCO file (streamed), failures.jsonl and summary.json. ``skipped``:
    the dataset's entries that are not images (``Listing.skipped``), listed first in failures.jsonl."""
    out = run_dir.path / OUTPUT
    counts = merge_coco(stage, out, run_dir.path / "failures.jsonl", skipped)
    failures = counts.pop("failures")
    summary = {**counts, "seconds": round(seconds, 2)}
    atomic_write_json(run_dir.path / "summary.json", summary)
    print(
        f"{summary['images']} images: {summary['annotations']} masks on {summary['labelled']}, "
        f"{summary['failed']} failed, {summary['skipped']} skipped (see failures.jsonl) -> {out}",
        file=sys.stderr,
    )
    for f in failures[:10]:
        print(f"  {f['file_name']}: {f['reason']}", file=sys.stderr)
    return out
