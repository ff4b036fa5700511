"""SOLV (Aydemir, Xie, Güney, "Self-supervised Object-Centric Learning for Videos", NeurIPS 2023): the
model, slot merging, and inference of object tracks. Training is in ``stages.video.solv_train``.

Input: frozen-ViT patch features of 2n+1 consecutive frames (sec. 3.2.1: the last block's output before
the final norm, CLS dropped; (B, 2n+1, N, D), N = h*w in raster order). Frames outside the video are
padding, flagged by ``frame_valid`` and masked out of the temporal attention (B.2).

1. Token drop (training only, ``drop_tokens``): each frame keeps a random subset of its patches (paper:
   half), with their indices on the grid.
2. Spatial binding: invariant slot attention on each frame (``stages.video.slot_attention``), K slots.
3. Temporal binding: a transformer encoder over the 2n+1 slots of one slot index (3 layers, 8 heads,
   feed-forward 4 * D_slot, learned temporal encoding added per frame); the middle frame's output c.
4. Slot merging (``merge_labels``/``merge_slots``): agglomerative clustering of c, complete linkage on
   cosine distance, threshold 0.12 (B.3); merged slot = mean of its members, merged attention = sum of
   their middle-frame attention maps A, from which each merged slot's position and scale (and so its
   relative grid for the decoder) are recomputed (B.2).
5. Decoder: spatial broadcast MLP (DINOSAUR): per slot, broadcast to the full grid + learned position
   embedding + a linear map of its relative grid, 5 linear layers (ReLU, hidden 1024) -> D features and
   an alpha logit per patch; masks = softmax of alpha over the slots; reconstruction = sum of features
   weighted by the masks. Loss: MSE to the middle frame's full (undropped) features (eq. 12).

Inference (``video_slots`` then ``video_tracks``): every frame is the middle of its own window (padded at
the ends), all patches kept, merging always on; masks are upsampled bilinearly and each pixel takes the
slot of the largest mask (B.1); slots are matched between consecutive frames by the Hungarian algorithm on
cosine similarity (B.3) to give track ids.

Where this differs from the paper or fills a gap it leaves (the SOLV public code decides most gaps):
- Token drop happens on the ViT's outputs, not on its input patches (the paper runs the ViT on the kept
  patches only, MAE-style): the features of a frame are then computed once and can be cached, at the
  cost of the ViT compute the paper saves; kept patches have seen the whole frame.
- Clustering uses scipy's hierarchical clustering (scikit-learn, the paper's library, is not installed);
  merges at cosine distance strictly below the threshold, as scikit-learn's ``distance_threshold``.
- A merge that would leave fewer than ``merge_min_slots`` slots is not applied (public code: 3).
- Slots of frame t+1 left unmatched by the Hungarian step (when merging left frame t+1 more slots than
  frame t) join the track of their most similar slot of frame t (public code); a track whose slot is
  left unmatched ends. The paper has no background: ``video_tracks`` can name one track background by
  BA's rule (most border patches) or keep every track as an object.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.optimize import linear_sum_assignment
from torch import nn

from stages.video.ba_cluster import background_cluster, instance_tracks
from stages.video.slot_attention import InvariantSlotAttention, relative_grid, slot_position_scale

EPS = 1e-8


@dataclass(frozen=True)
class SOLVConfig:
    """The model's shape and its merging rule. Paper values (YTVIS19, B.2-B.3) in brackets."""

    num_slots: int  # K [8; 18 on MOVi-E]
    slot_dim: int  # D_slot [128]
    slot_iters: int  # slot attention iterations [3]
    context: int  # n: windows of 2n+1 frames [2]
    temporal_layers: int  # [3]
    temporal_heads: int  # [8]
    temporal_dropout: float  # dropout in the temporal transformer [paper silent; public code: 0.1]
    decoder_hidden: int  # [1024]
    decoder_layers: int  # linear layers of the decoder MLP [5]
    scale_factor: float  # delta, relative grid = offset / (delta * scale) [5]
    token_drop: float  # fraction of each frame's patches dropped in training [0.5]
    merge_slots: bool  # [True; False when fine-tuning on DAVIS17]
    merge_threshold: float  # cosine distance below which slots merge (complete linkage) [0.12]
    merge_min_slots: int  # a merge leaving fewer slots is not applied [paper silent; public code: 3]

    def __post_init__(self) -> None:
        for name in ("num_slots", "slot_dim", "slot_iters", "temporal_layers", "temporal_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.context < 0:
            raise ValueError(f"context must be >= 0, got {self.context}")
        if self.slot_dim % self.temporal_heads:
            raise ValueError(f"slot_dim ({self.slot_dim}) must be a multiple of temporal_heads")
        if self.decoder_hidden < 1 or self.decoder_layers < 2:
            raise ValueError("decoder_hidden must be >= 1 and decoder_layers >= 2")
        if not 0 <= self.temporal_dropout < 1:
            raise ValueError(f"temporal_dropout must be in [0, 1), got {self.temporal_dropout}")
        if not 0 <= self.token_drop < 1:
            raise ValueError(f"token_drop must be in [0, 1), got {self.token_drop}")
        if self.scale_factor <= 0:
            raise ValueError(f"scale_factor must be > 0, got {self.scale_factor}")
        if not 0 <= self.merge_threshold <= 2:
            raise ValueError(f"merge_threshold is a cosine distance in [0, 2], got {self.merge_threshold}")
        if self.merge_min_slots < 1:
            raise ValueError(f"merge_min_slots must be >= 1, got {self.merge_min_slots}")

    @property
    def window(self) -> int:
        return 2 * self.context + 1


# ----------------------------------------------------------------------------------------------------------
# Token drop and slot merging


def kept_tokens(num_patches: int, drop: float) -> int:
    """How many of a frame's patches survive token drop (at least one)."""
    return max(1, round(num_patches * (1 - drop)))


def drop_tokens(
    features: torch.Tensor, drop: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token drop, drawn independently for every frame: (B, F, N, D) -> the kept features
    (B, F, N', D) and their patch indices (B, F, N') in increasing order. The draw uses ``generator``
    (a CPU generator, so a run's choices do not depend on the device)."""
    b, f, n, _ = features.shape
    keep = kept_tokens(n, drop)
    index = torch.rand(b, f, n, generator=generator).argsort(dim=-1)[..., :keep].sort(dim=-1).values
    index = index.to(features.device)
    return features.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, features.shape[-1])), index


def merge_labels(slots: np.ndarray, threshold: float, min_slots: int) -> np.ndarray:
    """Agglomerative clustering of one frame's slots: (K, D) -> (K,) cluster of each slot, numbered
    0..M-1 by the first slot of each cluster. Complete linkage on cosine distance; clusters stop merging
    at distance >= threshold (scikit-learn's ``distance_threshold`` semantics). If fewer than
    ``min_slots`` clusters would remain, nothing is merged."""
    k = slots.shape[0]
    if k < 2:
        return np.zeros(k, np.int64)
    tree = linkage(slots.astype(np.float64), method="complete", metric="cosine")
    # fcluster keeps merges at distance <= t; the largest float below the threshold makes it "<"
    raw = fcluster(tree, t=np.nextafter(threshold, -np.inf), criterion="distance")
    _, first, inverse = np.unique(raw, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    labels = rank[inverse]
    return labels if labels.max() + 1 >= min_slots else np.arange(k)


def merge_slots(
    slots: torch.Tensor, attn: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge slots by cluster: slots (B, K, D), attention A (B, K, N), labels (B, K) long in 0..K-1 ->
    merged slots (B, K, D) = mean of each cluster's slots, merged attention (B, K, N) = sum of their
    attention, and valid (B, K) bool. Cluster c lands in row c; rows of unused cluster numbers are 0."""
    onehot = F.one_hot(labels, slots.shape[1]).transpose(1, 2).to(slots.dtype)  # (B, cluster, slot)
    members = onehot.sum(dim=-1, keepdim=True)
    merged = (onehot @ slots) / members.clamp_min(1)
    return merged, onehot @ attn, members.squeeze(-1) > 0


# ----------------------------------------------------------------------------------------------------------
# Modules


class TemporalBinder(nn.Module):
    """Transformer encoder across the frames of each slot index (sec. 3.2.2): (B, F, K, D_slot) slots and
    (B, F) frame validity -> (B, K, D_slot) slots of the middle frame. Invalid frames are masked keys."""

    def __init__(self, slot_dim: int, frames: int, layers: int, heads: int, dropout: float):
        super().__init__()
        layer = nn.TransformerEncoderLayer(slot_dim, heads, 4 * slot_dim, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.time = nn.Parameter(torch.randn(frames, slot_dim) * 0.02)  # B.2: normal init

    def forward(self, slots: torch.Tensor, frame_valid: torch.Tensor) -> torch.Tensor:
        b, f, k, d = slots.shape
        x = (slots + self.time[:, None]).transpose(1, 2).reshape(b * k, f, d)
        padding = ~frame_valid.repeat_interleave(k, dim=0)
        return self.encoder(x, src_key_padding_mask=padding)[:, f // 2].view(b, k, d)


class BroadcastDecoder(nn.Module):
    """Spatial broadcast MLP decoder (DINOSAUR; SOLV sec. 3.2.3, B.2): slots (B, K, D_slot), their
    relative grids (B, K, N, 2) and validity (B, K) -> reconstruction (B, N, D) and masks (B, K, N)
    (softmax of the alpha logits over the valid slots; 0 for invalid ones)."""

    def __init__(self, slot_dim: int, feature_dim: int, num_patches: int, hidden: int, layers: int):
        super().__init__()
        self.position = nn.Parameter(torch.randn(num_patches, slot_dim) * 0.02)
        self.relative = nn.Linear(2, slot_dim)  # h in B.2
        widths = [slot_dim] + [hidden] * (layers - 1)
        blocks: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            blocks += [nn.Linear(a, b), nn.ReLU()]
        self.mlp = nn.Sequential(*blocks, nn.Linear(widths[-1], feature_dim + 1))

    def forward(
        self, slots: torch.Tensor, rel_grid: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = slots.unsqueeze(2) + self.position + self.relative(rel_grid)
        out = self.mlp(x)  # (B, K, N, D + 1)
        alpha = out[..., -1].masked_fill(~valid.unsqueeze(-1), float("-inf"))
        masks = alpha.softmax(dim=1)
        return torch.einsum("bkn,bknd->bnd", masks, out[..., :-1]), masks


class SOLVOutput(NamedTuple):
    reconstruction: torch.Tensor  # (B, N, D) the middle frame's features
    masks: torch.Tensor  # (B, K, N) per merged slot (rows beyond num_slots are 0)
    slots: torch.Tensor  # (B, K, D_slot) merged slots (rows beyond num_slots are 0)
    num_slots: torch.Tensor  # (B,) long: slots left after merging (K_t)


class SOLV(nn.Module):
    """The SOLV model on precomputed features. feature_dim: D of the ViT; grid: (h, w) patches per frame
    (fixed: the absolute grid and the decoder's position embedding are learned for it)."""

    def __init__(self, cfg: SOLVConfig, feature_dim: int, grid: tuple[int, int]):
        super().__init__()
        self.cfg, self.feature_dim, self.grid = cfg, feature_dim, (int(grid[0]), int(grid[1]))
        self.binder = InvariantSlotAttention(
            feature_dim, cfg.num_slots, cfg.slot_dim, cfg.slot_iters, self.grid, cfg.scale_factor
        )
        self.temporal = TemporalBinder(
            cfg.slot_dim, cfg.window, cfg.temporal_layers, cfg.temporal_heads, cfg.temporal_dropout
        )
        self.decoder = BroadcastDecoder(
            cfg.slot_dim, feature_dim, self.grid[0] * self.grid[1], cfg.decoder_hidden, cfg.decoder_layers
        )

    def forward(
        self,
        features: torch.Tensor,
        frame_valid: torch.Tensor,
        token_index: torch.Tensor | None = None,
        merge: torch.Tensor | None = None,
    ) -> SOLVOutput:
        """features: (B, 2n+1, N', D), the middle frame is the one decoded; frame_valid: (B, 2n+1) bool
        (the middle must be valid); token_index: (B, 2n+1, N') patch indices after token drop (None: all
        N = h*w patches); merge: (B,) bool, which clips merge their slots (None: all, when
        cfg.merge_slots). Raises ValueError on a wrong window length or an invalid middle frame."""
        b, f, n, d = features.shape
        if f != self.cfg.window or d != self.feature_dim:
            want = f"(B, {self.cfg.window}, N, {self.feature_dim})"
            raise ValueError(f"expected {want} features, got {tuple(features.shape)}")
        mid = self.cfg.context
        if not bool(frame_valid[:, mid].all()):
            raise ValueError("the middle frame of every window must be valid")
        flat_index = None if token_index is None else token_index.reshape(b * f, n)
        bound = self.binder(features.reshape(b * f, n, d), flat_index)
        slots = self.temporal(bound.slots.view(b, f, *bound.slots.shape[1:]), frame_valid)
        attn = bound.attn.view(b, f, -1, n)[:, mid]
        coords = self.binder.patch_coords(flat_index, b * f).view(b, f, n, 2)[:, mid]
        labels = self.cluster(slots, merge)
        merged, merged_attn, valid = merge_slots(slots, attn, labels)
        position, scale = slot_position_scale(merged_attn + EPS, coords)  # EPS: unused rows stay finite
        rel = relative_grid(self.binder.coords, position, scale, self.cfg.scale_factor)
        reconstruction, masks = self.decoder(merged, rel, valid)
        return SOLVOutput(reconstruction, masks, merged, valid.sum(dim=1))

    def cluster(self, slots: torch.Tensor, merge: torch.Tensor | None) -> torch.Tensor:
        """(B, K) cluster labels of each clip's slots; the identity for clips that do not merge."""
        b, k = slots.shape[:2]
        labels = np.tile(np.arange(k), (b, 1))
        if not self.cfg.merge_slots:
            return torch.from_numpy(labels).to(slots.device)
        chosen = [True] * b if merge is None else merge.tolist()
        values = slots.detach().float().cpu().numpy()
        for i in range(b):
            if chosen[i]:
                labels[i] = merge_labels(values[i], self.cfg.merge_threshold, self.cfg.merge_min_slots)
        return torch.from_numpy(labels).to(slots.device)


def reconstruction_loss(output: SOLVOutput, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the reconstruction and the middle frame's full features (eq. 12)."""
    return F.mse_loss(output.reconstruction, target)


# ----------------------------------------------------------------------------------------------------------
# Inference: masks per frame, then tracks


class VideoSlots(NamedTuple):
    slots: torch.Tensor  # (T, K, D_slot) merged slots of each frame (rows beyond num_slots are 0)
    masks: torch.Tensor  # (T, K, N) their masks
    num_slots: torch.Tensor  # (T,) long


def windows(num_frames: int, frames: Sequence[int], context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Window frame indices (len(frames), 2n+1), clamped into the video, and their validity."""
    index = torch.as_tensor(list(frames)).unsqueeze(1) + torch.arange(-context, context + 1)
    return index.clamp(0, num_frames - 1), (index >= 0) & (index < num_frames)


@torch.no_grad()
def video_slots(model: SOLV, features: torch.Tensor, batch_size: int) -> VideoSlots:
    """Every frame of a video decoded as the middle of its window: (T, N, D) features (all patches, on
    the model's device) -> merged slots and masks per frame, ``batch_size`` windows at a time (the
    model is put in eval mode)."""
    model.eval()
    t = features.shape[0]
    slots, masks, counts = [], [], []
    for start in range(0, t, batch_size):
        index, valid = windows(t, range(start, min(t, start + batch_size)), model.cfg.context)
        out = model(features[index.to(features.device)], valid.to(features.device))
        slots.append(out.slots)
        masks.append(out.masks)
        counts.append(out.num_slots)
    return VideoSlots(torch.cat(slots), torch.cat(masks), torch.cat(counts))


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, D), (N, D) -> (M, N) cosine similarities."""
    return F.normalize(a, dim=-1, eps=EPS) @ F.normalize(b, dim=-1, eps=EPS).T


def match_tracks(slots: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Track id of every slot of every frame: frame 0's slots are tracks 0..K_0-1; frame t's slots are
    matched one-to-one to frame t-1's by the Hungarian algorithm on cosine similarity and take their
    track; slots left over join the track of their most similar slot of frame t-1."""
    ids = [np.arange(len(slots[0]))]
    for prev, cur in zip(slots[:-1], slots[1:], strict=True):
        sim = cosine_similarity(prev.float(), cur.float()).cpu().numpy()
        rows, cols = linear_sum_assignment(-sim)
        cur_ids = ids[-1][sim.argmax(axis=0)]  # leftovers: the most similar previous slot's track
        cur_ids[cols] = ids[-1][rows]
        ids.append(cur_ids)
    return ids


def frame_labels(masks: torch.Tensor, grid: tuple[int, int], size: tuple[int, int] | None) -> torch.Tensor:
    """(T, K, N) masks -> (T, H, W) long slot of the largest mask at each pixel; the masks are upsampled
    bilinearly to ``size`` (H, W) first (B.1), or kept on the patch grid when size is None."""
    maps = masks.view(masks.shape[0], masks.shape[1], *grid)
    if size is not None and tuple(size) != tuple(grid):
        maps = torch.cat(  # a frame at a time: K full-size float maps per frame at most
            [F.interpolate(m[None], size=tuple(size), mode="bilinear", align_corners=False) for m in maps]
        )
    return maps.argmax(dim=1)


def video_tracks(
    video: VideoSlots,
    grid: tuple[int, int],
    size: tuple[int, int] | None = None,
    background: Literal["border", "largest", "none"] = "border",
) -> torch.Tensor:
    """Slots and masks of every frame -> (T, H, W) long track ids with one identity per object over the
    video: 0 = background, 1..M = tracks numbered by first appearance in (t, y, x) order.

    background: SOLV has none; 'border' / 'largest' name the track with the most border pixels / the
    most pixels background (BA's rule, ``stages.video.ba_cluster.background_cluster``); 'none' keeps every
    track an object (ids from 1, no 0)."""
    counts = video.num_slots.tolist()
    ids = match_tracks([s[:c] for s, c in zip(video.slots, counts, strict=True)])
    labels = frame_labels(video.masks, grid, size)
    lookup = torch.zeros(len(counts), video.slots.shape[1], dtype=torch.long)
    for t, frame_ids in enumerate(ids):
        lookup[t, : len(frame_ids)] = torch.from_numpy(frame_ids)
    track_map = lookup.to(labels.device).gather(1, labels.flatten(1)).view(labels.shape)
    if background == "none":
        return instance_tracks(track_map, -1)
    return instance_tracks(track_map, background_cluster(track_map, background))


# ----------------------------------------------------------------------------------------------------------
# Weights for inference


def model_spec(model: SOLV) -> dict:
    """What a checkpoint needs to rebuild the model: its config, feature dimension and grid."""
    return {"config": asdict(model.cfg), "feature_dim": model.feature_dim, "grid": list(model.grid)}


def load_model(path: Path, device: torch.device | str = "cpu") -> SOLV:
    """The trained model of a ``stages.video.solv_train`` checkpoint, in eval mode on ``device``."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    spec = state["spec"]
    model = SOLV(SOLVConfig(**spec["config"]), spec["feature_dim"], tuple(spec["grid"]))
    model.load_state_dict(state["model"], strict=True)
    return model.to(device).eval()
