"""FreeMask (Wang et al., CVPR 2022, FreeSOLO's first step): many coarse masks, one per query position at
several scales, scored by their "maskness" and kept by Matrix NMS: a multi-object alternative to MaskCut.

Every position of the key map, and of the map downsampled by 0.5 and 0.25 (bilinear), is a query; its
cosine similarity to every key, min-max normalised to [0, 1], is a soft mask and >= 0.5 its binary mask.
Maskness = the mean soft value inside the binary mask. Masks sorted by maskness go through Matrix NMS
(SOLOv2: each score decays by exp(-sigma (IoU^2 - IoU_comp^2)) against every higher-scored mask, sigma 2);
the 20 best are kept when their decayed score is >= 0.7, their mask's vertical centre is below the top 20%
of the image (sky, ceilings) and they are narrower than 95% of it.

Defaults: FreeSOLO's demo/inference_freemask.py (scales 1, 0.5, 0.25; threshold 0.5; masks of >= 2
positions; Gaussian Matrix NMS, sigma 2; top 20; score >= 0.7; centre > 0.2 H; width < 0.95 W). FreeSOLO
runs it on DenseCL ResNet features; here on the last-block ViT keys (after a key treatment).
Before Matrix NMS, masks below the final score are dropped (decay only lowers scores, and a mask only
decays the ones scored below it) and so are exact duplicates of a higher-scored mask (they decay nothing
more than the original does): both exact. Then at most ``max_candidates`` masks, the best, go through
Matrix NMS: SOLOv2's own cap before NMS (NMS_PRE 500 in FreeSOLO's config), which FreeSOLO's FreeMask
script leaves out; without it a 60x60 grid sends ~2,600 masks of 3,600 patches through an O(m^2 n) NMS.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from stages.common.masks import pairwise_iou
from stages.common.schema import fail, positive, section
from stages.discovery.base import (
    METHODS,
    Family,
    ImageMethod,
    KeyTreatment,
    PatchFeatures,
    ScoredMask,
    no_object_rule,
    treated_keys,
    validate_families,
    validate_image_settings,
)
from stages.discovery.no_object import NoObjectRule


def query_masks(
    keys: torch.Tensor, grid: tuple[int, int], scales: tuple[float, ...], queries: torch.Tensor | None = None
) -> torch.Tensor:
    """(h*w, d) keys -> (q, h*w) soft masks in [0, 1], one per query position: each position of the query
    map resized by each scale (bilinear). Without ``queries`` (FreeSOLO) the query map is the key map and
    a soft mask is the query's cosine similarity to every key; with (h*w, d) ``queries`` (a ViT's last-block
    queries) it is the query's attention to every key, softmax(q k^T / sqrt(d)). Min-max normalised per
    query either way."""
    source = keys if queries is None else queries
    fmap = source.float().T.reshape(1, source.shape[1], *grid)
    rows = []
    for scale in scales:
        resized = fmap if scale == 1.0 else F.interpolate(fmap, scale_factor=scale, mode="bilinear")
        rows.append(resized.reshape(source.shape[1], -1).T)
    if queries is None:
        sim = F.normalize(torch.cat(rows), dim=1) @ F.normalize(keys.float(), dim=1).T
    else:
        sim = (torch.cat(rows) @ keys.float().T / keys.shape[1] ** 0.5).softmax(dim=1)
    sim -= sim.min(dim=1, keepdim=True).values
    return sim / sim.max(dim=1, keepdim=True).values.clamp(min=torch.finfo(sim.dtype).tiny)


def matrix_nms(masks: torch.Tensor, scores: torch.Tensor, sigma: float) -> torch.Tensor:
    """SOLOv2's Gaussian Matrix NMS. masks: (m, n) bool sorted by descending ``scores`` (m,). Returns the
    decayed scores: s_j * min over i < j of exp(-sigma IoU_ij^2) / exp(-sigma c_i^2), c_i = the largest
    IoU of mask i with a mask above it (0 for the first). A decay above 1 (SOLOv2's formula allows it
    when every mask above j overlaps its own predecessors more than it overlaps j) is clamped to 1, so a
    score never rises; this is what makes the pre-NMS drop in ``freemask`` exact."""
    iou = pairwise_iou(masks).triu(diagonal=1)
    compensate = iou.max(dim=0).values  # c_i: max IoU with the masks above i
    decay = torch.exp(-sigma * (iou**2 - compensate[:, None] ** 2))
    decay = decay.masked_fill(torch.ones_like(iou, dtype=torch.bool).tril(), float("inf"))
    return scores * decay.min(dim=0).values.clamp(max=1.0)


def freemask(
    keys: torch.Tensor,
    grid: tuple[int, int],
    scales: tuple[float, ...],
    mask_threshold: float,
    sigma: float,
    max_masks: int,
    min_score: float,
    top_margin: float,
    max_width: float,
    max_candidates: int,
    no_object: NoObjectRule | None = None,
    queries: torch.Tensor | None = None,
) -> list[ScoredMask]:
    """FreeMask on one image: (h*w, d) keys (after any key treatment) -> up to ``max_masks`` masks with
    their decayed maskness, best first.

    scales: query map scales (1, 0.5, 0.25); mask_threshold: soft -> binary (0.5); sigma: Matrix NMS (2);
    min_score: kept when the decayed score is >= this (0.7); top_margin: dropped when the mask's vertical
    centre (mean of its occupied rows, as a fraction of the height) is <= this (0.2); max_width: dropped
    when it occupies >= this fraction of the columns (0.95); max_candidates: masks entering Matrix NMS
    (SOLOv2's 500). With a ``no_object`` rule, masks that
    separate nothing (stages/discovery/no_object.py) are dropped. ``queries``: (h*w, d) last-block queries to
    take the masks from attention instead of key similarity (``query_masks``); None = FreeSOLO's way.
    """
    soft = query_masks(keys, grid, scales, queries)
    binary = soft >= mask_threshold
    area = binary.sum(dim=1)
    maskness = (soft * binary).sum(dim=1) / area.clamp(min=1)
    keep = (area > 1) & (maskness >= min_score)  # exact: a score only decays (see the module docstring)
    soft, binary, maskness = soft[keep], binary[keep], maskness[keep]
    order = torch.argsort(maskness, descending=True, stable=True)
    binary, maskness = binary[order], maskness[order]
    binary, maskness = _drop_duplicates(binary, maskness)
    binary, maskness = binary[:max_candidates], maskness[:max_candidates]
    decayed = matrix_nms(binary, maskness, sigma)
    out = []
    for i in torch.argsort(decayed, descending=True, stable=True)[:max_masks].tolist():
        mask = binary[i].cpu().numpy().reshape(grid)
        if float(decayed[i]) >= min_score and _placed(mask, top_margin, max_width):
            out.append(ScoredMask(mask, float(decayed[i])))
    if no_object is not None:
        out = [m for m in out if no_object.separates(m.mask)]
    return out


def _drop_duplicates(binary: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the (m, n) bool ``binary`` (sorted by score) equal to an earlier row removed."""
    if binary.shape[0] == 0:
        return binary, scores
    _, inverse = torch.unique(binary, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), binary.shape[0], dtype=torch.long, device=binary.device)
    first = first.scatter_reduce(0, inverse, torch.arange(binary.shape[0], device=binary.device), "amin")
    keep = torch.sort(first).values
    return binary[keep], scores[keep]


def _placed(mask: np.ndarray, top_margin: float, max_width: float) -> bool:
    """FreeMask's placement filters, as FreeSOLO measures them: the mean of the occupied rows' centres
    (as a fraction of the height) above ``top_margin``, and the number of occupied columns below
    ``max_width`` of the width."""
    rows = np.nonzero(mask.any(axis=1))[0]
    centre = (rows.mean() + 0.5) / mask.shape[0]
    width = mask.any(axis=0).sum() / mask.shape[1]
    return centre > top_margin and width < max_width


@section
class FreeMaskConfig:
    name: Literal["freemask"]
    reference_backbone: str  # the backbone picked by backbone.arch=auto when its weights exist
    scales: list[float]  # query maps: the key map resized by each (FreeSOLO: 1, 0.5, 0.25)
    mask_threshold: float  # soft -> binary (0.5)
    sigma: float  # Gaussian Matrix NMS (2)
    max_masks: int  # masks kept per image (20)
    min_score: float  # decayed maskness kept (0.7)
    top_margin: float  # masks centred in the top fraction of the image are dropped (0.2)
    max_width: float  # masks spanning this fraction of the width or more are dropped (0.95)
    max_candidates: int  # masks entering Matrix NMS (SOLOv2's NMS_PRE, 500)
    keys: dict[Family, KeyTreatment]  # key treatment per backbone family: 'dino', 'dinov2'
    no_object: float | None  # the no-object rule's max_cosine (stages/discovery/no_object.py); null = off
    resize: int | None  # square side the image is resized to; None = keep the size, pad
    refine: str  # a refiner (stages/refinement/refine.py REFINERS): crf, bilateral, none

    def validate(self, key: str) -> None:
        if not self.scales or any(not 0 < s <= 1 for s in self.scales):
            fail(f"{key}.scales", f"must be a non-empty list of values in (0, 1], got {self.scales}")
        for name in ("mask_threshold", "min_score", "top_margin", "max_width"):
            if not 0 <= getattr(self, name) <= 1:
                fail(f"{key}.{name}", f"must be in [0, 1], got {getattr(self, name)}")
        for name in ("sigma", "max_masks", "max_candidates"):
            positive(f"{key}.{name}", getattr(self, name))
        validate_families(self.keys, f"{key}.keys")
        validate_image_settings(self, key)


@METHODS.register("freemask")
class FreeMask(ImageMethod):
    """FreeMask (FreeSOLO, Wang et al., CVPR 2022): up to ``max_masks`` scored masks per image, best
    first; the score (decayed maskness) is written into the pseudo-labels."""

    Config = FreeMaskConfig
    needs = ("key_bias",)

    def __call__(self, feats: PatchFeatures) -> list[ScoredMask]:
        c = self.cfg
        return freemask(
            treated_keys(feats, c.keys[feats.family]),
            feats.grid,
            tuple(c.scales),
            c.mask_threshold,
            c.sigma,
            c.max_masks,
            c.min_score,
            c.top_margin,
            c.max_width,
            c.max_candidates,
            no_object=no_object_rule(feats, c.no_object),
        )
