"""VoteCut (CuVLER, Arica et al., CVPR 2024): candidate masks from several feature sources, clustered by
IoU; a cluster's members vote for its mask, and the number of votes is the mask's object score.

Candidates. For each source (a backbone, a key treatment, a scale, ...) each normalized-cut eigenvector is
split by k-means into K = 2 and K = 3 groups of patches (1-D, on the vector's values); a group that holds
2 or more grid corners is background; the others are cut into 4-connected components, a group of more
than 30 components is noise, and a component whose box is under 5 patches both wide and high is dropped.
Masks from other methods (MaskCut's, FOUND's) can be added as they are: every candidate is a vote.

Voting. Candidates are resized to one grid (nearest) and clustered greedily: the candidate agreeing
(IoU > 0.6) with most others is the first pivot; its cluster is every candidate agreeing with it; the
pivot moves to the member with the largest summed IoU with the cluster and the cluster grows around it,
up to 5 times; the next pivot is the next candidate not yet in a cluster. A cluster's mask is the patches
that more than tau_m = 20% of its members cover; its votes are its members, its score the votes divided by
the best cluster's votes in the image (CuVLER's soft target for the detector); at most 10 masks, most
votes first.

Defaults: CuVLER's code (votecut/votecut.py, create_pseudo_masks.py): K in (2, 3), IoU 0.6, 5 pivot
moves, tau_m 0.2, 10 masks, min box 5 patches, 30 components. One addition: ``min_votes`` (2 here; the
code keeps single-candidate clusters too, with a low score): a mask is kept only when at least that many
candidates agree on it, which is what drops a candidate no other source supports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from stages.common.masks import pairwise_iou, resize_masks
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
from stages.discovery.ncut import binary_affinity, smallest_eigenvectors
from stages.discovery.no_object import NoObjectRule


@dataclass
class VotedMask:
    """A voted mask on the common grid, (h, w) bool; ``votes``: candidates in its cluster; ``score``:
    votes / the image's largest votes, in (0, 1] (CuVLER's per-mask object score)."""

    mask: np.ndarray
    votes: int
    score: float


def kmeans_groups(values: np.ndarray, k: int, seed: int) -> np.ndarray:
    """(n,) values -> (n,) int labels of k-means with k clusters (scikit-learn, 10 starts)."""
    from sklearn.cluster import KMeans

    k = min(k, len(np.unique(values)))
    if k < 2:
        return np.zeros(len(values), np.int64)
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(
        values.reshape(-1, 1).astype(np.float64)
    )


def eigenvector_candidates(
    vectors: torch.Tensor,
    grid: tuple[int, int],
    ks: tuple[int, ...],
    min_box: int,
    max_components: int,
    seed: int = 0,
) -> list[np.ndarray]:
    """CuVLER's candidates from one source: (k, h*w) eigenvectors -> (h, w) bool masks (see the module
    docstring); ks: k-means cluster counts (2, 3); min_box: a component is kept when its box is at least
    this many patches wide or high (5); max_components: a group splitting into more is dropped (30)."""
    from scipy import ndimage

    out = []
    for vector in vectors.detach().cpu().double().numpy():
        for k in ks:
            labels = kmeans_groups(vector, k, seed).reshape(grid)
            for label in np.unique(labels):
                group = labels == label
                if int(group[0, 0]) + int(group[0, -1]) + int(group[-1, 0]) + int(group[-1, -1]) >= 2:
                    continue  # background
                parts, count = ndimage.label(group)
                if count > max_components:
                    continue
                for part in range(1, count + 1):
                    mask = parts == part
                    ys, xs = np.nonzero(mask)
                    if xs.max() - xs.min() + 1 < min_box and ys.max() - ys.min() + 1 < min_box:
                        continue
                    out.append(mask)
    return out


def iou_clusters(iou: np.ndarray, threshold: float, pivot_moves: int) -> list[tuple[int, list[int]]]:
    """CuVLER's greedy IoU clustering of m candidates given their (m, m) IoU matrix. Returns (pivot,
    members) per cluster, in creation order; members exclude candidates already in an earlier cluster."""
    agree = iou > threshold
    order = np.argsort(-agree.sum(axis=1), kind="stable")  # most agreed-with first (ties: lower index)
    used: set[int] = set()
    clusters = []
    for start in order.tolist():
        if start in used:
            continue
        pivot, members = start, {start}
        for _ in range(pivot_moves):
            grown = members | set(np.nonzero(agree[pivot])[0].tolist())
            if len(grown) == len(members):
                break
            members = grown
            index = sorted(members)
            pivot = index[int(np.argmax(iou[np.ix_(index, index)].sum(axis=1)))]
        if pivot not in used:
            clusters.append((pivot, sorted(members - used)))
        used |= members
    return clusters


def votecut(
    candidates: list[np.ndarray],
    grid: tuple[int, int],
    iou_threshold: float,
    pivot_moves: int,
    tau_m: float,
    max_masks: int,
    min_votes: int,
    no_object: NoObjectRule | None = None,
) -> list[VotedMask]:
    """VoteCut's voting on one image: candidate (h_i, w_i) bool masks from any sources -> up to
    ``max_masks`` voted masks on ``grid``, most votes first, each with at least ``min_votes`` votes.

    iou_threshold: candidates agree above this IoU (0.6); pivot_moves: pivot refinements (5); tau_m: a
    patch is in a cluster's mask when more than this fraction of its members cover it (0.2). With a
    ``no_object`` rule (on ``grid``), voted masks that separate nothing are dropped. Scores are votes over
    the largest votes among the masks returned.
    """
    masks = [m for m in resize_masks(candidates, grid) if m.any()]
    if not masks:
        return []
    stack = torch.from_numpy(np.stack(masks))
    iou = pairwise_iou(stack).numpy()
    voted = []
    for _, members in iou_clusters(iou, iou_threshold, pivot_moves):
        if len(members) < min_votes:
            continue
        mask = stack[members].float().mean(dim=0).numpy() > tau_m
        if mask.any() and (no_object is None or no_object.separates(mask)):
            voted.append((mask, len(members)))
        if len(voted) == max_masks:
            break
    voted.sort(key=lambda item: -item[1])  # stable: equal votes keep creation order
    best = voted[0][1] if voted else 1
    return [VotedMask(mask, votes, votes / best) for mask, votes in voted]


# ----------------------------------------------------------------------------------------------------------
# The registered method: its sources are normalized-cut graphs on the same backbone features


@section
class VoteSource:
    """One candidate source: the binary key graph (tau, eps as MaskCut's) of the keys after a treatment."""

    keys: KeyTreatment
    tau: float

    def validate(self, key: str) -> None:
        if not -1.0 <= self.tau < 1.0:
            fail(f"{key}.tau", f"must be in [-1, 1), got {self.tau}")


@section
class VoteCutConfig:
    name: Literal["votecut"]
    reference_backbone: str  # the backbone picked by backbone.arch=auto when its weights exist
    sources: dict[Family, list[VoteSource]]  # per backbone family ('dino', 'dinov2'): the graphs that vote
    eigenvectors: int  # smallest non-trivial eigenvectors per source ('num_eig_vecs')
    eps: float  # weight of the edges below tau
    ks: list[int]  # k-means groups per eigenvector (CuVLER: 2, 3)
    min_box: int  # candidate components under this many patches both wide and high are dropped (5)
    max_components: int  # a group of more components is noise (30)
    iou_threshold: float  # candidates agree above this IoU (0.6)
    pivot_moves: int  # pivot refinements (5)
    tau_m: float  # a patch is in a cluster's mask when more than this share of members cover it (0.2)
    max_masks: int  # voted masks per image (10)
    min_votes: int  # ours: a mask needs this many agreeing candidates
    no_object: float | None  # the no-object rule's max_cosine (stages/discovery/no_object.py); null = off
    resize: int | None  # square side the image is resized to; None = keep the size, pad
    refine: str  # a refiner (stages/refinement/refine.py REFINERS): crf, bilateral, none
    solver: Literal["fast", "dense"]  # the eigensolve (stages/discovery/ncut.py smallest_eigenvectors)

    def validate(self, key: str) -> None:
        validate_families(self.sources, f"{key}.sources")
        for family, sources in self.sources.items():
            if not sources:
                fail(f"{key}.sources.{family}", "needs at least one source")
            for i, source in enumerate(sources):
                source.validate(f"{key}.sources.{family}.{i}")
        for name in ("eigenvectors", "eps", "min_box", "max_components", "max_masks", "min_votes"):
            positive(f"{key}.{name}", getattr(self, name))
        if not self.ks or any(k < 2 for k in self.ks):
            fail(f"{key}.ks", f"must be a non-empty list of integers >= 2, got {self.ks}")
        if self.pivot_moves < 0:
            fail(f"{key}.pivot_moves", f"must be >= 0, got {self.pivot_moves}")
        for name in ("iou_threshold", "tau_m"):
            if not 0 <= getattr(self, name) < 1:
                fail(f"{key}.{name}", f"must be in [0, 1), got {getattr(self, name)}")
        self._check_min_votes_reachable(key)
        validate_image_settings(self, key)

    def _check_min_votes_reachable(self, key: str) -> None:
        # Candidates of one k-means split are disjoint, so at an IoU threshold >= 0.5 each split gives an
        # object one vote at most: a min_votes above the splits a family has would drop every mask, silently.
        if self.iou_threshold < 0.5:
            return
        for family, sources in self.sources.items():
            splits = len(sources) * self.eigenvectors * len(self.ks)
            if self.min_votes > splits:
                fail(
                    f"{key}.min_votes",
                    f"{self.min_votes} votes can never be reached with the {family} sources: they give an "
                    f"object {splits} at most ({len(sources)} sources x {self.eigenvectors} eigenvectors x "
                    f"{len(self.ks)} ks)",
                )


@METHODS.register("votecut")
class VoteCut(ImageMethod):
    """VoteCut (CuVLER, Arica et al., CVPR 2024) on one backbone's features: every source of
    ``sources[family]`` (a key treatment and a graph threshold) gives its eigenvectors' candidates; the
    voted masks come back most votes first with their score (votes / the image's most votes), which the
    pseudo-labels carry as the annotation's ``score`` (CuVLER's soft target)."""

    Config = VoteCutConfig
    needs = ("key_bias",)

    def candidates(self, feats: PatchFeatures) -> list[np.ndarray]:
        """Every source's candidate (h, w) bool masks, source by source."""
        c = self.cfg
        out: list[np.ndarray] = []
        for source in c.sources[feats.family]:
            unit = F.normalize(treated_keys(feats, source.keys), dim=1)
            affinity = binary_affinity(unit, source.tau, c.eps)
            vectors = smallest_eigenvectors(affinity, c.eigenvectors, c.solver).vectors
            out += eigenvector_candidates(vectors, feats.grid, tuple(c.ks), c.min_box, c.max_components)
        return out

    def __call__(self, feats: PatchFeatures) -> list[ScoredMask]:
        c = self.cfg
        voted = votecut(
            self.candidates(feats),
            feats.grid,
            c.iou_threshold,
            c.pivot_moves,
            c.tau_m,
            c.max_masks,
            c.min_votes,
            no_object_rule(feats, c.no_object),
        )
        return [ScoredMask(v.mask, v.score) for v in voted]
