"""MaskCut (CutLER's pseudo-labeler): repeated normalized cuts on one image's key graph, each cut taking
the patches it finds out of the graph."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from stages.common.masks import mask_iou
from stages.common.schema import fail, positive, section
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
from stages.discovery.ncut import (
    binary_affinity,
    bipartition,
    corner_count,
    fiedler_vector,
    isolate_nodes,
    seed_component,
    unit_keys,
)
from stages.discovery.no_object import NoObjectRule


def cut_once(affinity: torch.Tensor, grid: tuple[int, int], solver: str) -> np.ndarray:
    """One MaskCut cut of an (n, n) patch graph -> (h, w) bool mask of the seed's component.

    The object side is the seed's (argmax |v|) unless 3 or more grid corners are foreground (the
    object-centric prior); after a flip the seed moves to argmax(-v).
    """
    vec = fiedler_vector(affinity, solver)
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
    no_object: NoObjectRule | None = None,
) -> list[np.ndarray]:
    """Keys (h*w, d) of one image -> up to ``n_masks`` disjoint (h, w) bool masks, in discovery order.

    After each cut the mask's patches get zero features, so they become eps-only nodes of the next graph
    (the graph is built once and those nodes are isolated in place: the same graph, bit for bit).
    A later mask is discarded when its IoU with the previous mask is above ``max_overlap`` or it covers at
    most ``min_area`` of the grid. Differs from the reference: a discard ends the loop. The graph is
    unchanged after a discard, so every later cut would repeat it (the reference keeps cutting, and can
    then accept the duplicate because it compares against the zeroed placeholder of the discarded one).
    Masks are returned disjoint, later minus earlier; a mask left empty by that (a cut that repeated an
    earlier, not the previous, mask) is dropped. With a ``no_object`` rule, the masks that separate nothing
    (stages/discovery/no_object.py) are dropped last, each judged on its own; None keeps every mask.
    """
    affinity = binary_affinity(unit_keys(keys, center), tau, eps)
    masks: list[np.ndarray] = []
    for _ in range(n_masks):
        mask = cut_once(affinity, grid, solver)
        if masks and (mask_iou(mask, masks[-1]) > max_overlap or mask.mean() <= min_area):
            break
        masks.append(mask)
        isolate_nodes(affinity, torch.from_numpy(mask.reshape(-1)).to(affinity.device), tau, eps)
    disjoint = [m & ~np.any(masks[:i], axis=0) if i else m for i, m in enumerate(masks)]
    masks = [m for m in disjoint if m.any()]
    return masks if no_object is None else no_object.objects(masks)


@section
class MaskCutConfig:
    name: Literal["maskcut"]
    reference_backbone: str  # the paper's backbone, picked by backbone.arch=auto when its weights exist
    graph: dict[Family, GraphConfig]  # per backbone family: 'dino', 'dinov2'
    eps: float  # weight of the edges below tau
    n_masks: int  # cuts per image
    max_overlap: float  # drop a mask whose IoU with the previous one is above this
    min_area: float  # drop a mask covering at most this fraction of the image
    resize: int | None  # square side the image is resized to; None = keep the size, pad
    refine: str  # a refiner (stages/refinement/refine.py REFINERS): crf, bilateral, none
    no_object: float | None  # the no-object rule's max_cosine (stages/discovery/no_object.py); null = off
    solver: Literal["fast", "dense"]  # the generalized eigensolve (stages/discovery/ncut.py); dense = LAPACK

    def validate(self, key: str) -> None:
        validate_graphs(self.graph, f"{key}.graph")
        positive(f"{key}.eps", self.eps)
        positive(f"{key}.n_masks", self.n_masks)
        validate_image_settings(self, key)
        if not 0 <= self.max_overlap <= 1:
            fail(f"{key}.max_overlap", f"must be in [0, 1], got {self.max_overlap}")
        if not 0 <= self.min_area < 1:
            fail(f"{key}.min_area", f"must be in [0, 1), got {self.min_area}")


@METHODS.register("maskcut")
class MaskCut(ImageMethod):
    """MaskCut (Wang et al., CVPR 2023, CutLER): up to ``n_masks`` objects per image."""

    Config = MaskCutConfig

    def key_treatments(self) -> tuple[str, ...]:
        return tuple(g.keys for g in self.cfg.graph.values())

    def __call__(self, feats: PatchFeatures) -> list[np.ndarray]:
        c = self.cfg
        graph = c.graph[feats.family]
        keys, center = graph_keys(feats, graph.keys)
        return maskcut(
            keys,
            feats.grid,
            graph.tau,
            c.eps,
            center,
            c.n_masks,
            c.max_overlap,
            c.min_area,
            c.solver,
            no_object_rule(feats, c.no_object),
        )
