"""Deep Spectral Methods (Melas-Kyriazi et al., CVPR 2022): the eigenvectors of a Laplacian that joins
feature similarity with colour/position affinity of the image.

Affinity W = max(F F^T, 0) / max + lambda_knn * W_knn on the nodes of a grid at patch resolution (or finer:
the features are upsampled bilinearly), F the L2-normalised keys. W_knn links each node to its 20 nearest
neighbours in (r, g, b, 2 x, 2 y) and its 10 nearest in (r, g, b, 0.1 x, 0.1 y) (colours in [0, 1],
positions in [0, 1] across the image), both directions, weight 1 per link. The smallest non-trivial
generalized eigenvectors of (D - W) v = lambda D v give the segments (k-means on them; the segment that
touches the border most is the background); object localisation takes the Fiedler vector's positive side,
flipped when it is the larger one (the object is the smaller side), and boxes its largest component.

Defaults (the paper and its code, extract.py ``_extract_eig`` / object-localization): keys, normalised,
negatives zeroed; lambda_knn 10; nodes at patch resolution (downsample = patch size); 4 segments from
the non-trivial eigenvectors. Differs from the code: its colour affinity divides the colours by 255
twice (so colours barely count); here they are in [0, 1] as the paper describes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.spatial import cKDTree

from stages.common.masks import components, resize_masks
from stages.common.schema import fail, positive, section
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
from stages.discovery.ncut import Spectrum, smallest_eigenvectors
from stages.discovery.no_object import NoObjectRule
from stages.features.backbone import IMAGENET_MEAN

KNN_NEIGHBOURS = (20, 10)  # DSM's knn_affinity: neighbours at each of its two position scales
KNN_POSITION_WEIGHTS = (2.0, 0.1)  # weight of (x, y) against the colours at each scale


def knn_affinity(image: np.ndarray) -> torch.Tensor:
    """(h, w, 3) float image with colours in [0, 1] -> (h*w, h*w) float32 KNN affinity (DSM's colour and
    position term): 1 for each of a node's nearest neighbours in (r, g, b, s x, s y) at the two scales,
    added in both directions (so entries are 0, 1, 2, ...)."""
    h, w, _ = image.shape
    n = h * w
    ys, xs = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    colours = image.reshape(n, 3).astype(np.float64)
    out = torch.zeros(n, n)
    for k, weight in zip(KNN_NEIGHBOURS, KNN_POSITION_WEIGHTS, strict=True):
        points = np.column_stack([colours, weight * xs.ravel(), weight * ys.ravel()])
        _, neighbours = cKDTree(points).query(points, k=min(k, n))
        rows = torch.from_numpy(np.repeat(np.arange(n), neighbours.shape[1]))
        cols = torch.from_numpy(neighbours.reshape(-1).astype(np.int64))
        ones = torch.ones(rows.numel())
        out.index_put_((rows, cols), ones, accumulate=True)
        out.index_put_((cols, rows), ones, accumulate=True)
    return out


def node_grid(grid: tuple[int, int], patch: int, downsample: int) -> tuple[int, int]:
    """The (h', w') grid of graph nodes: the padded image (grid * patch pixels) divided by ``downsample``
    (= patch: one node per patch; patch / 2: four per patch)."""
    if downsample <= 0 or (grid[0] * patch) % downsample or (grid[1] * patch) % downsample:
        raise ValueError(
            f"downsample {downsample} must divide the padded image {grid[0] * patch}x{grid[1] * patch}"
        )
    return grid[0] * patch // downsample, grid[1] * patch // downsample


def node_image(image: np.ndarray, grid: tuple[int, int], patch: int, nodes: tuple[int, int]) -> np.ndarray:
    """The (H, W, 3) uint8 picture the network saw (before padding) -> (h', w', 3) float colours in
    [0, 1] of the graph nodes: padded like the network input (ImageNet mean colour, right and bottom) to
    grid * patch pixels, then resized bilinearly to the node grid."""
    height, width = grid[0] * patch, grid[1] * patch
    if image.shape[0] > height or image.shape[1] > width:
        raise ValueError(f"image {image.shape[:2]} is larger than the patch grid's {height}x{width}")
    padded = np.empty((height, width, 3), np.uint8)
    padded[:] = np.round(np.array(IMAGENET_MEAN) * 255).astype(np.uint8)
    padded[: image.shape[0], : image.shape[1]] = image
    small = Image.fromarray(padded).resize((nodes[1], nodes[0]), Image.BILINEAR)
    return np.asarray(small, np.float64) / 255.0


def spectral_affinity(
    keys: torch.Tensor,
    grid: tuple[int, int],
    nodes: tuple[int, int],
    colours: np.ndarray | None,
    lambda_knn: float,
) -> torch.Tensor:
    """DSM's affinity on the (h', w') node grid: max(F F^T, 0) / its max over the L2-normalised keys
    (upsampled bilinearly from the patch grid when the nodes are finer) + lambda_knn * ``knn_affinity`` of
    ``colours`` ((h', w', 3) in [0, 1]; None when lambda_knn is 0). Returns (n', n') float32."""
    feats = keys.float()
    if tuple(nodes) != tuple(grid):
        fmap = feats.T.reshape(1, feats.shape[1], *grid)
        fmap = F.interpolate(fmap, size=tuple(nodes), mode="bilinear", align_corners=False)
        feats = fmap.reshape(feats.shape[1], -1).T
    feats = F.normalize(feats, dim=1)
    affinity = (feats @ feats.T).clamp_(min=0)
    affinity /= affinity.max()
    if lambda_knn > 0:
        if colours is None:
            raise ValueError("lambda_knn > 0 needs the image's colours")
        affinity += lambda_knn * knn_affinity(colours).to(affinity.device)
    return affinity


def fiedler_foreground(vector: torch.Tensor, nodes: tuple[int, int]) -> np.ndarray:
    """DSM's object side of the Fiedler vector: v > 0, flipped when that covers more than half the nodes
    (the object is the smaller side), and the whole grid when nothing is positive."""
    positive = (vector > 0).cpu().numpy().reshape(nodes)
    if positive.mean() > 0.5 or not positive.any():
        positive = ~positive
    return positive


def spectral_segments(
    vectors: torch.Tensor, nodes: tuple[int, int], n_segments: int, seed: int
) -> np.ndarray:
    """(k, n') eigenvectors -> (h', w') int segment labels from k-means on the nodes' eigenvector
    coordinates (DSM's multi-region segmentation), relabelled so that 0 is the segment with the most
    border nodes (the background) and the others follow in order of size."""
    from sklearn.cluster import KMeans

    points = vectors.T.cpu().double().numpy()
    n_segments = min(n_segments, points.shape[0])
    labels = KMeans(n_clusters=n_segments, n_init=10, random_state=seed).fit_predict(points).reshape(nodes)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    background = int(np.bincount(border, minlength=n_segments).argmax())
    sizes = np.bincount(labels.ravel(), minlength=n_segments)
    others = sorted((s for s in range(n_segments) if s != background), key=lambda s: -sizes[s])
    order = [background, *others]
    return np.argsort(order)[labels]


@dataclass
class DeepSpectral:
    """What Deep Spectral Methods found in one image, on the node grid: the localisation foreground (the
    Fiedler vector's object side), the object (its largest 4-connected component: what CorLoc boxes),
    the segment labels (0 = background), and the spectrum."""

    foreground: np.ndarray
    object: np.ndarray
    segments: np.ndarray
    spectrum: Spectrum

    def objects(self) -> list[np.ndarray]:
        """The object first, then every other 4-connected component of the non-background segments with
        at least 2 nodes, by segment and size: DSM's multi-region masks as object candidates."""
        out = [self.object] if self.object.any() else []
        for label in range(1, int(self.segments.max()) + 1):
            out += [c for c in components(self.segments == label) if c.sum() >= 2]
        return out


def deep_spectral(
    keys: torch.Tensor,
    grid: tuple[int, int],
    image: np.ndarray | None,
    patch: int,
    lambda_knn: float,
    downsample: int,
    n_eigenvectors: int,
    n_segments: int,
    solver: str,
    seed: int = 0,
    no_object: NoObjectRule | None = None,
) -> DeepSpectral:
    """Deep Spectral Methods on one image.

    keys: (h*w, d) last-block keys (after any key treatment); image: the (H, W, 3) uint8 picture the
    network saw before padding (None only with lambda_knn 0); patch: the backbone's patch size; lambda_knn
    (10 in DSM): weight of the colour/position KNN affinity; downsample: pixels per graph node (patch: one
    node per patch, as DSM's default); n_eigenvectors: how many smallest non-trivial eigenvectors (>= 1);
    n_segments: k-means segments on them (DSM: 4); solver: 'fast' or 'dense' (stages/discovery/ncut.py). With
    a ``no_object`` rule (judged on the patch grid) an object that separates nothing is dropped: empty
    object and foreground, segments all background.
    """
    nodes = node_grid(grid, patch, downsample)
    if lambda_knn > 0 and image is None:
        raise ValueError("Deep Spectral Methods with lambda_knn > 0 needs the image")
    colours = node_image(image, grid, patch, nodes) if lambda_knn > 0 else None
    affinity = spectral_affinity(keys, grid, nodes, colours, lambda_knn)
    spectrum = smallest_eigenvectors(affinity, n_eigenvectors, solver)
    foreground = fiedler_foreground(spectrum.vectors[0], nodes)
    parts = components(foreground)
    obj = parts[0] if parts else np.zeros(nodes, bool)
    segments = spectral_segments(spectrum.vectors, nodes, n_segments, seed)
    if no_object is not None and not no_object.separates(resize_masks([obj], grid)[0]):
        empty = np.zeros(nodes, bool)
        return DeepSpectral(empty, empty, np.zeros(nodes, np.int64), spectrum)
    return DeepSpectral(foreground, obj, segments, spectrum)


@section
class DeepSpectralConfig:
    name: Literal["deep_spectral"]
    reference_backbone: str  # the paper's backbone, picked by backbone.arch=auto when its weights exist
    lambda_knn: float  # weight of the colour/position KNN affinity (DSM: 10)
    downsample: int | None  # pixels per graph node; None = the patch size (one node per patch, DSM's)
    n_eigenvectors: int  # smallest non-trivial eigenvectors
    n_segments: int  # k-means segments on them (DSM: 4)
    keys: dict[Family, KeyTreatment]  # key treatment per backbone family: 'dino', 'dinov2'
    no_object: float | None  # the no-object rule's max_cosine (stages/discovery/no_object.py); null = off
    resize: int | None  # square side the image is resized to; None = keep the size, pad
    refine: str  # a refiner (stages/refinement/refine.py REFINERS): crf, bilateral, none
    solver: Literal["fast", "dense"]  # the eigensolve (stages/discovery/ncut.py smallest_eigenvectors)

    def validate(self, key: str) -> None:
        if self.lambda_knn < 0:
            fail(f"{key}.lambda_knn", f"must be >= 0, got {self.lambda_knn}")
        if self.downsample is not None:
            positive(f"{key}.downsample", self.downsample)
        positive(f"{key}.n_eigenvectors", self.n_eigenvectors)
        positive(f"{key}.n_segments", self.n_segments)
        validate_families(self.keys, f"{key}.keys")
        validate_image_settings(self, key)


@METHODS.register("deep_spectral")
class DeepSpectralMethod(ImageMethod):
    """Deep Spectral Methods (Melas-Kyriazi et al., CVPR 2022): the object (the Fiedler vector's smaller
    side, largest component) first, then the components of the other non-background segments
    (``DeepSpectral.objects``). With nodes finer than patches (``downsample``), masks are brought back to
    the patch grid by nearest-neighbour resizing."""

    Config = DeepSpectralConfig
    needs = ("key_bias",)

    def __call__(self, feats: PatchFeatures) -> list[np.ndarray]:
        c = self.cfg
        result = deep_spectral(
            treated_keys(feats, c.keys[feats.family]),
            feats.grid,
            feats.image,
            feats.patch,
            c.lambda_knn,
            c.downsample or feats.patch,
            c.n_eigenvectors,
            c.n_segments,
            c.solver,
            no_object=no_object_rule(feats, c.no_object),
        )
        return resize_masks(result.objects(), feats.grid)
