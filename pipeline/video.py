"""Video runs: BA pseudo-masks (tracks per video), correlator training, and video evaluation."""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from pipeline.config import Config, replace, save_config
from pipeline.ray_runner import run_configured
from pipeline.runs import RunDir, RunError, load_backbone, resolve_backbone, write_jsonl
from stages import correlator as corr
from stages.ba import VideoDiscoverer, frame_input_size, load_correlator, run_video
from stages.backbone import IMAGENET_MEAN, IMAGENET_STD, Backbone
from stages.export import coco_file, write_coco
from stages.io import atomic_write_json, load_rgb, read_json
from stages.video_metrics import davis_jf, davis_proposals, fg_ari, miou_hungarian, with_background_proposal
from stages.videos import frame_records, list_videos, video_truth

OUTPUT = "pseudolabels.json"  # per-frame COCO (what self-training reads)
TRACKS = "ytvis.json"  # YouTube-VIS style: one annotation per track, a segmentation per frame
CHECKPOINT = "correlator.pth"
FROZEN = "frozen"  # correlator.checkpoint value: BA on the frozen ViT's attention, trained correlator or not


# ----------------------------------------------------------------------------------------------------------
# Correlator training


def resolve_correlator(cfg: Config) -> Config:
    """Fix correlator.checkpoint: the configured file, else the correlator trained on this dataset with this
    backbone and settings, else None (BA then runs on the frozen ViT's own attention, baseline "A").
    ``frozen`` asks for that baseline even where a correlator was trained."""
    if cfg.correlator.checkpoint == FROZEN:
        return replace(cfg, **{"correlator.checkpoint": None})
    if cfg.correlator.checkpoint:
        path = Path(cfg.correlator.checkpoint).expanduser()
        if not path.is_file():
            raise RunError(f"config key 'correlator.checkpoint': no such file '{path}'")
        return cfg
    trained = RunDir.for_config(cfg, "correlator").path / CHECKPOINT
    if trained.is_file():
        return replace(cfg, **{"correlator.checkpoint": str(trained)})
    print(
        "warning: no trained correlator for this dataset and backbone (make train-correlator); BA runs on "
        "the frozen ViT's last-block attention instead (the BA paper's baseline 'A').",
        file=sys.stderr,
    )
    return cfg


def clip_batches(cfg: Config, backbone: Backbone, start_step: int):
    """Endless batches (B, T, 1 + n, C) of frozen-ViT tokens from random clips, the same crop and flip on
    every frame of a clip. Step s draws from a generator seeded by (seed, s): a resumed run continues with
    the clips it would have seen."""
    c = cfg.correlator
    videos = [v for v in list_videos(cfg.dataset) if len(v.frames) >= c.clip_len]
    if not videos:
        raise RunError(f"no video of '{cfg.dataset.name}' has {c.clip_len} frames (correlator.clip_len)")
    size = frame_input_size(c.size, backbone.patch)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    step = start_step
    while True:
        rng = np.random.default_rng([cfg.seed, step])
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        clips = []
        for _ in range(c.batch_size):
            video = videos[int(rng.integers(len(videos)))]
            gap = min(c.stride, (len(video.frames) - 1) // (c.clip_len - 1)) if c.clip_len > 1 else 1
            first = int(rng.integers(len(video.frames) - gap * (c.clip_len - 1)))
            names = video.frames[first : first + gap * c.clip_len : gap]
            frames = torch.stack(
                [torch.from_numpy(load_rgb(Path(video.root) / n)).permute(2, 0, 1) for n in names]
            )
            crop = corr.clip_augment(
                frames.float() / 255, gen, size, tuple(c.crop_scale), tuple(c.crop_ratio), c.flip_prob
            )
            clips.append(backbone((crop - mean) / std).keys)
        yield torch.stack(clips)
        step += 1


def train_correlator(cfg: Config) -> Path:
    """Train (or resume) BA's correlator on the dataset's videos; returns the checkpoint path."""
    cfg = resolve_backbone(cfg)
    run_dir = RunDir.for_config(cfg, "correlator")
    run_dir.path.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir.path / "config.yaml")
    checkpoint = run_dir.path / CHECKPOINT
    backbone = load_backbone(cfg)
    c = cfg.correlator
    model = corr.TemporalCorrelator(
        backbone.model.embed_dim, c.heads, c.mlp_ratio, c.clip_len, c.attn_drop, c.proj_drop
    ).to(backbone.device)
    done = (
        torch.load(checkpoint, map_location="cpu", weights_only=True)["step"] if checkpoint.is_file() else 0
    )
    if done >= c.steps:
        print(f"correlator already trained for {done} steps: {checkpoint}", file=sys.stderr)
        return checkpoint
    params = corr.LossParams(c.num_pos, c.num_neg, c.semantic_margin, c.motion_margin)
    with (
        tqdm(total=c.steps, initial=done, unit="step", desc="correlator", dynamic_ncols=True) as bar,
        SummaryWriter(str(run_dir.path / "tensorboard"), purge_step=done + 1) as board,
    ):

        def progress(step: int, loss: float, parts: dict) -> None:
            # The entropy weights' effective sample size (1 / sum w^2, out of the T*n rows of a clip) shows
            # a collapse of the loss onto a few rows.
            board.add_scalar("loss/total", loss, step)
            for name, value in parts.items():
                board.add_scalar(
                    f"loss/{name}" if name != "ess" else "weights/effective_sample_size", value, step
                )
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", ess=f"{parts['ess']:.0f}")

        corr.train_correlator(
            model,
            clip_batches(cfg, backbone, done),
            c.steps,
            c.lr,
            c.weight_decay,
            params,
            checkpoint,
            c.checkpoint_every,
            progress,
            seed=cfg.seed,
        )
    print(f"correlator -> {checkpoint}", file=sys.stderr)
    return checkpoint


# ----------------------------------------------------------------------------------------------------------
# BA pseudo-labels


def make_worker(cfg: Config, run_dir: RunDir, overlay_ids: frozenset[int]):
    """Built inside each Ray actor: backbone and correlator are loaded once."""
    backbone = load_backbone(cfg)
    correlator = None
    if cfg.correlator.checkpoint:
        correlator = load_correlator(
            Path(cfg.correlator.checkpoint), backbone.model.embed_dim, cfg.correlator, backbone.device
        )
    discoverer = VideoDiscoverer(backbone, correlator, cfg.method, cfg.backbone.batch_size)

    def work(index: int, videos: list) -> dict:
        (video,) = videos
        overlay = run_dir.path / "overlays" / f"{video.name}.gif" if video.id in overlay_ids else None
        return run_video(discoverer, video, run_dir.shard_file(index), overlay)

    return work


def run(cfg: Config) -> Path:
    """BA tracks for every video (one video per shard, resumable), merged into ytvis.json and a per-frame
    COCO pseudolabels.json; returns the latter."""
    cfg = resolve_correlator(resolve_backbone(cfg))
    videos = list_videos(cfg.dataset)
    run_dir = RunDir.for_config(cfg, "pseudolabels")
    run_dir.start(cfg, frame_records(cfg.dataset))
    print(
        f"BA on {cfg.dataset.name}: {len(videos)} videos, correlator "
        f"{cfg.correlator.checkpoint or 'none (frozen ViT attention)'} -> {run_dir.path}",
        file=sys.stderr,
    )
    start = time.perf_counter()
    shards = [[v] for v in videos]
    overlay_ids = frozenset(v.id for v in videos[: cfg.run.overlays])
    factory = functools.partial(make_worker, cfg, run_dir, overlay_ids)
    size = lambda v: len(v.frames)  # noqa: E731
    report = run_configured(cfg.run, cfg.backbone.device, factory, shards, run_dir.shard_file, "ba", size)
    if report.failed:
        raise RunError(
            f"{len(report.failed)} videos failed (finished ones are kept; re-run to retry): "
            f"{next(iter(report.failed.values()))}"
        )
    return merge(cfg, run_dir, len(shards), time.perf_counter() - start)


def merge(cfg: Config, run_dir: RunDir, n_shards: int, seconds: float) -> Path:
    frame_ids = {r.file_name: r.id for r in frame_records(cfg.dataset)}
    videos, tracks, images, annotations, failures = [], [], [], [], []
    for i in range(n_shards):
        shard = read_json(run_dir.shard_file(i))
        failures += shard["failures"]
        video = shard["video"]
        if video is None:
            continue
        videos.append(
            {k: video[k] for k in ("id", "file_names", "width", "height")} | {"name": video["name"]}
        )
        for name in video["file_names"]:
            images.append(
                {
                    "id": frame_ids[name],
                    "file_name": name,
                    "width": video["width"],
                    "height": video["height"],
                    "video_id": video["id"],
                }
            )
        for track in shard["tracks"]:
            tracks.append(
                {
                    "id": len(tracks) + 1,
                    "video_id": video["id"],
                    "category_id": 1,
                    "iscrowd": 0,
                    "segmentations": track["segmentations"],
                }
            )
            for name, seg in zip(video["file_names"], track["segmentations"], strict=True):
                if seg is not None:
                    annotations.append(_frame_annotation(seg, frame_ids[name], video["id"], len(tracks)))
    out = run_dir.path / OUTPUT
    write_coco(out, coco_file(images, annotations))
    atomic_write_json(
        run_dir.path / TRACKS,
        {"videos": videos, "annotations": tracks, "categories": [{"id": 1, "name": "fg"}]},
    )
    write_jsonl(run_dir.path / "failures.jsonl", failures)
    summary = {
        "videos": len(videos) + len(failures),
        "failed": len(failures),
        "tracks": len(tracks),
        "frame_masks": len(annotations),
        "seconds": round(seconds, 2),
    }
    atomic_write_json(run_dir.path / "summary.json", summary)
    print(
        f"{summary['videos']} videos: {summary['tracks']} tracks, {summary['failed']} failed -> {out}",
        file=sys.stderr,
    )
    return out


def _frame_annotation(rle: dict, image_id: int, video_id: int, track_id: int) -> dict:
    from pycocotools import mask as mask_utils

    coded = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    return {
        "image_id": image_id,
        "category_id": 1,
        "iscrowd": 0,
        "segmentation": rle,
        "area": int(mask_utils.area(coded)),
        "bbox": [float(v) for v in mask_utils.toBbox(coded)],
        "video_id": video_id,
        "track_id": track_id,
    }


# ----------------------------------------------------------------------------------------------------------
# Evaluation


def predicted_ids(tracks: dict, video_id: int, shape: tuple[int, int, int]) -> np.ndarray:
    """(T, H, W) predicted track ids of one video from ytvis.json (later tracks win on overlap)."""
    from pycocotools import mask as mask_utils

    ids = np.zeros(shape, np.int64)
    for k, track in enumerate((a for a in tracks["annotations"] if a["video_id"] == video_id), start=1):
        for t, seg in enumerate(track["segmentations"]):
            if seg is not None:
                ids[t][
                    mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode("ascii")}) > 0
                ] = k
    return ids


def evaluate(cfg: Config) -> dict:
    """DAVIS J&F (sequence-level matching), FG-ARI and Hungarian mIoU of a BA run against ground truth.

    Proposals, as the BA code evaluates them: every cluster, the background one too (the complement of the
    tracks; pseudo-labels leave it out). J&F follows davis2017-evaluation's unsupervised protocol: at most
    20 proposals per sequence (the 20 largest are kept) and void pixels left out of J and F (and of mIoU).
    FG-ARI is unchanged by the background proposal (predicted background already is one cluster there).
    """
    cfg = resolve_correlator(resolve_backbone(cfg))
    run_dir = RunDir.for_config(cfg, "pseudolabels")
    if not (run_dir.path / TRACKS).exists():
        raise RunError(
            f"no BA tracks at {run_dir.path}: run `make pseudolabels METHOD=ba` with the same settings"
        )
    tracks = read_json(run_dir.path / TRACKS)
    per_video, js, fs, ious = {}, [], [], []
    for video in list_videos(cfg.dataset):
        gt, void = video_truth(cfg.dataset, video)
        pred = predicted_ids(tracks, video.id, gt.shape)
        jf = davis_jf(gt, davis_proposals(pred, background=True), void)
        miou = miou_hungarian(gt, with_background_proposal(pred), void)
        js += [o["J"] for o in jf["per_object"].values()]
        fs += [o["F"] for o in jf["per_object"].values()]
        ious += list(miou["per_object"].values())
        per_video[video.name] = {
            "J&F": jf["JF"],
            "J": jf["J"],
            "F": jf["F"],
            "FG-ARI": fg_ari(gt, pred),
            "mIoU": miou["mean"],
        }
    j, f = float(np.mean(js)), float(np.mean(fs))
    result = {
        "J&F": (j + f) / 2,
        "J": j,
        "F": f,
        "FG-ARI": float(np.nanmean([v["FG-ARI"] for v in per_video.values()])),
        "mIoU": float(np.mean(ious)),
        "videos": per_video,
    }
    atomic_write_json(run_dir.path / "metrics.json", result)
    print(
        f"BA on {cfg.dataset.name}: J&F {100 * result['J&F']:.1f} (J {100 * j:.1f}, F {100 * f:.1f}), "
        f"FG-ARI {100 * result['FG-ARI']:.1f}, mIoU {100 * result['mIoU']:.1f}",
        file=sys.stderr,
    )
    return result
