"""Normalized-cut building blocks shared by TokenCut and MaskCut: the patch graph, the generalized
eigensolve, and the step from an eigenvector to an object mask on the patch grid.

Notation: n = h*w patches, keys (n, d) with the CLS token removed, grid = (h, w) in row-major order.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from scipy import ndimage


def unit_keys(keys: torch.Tensor, center: bool) -> torch.Tensor:
    """(n, d) keys -> (n, d) rows of unit length; with ``center`` the per-image mean key is removed first
    (DINOv2's keys all point the same way, SPEC "Backbone")."""
    keys = keys.float()
    if center:
        keys = keys - keys.mean(dim=0, keepdim=True)
    return F.normalize(keys, dim=1)


def binary_affinity(feats: torch.Tensor, tau: float, eps: float) -> torch.Tensor:
    """Cosine graph of (n, d) unit (or all-zero) rows: 1 where the similarity is above ``tau``, ``eps``
    elsewhere. All-zero rows (patches already taken by MaskCut) become eps-only, nearly isolated nodes."""
    sim = feats @ feats.T
    return torch.where(sim > tau, 1.0, eps).to(feats.dtype)


def fiedler_vector(affinity: torch.Tensor, solver: str) -> torch.Tensor:
    """Second-smallest generalized eigenvector v of (D - A) v = lambda D v, D = diag(row sums of A).

    Every caller goes through here, so the solver can be swapped in one place. 'dense' is the reference
    formulation: a dense generalized symmetric eigensolve (LAPACK via scipy) in float64.
    """
    if solver != "dense":
        raise ValueError(f"unknown eigensolver '{solver}'")
    a = affinity.detach().cpu().double().numpy()
    d = a.sum(axis=1)
    _, vecs = scipy.linalg.eigh(np.diag(d) - a, np.diag(d), subset_by_index=[1, 1])
    return torch.from_numpy(vecs[:, 0]).to(affinity.device)


def bipartition(vec: torch.Tensor) -> np.ndarray:
    """Foreground side of the cut: entries above the mean of the eigenvector, as a bool array."""
    v = vec.detach().cpu().numpy()
    return v > v.mean()


def seed_component(foreground: np.ndarray, seed: int) -> np.ndarray:
    """The 4-connected component of the (h, w) bool ``foreground`` that contains flat index ``seed``
    (empty when the seed is background)."""
    labels, _ = ndimage.label(foreground)  # the default structure is 4-connectivity
    label = labels.flat[seed]
    return labels == label if label else np.zeros_like(foreground)


def corner_count(foreground: np.ndarray) -> int:
    """How many of the four corner patches of an (h, w) bool grid are foreground."""
    return int(foreground[0, 0]) + int(foreground[0, -1]) + int(foreground[-1, 0]) + int(foreground[-1, -1])


def patch_box(mask: np.ndarray, patch: int) -> tuple[int, int, int, int]:
    """Pixel box [x0, y0, x1, y1) covering the patches of an (h, w) bool mask (SPEC: (xmax+1)*p)."""
    ys, xs = np.nonzero(mask)
    return (
        int(xs.min()) * patch,
        int(ys.min()) * patch,
        (int(xs.max()) + 1) * patch,
        (int(ys.max()) + 1) * patch,
    )
