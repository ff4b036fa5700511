"""Images with no object: telling a mask that separates something from one that separates nothing.

Every discovery method returns a mask for any input: a uniform grey image gets halves and quarters from
MaskCut, the whole frame from TokenCut. Those masks become false positives in every self-training round.
The graph a method cuts cannot tell: per-image centred keys (what MaskCut uses on DINOv2)
rescale whatever tiny variation is left (position embedding, JPEG noise, padding) into a graph as
structured as a real image's, so its eigengap and normalized-cut value overlap real images' (README, "No
object", gives the measurements).

What does tell is the key bias (``stages.discovery.ncut.treat_keys``): with the last block's key-projection
bias removed, the keys of a real image's object and of its background point different ways, while the two
sides of any mask on a uniform, noise or plain-sky image still point the same way. So a mask M separates
something when, over the patches inside the image (padding excluded),

    cos(mean of (k_i - b) over M, mean of (k_i - b) outside M) < max_cosine,

and a mask covering every such patch (LOST on raw DINOv2 keys does that) is an object only when the image's
bias-free keys are not all alike: mean pairwise cosine < max_cosine. A mask made only of padding patches
never is. On DINOv2-S/14 the measured cosines are at most 0.73 for the demo photos' first masks and at
least 0.87 for every mask on uniform, noise and plain-sky images; max_cosine = 0.8 sits between.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def valid_patches(grid: tuple[int, int], patch: int, height: int, width: int) -> np.ndarray:
    """(h, w) bool: the patches of a grid that lie entirely inside a ``height`` x ``width`` pixel image,
    i.e. hold none of the zero padding added on the right and bottom (TokenCut, LOST: no resize). Even 2
    padded pixels make a column's keys stand out (measured: cosine 0.75 with the rest of a blank image)."""
    rows = (np.arange(grid[0]) + 1) * patch <= height
    cols = (np.arange(grid[1]) + 1) * patch <= width
    return rows[:, None] & cols[None, :]


@dataclass(eq=False)
class NoObjectRule:
    """The rule for one image: its bias-free keys (n, d) = keys - key bias, the (h, w) bool patches inside
    the image (all when there is no padding), and the cosine above which a mask separates nothing.

    Build it with ``for_image`` from the backbone's raw keys, whatever key treatment the method itself
    uses, and hand it to a method's ``no_object`` parameter."""

    features: torch.Tensor
    valid: np.ndarray
    max_cosine: float

    @classmethod
    def for_image(
        cls,
        keys: torch.Tensor,
        key_bias: torch.Tensor,
        grid: tuple[int, int],
        max_cosine: float,
        valid: np.ndarray | None = None,
    ) -> NoObjectRule:
        """keys (h*w, d) as the backbone gives them (raw), key_bias (d,) the last block's key-projection
        bias, ``valid`` (h, w) bool or None for all patches. Raises ValueError on mismatched shapes or a
        max_cosine outside (-1, 1]."""
        n, d = keys.shape
        if n != grid[0] * grid[1] or key_bias.shape != (d,):
            raise ValueError(
                f"keys {tuple(keys.shape)}, key bias {tuple(key_bias.shape)}, grid {grid} disagree"
            )
        if not -1.0 < max_cosine <= 1.0:
            raise ValueError(f"max_cosine must be in (-1, 1], got {max_cosine}")
        valid = np.ones(grid, bool) if valid is None else np.asarray(valid, bool)
        if valid.shape != tuple(grid) or not valid.any():
            raise ValueError(f"valid patches: need a ({grid[0]}, {grid[1]}) mask with a True entry")
        features = keys.detach().float() - key_bias.to(device=keys.device, dtype=torch.float32)
        return cls(features, valid, max_cosine)

    def similarity(self, mask: np.ndarray) -> float:
        """Cosine between the mean bias-free key inside the (h, w) bool ``mask`` and outside it (valid
        patches only); for a mask covering every valid patch, the mean pairwise cosine of the valid
        patches' bias-free keys. NaN for a mask without a valid patch."""
        flat = torch.from_numpy(np.asarray(mask, bool).reshape(-1)).to(self.features.device)
        valid = torch.from_numpy(self.valid.reshape(-1)).to(self.features.device)
        inside, outside = flat & valid, ~flat & valid
        if not bool(inside.any()):
            return float("nan")
        if not bool(outside.any()):
            return mean_pairwise_cosine(self.features[valid])
        a, b = self.features[inside].mean(dim=0), self.features[outside].mean(dim=0)
        return float(F.cosine_similarity(a, b, dim=0))

    def separates(self, mask: np.ndarray) -> bool:
        """Whether ``mask`` is an object by this rule (False for an empty or padding-only mask)."""
        return bool(self.similarity(mask) < self.max_cosine)  # NaN (no valid patch) compares False

    def objects(self, masks: list[np.ndarray]) -> list[np.ndarray]:
        """The masks that separate something, in their order."""
        return [m for m in masks if self.separates(m)]


def mean_pairwise_cosine(features: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs i != j of the rows of (n, d) ``features`` (1.0 for n < 2),
    in O(n d): sum_ij u_i.u_j = |sum_i u_i|^2."""
    n = features.shape[0]
    if n < 2:
        return 1.0
    total = F.normalize(features.double(), dim=1).sum(dim=0)
    return float((total @ total - n) / (n * (n - 1)))
