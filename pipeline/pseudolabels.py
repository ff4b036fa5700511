"""The image pseudo-label run: list images, run discovery shards on Ray, merge into one COCO file."""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

from pipeline.config import Config
from pipeline.ray_runner import run_configured
from pipeline.runs import RunDir, RunError, load_backbone, resolve_backbone, shard_records, write_jsonl
from stages.datasets import ImageRecord, image_listing
from stages.discover import Discoverer, run_shard
from stages.export import coco_file, write_coco
from stages.io import atomic_write_json, read_json

OUTPUT = "pseudolabels.json"


def make_worker(cfg: Config, run_dir: RunDir, overlay_ids: frozenset[int]):
    """Built inside each Ray actor: loads the backbone once, then runs shards."""
    discoverer = Discoverer(load_backbone(cfg), cfg.method, cfg.refine, cfg.run.max_patches)

    def work(index: int, records: list[ImageRecord]) -> dict:
        wanted = [r for r in records if r.id in overlay_ids]
        overlays = run_dir.path / "overlays" if wanted else None
        batch = cfg.backbone.batch_size
        return run_shard(discoverer, records, run_dir.shard_file(index), batch, overlays, wanted)

    return work


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
    shards = shard_records(records, cfg.run.shard_size)
    print(
        f"{cfg.method.name} on {cfg.dataset.name}: {len(records)} images, {len(shards)} shards, "
        f"backbone {cfg.backbone.arch} -> {run_dir.path}",
        file=sys.stderr,
    )
    start = time.perf_counter()
    overlay_ids = frozenset(r.id for r in records[: cfg.run.overlays])
    factory = functools.partial(make_worker, cfg, run_dir, overlay_ids)
    device = cfg.backbone.device
    report = run_configured(cfg.run, device, factory, shards, run_dir.shard_file, cfg.method.name)
    if report.failed:
        raise RunError(
            f"{len(report.failed)} of {len(shards)} shards failed ({report.done} finished now, kept in "
            f"{run_dir.shards}); fix the cause and re-run to do only the rest. First error: "
            f"{next(iter(report.failed.values()))}"
        )
    return merge(run_dir, len(shards), time.perf_counter() - start, listing.skipped)


def merge(run_dir: RunDir, n_shards: int, seconds: float, skipped: list[dict] = ()) -> Path:
    """Merge the shard files into one validated COCO file, failures.jsonl and summary.json. ``skipped``:
    the dataset's entries that are not images (``Listing.skipped``), listed first in failures.jsonl."""
    images, annotations, failures = [], [], []
    for i in range(n_shards):
        shard = read_json(run_dir.shard_file(i))
        images += shard["images"]
        annotations += shard["annotations"]
        failures += shard["failures"]
    out = run_dir.path / OUTPUT
    write_coco(out, coco_file(images, annotations))
    write_jsonl(run_dir.path / "failures.jsonl", [*skipped, *failures])
    summary = {
        "images": len(images) + len(failures),
        "labelled": len(images),
        "failed": len(failures),
        "skipped": len(skipped),
        "annotations": len(annotations),
        "seconds": round(seconds, 2),
    }
    atomic_write_json(run_dir.path / "summary.json", summary)
    print(
        f"{summary['images']} images: {summary['annotations']} masks on {summary['labelled']}, "
        f"{summary['failed']} failed, {summary['skipped']} skipped (see failures.jsonl) -> {out}",
        file=sys.stderr,
    )
    for f in [*skipped, *failures][:10]:
        print(f"  {f['file_name']}: {f['reason']}", file=sys.stderr)
    return out
