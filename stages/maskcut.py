"""MaskCut (CutLER's pseudo-labeler): repeated normalized cuts on one image's key graph, each cut taking
the patches it finds out of the graph."""

from __future__ import annotations

import numpy as np
import torch

from stages.ncut import binary_affinity, bipartition, corner_count, fiedler_vector, seed_component, unit_keys


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def cut_once(feats: torch.Tensor, grid: tuple[int, int], tau: float, eps: float, solver: str) -> np.ndarray:
    """One MaskCut cut of (n, d) unit/zero rows -> (h, w) bool mask of the seed's component.

    The object side is the seed's (argmax |v|) unless 3 or more grid corners are foreground (the
    object-centric prior); after a flip the seed moves to argmax(-v).
    """
    vec = fiedler_vector(binary_affinity(feats, tau, eps), solver)
    foreground = bipartition(vec)
    seed = int(vec.abs().argmax())
    if corner_count(foreground.reshape(grid)) >= 3 or not foreground[seed]:
        foreground, vec = ~foreground, -vec
    seed = int(vec.argmax())
    return seed_component(foreground.reshape(grid), seed)


def maskcut(
    keys: torch.Tensor,
    grid: tuple[int, int],
    tau: float,
    eps: float,
    center: bool,
    n_masks: int,
    max_overlap: float,
    min_area: float,
    solver: str,
) -> list[np.ndarray]:
    """Keys (h*w, d) of one image -> up to ``n_masks`` disjoint (h, w) bool masks, in discovery order.

    After each cut the mask's patches get zero features, so they become eps-only nodes of the next graph.
    A later mask is discarded when its IoU with the previous mask is above ``max_overlap`` or it covers at
    most ``min_area`` of the grid. Differs from the reference: a discard ends the loop. The graph is
    unchanged after a discard, so every later cut would repeat it (the reference keeps cutting, and can
    then accept the duplicate because it compares against the zeroed placeholder of the discarded one).
    Masks are returned disjoint, later minus earlier; a mask left empty by that (a cut that repeated an
    earlier, not the previous, mask) is dropped.
    """
    feats = unit_keys(keys, center)
    taken = torch.zeros(feats.shape[0], dtype=torch.bool, device=feats.device)
    masks: list[np.ndarray] = []
    for _ in range(n_masks):
        mask = cut_once(feats.masked_fill(taken[:, None], 0.0), grid, tau, eps, solver)
        if masks and (mask_iou(mask, masks[-1]) > max_overlap or mask.mean() <= min_area):
            break
        masks.append(mask)
        taken |= torch.from_numpy(mask.reshape(-1)).to(taken.device)
    disjoint = [m & ~np.any(masks[:i], axis=0) if i else m for i, m in enumerate(masks)]
    return [m for m in disjoint if m.any()]
