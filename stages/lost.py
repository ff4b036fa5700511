"""LOST: the seed is the patch least correlated with the rest of the image; the object grows from the
seed over the patches it correlates with."""

from __future__ import annotations

import numpy as np
import torch

from stages.ncut import seed_component
from stages.no_object import NoObjectRule


def lost(
    keys: torch.Tensor, grid: tuple[int, int], k: int, no_object: NoObjectRule | None = None
) -> np.ndarray:
    """Keys (h*w, d) of one image (raw: not normalised, not centred) -> (h, w) bool object mask.

    A = F F^T. Degree of a patch = number of positive similarities to other patches; seed = the patch of
    minimum degree. S = the seed's positively correlated patches among the k lowest-degree ones; the object
    is the seed's 4-connected component of {sum over S of A[s, :] > 0}. With a ``no_object`` rule, a mask
    that separates nothing (stages/no_object.py) comes back empty; None: a mask for every image.
    """
    feats = keys.float()
    sim = feats @ feats.T
    positive = sim > 0
    positive.fill_diagonal_(False)  # SPEC: the diagonal is ignored
    order = torch.argsort(positive.sum(dim=1), stable=True)
    seed = int(order[0])
    candidates = order[:k]
    similar = candidates[sim[seed, candidates] > 0]
    score = sim[similar].sum(dim=0).cpu().numpy().reshape(grid)
    mask = seed_component(score > 0, seed)
    if not mask.any():  # the seed's own score can be <= 0 (never seen on real keys): keep the seed patch
        mask.flat[seed] = True
    if no_object is not None and not no_object.separates(mask):
        return np.zeros_like(mask)
    return mask
