"""SOLV as a registered video method (``METHOD=solv``): its two config sections, the frozen ViT features it
reads, and the class that turns a video's frames into object tracks with a trained model.

- ``solv_model`` (``SOLVModelSection``, a top-level section like BA's ``correlator``): the model's shape, its
  training schedule, the frame size it is trained at, and ``checkpoint``, the trained model a run uses
  (found by ``pipeline/train_solv.py:resolve_solv_model``).
- ``method`` (``SOLVMethodConfig``): how tracks are made from a trained model's masks.

The model, slot merging and tracking are in ``stages.video.solv``, training in ``stages.video.solv_train``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from stages.common.schema import fail, positive, section
from stages.discovery.base import METHODS
from stages.features.backbone import Backbone, prepare_image
from stages.video.ba import frame_input_size
from stages.video.base import VideoMethod
from stages.video.solv import SOLV, SOLVConfig, load_model, video_slots, video_tracks
from stages.video.solv_train import SOLVTrainConfig

MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(SOLVConfig))
SCHEDULE_FIELDS = tuple(f.name for f in dataclasses.fields(SOLVTrainConfig) if f.name != "seed")


@section
class SOLVModelSection:
    """SOLV's model and its training (``make train-solv``). Paper values: YTVIS19, supplementary B.2-B.3
    (``configs/defaults.yaml`` says which come from the public code)."""

    checkpoint: str | None  # None: the model trained on this dataset with these settings (make train-solv)
    size: list[int]  # [height, width] frames are resized to (each rounded to a multiple of the patch)
    # The model (stages.video.solv.SOLVConfig)
    num_slots: int
    slot_dim: int
    slot_iters: int
    context: int
    temporal_layers: int
    temporal_heads: int
    temporal_dropout: float
    decoder_hidden: int
    decoder_layers: int
    scale_factor: float
    token_drop: float
    merge_slots: bool
    merge_threshold: float
    merge_min_slots: int
    # The schedule (stages.video.solv_train.SOLVTrainConfig)
    steps: int
    lr: float
    warmup_fraction: float
    final_lr_fraction: float
    weight_decay: float
    grad_clip: float
    merge_periods: int
    batch_size: int  # clips per step
    checkpoint_every: int  # steps between checkpoints
    feature_cache_mb: int  # frozen-ViT features of frames kept in memory between steps (0: none)

    def validate(self, key: str) -> None:
        if len(self.size) != 2 or min(self.size) <= 0:
            fail(f"{key}.size", f"expected [height, width] > 0, got {self.size}")
        for name in ("batch_size", "checkpoint_every"):
            positive(f"{key}.{name}", getattr(self, name))
        if self.feature_cache_mb < 0:
            fail(f"{key}.feature_cache_mb", f"must be >= 0, got {self.feature_cache_mb}")
        for build in (self.model, lambda: self.schedule(0)):
            try:
                build()
            except ValueError as e:  # the dataclasses' checks name the field
                fail(f"{key}.{str(e).split()[0]}", str(e))

    def model(self) -> SOLVConfig:
        return SOLVConfig(**{name: getattr(self, name) for name in MODEL_FIELDS})

    def schedule(self, seed: int) -> SOLVTrainConfig:
        return SOLVTrainConfig(**{name: getattr(self, name) for name in SCHEDULE_FIELDS}, seed=seed)


@section
class SOLVMethodConfig:
    """SOLV video discovery: a trained model's per-frame slot masks matched into tracks (sec. 3.1, B.3)."""

    name: Literal["solv"]
    reference_backbone: str  # the paper's DINOv2 ViT-B/14 (B.2), picked by backbone.arch=auto when on disk
    # SOLV has no background: 'border' / 'largest' name one track background by BA's rule (the most border
    # pixels / the most pixels), 'none' keeps every track an object.
    background: Literal["border", "largest", "none"]

    def validate(self, key: str) -> None:
        pass


def frame_features(
    backbone: Backbone, frames: Sequence[np.ndarray], size: Sequence[int], batch_size: int
) -> tuple[torch.Tensor, tuple[int, int]]:
    """SOLV's visual features of frames (HxWx3 uint8): each resized (bicubic) to ``size`` [height, width]
    rounded to the patch, through the frozen ViT; the last block's output before the final norm, CLS
    dropped (sec. 3.2.1, B.2). Returns (T, h*w, D) float32 on the backbone's device and the grid (h, w)."""
    h, w = frame_input_size(size, backbone.patch)
    feats, grid = [], None
    for start in range(0, len(frames), batch_size):
        x = torch.stack(
            [
                prepare_image(
                    np.array(Image.fromarray(f).resize((w, h), Image.BICUBIC)), backbone.patch, None
                )
                for f in frames[start : start + batch_size]
            ]
        )
        out = backbone(x, want=("block_output",))
        feats.append(out.block_output[:, 1:])
        grid = out.grid
    return torch.cat(feats), grid


@METHODS.register("solv")
class SOLVMethod(VideoMethod):
    """SOLV (Aydemir et al., NeurIPS 2023): every frame decoded as the middle of its 2n+1-frame window by a
    trained model, masks upsampled to the frame (bilinear, B.1), slots of consecutive frames matched by the
    Hungarian algorithm into tracks (B.3). Holds the backbone and the model."""

    Config = SOLVMethodConfig
    uses = ("solv_model",)

    def __init__(self, backbone: Backbone, model: SOLV, cfg: SOLVMethodConfig, batch_size: int):
        self.backbone, self.model, self.cfg, self.batch_size = backbone, model, cfg, batch_size

    @classmethod
    def from_config(
        cls, cfg: SOLVMethodConfig, backbone: Backbone, sections: dict, batch_size: int
    ) -> SOLVMethod:
        """With ``sections['solv_model'].checkpoint`` (resolved). ValueError when there is none or when it
        was trained on features of another width than this backbone's."""
        path = sections["solv_model"].checkpoint
        if not path:
            raise ValueError("SOLV needs a trained model (solv_model.checkpoint): run make train-solv")
        model = load_model(Path(path), backbone.device)
        if model.feature_dim != backbone.model.embed_dim:
            raise ValueError(
                f"the SOLV model {path} reads {model.feature_dim}-d features; backbone {backbone.arch} gives "
                f"{backbone.model.embed_dim}-d ones"
            )
        return cls(backbone, model, cfg, batch_size)

    @classmethod
    def describe(cls, sections: dict) -> str:
        return f", model {sections['solv_model'].checkpoint}"

    @property
    def frame_size(self) -> tuple[int, int]:
        """[height, width] of the network input: the grid the model was trained for, in pixels."""
        return self.model.grid[0] * self.backbone.patch, self.model.grid[1] * self.backbone.patch

    @torch.inference_mode()
    def __call__(self, frames: list[np.ndarray]) -> np.ndarray:
        """Frames (HxWx3 uint8, same size) -> (T, H, W) int64 track ids at the frames' size."""
        feats, grid = frame_features(self.backbone, frames, self.frame_size, self.batch_size)
        video = video_slots(self.model, feats, self.batch_size)
        height, width = frames[0].shape[:2]
        return video_tracks(video, grid, (height, width), self.cfg.background).cpu().numpy().astype(np.int64)
