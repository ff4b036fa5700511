"""Mean-field inference of the fully connected CRF (Krähenbühl & Koltun, "Efficient Inference in Fully
Connected CRFs with Gaussian Edge Potentials", NeurIPS 2011) in torch, on the device of its inputs.

The Gaussian filtering runs on a permutohedral lattice (Adams, Baek & Davis, "Fast High-Dimensional
Filtering Using the Permutohedral Lattice", Eurographics 2010): pixels are splatted onto the vertices of the
simplices that enclose their features, blurred with a [1/2, 1, 1/2] kernel along each of the d+1 lattice
directions, and sliced back. It follows pydensecrf (the reference, ``stages.refinement.refine.crf_refine``)
step by step: the same elevation, rounding, ranks and barycentric weights in float32, the same blur, the
filter's self-contribution included, symmetric normalisation D^-1/2 K D^-1/2 of every kernel, Potts
compatibility, and MAP with ties going to the background. Only the order of floating-point sums differs.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from stages.refinement.connected_components_torch import fill_holes

# pydensecrf.utils.unary_from_softmax clips probabilities at this before the log.
_UNARY_CLIP = 1e-5


class CrfParameters(Protocol):
    """The dense CRF's settings (``refine.crf`` in configs/defaults.yaml, SPEC "Refinement")."""

    iters: int
    gauss_sxy: float
    gauss_compat: float
    bilateral_sxy: float
    bilateral_srgb: float
    bilateral_compat: float


class PermutohedralLattice:
    """Splat / blur / slice of one set of features on the permutohedral lattice.

    Args:
        features: (N, d) float features, already divided by their standard deviations.
    Raises:
        ValueError: features are not (N, d) with N, d >= 1, or span too many lattice cells to index.
    """

    def __init__(self, features: torch.Tensor):
        if features.ndim != 2 or min(features.shape) < 1:
            raise ValueError(f"features must be (N, d) with N, d >= 1, got {tuple(features.shape)}")
        self.d = features.shape[1]
        # Coordinate-major (d+1, N) layout throughout: on a CPU, ops along N are far faster than along d.
        rem0, rank, barycentric = _enclosing_simplices(features.float().T.contiguous())
        codes, strides = _corner_codes(rem0, rank)
        vertex_codes, offsets = torch.unique(codes.reshape(-1), sorted=True, return_inverse=True)
        self.n_vertices = len(vertex_codes)
        self.offsets = offsets  # ((d+1) * N,) vertex of corner r of pixel i at r * N + i
        self.weights = barycentric  # (d+1, N)
        # pydensecrf's slice scale 1 / (1 + 2^-d); it cancels under symmetric normalisation but keeps
        # filter() an approximation of the Gaussian sum itself.
        self.slice_weights = barycentric * (1.0 / (1.0 + 2.0**-self.d))
        # The neighbours of a vertex along lattice direction j: +d on coordinate j and -1 on the others (n1),
        # or the opposite (n2); the implicit last coordinate follows. A missing one is the zero row.
        self.neighbours = []
        for j in range(self.d + 1):
            delta = sum((self.d if i == j else -1) * stride for i, stride in enumerate(strides))
            self.neighbours.append(_neighbour_pairs(vertex_codes, delta))

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """(C, N) float32 -> (C, N): approximately sum_j exp(-|f_i - f_j|^2 / 2) v_j (j = i included)."""
        c, n = values.shape
        lattice = values.new_zeros(c, self.n_vertices + 1)  # the last column stays zero: missing neighbours
        for k in range(c):  # one channel at a time: a 1-D index_add is the fast one
            lattice[k].index_add_(0, self.offsets, (self.weights * values[k]).reshape(-1))
        for n1, n2 in self.neighbours:
            lattice = lattice + 0.5 * (lattice.index_select(1, n1) + lattice.index_select(1, n2))
        corners = lattice.index_select(1, self.offsets).reshape(c, self.d + 1, n)
        return (self.slice_weights * corners).sum(1)


def _enclosing_simplices(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d, N) float32 features -> for the simplex enclosing each elevated feature: its remainder-0 corner
    (d+1, N) float32 (integer coordinates), the rank of each coordinate of the feature's offset from it
    (d+1, N) int64 (0 = largest), and the barycentric weights of its d+1 corners (d+1, N) float32.
    Float32 throughout, in pydensecrf's order of operations (Adams et al. 2010, section 3)."""
    d, n = features.shape
    dev = features.device
    # Elevation onto the plane x_0 + ... + x_d = 0, scaled so that the blur has unit standard deviation.
    inv_std = float(torch.tensor(math.sqrt(2.0 / 3.0) * (d + 1), dtype=torch.float32))
    scale = torch.tensor([1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std for i in range(d)], device=dev)
    cf = features * scale[:, None]
    elevated = torch.empty(d + 1, n, device=dev)
    total = torch.zeros(n, device=dev)
    for j in range(d, 0, -1):
        elevated[j] = total - j * cf[j - 1]
        total = total + cf[j - 1]
    elevated[0] = total
    # Nearest remainder-0 lattice point (coordinates multiples of d+1), ties to even as SSE rounding does.
    inv_d1 = torch.tensor(1.0 / (d + 1), dtype=torch.float32, device=dev)
    down = torch.round(elevated * inv_d1)
    rem0 = down * (d + 1)
    residual = elevated - rem0
    # pydensecrf compares each pair i < j once: r_i < r_j ranks i one lower (rank 0 = largest), else j.
    rank = torch.zeros(d + 1, n, dtype=torch.int64, device=dev)
    for i in range(d):
        for j in range(i + 1, d + 1):
            lower = residual[i] < residual[j]
            rank[i] += lower
            rank[j] += ~lower
    # Off the plane when the rounded coordinates do not sum to 0: shift ranks and corner back.
    rank += down.sum(0).long()
    wrap = (rank < 0).long() - (rank > d).long()
    rank += (d + 1) * wrap
    rem0 = rem0 + (d + 1) * wrap
    # Barycentric weights from the offsets sorted by rank: b_p = v_(rank d-p) - v_(rank d-p+1), wrapping.
    v = (elevated - rem0) * inv_d1
    by_rank = torch.empty_like(v).scatter_(0, d - rank, v)
    bary = torch.empty_like(v)
    bary[0] = by_rank[0] + (1.0 - by_rank[d])
    bary[1:] = by_rank[1:] - by_rank[:-1]
    return rem0, rank, bary


def _corner_codes(rem0: torch.Tensor, rank: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Remainder-0 corners and ranks (d+1, N) -> int64 codes (d+1, N) of the d+1 corners of each simplex,
    and the strides of the code's mixed radix (one per stored key coordinate).

    Corner r has key rem0 + r on the coordinates of rank <= d - r and rem0 + r - (d+1) on the others; the
    key's last coordinate is implied (they sum to 0), so d are stored. Each coordinate's range has room for
    the blur's +-d steps, so a neighbour's code is the vertex's code plus a constant and never aliases.
    """
    d = rem0.shape[0] - 1
    key0 = rem0[:d].long()
    low = key0.amin(1) - (2 * d + 1)
    extent = (key0.amax(1) + 2 * d - low + 1).tolist()
    if math.prod(extent) >= 2**62:
        raise ValueError(
            f"the features span {extent} lattice cells per axis, too many to index in 64 bits: "
            "use larger standard deviations"
        )
    strides = [math.prod(extent[:i]) for i in range(d)]
    stride = torch.tensor(strides, device=rem0.device)[:, None]
    base = ((key0 - low[:, None]) * stride).sum(0)
    codes = torch.empty(d + 1, rem0.shape[1], dtype=torch.int64, device=rem0.device)
    for r in range(d + 1):
        codes[r] = base + r * sum(strides) - (d + 1) * ((rank[:d] > d - r) * stride).sum(0)
    return codes, strides


def _neighbour_pairs(codes: torch.Tensor, delta: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For sorted vertex ``codes`` (M,): the index of the vertex at code + delta and at code - delta, each
    (M+1,), with M (the zero row appended to the lattice) where there is none and for the zero row itself."""
    m = len(codes)
    if codes.device.type == "cpu":  # numpy's search narrows its range for sorted queries: ~2x torch's here
        found = torch.from_numpy(np.searchsorted(codes.numpy(), codes.numpy() + delta)).clamp_(max=m - 1)
    else:
        found = torch.searchsorted(codes, codes + delta).clamp_(max=m - 1)
    has = codes[found] == codes + delta
    up = torch.full((m + 1,), m, dtype=torch.int64, device=codes.device)
    up[:m] = torch.where(has, found, m)
    # The same pairs read the other way round: no second search.
    down = torch.full_like(up, m)
    down[found[has]] = torch.nonzero(has)[:, 0]
    return up, down


@dataclass
class NormalizedKernel:
    """One pairwise term: its lattice, pydensecrf's symmetric normalisation 1/sqrt(K 1) (N,), and the Potts
    weight (the term's ``compat``)."""

    lattice: PermutohedralLattice
    norm: torch.Tensor
    weight: float

    @classmethod
    def build(cls, features: torch.Tensor, weight: float) -> NormalizedKernel:
        lattice = PermutohedralLattice(features)
        ones = torch.ones(1, features.shape[0], device=features.device)
        norm = torch.rsqrt(lattice.filter(ones)[0] + 1e-20)
        return cls(lattice, norm, weight)

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        """D^-1/2 K D^-1/2 values, (C, N) -> (C, N)."""
        return self.norm * self.lattice.filter(self.norm * values)


def _positions(h: int, w: int, device: torch.device) -> torch.Tensor:
    """(H*W, 2) float32 pixel coordinates (x, y), row-major."""
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float32, device=device),
        torch.arange(w, dtype=torch.float32, device=device),
        indexing="ij",
    )
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], 1)


@functools.lru_cache(maxsize=4)
def _gaussian_kernel(h: int, w: int, sxy: float, compat: float, device: torch.device) -> NormalizedKernel:
    # Positions only: one lattice per image size, reused by every image of that size (MaskCut resizes all
    # to one). Read-only once built.
    # Divisions in float32 as pydensecrf does (i / sx with a float sx).
    return NormalizedKernel.build(_positions(h, w, device) / torch.tensor(sxy, dtype=torch.float32), compat)


def crf_kernels(image: torch.Tensor, params: CrfParameters) -> list[NormalizedKernel]:
    """The two pairwise terms of pydensecrf's DenseCRF2D for an (H, W, 3) uint8 image: the Gaussian on
    pixel positions (x/gauss_sxy, y/gauss_sxy) and the bilateral on positions and colour (x/bilateral_sxy,
    y/bilateral_sxy, r/srgb, g/srgb, b/srgb), in that order, on the image's device."""
    h, w, _ = image.shape
    dev = image.device
    colour = image.reshape(-1, 3).float()
    bilateral = torch.cat(
        [
            _positions(h, w, dev) / torch.tensor(params.bilateral_sxy, dtype=torch.float32),
            colour / torch.tensor(params.bilateral_srgb, dtype=torch.float32),
        ],
        1,
    )
    return [
        _gaussian_kernel(h, w, float(params.gauss_sxy), float(params.gauss_compat), dev),
        NormalizedKernel.build(bilateral, params.bilateral_compat),
    ]


def mask_unary(masks: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool masks -> (B, H*W) float32 unary logit of foreground over background.

    As in MaskCut (and ``crf_refine``), the mask m gives the logits {bg: 1 - m, fg: m}, their softmax the
    probabilities (0.73 for the mask's label) and pydensecrf's ``unary_from_softmax`` the energies
    -log(max(p, 1e-5)); the returned value is U_bg - U_fg (+-1 up to rounding).
    """
    fg = masks.reshape(masks.shape[0], -1).float()
    logits = torch.stack([1.0 - fg, fg])
    energy = -torch.log(torch.softmax(logits, 0).clamp(min=_UNARY_CLIP))
    return energy[0] - energy[1]


def mean_field(unary: torch.Tensor, kernels: list[NormalizedKernel], iters: int) -> torch.Tensor:
    """Mean-field inference of a two-label fully connected CRF with Potts pairwise terms.

    With two labels pydensecrf's update Q_l <- softmax_l(-U_l + sum_k w_k K_k Q_l) depends only on the
    difference of the two labels' inputs, so one channel per mask is filtered: with q = Q_fg,
    K_k Q_bg = K_k 1 - K_k q.

    Args:
        unary: (B, N) U_bg - U_fg per mask and pixel.
        kernels: normalised pairwise terms of the image.
        iters: mean-field iterations (0 gives the unary's own labelling).
    Returns:
        (B, N) float32 logit of foreground over background after ``iters`` updates.
    """
    constant = unary.clone()
    ones = torch.ones(1, unary.shape[1], device=unary.device)
    for kernel in kernels:
        constant -= kernel.weight * kernel(ones)
    logit = unary
    for _ in range(iters):
        q = torch.sigmoid(logit)
        logit = constant.clone()
        for kernel in kernels:
            logit += 2.0 * kernel.weight * kernel(q)
    return logit


def crf_refine(image: torch.Tensor, masks: torch.Tensor, params: CrfParameters) -> torch.Tensor:
    """Dense-CRF refinement of several binary masks of one image, as ``stages.refinement.refine.crf_refine``
    does for one: mean-field inference from the masks' weak softmax unary, MAP, holes filled.

    Args:
        image: (H, W, 3) uint8 RGB.
        masks: (B, H, W) bool coarse masks, on the image's device.
        params: iterations and the Gaussian / bilateral pairwise parameters (SPEC "Refinement").
    Returns:
        (B, H, W) bool refined masks on the image's device.
    Raises:
        ValueError: shapes, dtypes or devices do not match.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != torch.uint8:
        raise ValueError(f"image must be HxWx3 uint8 RGB, got shape {tuple(image.shape)} dtype {image.dtype}")
    if masks.ndim != 3 or masks.dtype != torch.bool or masks.shape[1:] != image.shape[:2]:
        raise ValueError(
            f"masks must be (B, H, W) bool with the image's size {tuple(image.shape[:2])}, "
            f"got shape {tuple(masks.shape)} dtype {masks.dtype}"
        )
    if masks.device != image.device:
        raise ValueError(f"masks are on {masks.device}, the image on {image.device}")
    if masks.shape[0] == 0:
        return masks.clone()
    logit = mean_field(mask_unary(masks), crf_kernels(image, params), params.iters)
    # pydensecrf's MAP takes the first label on ties: foreground only when strictly more likely.
    labels = (logit > 0).reshape(masks.shape)
    return fill_holes(labels)
