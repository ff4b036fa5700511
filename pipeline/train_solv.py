"""SOLV's model: training it on a video dataset's frames (``make train-solv``, resumable), and finding the
trained one a SOLV run uses (``resolve_solv_model``)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from pipeline.config import METHODS, Config, replace, save_config
from pipeline.memory_cache import BudgetCache
from pipeline.runs import (
    RunDir,
    RunError,
    load_backbone,
    resolve_backbone,
    trained_steps,
    warn_if_partly_trained,
)
from stages.common.io import BadImage, load_rgb
from stages.data.videos import VideoRecord, list_videos
from stages.features.backbone import Backbone
from stages.video.ba import frame_input_size
from stages.video.solv import SOLV, windows
from stages.video.solv_method import frame_features
from stages.video.solv_train import FeatureBatch, train_solv

CHECKPOINT = "solv.pth"
SECTION = "solv_model"


def trained_checkpoint(cfg: Config) -> Path:
    """Where ``make train-solv`` writes the model of ``cfg``'s dataset, backbone and solv_model settings."""
    return RunDir.for_config(cfg, SECTION).path / CHECKPOINT


def resolve_solv_model(cfg: Config) -> Config:
    """Fix solv_model.checkpoint: the configured file, else the model trained on this dataset with this
    backbone and settings. RunError when neither exists (SOLV has no untrained fallback)."""
    configured = cfg.solv_model.checkpoint
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise RunError(f"config key 'solv_model.checkpoint': no such file '{path}'")
        return cfg
    trained = trained_checkpoint(cfg)
    if not trained.is_file():
        raise RunError(
            f"no trained SOLV model for dataset '{cfg.dataset.name}' with backbone {cfg.backbone.arch} and "
            f"these solv_model settings: run `make train-solv DATASET={cfg.dataset.name}` with the same "
            "settings first, or give one with solv_model.checkpoint=<file>"
        )
    warn_if_partly_trained(trained, cfg.solv_model.steps, "SOLV model", "make train-solv")
    return replace(cfg, **{"solv_model.checkpoint": str(trained)})


class FrameFeatures:
    """Frozen-ViT features of single frames, (N, D) float16 on the CPU, computed on first use and kept up to
    ``budget_mb`` (least recently used out first). Always rounded to float16, so a feature computed anew and
    one from the cache are the same. A frame that cannot be read is reported once and given as None."""

    def __init__(
        self, backbone: Backbone, videos: list[VideoRecord], size: list[int], budget_mb: int, batch_size: int
    ):
        self.backbone, self.videos, self.size, self.batch_size = backbone, videos, size, batch_size
        self.cache: BudgetCache[tuple[int, int], torch.Tensor] = BudgetCache(
            budget_mb, lambda feats: feats.numel() * feats.element_size()
        )
        self.bad: set[tuple[int, int]] = set()

    def _read(self, key: tuple[int, int]) -> np.ndarray | None:
        video = self.videos[key[0]]
        try:
            return load_rgb(Path(video.root) / video.frames[key[1]])
        except (BadImage, OSError) as e:
            print(f"warning: frame {video.frames[key[1]]} skipped: {e}", file=sys.stderr)
            self.bad.add(key)
            return None

    def get(self, keys: list[tuple[int, int]]) -> dict[tuple[int, int], torch.Tensor | None]:
        missing = [k for k in dict.fromkeys(keys) if k not in self.cache and k not in self.bad]
        read = [(k, rgb) for k in missing if (rgb := self._read(k)) is not None]
        new = {}
        if read:
            feats, _ = frame_features(self.backbone, [rgb for _, rgb in read], self.size, self.batch_size)
            new = {k: f.to("cpu", torch.float16) for (k, _), f in zip(read, feats, strict=True)}
        out = {}
        for k in keys:
            if k in new or k in self.cache:
                out[k] = new[k] if k in new else self.cache.get(k)
                self.cache.put(k, out[k])
            else:
                out[k] = None
        return out


def clip_batches(cfg: Config, features: FrameFeatures, start_step: int) -> Iterator[FeatureBatch]:
    """Endless batches of 2n+1-frame windows around middle frames drawn uniformly over every frame of the
    dataset; frames beyond a video's ends (or unreadable) are padding, flagged invalid (B.2). Step s draws
    from a generator seeded by (seed, s): a resumed run continues with the clips it would have seen."""
    s = cfg.solv_model
    frames = [(v, t) for v, video in enumerate(features.videos) for t in range(len(video.frames))]
    step = start_step
    while True:
        rng = np.random.default_rng([cfg.seed, step])
        clips, valids = [], []
        while len(clips) < s.batch_size:
            v, t = frames[int(rng.integers(len(frames)))]
            index, valid = windows(len(features.videos[v].frames), [t], s.context)
            keys = [(v, int(i)) for i in index[0]]
            got = features.get(keys)
            valid = valid[0] & torch.tensor([got[k] is not None for k in keys])
            if not valid[s.context]:
                if len(features.bad) == len(frames):
                    raise RunError(f"no frame of dataset '{cfg.dataset.name}' could be read")
                continue  # an unreadable middle frame: draw another
            ref = got[keys[s.context]]
            clips.append(
                torch.stack(
                    [got[k] if ok else torch.zeros_like(ref) for k, ok in zip(keys, valid, strict=True)]
                )
            )
            valids.append(valid)
        yield FeatureBatch(torch.stack(clips).float(), torch.stack(valids))
        step += 1


def train(cfg: Config) -> Path:
    """Train (or resume) SOLV's model on the dataset's videos; returns the checkpoint path."""
    if "solv_model" not in getattr(METHODS.get(cfg.method.name), "uses", ()):
        raise RunError(f"train-solv trains SOLV's model: give --method solv (not {cfg.method.name})")
    cfg = resolve_backbone(cfg)
    videos = list_videos(cfg.dataset)  # checks the dataset's files before the backbone is loaded
    if not videos:
        raise RunError(f"dataset '{cfg.dataset.name}' has no videos")
    run_dir = RunDir.for_config(cfg, SECTION)
    run_dir.path.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir.path / "config.yaml")
    checkpoint = run_dir.path / CHECKPOINT
    s = cfg.solv_model
    done = trained_steps(checkpoint)
    if done >= s.steps:
        print(f"SOLV already trained for {done} steps: {checkpoint}", file=sys.stderr)
        return checkpoint
    backbone = load_backbone(cfg.backbone, cfg.seed)
    features = FrameFeatures(backbone, videos, s.size, s.feature_cache_mb, cfg.backbone.batch_size)
    grid = tuple(x // backbone.patch for x in frame_input_size(s.size, backbone.patch))
    torch.manual_seed(cfg.seed)  # the model's initial weights
    model = SOLV(s.model(), backbone.model.embed_dim, grid).to(backbone.device)
    print(
        f"SOLV on {cfg.dataset.name}: {len(videos)} videos, {backbone.arch} {grid[0]}x{grid[1]} patches, "
        f"{s.steps} steps of {s.batch_size} clips -> {run_dir.path}",
        file=sys.stderr,
    )
    with (
        tqdm(total=s.steps, initial=done, unit="step", desc="solv", dynamic_ncols=True) as bar,
        SummaryWriter(str(run_dir.path / "tensorboard"), purge_step=done + 1) as board,
    ):

        def progress(step: int, scalars: dict[str, float]) -> None:
            board.add_scalar("loss", scalars["loss"], step)
            board.add_scalar("learning_rate", scalars["lr"], step)
            board.add_scalar("slots/merged", scalars["num_slots"], step)
            board.add_scalar("slots/merge_probability", scalars["merge_probability"], step)
            bar.update(1)
            bar.set_postfix(loss=f"{scalars['loss']:.4f}", slots=f"{scalars['num_slots']:.1f}")

        train_solv(
            model,
            clip_batches(cfg, features, done),
            s.schedule(cfg.seed),
            checkpoint,
            s.checkpoint_every,
            progress,
        )
    print(f"SOLV model -> {checkpoint}", file=sys.stderr)
    return checkpoint
