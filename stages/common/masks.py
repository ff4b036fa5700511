"""Small operations on binary masks shared by the discovery methods and refinement: IoU, connected
components, resizing candidate masks to one grid."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks of the same shape; 0.0 when both are empty."""
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape}")
    a, b = a.astype(bool), b.astype(bool)
    union = np.logical_or(a, b).sum()
    # Two empty masks match nothing: 0 keeps "refine an empty mask" a rejection rather than a success.
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def pairwise_iou(masks: torch.Tensor) -> torch.Tensor:
    """(m, ...) bool masks -> (m, m) float32 IoU matrix; two empty masks have IoU 0."""
    flat = masks.reshape(masks.shape[0], -1).float()
    inter = flat @ flat.T
    area = flat.sum(dim=1)
    union = area[:, None] + area[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))


def components(mask: np.ndarray) -> list[np.ndarray]:
    """The 4-connected components of an (h, w) bool mask, largest first (ties: first in row-major
    order of their first patch)."""
    labels, count = ndimage.label(mask)  # the default structure is 4-connectivity
    if count == 0:
        return []
    sizes = np.bincount(labels.ravel())[1:]
    order = sorted(range(count), key=lambda i: -sizes[i])  # stable: equal sizes keep label order
    return [labels == i + 1 for i in order]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of an (h, w) bool mask (empty stays empty): the object FOUND and
    Deep Spectral Methods box for localisation."""
    parts = components(mask)
    return parts[0] if parts else np.zeros_like(mask, dtype=bool)


def resize_masks(masks: list[np.ndarray], grid: tuple[int, int]) -> list[np.ndarray]:
    """Masks of any grids -> (h, w) bool masks on ``grid`` (nearest neighbour, as CuVLER resizes the
    candidates of different backbones to one grid)."""
    out = []
    for mask in masks:
        if mask.shape == tuple(grid):
            out.append(np.asarray(mask, bool))
            continue
        x = torch.from_numpy(np.asarray(mask, np.float32))[None, None]
        out.append(F.interpolate(x, size=tuple(grid), mode="nearest")[0, 0].numpy() > 0.5)
    return out
