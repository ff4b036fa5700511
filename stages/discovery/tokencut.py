"""TokenCut: one normalized cut of the key graph; the object is the seed's connected component."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from stages.common.schema import positive, section
from stages.discovery.base import (
    METHODS,
    Family,
    GraphConfig,
    ImageMethod,
    PatchFeatures,
    graph_keys,
    no_object_rule,
    validate_graphs,
    validate_image_settings,
)
from stages.discovery.ncut import binary_affinity, bipartition, fiedler_vector, seed_component, unit_keys
from stages.discovery.no_object import NoObjectRule


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
    ``no_object`` rule, a mask that separates nothing (stages/discovery/no_object.py) comes back empty (all
    False); None keeps the reference behaviour (a mask for every image).
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


@section
class TokenCutConfig:
    name: Literal["tokencut"]
    reference_backbone: str  # the paper's backbone, picked by backbone.arch=auto when its weights exist
    graph: dict[Family, GraphConfig]  # per backbone family: 'dino', 'dinov2'
    eps: float  # weight of the edges below tau
    resize: int | None  # square side the image is resized to; None = keep the size, pad
    refine: str  # a refiner (stages/refinement/refine.py REFINERS): crf, bilateral, none
    no_object: float | None  # the no-object rule's max_cosine (stages/discovery/no_object.py); null = off
    solver: Literal["fast", "dense"]

    def validate(self, key: str) -> None:
        validate_graphs(self.graph, f"{key}.graph")
        positive(f"{key}.eps", self.eps)
        validate_image_settings(self, key)


@METHODS.register("tokencut")
class TokenCut(ImageMethod):
    """TokenCut (Wang et al., CVPR 2022 / TPAMI 2023): one object per image."""

    Config = TokenCutConfig
    version = 2  # 2: DINOv2 keys minus the key bias (method.graph.dinov2.keys: no_bias), were centred

    def key_treatments(self) -> tuple[str, ...]:
        return tuple(g.keys for g in self.cfg.graph.values())

    def __call__(self, feats: PatchFeatures) -> list[np.ndarray]:
        graph = self.cfg.graph[feats.family]
        c = self.cfg
        rule = no_object_rule(feats, c.no_object)
        keys, center = graph_keys(feats, graph.keys)
        return [tokencut(keys, feats.grid, graph.tau, c.eps, center, c.solver, rule)]
