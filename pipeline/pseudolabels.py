"""The pseudo-label stage: list the dataset's items, run the configured method over shards of them on Ray
(``pipeline/driver.py``), merge into one COCO file (and, for videos, YouTube-VIS tracks)."""

from __future__ import annotations

import ctypes
import functools
import multiprocessing
import signal
import sys
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path
from typing import Any

from pipeline.config import METHODS, Config, MethodConfig
from pipeline.driver import ShardedStage, ShardOutput, iter_shards, merge_coco, run_stage
from pipeline.resolve import method_sections, resolve
from pipeline.runs import RunDir, RunError, load_backbone, shard_records, write_jsonl
from stages.common import rle
from stages.common.export import FOREGROUND, CocoWriter, validate_shard
from stages.common.io import JsonListsWriter, atomic_write_json, read_json
from stages.data.datasets import ImageRecord, image_listing
from stages.data.videos import VideoRecord, frame_records, list_videos
from stages.features.backbone import BackboneConfig, resolve_device
from stages.pseudolabels import Discoverer, pair_names, run_pairs, run_shard, run_video, validate_video_shard
from stages.refinement.refine import REFINERS, RefineConfig, torch_from
from stages.video.base import PairCache

OUTPUT = "pseudolabels.json"
OVERLAYS = "overlays"
TRACKS = "ytvis.json"  # videos, YouTube-VIS style: one annotation per track, a segmentation per frame


def code_version(cfg: Config) -> str:
    """The version of the code that shapes this run's shards: its method's (``DiscoveryMethod.version``),
    and the torch refinement where it refines them (``refine.backend`` on this device, ``torch_from``):
    refine.backend is not in the run's hash, and auto picks by device, so a run resumed on another kind of
    machine, or by a version that picks otherwise, recomputes the shards instead of mixing two refinements
    in one file."""
    version = f"{cfg.method.name} v{METHODS.get(cfg.method.name).version}"
    refiner = getattr(cfg.method, "refine", None)
    if refiner is None:
        return version
    first = torch_from(cfg.refine.backend, resolve_device(cfg.backbone.device), REFINERS.get(refiner))
    if first == 1:
        version += ", torch refinement"
    elif first is not None:
        version += f", torch refinement from {first} masks per image"
    return version


def _refine_process_init() -> None:
    """In each refinement process: one torch thread, and die with the model worker that started it (Linux:
    PR_SET_PDEATHSIG), so a killed or replaced Ray actor leaves no process behind."""
    import torch

    torch.set_num_threads(1)
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def refine_pool(processes: int, backbone: BackboneConfig, refine: RefineConfig) -> Executor | None:
    """The processes that refine a model worker's masks while its backbone runs the next batch
    (``run.refine_processes``); None (refine in the worker itself) for 0, or when refinement runs on the
    worker's GPU (``refine.backend``: torch on CUDA)."""
    device = resolve_device(backbone.device)
    if processes == 0 or (device.type == "cuda" and refine.backend != "reference"):
        return None
    # spawn: a Ray actor has threads (Ray's, torch's), which fork would copy in an unknown state.
    context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(processes, mp_context=context, initializer=_refine_process_init)


def make_worker(
    backbone: BackboneConfig,
    seed: int,
    method: MethodConfig,
    refine: RefineConfig,
    max_patches: int,
    overlay_ids: frozenset[int],
    refine_processes: int = 0,
):
    """Built inside each Ray actor: loads the backbone once (and starts its refinement processes), then runs
    shards. Neither gets an output path: the results (shard data, overlay PNGs) go back to the driver."""
    pool = refine_pool(refine_processes, backbone, refine)
    discoverer = Discoverer.from_config(load_backbone(backbone, seed), method, refine, max_patches, pool)

    def work(index: int, records: list[ImageRecord]) -> ShardOutput:
        start = time.perf_counter()
        data, overlays = run_shard(discoverer, records, backbone.batch_size, overlay_ids)
        files = {f"{OVERLAYS}/{name}": png for name, png in overlays.items()}
        return ShardOutput(data, files, {"images": len(records), "seconds": time.perf_counter() - start})

    return work


def worker_factory(
    cfg: Config, overlay_ids: frozenset[int] = frozenset(), refine_processes: int | None = None
):
    """``make_worker`` with ``cfg``'s settings, for a Ray actor to call (``refine_processes``: None =
    ``cfg.run.refine_processes``)."""
    run = cfg.run
    processes = run.refine_processes if refine_processes is None else refine_processes
    return functools.partial(
        make_worker, cfg.backbone, cfg.seed, cfg.method, cfg.refine, run.max_patches, overlay_ids, processes
    )


def image_stage(cfg: Config, run_dir: RunDir, records: list[ImageRecord]) -> ShardedStage:
    """The discovery stage of ``cfg`` over ``records``, writing into ``run_dir``."""
    factory = worker_factory(cfg, frozenset(r.id for r in records[: cfg.run.overlays]))
    return ShardedStage(
        name=cfg.method.name,
        shards=shard_records(records, cfg.run.shard_size),
        factory=factory,
        shard_dir=run_dir.shards,
        files_dir=run_dir.path,
        check=validate_shard,
        item_name=lambda r: r.file_name,
        version=code_version(cfg),
    )


def run(cfg: Config) -> Path:
    """Produce (or finish) the pseudo-label file of ``cfg``; returns its path. Finished shards are kept."""
    if cfg.modality == "video":  # tracks per video, also written as per-frame COCO
        return run_videos(cfg)
    cfg = resolve(cfg)
    listing = image_listing(cfg.dataset)
    records = listing.records
    if not records:
        raise RunError(f"dataset '{cfg.dataset.name}' has no images under {cfg.dataset.root}")
    # A missing file is that image's failure; none there means the root is wrong (DATA= elsewhere). Stops at
    # the first file found: one stat on a right root.
    if not any(Path(r.path).exists() for r in records):
        raise RunError(
            f"none of the {len(records)} images of dataset '{cfg.dataset.name}' is under {cfg.dataset.root} "
            f"(the first: {records[0].file_name}): check DATA= or dataset.root"
        )
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


def total_seconds(run_dir: RunDir, seconds: float) -> float:
    """The summary's ``seconds``: wall seconds spent on shards by every invocation that finished the run,
    this one's ``seconds`` added to the earlier summary's (a resume that finds every shard done adds ~0)."""
    earlier = run_dir.path / "summary.json"
    before = read_json(earlier).get("seconds", 0.0) if earlier.exists() else 0.0
    return round(before + seconds, 2)


def merge(stage: ShardedStage, run_dir: RunDir, seconds: float, skipped: list[dict] = ()) -> Path:
    """Merge the shard files into one COCO file (streamed), failures.jsonl and summary.json. ``skipped``:
    the dataset's entries that are not images (``Listing.skipped``), listed first in failures.jsonl."""
    out = run_dir.path / OUTPUT
    counts = merge_coco(stage, out, run_dir.path / "failures.jsonl", skipped)
    failures = counts.pop("failures")
    summary = {**counts, "seconds": total_seconds(run_dir, seconds)}
    atomic_write_json(run_dir.path / "summary.json", summary)
    print(
        f"{summary['images']} images: {summary['annotations']} masks on {summary['with_masks']} "
        f"({summary['labelled'] - summary['with_masks']} without), "
        f"{summary['failed']} failed, {summary['skipped']} skipped (see failures.jsonl) -> {out}",
        file=sys.stderr,
    )
    for f in failures[:10]:
        print(f"  {f['file_name']}: {f['reason']}", file=sys.stderr)
    return out


# ----------------------------------------------------------------------------------------------------------
# Videos


def make_video_worker(
    backbone_cfg: BackboneConfig,
    seed: int,
    method: Any,
    sections: dict[str, Any],
    overlay_ids: frozenset[int],
    pair_root: str | None = None,
):
    """Built inside each Ray actor: the backbone and the video method (with what it loads, e.g. BA's
    correlator) once. It gets no output path: its results (tracks, overlay GIFs) go back to the driver.
    ``pair_root``: the folder of the method's pair files (``PairCache``), which it only reads."""
    backbone = load_backbone(backbone_cfg, seed)
    video_method = METHODS.get(method.name).from_config(method, backbone, sections, backbone_cfg.batch_size)

    def work(index: int, videos: list) -> ShardOutput:
        (video,) = videos
        start = time.perf_counter()
        pairs = None if pair_root is None else [str(Path(pair_root) / n) for n in pair_names(video)]
        data, gif = run_video(video_method, video, video.id in overlay_ids, pairs)
        files = {f"overlays/{video.name}.gif": gif} if gif is not None else {}
        return ShardOutput(data, files, {"frames": len(video.frames), "seconds": time.perf_counter() - start})

    return work


def run_videos(cfg: Config) -> Path:
    """Tracks of the configured video method for every video (one video per shard, resumable), merged into
    ytvis.json and a per-frame COCO pseudolabels.json; returns the latter."""
    cfg = resolve(cfg)
    videos = list_videos(cfg.dataset)
    run_dir = RunDir.for_config(cfg, "pseudolabels")
    frames = frame_records(cfg.dataset)
    run_dir.start(cfg, frames)
    sections = method_sections(cfg)
    about = METHODS.get(cfg.method.name).describe(sections)
    print(
        f"{cfg.method.name} on {cfg.dataset.name}: {len(videos)} videos{about} -> {run_dir.path}",
        file=sys.stderr,
    )
    start = time.perf_counter()
    pair_root = None
    cache = METHODS.get(cfg.method.name).pair_cache(cfg.method)
    if cache is not None:
        run_stage(pair_stage(cfg, run_dir, videos, cache), cfg.run, cfg.backbone.device)
        pair_root = str(run_dir.path / cache.folder)
    overlay_ids = frozenset(v.id for v in videos[: cfg.run.overlays])
    stage = ShardedStage(
        name=cfg.method.name,
        shards=[[v] for v in videos],
        factory=functools.partial(
            make_video_worker, cfg.backbone, cfg.seed, cfg.method, sections, overlay_ids, pair_root
        ),
        shard_dir=run_dir.shards,
        files_dir=run_dir.path,
        check=validate_video_shard,
        size=lambda v: len(v.frames),
        item_name=lambda v: f"video {v.name}",
        version=code_version(cfg),
    )
    run_stage(stage, cfg.run, cfg.backbone.device)
    return merge_videos(stage, run_dir, {r.file_name: r.id for r in frames}, time.perf_counter() - start)


def make_pair_worker(cache: PairCache, device: str):
    """Built inside each Ray actor: the pair function of ``cache`` (e.g. a flow estimator) once. It gets
    no output path: the pair files go back to the driver."""
    compute = cache.worker(str(resolve_device(device)))

    def work(index: int, pairs: list[tuple[VideoRecord, int]]) -> ShardOutput:
        data, files = run_pairs(compute, cache.folder, pairs)
        return ShardOutput(data, files)

    return work


def pair_stage(cfg: Config, run_dir: RunDir, videos: list[VideoRecord], cache: PairCache) -> ShardedStage:
    """The stage that computes a video method's pair files (``PairCache``) once per run: shards of
    ``run.shard_size`` frame pairs, files written by the driver under the run directory; a second run (or
    the method's shards computed again) reads them."""
    pairs = [(v, t) for v in videos for t in range(len(v.frames) - 1)]
    return ShardedStage(
        name=f"{cfg.method.name} {cache.folder}",
        shards=[pairs[i : i + cfg.run.shard_size] for i in range(0, len(pairs), cfg.run.shard_size)],
        factory=functools.partial(make_pair_worker, cache, cfg.backbone.device),
        shard_dir=run_dir.path / f"{cache.folder}-shards",  # beside the pair files' folder
        files_dir=run_dir.path,
        item_name=lambda pair: pair_names(pair[0])[pair[1]],
        version=cache.folder,
    )


def merge_videos(stage: ShardedStage, run_dir: RunDir, frame_ids: dict[str, int], seconds: float) -> Path:
    """Stream the video shards into ytvis.json (a track per annotation, a segmentation per frame) and a
    per-frame COCO pseudolabels.json (frames as images), plus failures.jsonl and summary.json; memory
    holds one video at a time."""
    out = run_dir.path / OUTPUT
    failures = []
    with CocoWriter(out) as coco, JsonListsWriter(run_dir.path / TRACKS, ("videos", "annotations")) as ytvis:
        for shard in iter_shards(stage):
            failures += shard["failures"]
            video = shard["video"]
            if video is None:
                continue
            ytvis.add("videos", [{k: video[k] for k in ("id", "file_names", "width", "height", "name")}])
            images = [
                {
                    "id": frame_ids[name],
                    "file_name": name,
                    "width": video["width"],
                    "height": video["height"],
                    "video_id": video["id"],
                }
                for name in video["file_names"]
            ]
            tracks, annotations = [], []
            for track in shard["tracks"]:
                track_id = ytvis.counts["annotations"] + len(tracks) + 1
                tracks.append(
                    {
                        "id": track_id,
                        "video_id": video["id"],
                        "category_id": 1,
                        "iscrowd": 0,
                        "segmentations": track["segmentations"],
                    }
                )
                for name, seg in zip(video["file_names"], track["segmentations"], strict=True):
                    if seg is not None:
                        annotations.append((seg, frame_ids[name], video["id"], track_id))
            coco.add(images, _frame_annotations(annotations))
            ytvis.add("annotations", tracks)
        coco.commit()
        ytvis.commit({"categories": [FOREGROUND]})
        n_videos, n_tracks, n_masks = ytvis.counts["videos"], ytvis.counts["annotations"], coco.n_annotations
    write_jsonl(run_dir.path / "failures.jsonl", failures)
    summary = {
        "videos": n_videos + len(failures),
        "failed": len(failures),
        "tracks": n_tracks,
        "frame_masks": n_masks,
        "seconds": total_seconds(run_dir, seconds),
    }
    atomic_write_json(run_dir.path / "summary.json", summary)
    print(
        f"{summary['videos']} videos: {summary['tracks']} tracks, {summary['failed']} failed -> {out}",
        file=sys.stderr,
    )
    return out


def _frame_annotations(masks: list[tuple[dict, int, int, int]]) -> list[dict]:
    """Per-frame COCO annotations of (RLE, image id, video id, track id) tuples, areas and boxes from the
    RLEs."""
    segs = [seg for seg, *_ in masks]
    return [
        {
            "image_id": image_id,
            "category_id": 1,
            "iscrowd": 0,
            "segmentation": seg,
            "area": int(area),
            "bbox": [float(v) for v in box],
            "video_id": video_id,
            "track_id": track_id,
        }
        for (seg, image_id, video_id, track_id), area, box in zip(
            masks, rle.area(segs), rle.to_bbox(segs), strict=True
        )
    ]
