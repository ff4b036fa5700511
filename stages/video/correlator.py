"""BA ("Betrayed by Attention") temporal correlator: one Transformer block over the frozen ViT tokens of
several frames, trained without labels; its spatio-temporal attention is what ``stages.video.ba_cluster``
groups into object tracks.

Tokens. Per frame the input is [CLS; last-block keys] of the frozen ViT, (1 + n, C), n = h*w patches in
raster order; a clip is (B, T, 1 + n, C). Flattened, the token axis is frame-major: (t, CLS, patches).

The block (SPEC "BA (videos)"): x = tokens + e_t (a learnable embedding per frame position t < max_frames),
x = x + Attn(LN(x)), x = x + MLP(LN(x)), 8 heads, MLP ratio 4, GELU, no qkv bias (as the BA code). The
block's own attention runs over all T * (1 + n) tokens, CLS included (it mixes the values).

Dropout in training, as the BA code's block: ``attn_drop`` (0.4) on the attention probabilities, and
``proj_drop`` (0.1) after the output projection and after both MLP layers. The losses read the attention
*after* its dropout (the BA code returns the dropped attention to them): the patch attention below uses the
same dropped positions, scaled by 1 / (1 - attn_drop), so its rows sum to 1 only on average while
training. The masks come from a generator the caller seeds (a resumed run draws the same masks). In eval
mode (inference) nothing is dropped.

Patch attention A_v (what the losses and the clustering use), a readout of the same queries and keys:
per head, softmax over the *patch* keys only (CLS keys excluded before the softmax) of the patch queries,
then the mean over heads -> (B, T*n, T*n), rows sum to 1 by construction. Why this and not "drop the CLS
columns after the softmax": (1) it is what the BA code computes at inference (its sparse-key attention is
built from patch keys only, softmax per head, then the head mean), so training and inference see the same
object; (2) per head it equals the full softmax with CLS columns dropped and the row renormalised, but
heads that send most of their mass to CLS (an attention sink) are not down-weighted in the head mean;
(3) the BA training code drops the CLS rows/columns of the head-averaged softmax without renormalising,
so its rows do not sum to 1 (its KL and entropy terms then see sub-distributions) - not done here.
Scale: 1/sqrt(head dim) (SPEC writes sqrt(C) for the per-head channel count; the BA code uses head dim).
A patch's query and key depend only on its own token and its frame's embedding (LayerNorm and the
projections act per token), so A_v does not depend on the CLS inputs at all.

Sparse keys at inference (SPEC: "attention of all frames' queries to keys of every k-th frame"): the key
frames are 0, k, 2k, ... < L (all of them; the BA code's arange(L // k) * k drops a last partial stride).
Rows are distributions over the K*n key-frame patches, computed a chunk of query frames at a time.

Temporal embedding on videos longer than training clips (``temporal='relative'``): the query patch of
frame t uses the centre embedding e_c (c = (M - 1) // 2, M = max_frames) and a key of frame s uses
e_{c + clamp(s - t, -c, M - 1 - c)}. Every (query, key) embedding pair is then one the block saw in
training (the centre frame of a training clip looking at itself, at earlier and at later frames); for
M = 3 it is just "same frame / earlier / later". ``temporal='absolute'`` (frame t uses e_t, as in
training) is allowed only for videos of at most M frames. ``temporal='shared'`` gives every frame, query
or key, the centre embedding e_c: each key frame then has one embedding whatever the query, so its patches
cannot look different to queries before and after it (with 'relative' they can, which may split a track),
at the price of no temporal signal at all. The BA code has no temporal embedding (its
``encoder_pos`` is commented out), so it does not face this; SPEC asks for one. Set max_frames to the
training clip length T: with M > T the embeddings beyond T are never trained.

Losses (SPEC "BA (videos)"), for every patch i of a clip (N = T*n rows of A_v):
- Sampling: in every frame t, the Kp most and the Kn least attended patches of row i
  (``sample_pos_neg``); the patch itself is not excluded (the BA code does not either).
- Semantic margin, on the fused patch features f (cosine similarity s), triplet form within each frame:
  Ls_i = mean over (t, p, q) of relu(m_s - s(f_i, f_pos_tp) + s(f_i, f_neg_tq)), m_s = 0.8. The BA
  training script writes absolute thresholds (relu(0.9 - s_pos) + relu(s_neg - 0.1), gap 0.8, with 30 / 200
  samples); its utilities use this triplet form with margin 0.8, and the triplet form is what the motion
  loss uses, so both losses share one shape.
- Motion margin, on attention rows with the symmetric KL D (``ba_cluster.symmetric_kl``, the sum of both
  directions, the clustering's distance): Lm_i = mean over (t, p, q) of relu(m_m + D(a_i, a_pos) -
  D(a_i, a_neg)), m_m = 1.0, the anchor row a_i detached (as in the BA code, where only the positive and
  negative rows receive gradient). The BA code uses the one-way cross-entropy CE(a_i, .) (equal to
  KL(a_i || .) plus a constant, the anchor being detached) and draws this loss's samples from the query's
  own frame only; SPEC's symmetric KL and per-frame sampling are used here, the same samples as Ls.
- Weights: w = softmax over the clip's N rows of -H(a_i) (entropy of row i), without gradient (the
  model must not lower the loss by changing which rows count). The BA code takes this softmax over 8
  random patches of each frame and weights only the motion loss; SPEC weights both, over every patch.
- Loss = mean over the batch of sum_i w_i (Ls_i + Lm_i).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stages.common.io import atomic_write_bytes
from stages.common.schema import fail, positive, section
from stages.video.ba_cluster import LOG_FLOOR, symmetric_kl

TemporalMode = Literal["absolute", "relative", "shared"]


@section
class CorrelatorConfig:
    """BA's temporal correlator: its shape, and how it is trained on unlabeled clips (SPEC "BA")."""

    checkpoint: str | None  # a trained correlator; None = the one trained on this dataset, if any;
    # 'frozen' = none: the frozen ViT's own attention (baseline "A")
    heads: int
    mlp_ratio: float
    attn_drop: float  # dropout on the attention probabilities while training (the losses see it too)
    proj_drop: float  # dropout after the output projection and the MLP layers while training
    clip_len: int  # T frames per training clip (also the number of temporal embeddings)
    stride: int  # frame gap inside a clip (shorter videos use the largest gap that fits)
    size: list[int]  # [height, width] of the training crops
    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    num_pos: int  # most attended positions per frame (positives)
    num_neg: int  # least attended positions per frame (negatives)
    semantic_margin: float
    motion_margin: float
    crop_scale: list[float]  # random resized crop: area fraction range
    crop_ratio: list[float]  # and aspect ratio range
    flip_prob: float
    checkpoint_every: int

    def validate(self, key: str) -> None:
        for name in (
            "heads",
            "mlp_ratio",
            "clip_len",
            "stride",
            "steps",
            "batch_size",
            "lr",
            "num_pos",
            "num_neg",
            "checkpoint_every",
        ):
            positive(f"{key}.{name}", getattr(self, name))
        for name in ("attn_drop", "proj_drop"):
            if not 0 <= getattr(self, name) < 1:
                fail(f"{key}.{name}", f"must be in [0, 1), got {getattr(self, name)}")
        for name in ("size", "crop_scale", "crop_ratio"):
            if len(getattr(self, name)) != 2:
                fail(f"{key}.{name}", f"expected two values, got {getattr(self, name)}")


# ----------------------------------------------------------------------------------------------------------
# Attention helpers shared by the correlator and the DINO baseline


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(..., N, C) -> (..., heads, N, C // heads)."""
    *lead, n, c = x.shape
    return x.reshape(*lead, n, num_heads, c // num_heads).transpose(-3, -2)


def _patches(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B, heads, T*(1+n), T*(1+n)) over frame-major tokens, CLS first in every frame -> the (B, heads,
    T*n, T*n) patch-to-patch entries."""
    b, heads, total, _ = x.shape
    per_frame = total // num_frames
    n = per_frame - 1
    grid = x.reshape(b, heads, num_frames, per_frame, num_frames, per_frame)
    return grid[:, :, :, 1:, :, 1:].reshape(b, heads, num_frames * n, num_frames * n)


def patch_attention(
    logits: torch.Tensor, num_frames: int, keep: torch.Tensor | None = None, drop: float = 0.0
) -> torch.Tensor:
    """Head-averaged attention among patches from the block's logits.

    logits: (B, heads, T*(1+n), T*(1+n)) scaled q.k of frame-major tokens, CLS first in every frame.
    keep: None, or the (same shape) bool mask of the attention dropout with probability ``drop``: the
    dropped positions are zeroed and the others scaled by 1 / (1 - drop) before the head mean.
    Returns (B, T*n, T*n): per head the softmax over the patch keys only (CLS rows and columns removed
    before the softmax), then the mean over heads; without dropout every row sums to 1.
    """
    attn = _patches(logits, num_frames).softmax(dim=-1)
    if keep is not None:
        attn = attn * _patches(keep, num_frames) / (1 - drop)
    return attn.mean(dim=1)


def dropout_mask(shape: torch.Size, drop: float, generator: torch.Generator | None, device) -> torch.Tensor:
    """A bool mask of ``shape``, each entry kept (True) with probability 1 - drop."""
    return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1 - drop, generator=generator)


def _dropout(x: torch.Tensor, drop: float, generator: torch.Generator | None) -> torch.Tensor:
    """Inverted dropout with the masks drawn from ``generator`` (``F.dropout`` takes none)."""
    return x * dropout_mask(x.shape, drop, generator, x.device) / (1 - drop)


def head_mean_softmax(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Rows of attention of queries to keys: q (heads, n, d), k (heads, m, d) -> (n, m), the mean over
    heads of softmax(scale * q k^T). One head at a time, so memory stays at a few (n, m) matrices."""
    out = torch.zeros(q.shape[1], k.shape[1], dtype=q.dtype, device=q.device)
    for h in range(q.shape[0]):
        out += torch.softmax((q[h] * scale) @ k[h].T, dim=-1)
    return out / q.shape[0]


def key_frame_indices(num_frames: int, key_stride: int) -> list[int]:
    """The sparse key frames of a video of ``num_frames`` frames: 0, k, 2k, ... < num_frames."""
    if key_stride < 1:
        raise ValueError(f"key_stride must be >= 1, got {key_stride}")
    return list(range(0, num_frames, key_stride))


def iter_attention_chunks(
    attend: Callable[[Sequence[int]], torch.Tensor], num_frames: int, chunk_frames: int
) -> Iterator[tuple[range, torch.Tensor]]:
    """Yield (query frames, rows) for consecutive chunks of ``chunk_frames`` query frames.

    attend(frames) -> (len(frames) * n, K * n) rows, e.g. ``functools.partial(correlator.sparse_attention,
    tokens, key_stride=k, temporal='relative')`` or the same over ``dino_sparse_attention``. Only one
    chunk's rows exist at a time unless the caller keeps them.
    """
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
    for start in range(0, num_frames, chunk_frames):
        frames = range(start, min(num_frames, start + chunk_frames))
        yield frames, attend(frames)


@torch.no_grad()
def dino_sparse_attention(
    queries: torch.Tensor, keys: torch.Tensor, num_heads: int, key_stride: int, frames: Sequence[int]
) -> torch.Tensor:
    """Baseline "A" (no trained correlator): the frozen ViT's last-block attention across frames.

    queries, keys: (L, 1 + n, C) per frame from the backbone (``ViTFeatures.queries`` / ``.keys``, heads
    concatenated, CLS first). Row of patch i of frame t: per head softmax(q_ti . k_sj / sqrt(d)) over the
    patches j of every key frame s (``key_frame_indices``; CLS keys excluded before the softmax, as for the
    correlator), then the mean over heads. Returns (len(frames) * n, K * n), frame-major rows and columns.
    """
    scale = (queries.shape[-1] // num_heads) ** -0.5
    key_set = keys[key_frame_indices(keys.shape[0], key_stride), 1:]  # (K, n, C)
    k = split_heads(key_set.reshape(1, -1, key_set.shape[-1]), num_heads)[0]  # (heads, K*n, d)
    rows = [head_mean_softmax(split_heads(queries[t, 1:], num_heads), k, scale) for t in frames]
    return torch.cat(rows)


# ----------------------------------------------------------------------------------------------------------
# The model


class TemporalCorrelator(nn.Module):
    """One pre-norm Transformer block over T frames of [CLS; keys] tokens, with a temporal embedding.

    Parameters: 12 C^2 + 10 C (block: q, k, v without bias, output projection, MLP C -> 4C -> C, two
    LayerNorms) + max_frames * C (temporal embedding); 1,774,464 for C = 384, max_frames = 3.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        max_frames: int,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        for name, p in (("attn_drop", attn_drop), ("proj_drop", proj_drop)):
            if not 0 <= p < 1:
                raise ValueError(f"{name} must be in [0, 1), got {p}")
        self.num_heads = num_heads
        self.max_frames = max_frames
        self.attn_drop = attn_drop
        self.proj_drop = proj_drop
        self.scale = (dim // num_heads) ** -0.5
        hidden = int(dim * mlp_ratio)
        self.temporal = nn.Parameter(torch.zeros(max_frames, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # ViT-style: small truncated-normal weights, zero biases; the temporal embedding starts small so
        # that an untrained block barely changes the DINO geometry.
        nn.init.trunc_normal_(self.temporal, std=0.02)
        for layer in (self.q, self.k, self.v, self.proj, self.fc1, self.fc2):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

    def forward(
        self, tokens: torch.Tensor, with_attention: bool, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """tokens (B, T, 1 + n, C), T <= max_frames -> fused tokens (B, T, 1 + n, C) and, when asked,
        the patch attention (B, T*n, T*n) (``patch_attention``, after the attention dropout), else None.
        In training mode the dropout masks come from ``generator`` (on the model's device; None = torch's
        global generator)."""
        b, t, per_frame, c = tokens.shape
        if t > self.max_frames:
            raise ValueError(f"clip of {t} frames, but the temporal embedding has only {self.max_frames}")
        attn_drop = self.attn_drop if self.training else 0.0
        proj_drop = self.proj_drop if self.training else 0.0
        x = tokens.to(self.temporal.dtype) + self.temporal[:t, None, :]
        x = x.reshape(b, t * per_frame, c)
        h = self.norm1(x)
        q, k, v = (split_heads(layer(h), self.num_heads) for layer in (self.q, self.k, self.v))
        logits = (q * self.scale) @ k.transpose(-2, -1)  # (B, heads, N, N)
        probs = logits.softmax(dim=-1)
        keep = dropout_mask(logits.shape, attn_drop, generator, logits.device) if attn_drop else None
        if keep is not None:
            probs = probs * keep / (1 - attn_drop)
        mixed = (probs @ v).transpose(1, 2).reshape(b, t * per_frame, c)
        drop = (lambda y: _dropout(y, proj_drop, generator)) if proj_drop else (lambda y: y)
        x = x + drop(self.proj(mixed))
        x = x + drop(self.fc2(drop(F.gelu(self.fc1(self.norm2(x))))))
        attn = patch_attention(logits, t, keep, attn_drop) if with_attention else None
        return x.reshape(b, t, per_frame, c), attn

    def _heads(self, layer: nn.Linear, patches: torch.Tensor, position: int) -> torch.Tensor:
        """(n, C) patch tokens of one frame with embedding ``position`` -> (heads, n, d) for q or k."""
        x = patches.to(self.temporal.dtype) + self.temporal[position]
        return split_heads(layer(self.norm1(x)), self.num_heads)

    def embedding_positions(
        self, query_frame: int, key_frame: int, num_frames: int, temporal: TemporalMode
    ) -> tuple[int, int]:
        """Temporal embedding index of the query and of the key for one (query frame, key frame) pair of
        a video of ``num_frames`` frames (see the module docstring)."""
        m = self.max_frames
        if temporal == "absolute":
            if num_frames > m:
                raise ValueError(f"temporal='absolute' needs at most {m} frames, the video has {num_frames}")
            return query_frame, key_frame
        centre = (m - 1) // 2
        if temporal == "relative":
            offset = min(max(key_frame - query_frame, -centre), m - 1 - centre)
            return centre, centre + offset
        if temporal == "shared":
            return centre, centre
        raise ValueError(f"temporal must be 'absolute', 'relative' or 'shared', got {temporal!r}")

    @torch.no_grad()
    def sparse_attention(
        self, tokens: torch.Tensor, key_stride: int, temporal: TemporalMode, frames: Sequence[int]
    ) -> torch.Tensor:
        """Attention of the patches of the query ``frames`` to the patches of every key_stride-th frame.

        tokens: (L, 1 + n, C) of the whole video (CLS is ignored: patch queries and keys do not depend on
        it). Returns (len(frames) * n, K * n), K = len(key_frame_indices(L, key_stride)): frame-major rows,
        each a distribution over the key-frame patches (per head softmax, then the head mean). With
        key_stride 1 and temporal='absolute' these are the rows of ``forward``'s attention.
        """
        num_frames = tokens.shape[0]
        device = self.temporal.device
        key_set = key_frame_indices(num_frames, key_stride)
        cache: dict[tuple[int, int], torch.Tensor] = {}  # (key frame, embedding) -> (heads, n, d)
        rows = []
        for t in frames:
            needed = []  # (key frame, its embedding index) for this query frame
            for s in key_set:
                query_pos, key_pos = self.embedding_positions(t, s, num_frames, temporal)
                needed.append((s, key_pos))
                if (s, key_pos) not in cache:
                    cache[(s, key_pos)] = self._heads(self.k, tokens[s, 1:].to(device), key_pos)
            # the query's embedding index is the same for every key frame (t, or the centre)
            q = self._heads(self.q, tokens[t, 1:].to(device), query_pos)
            k = torch.cat([cache[pair] for pair in needed], dim=1)
            rows.append(head_mean_softmax(q, k, self.scale))
        return torch.cat(rows)


# ----------------------------------------------------------------------------------------------------------
# Losses


@dataclass(frozen=True)
class LossParams:
    """SPEC "BA (videos)" training loss settings (values come from the config)."""

    num_pos: int  # Kp: most attended patches per frame (SPEC 10)
    num_neg: int  # Kn: least attended patches per frame (SPEC 50)
    semantic_margin: float  # on cosine similarity (SPEC 0.8)
    motion_margin: float  # on symmetric KL (SPEC 1.0)


def sample_pos_neg(
    attn: torch.Tensor, num_frames: int, num_pos: int, num_neg: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive and negative patches of every row, per key frame, from the attention.

    attn: (B, N, T*n) rows over T frames of n patches (frame-major columns). Returns pos (B, N, T, Kp) and
    neg (B, N, T, Kn) long column indices into attn's last axis: in frame t, the Kp largest and the Kn
    smallest entries of the row among that frame's columns (ties broken by torch.topk).
    """
    b, rows, cols = attn.shape
    n = cols // num_frames
    if num_pos + num_neg > n:
        raise ValueError(f"num_pos + num_neg = {num_pos + num_neg} exceeds the {n} patches of a frame")
    per_frame = attn.detach().reshape(b, rows, num_frames, n)
    offset = (torch.arange(num_frames, device=attn.device) * n).view(1, 1, num_frames, 1)
    pos = per_frame.topk(num_pos, dim=-1).indices + offset
    neg = per_frame.topk(num_neg, dim=-1, largest=False).indices + offset
    return pos, neg


def _gather_pairs(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values (B, N, M), index (B, N, T, K) into the last axis -> (B, N, T, K)."""
    b, n, t, k = index.shape
    return values.gather(2, index.reshape(b, n, t * k)).reshape(b, n, t, k)


def _triplet_hinge(good_pos: torch.Tensor, good_neg: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean over (t, p, q) of relu(margin - good_pos[t, p] + good_neg[t, q]) -> (B, N); "good" is a
    similarity (higher = closer): every positive should beat every negative of its frame by the margin."""
    gap = good_pos.unsqueeze(-1) - good_neg.unsqueeze(-2)  # (B, N, T, Kp, Kn)
    return F.relu(margin - gap).mean(dim=(-3, -2, -1))


def semantic_margin_loss(
    features: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, margin: float
) -> torch.Tensor:
    """Semantic margin loss per anchor: features (B, N, C) fused patch features (the rows' patches),
    pos/neg (B, N, T, K) indices into N -> (B, N), the mean over frames and (positive, negative) pairs of
    relu(margin - cos(f_i, f_pos) + cos(f_i, f_neg))."""
    unit = F.normalize(features, dim=-1)
    cosine = unit @ unit.transpose(1, 2)  # (B, N, N)
    return _triplet_hinge(_gather_pairs(cosine, pos), _gather_pairs(cosine, neg), margin)


def motion_margin_loss(
    attn: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, margin: float
) -> torch.Tensor:
    """Motion margin loss per anchor: attn (B, N, N) attention rows (row j = patch j), pos/neg
    (B, N, T, K) -> (B, N), the mean over frames and pairs of relu(margin + D(a_i, a_pos) - D(a_i, a_neg)),
    D = symmetric KL (sum of both directions). The anchor row a_i is detached; gradient flows through the
    positive and negative rows."""
    dist = torch.stack([symmetric_kl(rows.detach(), rows) for rows in attn])  # (B, N, N): anchor x row
    return _triplet_hinge(-_gather_pairs(dist, pos), -_gather_pairs(dist, neg), margin)


def entropy_weights(attn: torch.Tensor) -> torch.Tensor:
    """attn (B, N, K) distributions -> (B, N) weights softmax_i(-H(a_i)) over each clip's rows, no
    gradient: peaked (confident) rows count more. Sums to 1 per clip."""
    rows = attn.detach()
    entropy = -(rows * rows.clamp_min(LOG_FLOOR).log()).sum(dim=-1)
    return torch.softmax(-entropy, dim=1)


def effective_sample_size(weights: torch.Tensor) -> torch.Tensor:
    """(B, N) weights summing to 1 per clip -> (B,) Kish's effective sample size 1 / sum_i w_i^2: N for
    uniform weights, 1 when one row takes all the weight (a collapse of the entropy weighting)."""
    return 1.0 / (weights * weights).sum(dim=1)


def correlator_loss(
    fused: torch.Tensor, attn: torch.Tensor, params: LossParams
) -> tuple[torch.Tensor, dict[str, float]]:
    """BA training loss of one batch: fused (B, T, 1 + n, C) correlator output, attn (B, T*n, T*n) its
    patch attention -> (scalar loss, {'semantic', 'motion': the weighted parts, 'ess': the entropy
    weights' effective sample size, mean over the clips (of N = T*n rows)}, for logging).

    loss = mean over the batch of sum_i w_i (Ls_i + Lm_i), samples from ``sample_pos_neg``.
    """
    b, t, per_frame, c = fused.shape
    features = fused[:, :, 1:].reshape(b, t * (per_frame - 1), c)
    pos, neg = sample_pos_neg(attn, t, params.num_pos, params.num_neg)
    weights = entropy_weights(attn)
    semantic = (weights * semantic_margin_loss(features, pos, neg, params.semantic_margin)).sum(1).mean()
    motion = (weights * motion_margin_loss(attn, pos, neg, params.motion_margin)).sum(1).mean()
    parts = {
        "semantic": float(semantic.detach()),
        "motion": float(motion.detach()),
        "ess": float(effective_sample_size(weights).mean()),
    }
    return semantic + motion, parts


# ----------------------------------------------------------------------------------------------------------
# Training and checkpoints


def make_optimizer(model: TemporalCorrelator, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; weight decay on the weight matrices only (not on biases, LayerNorms, temporal embedding)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trained if p.ndim >= 2 and p is not model.temporal]
    decayed = {id(p) for p in decay}
    rest = [p for p in trained if id(p) not in decayed]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    """Model, optimizer and the number of steps done, written atomically (a reader never sees half)."""
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Restore ``model`` (strict) and, when given, ``optimizer`` from ``save_checkpoint``'s file; returns
    the number of steps done."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


def step_seed(seed: int, step: int) -> int:
    """A 63-bit seed for the random draws of one training step, from the run's seed and the step."""
    return int(np.random.SeedSequence([seed, step]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def train_correlator(
    correlator: TemporalCorrelator,
    clips: Iterable[torch.Tensor],
    steps: int,
    lr: float,
    weight_decay: float,
    loss_params: LossParams,
    checkpoint: Path | None,
    checkpoint_every: int | None,
    on_step: Callable[[int, float, dict[str, float]], None] | None = None,
    seed: int = 0,
) -> list[float]:
    """Train the correlator with AdamW until ``steps`` optimizer steps are done in all.

    clips: batches (B, T, 1 + n, C) of frozen-ViT tokens (the caller runs the backbone and the clip
    augmentation); moved to the model's device and copied, so tensors made under torch.inference_mode
    (as ``Backbone`` returns them) can be used. checkpoint: when the file exists, model, optimizer and
    step are restored from it first and training resumes (``clips`` should then yield the batches of the
    remaining steps); it is written every ``checkpoint_every`` steps (None: only at the end) and at the
    end. on_step(step, loss, parts) is called after every step (parts: see ``correlator_loss``). The
    dropout masks of step s come from a generator seeded by (seed, s), so a resumed run continues exactly
    as an uninterrupted one. Returns the losses of the steps run here. Stops early if ``clips`` runs out.
    """
    optimizer = make_optimizer(correlator, lr, weight_decay)
    step = 0
    if checkpoint is not None and Path(checkpoint).is_file():
        step = load_checkpoint(checkpoint, correlator, optimizer)
    device = correlator.temporal.device
    correlator.train()
    losses: list[float] = []
    batches = iter(clips)
    while step < steps:
        tokens = next(batches, None)
        if tokens is None:
            break
        generator = torch.Generator(device).manual_seed(step_seed(seed, step))
        fused, attn = correlator(tokens.to(device).clone(), with_attention=True, generator=generator)
        loss, parts = correlator_loss(fused, attn, loss_params)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1], parts)
        if checkpoint is not None and checkpoint_every and step % checkpoint_every == 0:
            save_checkpoint(checkpoint, correlator, optimizer, step)
    if checkpoint is not None and losses:
        save_checkpoint(checkpoint, correlator, optimizer, step)
    return losses


# ----------------------------------------------------------------------------------------------------------
# Clip augmentation (the same for every frame of a clip)


@dataclass(frozen=True)
class CropParams:
    top: int
    left: int
    height: int
    width: int
    flip: bool


def sample_crop(
    height: int,
    width: int,
    generator: torch.Generator,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    flip_prob: float,
) -> CropParams:
    """A random resized crop box (area fraction in ``scale``, aspect w/h log-uniform in ``ratio``) inside
    a height x width frame, and whether to flip. Ten tries, then the whole frame (as torchvision does)."""

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    box = (0, 0, height, width)
    for _ in range(10):
        area = height * width * uniform(*scale)
        aspect = math.exp(uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = round(math.sqrt(area * aspect))
        h = round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            box = (top, left, h, w)
            break
    flip = float(torch.rand((), generator=generator)) < flip_prob
    return CropParams(*box, flip=flip)


def apply_crop(frames: torch.Tensor, crop: CropParams, size: tuple[int, int]) -> torch.Tensor:
    """frames (T, C, H, W) float -> (T, C, size[0], size[1]): the same box, bilinear resize
    (antialiased) and optional horizontal flip on every frame."""
    box = frames[:, :, crop.top : crop.top + crop.height, crop.left : crop.left + crop.width]
    out = F.interpolate(box, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return out.flip(-1) if crop.flip else out


def clip_augment(
    frames: torch.Tensor,
    generator: torch.Generator,
    size: tuple[int, int],
    scale: tuple[float, float],
    ratio: tuple[float, float],
    flip_prob: float,
) -> torch.Tensor:
    """One random resized crop + horizontal flip, identical on all frames of a clip: (T, C, H, W) float
    -> (T, C, size[0], size[1]). Motion between frames survives; only the view changes."""
    crop = sample_crop(frames.shape[-2], frames.shape[-1], generator, scale, ratio, flip_prob)
    return apply_crop(frames, crop, size)
