"""The BA video stage: frozen ViT tokens -> spatio-temporal attention (trained correlator, or the frozen
ViT's own last-block attention) -> clusters -> object tracks with a stable identity across frames.

Memory stays bounded on long videos: attention rows exist for ``window`` query frames at a time. The
first clustering round runs on each window alone and keeps only centroids; later rounds work on the
centroids; the final assignment recomputes each window's rows (SPEC "BA", stages/video/ba_cluster.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from stages.common.schema import fail, positive, section
from stages.discovery.base import METHODS
from stages.features.backbone import Backbone, prepare_image
from stages.video.ba_cluster import (
    background_cluster,
    cluster_blocks,
    instance_tracks,
)
from stages.video.base import VideoMethod
from stages.video.correlator import (
    CorrelatorConfig,
    TemporalCorrelator,
    dino_sparse_attention,
    iter_attention_chunks,
    load_checkpoint,
)


@section
class BAConfig:
    """BA video discovery: spatio-temporal attention clustered into object tracks (SPEC "BA")."""

    name: Literal["ba"]
    reference_backbone: str
    size: list[int]  # [height, width] frames are resized to (each rounded to a multiple of the patch)
    key_ratio: float  # keys from every round(1 / key_ratio)-th frame
    tau: float  # symmetric-KL absorption threshold (1.0; 1.6 merges all foreground)
    max_rounds: int  # absorption rounds at most (the loop stops when the cluster count stops changing)
    window: int  # frames per attention chunk and first clustering round: bounds memory on long videos
    background: Literal["border", "largest"]  # which cluster is the background
    smooth_first_round: bool  # smooth each row over its tau-neighbours before the first absorption
    centroid_weights: Literal["equal", "members"]  # how merged centroids average their members
    temporal: Literal["relative", "shared"]  # the correlator's temporal embeddings on long videos

    def validate(self, key: str) -> None:
        if len(self.size) != 2 or min(self.size) <= 0:
            fail(f"{key}.size", f"expected [height, width] > 0, got {self.size}")
        if not 0 < self.key_ratio <= 1:
            fail(f"{key}.key_ratio", f"must be in (0, 1], got {self.key_ratio}")
        for name in ("tau", "max_rounds", "window"):
            positive(f"{key}.{name}", getattr(self, name))

    @property
    def key_stride(self) -> int:
        return max(1, round(1 / self.key_ratio))


Attend = Callable[[Sequence[int]], torch.Tensor]  # query frames -> (len * n, K * n) attention rows


def ba_tracks(attend: Attend, num_frames: int, grid: tuple[int, int], cfg: BAConfig) -> torch.Tensor:
    """Attention -> (T, h, w) track ids: 0 = background, 1..K = objects, each one id over all frames."""

    def windows():
        return (rows for _, rows in iter_attention_chunks(attend, num_frames, cfg.window))

    labels = cluster_blocks(
        windows, cfg.tau, cfg.max_rounds, smooth=cfg.smooth_first_round, weights=cfg.centroid_weights
    ).reshape(num_frames, *grid)
    return instance_tracks(labels, background_cluster(labels, cfg.background))


def frame_input_size(size: Sequence[int], patch: int) -> tuple[int, int]:
    """The configured [height, width], each rounded to a multiple of the patch size."""
    return tuple(max(patch, round(s / patch) * patch) for s in size)


def load_correlator(path: Path, dim: int, cfg: CorrelatorConfig, device: torch.device) -> TemporalCorrelator:
    model = TemporalCorrelator(dim, cfg.heads, cfg.mlp_ratio, cfg.clip_len, cfg.attn_drop, cfg.proj_drop)
    load_checkpoint(path, model)
    return model.to(device).eval()


@METHODS.register("ba")
class BA(VideoMethod):
    """BA (Bao et al.): the frozen ViT's keys through the temporal correlator (or, without one, the ViT's
    own attention), clustered into object tracks. Holds the backbone and the correlator."""

    Config = BAConfig
    uses = ("correlator",)

    def __init__(
        self, backbone: Backbone, correlator: TemporalCorrelator | None, cfg: BAConfig, batch_size: int
    ):
        self.backbone = backbone
        self.correlator = correlator
        self.cfg = cfg
        self.batch_size = batch_size

    @classmethod
    def from_config(cls, cfg: BAConfig, backbone: Backbone, sections: dict, batch_size: int) -> BA:
        """With ``sections['correlator'].checkpoint`` (resolved): that trained correlator, else none."""
        corr = sections["correlator"]
        correlator = None
        if corr.checkpoint:
            correlator = load_correlator(
                Path(corr.checkpoint), backbone.model.embed_dim, corr, backbone.device
            )
        return cls(backbone, correlator, cfg, batch_size)

    @classmethod
    def describe(cls, sections: dict) -> str:
        return f", correlator {sections['correlator'].checkpoint or 'none (frozen ViT attention)'}"

    def tokens(self, frames: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Per frame keys and queries (T, 1 + n, C), CLS first, at the configured size."""
        p = self.backbone.patch
        h, w = frame_input_size(self.cfg.size, p)
        x = torch.stack(
            [
                prepare_image(np.array(Image.fromarray(f).resize((w, h), Image.BICUBIC)), p, None)
                for f in frames
            ]
        )
        keys, queries = [], []
        for start in range(0, len(frames), self.batch_size):
            feats = self.backbone(x[start : start + self.batch_size], want=("keys", "queries"))
            keys.append(feats.keys)
            queries.append(feats.queries)
        return torch.cat(keys), torch.cat(queries), feats.grid

    def attention(self, keys: torch.Tensor, queries: torch.Tensor) -> Attend:
        stride = self.cfg.key_stride
        if self.correlator is not None:  # tokens = [CLS; keys] per frame, as in training
            return functools.partial(self.correlator.sparse_attention, keys, stride, self.cfg.temporal)
        heads = self.backbone.model.blocks[-1].attn.num_heads
        return functools.partial(dino_sparse_attention, queries, keys, heads, stride)

    @torch.inference_mode()
    def __call__(self, frames: list[np.ndarray]) -> np.ndarray:
        """Frames (HxWx3 uint8, same size) -> (T, H, W) int track ids at the frames' size."""
        keys, queries, grid = self.tokens(frames)
        tracks = ba_tracks(self.attention(keys, queries), len(frames), grid, self.cfg).cpu().numpy()
        height, width = frames[0].shape[:2]
        return np.stack([resize_ids(t, height, width) for t in tracks])


def resize_ids(ids: np.ndarray, height: int, width: int) -> np.ndarray:
    """(h, w) integer ids -> (height, width) int64 ids, nearest neighbour. Resized as 32-bit integers: an
    8-bit image would wrap ids from 256 on (track 256 would become background, 257 track 1)."""
    if ids.min(initial=0) < 0 or ids.max(initial=0) > np.iinfo(np.int32).max:
        raise ValueError(f"ids must be in [0, 2**31), got [{ids.min()}, {ids.max()}]")
    image = Image.fromarray(ids.astype(np.int32))  # mode "I"
    return np.asarray(image.resize((width, height), Image.NEAREST)).astype(np.int64)
