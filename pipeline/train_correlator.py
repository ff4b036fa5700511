"""BA's temporal correlator: training it on a video dataset's clips (resumable), and finding the trained one
a BA run uses (``resolve_correlator``)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from pipeline.config import Config, replace, save_config
from pipeline.runs import RunDir, RunError, load_backbone, resolve_backbone, trained_steps
from stages.common.io import load_rgb
from stages.data.videos import list_videos
from stages.features.backbone import IMAGENET_MEAN, IMAGENET_STD, Backbone
from stages.video import correlator as corr
from stages.video.ba import frame_input_size

CHECKPOINT = "correlator.pth"
FROZEN = "frozen"  # correlator.checkpoint value: BA on the frozen ViT's attention, trained correlator or not


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
    list_videos(cfg.dataset)  # checks the dataset's files before the backbone is loaded
    run_dir = RunDir.for_config(cfg, "correlator")
    run_dir.path.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir.path / "config.yaml")
    checkpoint = run_dir.path / CHECKPOINT
    backbone = load_backbone(cfg.backbone, cfg.seed)
    c = cfg.correlator
    model = corr.TemporalCorrelator(
        backbone.model.embed_dim, c.heads, c.mlp_ratio, c.clip_len, c.attn_drop, c.proj_drop
    ).to(backbone.device)
    done = trained_steps(checkpoint)
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
