"""Invariant slot attention (Biza et al., "Invariant Slot Attention: Object Discovery with Slot-Centric
Reference Frames", ICML 2023) with SOLV's shared initialisation (Aydemir et al., NeurIPS 2023, sec. 3.2.2
and supplementary B.2, C): SOLV's spatial binding, run on each frame independently.

Each of the K slots has a vector z^j (D_slot), a position S_p^j and a scale S_s^j (both 2-d, in the
coordinates of the absolute grid G_abs, one (x, y) point per patch, initialised to [-1, 1] and learned).
The initial z, S_p and S_s are learned parameters shared by every frame. One iteration (eqs. 13-17):

    G_rel^j = (G_abs - S_p^j) / (delta * S_s^j)                                (B.2: delta = 5)
    A = softmax over the slots of  p(k(x) + g(G_rel^j)) . q(norm(z^j)) / sqrt(D_slot)      (eq. 13)
    W^j = A^j / sum(A^j)                   (weights over the patches)
    S_p^j = sum(W^j G_abs),  S_s^j = sqrt(sum(W^j (G_abs - S_p^j)^2))                      (eq. 15)
    U^j = sum(W^j p(v(x) + g(G_rel^j)))                                                    (eq. 16)
    z = GRU(U, z);  z = z + MLP(norm(z))                                                   (eq. 17)

x are the frame's features after a small input MLP (B.2: "a 2-layer MLP followed by layer normalisation";
the public code also normalises its input first, which matters for ViT features taken before the final
norm). As in Biza et al. and the SOLV code, the iterations update the slots ``iters`` times and one last
attention pass (with the final slots) gives the attention masks, positions and scales; a linear layer
maps the final slots (SOLV code). The keys depend on the slot (through its relative grid), so p, the
position encoder, runs on (K, N) pairs: the cost is K times that of plain slot attention.

Token drop: a frame may come with only some of its patches (``token_index`` names them on the full grid);
their grid coordinates travel with them, so the result does not depend on the order of the patches.

Choices where the papers are silent or differ:
- Scales computed from attention are clipped to [0.001, 2] (Biza et al.'s bounds): a slot whose attention
  sits on one patch would otherwise divide the relative grid by ~0. The SOLV code does not clip; the
  learned initial scale is used as it is, as there.
- p (the "grid encoder" of Biza et al.) is Linear-ReLU-Linear at D_slot, as in the SOLV code.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

MIN_SCALE = 0.001  # Biza et al.'s clip of the computed slot scales
MAX_SCALE = 2.0


def coordinate_grid(grid: tuple[int, int]) -> torch.Tensor:
    """(h*w, 2) patch coordinates (x, y), each in [-1, 1], in the ViT's raster order (row-major)."""
    h, w = grid
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)


def slot_position_scale(attn: torch.Tensor, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre of mass and spread of each slot's attention (Biza et al.; SOLV eq. 15).

    attn: (B, K, N) non-negative weights of each slot over N patches (any total > 0; normalised here).
    coords: (B, N, 2) or (N, 2) coordinates of those patches. Returns positions (B, K, 2) and scales
    (B, K, 2), the per-axis standard deviations, clipped to [MIN_SCALE, MAX_SCALE].
    """
    weights = attn / attn.sum(dim=-1, keepdim=True)
    if coords.dim() == 2:
        coords = coords.expand(attn.shape[0], -1, -1)
    position = weights @ coords  # (B, K, 2)
    spread = weights @ coords.square() - position.square()  # E[x^2] - E[x]^2 per axis
    scale = spread.clamp_min(0).sqrt().clamp(MIN_SCALE, MAX_SCALE)
    return position, scale


def relative_grid(coords: torch.Tensor, position: torch.Tensor, scale: torch.Tensor, factor: float):
    """Each slot's view of the patches: (B, N, 2) or (N, 2) coordinates, (B, K, 2) positions and scales ->
    (B, K, N, 2) = (coords - position) / (factor * scale)."""
    if coords.dim() == 2:
        coords = coords.unsqueeze(0)
    return (coords.unsqueeze(1) - position.unsqueeze(2)) / (factor * scale.unsqueeze(2))


class ResidualMLP(nn.Module):
    """z + Linear(ReLU(Linear(LayerNorm(z)))): the slot update's feed-forward block."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.net(z)


class SlotAttentionResult(NamedTuple):
    slots: torch.Tensor  # (B, K, D_slot)
    attn: torch.Tensor  # (B, K, N'): A, softmax over the slots (each patch's weights sum to 1)
    position: torch.Tensor  # (B, K, 2): S_p from the last attention
    scale: torch.Tensor  # (B, K, 2): S_s from the last attention


class InvariantSlotAttention(nn.Module):
    """Invariant slot attention over one frame's patch features, with a shared learned initialisation.

    input_dim: D of the features; num_slots: K; slot_dim: D_slot (SOLV: 128); iters: slot updates (3);
    grid: (h, w) patch grid the absolute coordinates are learned on; scale_factor: delta (5); eps: added
    to the attention before the weighted means (1e-8, as slot attention).
    """

    def __init__(
        self,
        input_dim: int,
        num_slots: int,
        slot_dim: int,
        iters: int,
        grid: tuple[int, int],
        scale_factor: float = 5.0,
        eps: float = 1e-8,
    ):
        super().__init__()
        self.num_slots, self.slot_dim, self.iters = num_slots, slot_dim, iters
        self.scale_factor, self.eps = scale_factor, eps
        self.grid = tuple(grid)
        # learned initialisation shared by all frames (B.2: Xavier slots, normal positions and scales)
        self.slots = nn.Parameter(nn.init.xavier_uniform_(torch.empty(num_slots, slot_dim)))
        self.init_position = nn.Parameter(torch.randn(num_slots, 2) * 0.02)
        self.init_scale = nn.Parameter(torch.randn(num_slots, 2) * 0.02)
        self.coords = nn.Parameter(coordinate_grid(self.grid))  # G_abs, learned (sec. 3.2.2)
        self.input_mlp = nn.Sequential(
            nn.LayerNorm(input_dim),
            nn.Linear(input_dim, input_dim),
            nn.ReLU(),
            nn.Linear(input_dim, slot_dim),
            nn.LayerNorm(slot_dim),
        )
        self.q = nn.Linear(slot_dim, slot_dim, bias=False)
        self.k = nn.Linear(slot_dim, slot_dim, bias=False)
        self.v = nn.Linear(slot_dim, slot_dim, bias=False)
        self.g = nn.Linear(2, slot_dim)  # relative grid -> D_slot
        self.p = nn.Sequential(nn.Linear(slot_dim, slot_dim), nn.ReLU(), nn.Linear(slot_dim, slot_dim))
        self.norm = nn.LayerNorm(slot_dim)
        self.gru = nn.GRUCell(slot_dim, slot_dim)
        self.mlp = ResidualMLP(slot_dim, 4 * slot_dim)  # B.2: hidden size 4 * D_slot
        self.out = nn.Linear(slot_dim, slot_dim)

    def patch_coords(self, token_index: torch.Tensor | None, batch: int) -> torch.Tensor:
        """(B, N', 2) learned coordinates of the given patches (all of them when token_index is None)."""
        if token_index is None:
            return self.coords.expand(batch, -1, -1)
        return self.coords[token_index]

    def forward(self, features: torch.Tensor, token_index: torch.Tensor | None = None) -> SlotAttentionResult:
        """features: (B, N', D) patch features of B frames; token_index: (B, N') long, each patch's index
        on the full h*w grid (None: all h*w patches in raster order)."""
        b, n, _ = features.shape
        if token_index is None and n != self.grid[0] * self.grid[1]:
            raise ValueError(f"{n} patches without token_index, but the grid {self.grid} has h*w patches")
        coords = self.patch_coords(token_index, b)
        x = self.input_mlp(features)
        kx, vx = self.k(x).unsqueeze(1), self.v(x).unsqueeze(1)  # (B, 1, N', D_slot)
        z = self.slots.expand(b, -1, -1)
        position = self.init_position.expand(b, -1, -1)
        scale = self.init_scale.expand(b, -1, -1)
        for it in range(self.iters + 1):
            rel = self.g(relative_grid(coords, position, scale, self.scale_factor))  # (B, K, N', D_slot)
            keys = self.p(kx + rel)
            q = self.q(self.norm(z))
            logits = torch.einsum("bkd,bknd->bkn", q, keys) / math.sqrt(self.slot_dim)
            attn = logits.softmax(dim=1)  # slots compete for each patch
            weights = attn + self.eps
            weights = weights / weights.sum(dim=-1, keepdim=True)
            if it < self.iters:  # values use the grid the keys used; the last pass only reads attention
                updates = torch.einsum("bkn,bknd->bkd", weights, self.p(vx + rel))
                z = self.gru(updates.reshape(-1, self.slot_dim), z.reshape(-1, self.slot_dim))
                z = self.mlp(z.view(b, -1, self.slot_dim))
            position, scale = slot_position_scale(weights, coords)
        return SlotAttentionResult(self.out(z), attn, position, scale)
