"""LOST: the seed is the patch least correlated with the rest of the image; the object grows from the
seed over the patches it correlates with."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from stages.common.schema import positive, section
from stages.discovery.base import (
    METHODS,
    Family,
    ImageMethod,
    KeyTreatment,
    PatchFeatures,
    no_object_rule,
    treated_keys,
    validate_families,
    validate_image_settings,
)
from stages.discovery.ncut import seed_component
from stages.discovery.no_object import NoObjectRule


def lost(
    keys: torch.Tensor, grid: tuple[int, int], k: int, no_object: NoObjectRule | None = None
) -> np.ndarray:
    """Keys (h*w, d) of one image (not normalised; after any key treatment, ``treat_keys``) -> (h, w) bool
    object mask.

    A = F F^T. Degree of a patch = number of positive similarities to other patches; seed = the patch of
    minimum degree. S = the seed's positively correlated patches among the k lowest-degree ones; the object
    is the seed's 4-connected component of {sum over S of A[s, :] > 0}. With a ``no_object`` rule, a mask
    that separates nothing (stages/discovery/no_object.py) comes back empty; None: a mask for every image.
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


@section
class LostConfig:
    name: Literal["lost"]
    reference_backbone: str  # the paper's backbone, picked by backbone.arch=auto when its weights exist
    k: int  # size of the low-degree candidate set
    keys: dict[Family, KeyTreatment]  # key treatment per backbone family: 'dino', 'dinov2'
    resize: int | None  # square side the image is resized to; None = keep the size, pad
    refine: str  # a refiner (stages/refinement/refine.py REFINERS): crf, bilateral, none
    no_object: float | None  # the no-object rule's max_cosine (stages/discovery/no_object.py); null = off

    def validate(self, key: str) -> None:
        positive(f"{key}.k", self.k)
        validate_families(self.keys, f"{key}.keys")
        validate_image_settings(self, key)


@METHODS.register("lost")
class Lost(ImageMethod):
    """LOST (Simeoni et al., BMVC 2021): one object per image, grown from the least connected patch."""

    Config = LostConfig
    version = 2  # 2: DINOv2 keys minus the key bias (method.keys.dinov2: no_bias), were raw

    def key_treatments(self) -> tuple[str, ...]:
        return tuple(self.cfg.keys.values())

    def __call__(self, feats: PatchFeatures) -> list[np.ndarray]:
        c = self.cfg
        keys = treated_keys(feats, c.keys[feats.family])
        return [lost(keys, feats.grid, c.k, no_object_rule(feats, c.no_object))]
