"""TokenCut: one normalized cut of the key graph; the object is the seed's connected component."""

from __future__ import annotations

import numpy as np
import torch

from stages.ncut import binary_affinity, bipartition, fiedler_vector, seed_component, unit_keys
from stages.no_object import NoObjectRule


def tokencut(
    keys: torch.Tensor,
    grid: tuple[int, int],
    tau: float,
    eps: float,
    center: bool,
    solver: str,
    no_object: NoObjectRule | None = None,
) -> np.ndarray:
    """Keys (h*w, d) of one image -> (h, w) bool mask of the object.

    Bipartition v > mean(v) of the Fiedler vector; the seed is argmax |v|; the partition is flipped when
    the seed falls on the background side; the object is the seed's 4-connected component. With a
    ``no_object`` rule, a mask that separates nothing (stages/no_object.py) comes back empty (all False);
    None keeps the reference behaviour (a mask for every image).
    """
    vec = fiedler_vector(binary_affinity(unit_keys(keys, center), tau, eps), solver)
    foreground = bipartition(vec)
    seed = int(vec.abs().argmax())
    if not foreground[seed]:
        foreground = ~foreground
    mask = seed_component(foreground.reshape(grid), seed)
    if no_object is not None and not no_object.separates(mask):
        return np.zeros_like(mask)
    return mask
