"""Power iteration clustering (PIC; Lin and Cohen, ICML 2010) on torch, and the spectral initialisation of
ssl-vos (Ponimatkin, Samet et al., "A Simple and Powerful Global Optimization for Unsupervised Video Object
Segmentation", WACV 2023): one foreground vector per frame, without an eigendecomposition.

PIC. Spectral clustering of a graph A (n x n, symmetric, positive degrees d) reads its clusters off the
leading non-trivial eigenvectors of the random walk W = D^-1 A. W's leading eigenvector is the constant one
(eigenvalue 1), and W is D-symmetric, so d^T x is conserved by x -> W x. PIC iterates v <- W v / |W v|_1
from v0 = d / sum(d) and stops when the "acceleration" |delta_t - delta_(t-1)|_inf, delta_t = v_t - v_(t-1),
is below a tolerance (Lin and Cohen's 1e-5 / n): the fast-decaying eigenvectors have died out, the slow
ones that carry the clusters remain. Here the trivial component is removed exactly (in the D-inner
product, x - (d^T x / sum d) 1) from the start vector and again after each product to clear rounding: the
partition of the vector is unchanged by that (v and v - c 1 split alike, at the mean or by 2-means), but the
vector keeps full float32 precision where plain PIC lets the constant swamp it, and it converges to the
dense second eigenvector (the Fiedler vector of stages/discovery/ncut.py) when the eigenvalue gap allows. A
step is one product A x per graph, batched over frames, on the affinity's device (CPU or GPU, same code).

Graph of a frame (the public ssl-vos code, generate_pic_eigenvectors.py). Cosine similarity of the patches'
last-block keys plus ``flow_weight`` times the cosine similarity of their forward and of their backward
optical flow vectors (flow direction per patch), divided by 1 + 2 flow_weight; entries at or below ``tau``
become ``eps`` (a weighted graph: the similarity is kept above the threshold, ``ncut.weighted_affinity``).
The first frame has no backward flow and the last no forward flow: the other one stands in, as there.

Foreground. The vector is split at its mean (the normalized-cut bipartition) and the smaller side is the
object (the public code's rule, extract_masks.py, which splits its final soft masks by k-means with k = 2
and takes the cluster with fewer pixels; ``foreground(..., 'two_means')`` is that split). On the PIC vector
itself the mean split is the better one: 2-means cuts its long-tailed object side too high (on the tests'
planted maps, object IoU 0.82-0.98 against 0.94-1.0). Neither depends on the vector's sign.

Video graph. The paper's graph of a whole video is block tri-diagonal: diagonal blocks A_p (the frames'
graphs), off-diagonal blocks linking frame p to p-1 and p+1 through the optical flow. The paper does not
solve it: it runs PIC on every frame alone (the diagonal blocks) and enforces the off-diagonal links by the
global optimisation (stages/video/flow_consistency.py). That is ``coupling = 0`` here, the default.
``coupling`` > 0 runs PIC on the tri-diagonal graph itself, matrix-free: the off-diagonal block of frames p,
p+1 is the bilinear flow correspondence 0.5 (S(F_p) + S(B_p)^T) (S: ``optical_flow.sampling_matrix``; F_p the
flow p -> p+1, B_p the flow p+1 -> p), scaled by ``coupling`` times the frames' mean degree, so that coupling
= 1 gives a patch's link to its flow correspondent the weight of all its in-frame links together.

Memory. The frame graphs exist for ``window`` frames at a time (window * n^2 floats); with coupling the
windows overlap by ``overlap`` frames and each frame's vector is taken from the window it is most central in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from stages.discovery.ncut import unit_keys, weighted_affinity
from stages.video.optical_flow import sampling_matrix


@dataclass(frozen=True)
class SpectralInitParams:
    """Settings of the spectral initialisation; defaults from the public ssl-vos code
    (generate_pic_eigenvectors.py, its DAVIS / SegTrack-v2 / FBMS-59 runs) unless said otherwise."""

    tau: float = 0.3  # --beta: similarities at or below it become eps
    eps: float = 1e-6  # weight of the removed edges (np.where(A - beta > 0, A, 1e-6))
    flow_weight: float = 0.1  # --flow-weight, on each of the forward and backward flow similarities
    center: bool = False  # subtract each frame's mean key (DINO keys: no, as in the paper; DINOv2: yes)
    tol: float = 1e-5  # PIC stops at acceleration <= tol / n (Lin and Cohen's 1e-5 / n)
    max_steps: int = 1000  # a cap the paper does not have (it iterates until the tolerance is met)
    coupling: float = 0.0  # tri-diagonal video graph weight; 0 = the paper's per-frame PIC
    window: int = 8  # frames whose graphs are held at once (memory: window * n^2 floats)
    overlap: int = 2  # frames shared by consecutive windows when coupling > 0


@dataclass
class PowerIteration:
    """PIC's result per graph: (B, n) vectors (trivial component removed, |v|_1 = 1), (B,) steps taken and
    (B,) whether the acceleration met the tolerance before the step cap."""

    vectors: torch.Tensor
    steps: torch.Tensor
    converged: torch.Tensor


def power_iteration(
    product: Callable[[torch.Tensor], torch.Tensor], degree: torch.Tensor, tol: float, max_steps: int
) -> PowerIteration:
    """PIC of B graphs of n nodes given matrix-free: ``product(x)`` = A x for (B, n) x, ``degree`` (B, n) the
    row sums of A (all positive). Stops each graph when its acceleration is <= ``tol`` / n, or after
    ``max_steps`` steps. Raises ValueError when a degree is not positive."""
    if not bool((degree > 0).all()):
        raise ValueError("power iteration needs positive degrees: a node has none")
    n = degree.shape[1]
    volume = degree.sum(dim=1, keepdim=True)

    def deflate(x: torch.Tensor) -> torch.Tensor:  # remove the constant eigenvector in the D-inner product
        return x - (degree * x).sum(dim=1, keepdim=True) / volume

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / x.abs().sum(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)

    vector = deflate(degree / volume)  # |degree / volume|_1 = 1
    # Equal degrees leave nothing (or rounding) after deflation: those graphs start from a fixed
    # pseudo-random vector, the same on every device.
    flat = vector.abs().sum(dim=1) < 1e-6
    vector = unit(vector)
    if bool(flat.any()):
        noise = torch.rand(degree.shape, generator=torch.Generator().manual_seed(0), dtype=degree.dtype)
        vector = torch.where(flat[:, None], unit(deflate(noise.to(degree.device) - 0.5)), vector)
    delta = torch.zeros_like(vector)
    active = torch.ones(degree.shape[0], dtype=torch.bool, device=degree.device)
    steps = torch.zeros(degree.shape[0], dtype=torch.long, device=degree.device)
    for step in range(max_steps):
        following = unit(deflate(product(vector) / degree))
        change = following - vector
        acceleration = (change - delta).abs().amax(dim=1)
        keep = active[:, None]
        vector = torch.where(keep, following, vector)
        delta = torch.where(keep, change, delta)
        steps += active
        if step > 0:  # the first step has no previous change to compare with
            active &= acceleration * n > tol
        if not bool(active.any()):
            break
    return PowerIteration(vector, steps, ~active)


def dense_power_iteration(affinity: torch.Tensor, tol: float = 1e-5, max_steps: int = 1000) -> PowerIteration:
    """PIC of (B, n, n) or (n, n) dense symmetric affinities (positive row sums); see ``power_iteration``.
    An (n, n) input gives a batch of one."""
    a = affinity if affinity.dim() == 3 else affinity[None]
    return power_iteration(lambda x: torch.bmm(a, x[..., None])[..., 0], a.sum(dim=2), tol, max_steps)


def two_means(values: torch.Tensor) -> torch.Tensor:
    """Exact 1-D k-means with k = 2 of each row of (B, n) values (n >= 2): -> (B, n) bool, True on the
    cluster of the higher values. In 1-D the optimal clusters are the two sides of a split of the sorted
    values, so every split is scored (within-cluster sum of squares, float64 prefix sums)."""
    ordered, order = values.double().sort(dim=1, stable=True)
    n = values.shape[1]
    count = torch.arange(1, n, device=values.device, dtype=torch.float64)
    first, second = ordered.cumsum(dim=1), (ordered * ordered).cumsum(dim=1)
    s1, s2 = first[:, :-1], second[:, :-1]  # sums over the lowest k values, k = 1 .. n-1
    t1, t2 = first[:, -1:], second[:, -1:]
    low = s2 - s1 * s1 / count
    high = (t2 - s2) - (t1 - s1) ** 2 / (n - count)
    split = (low + high).argmin(dim=1)  # the lowest split + 1 values form the low cluster
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=values.device).expand_as(order))
    return ranks > split[:, None]


SPLITS = ("mean", "two_means")


def foreground(vectors: torch.Tensor, split: str = "mean") -> torch.Tensor:
    """(B, n) spectral vectors or soft masks -> (B, n) bool foreground: the values are split in two, at each
    row's mean ('mean': the normalized-cut bipartition of TokenCut, ``ncut.bipartition``) or by exact 1-D
    2-means ('two_means': the public ssl-vos code's split of its final soft masks, extract_masks.py), and the
    smaller side is the object (the public code's rule; the high side when both are of equal size). The
    result does not depend on the vectors' sign. Raises ValueError on an unknown ``split``."""
    if split == "mean":
        high = vectors > vectors.mean(dim=1, keepdim=True)
    elif split == "two_means":
        high = two_means(vectors)
    else:
        raise ValueError(f"unknown split '{split}'; choose from {SPLITS}")
    smaller_is_high = high.sum(dim=1) <= (~high).sum(dim=1)
    return torch.where(smaller_is_high[:, None], high, ~high)


def soft_masks(vectors: torch.Tensor) -> torch.Tensor:
    """(B, n) spectral vectors -> (B, n) float32 in [0, 1], the foreground side (``foreground``, mean split)
    high: the vector, negated when the object is its low side, min-max scaled per row (the starting point
    of the flow-consistent optimisation; the public code flips the PIC vector the same way before it)."""
    fg = foreground(vectors)
    high_mean = (vectors * fg).sum(dim=1) / fg.sum(dim=1).clamp_min(1)
    low_mean = (vectors * ~fg).sum(dim=1) / (~fg).sum(dim=1).clamp_min(1)
    oriented = torch.where((high_mean >= low_mean)[:, None], vectors, -vectors).float()
    low, high = oriented.aminmax(dim=1, keepdim=True)
    return (oriented - low) / (high - low).clamp_min(torch.finfo(torch.float32).tiny)


def frame_flows(
    forward: torch.Tensor | None, backward: torch.Tensor | None, frames: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-frame motion features from (T-1, h, w, 2) forward (p -> p+1) and backward (p+1 -> p) flows at the
    patch grid: (T, h*w, 2) forward and (T, h*w, 2) backward flow of each frame, the first frame's missing
    backward flow replaced by its forward one and the last frame's forward by its backward one (as the
    public code does). None when there is no flow (a single frame, or flows not given)."""
    if forward is None or backward is None or frames < 2:
        return None
    if forward.shape[0] != frames - 1 or backward.shape != forward.shape:
        raise ValueError(
            f"{frames} frames need (T-1, h, w, 2) forward and backward flows, got "
            f"{tuple(forward.shape)} and {tuple(backward.shape)}"
        )
    fwd, bwd = forward.flatten(1, 2).float(), backward.flatten(1, 2).float()
    own_forward = torch.cat((fwd, bwd[-1:]))  # frame p: flow p -> p+1; the last frame: p -> p-1
    own_backward = torch.cat((fwd[:1], bwd))  # frame p: flow p -> p-1; the first frame: p -> p+1
    return own_forward, own_backward


def frame_affinity(
    keys: torch.Tensor, motion: tuple[torch.Tensor, torch.Tensor] | None, params: SpectralInitParams
) -> torch.Tensor:
    """(B, n, d) keys and optional per-frame ((B, n, 2) forward, (B, n, 2) backward) flows -> (B, n, n)
    weighted graphs: (cos keys + w cos forward + w cos backward) / (1 + 2 w), entries <= tau set to eps.
    One batched product of [keys, sqrt(w) forward, sqrt(w) backward] (unit rows each) with itself."""
    parts = [unit_keys(keys, params.center)]
    scale = 1.0
    if motion is not None and params.flow_weight > 0:
        root = params.flow_weight**0.5
        parts += [root * unit_keys(flow, False) for flow in motion]
        scale += 2 * params.flow_weight
    feats = torch.cat(parts, dim=2)
    similarity = torch.bmm(feats, feats.transpose(1, 2)).div_(scale)
    return weighted_affinity(similarity, params.tau, params.eps)


def spectral_vectors(
    keys: torch.Tensor,
    forward: torch.Tensor | None,
    backward: torch.Tensor | None,
    params: SpectralInitParams,
) -> PowerIteration:
    """The per-frame PIC vectors of a video: (T, n, d) keys of the frames' patches (n = h*w, row-major;
    CLS removed) and optional (T-1, h, w, 2) forward / backward flows at the patch grid in patch units ->
    ``PowerIteration`` with (T, n) vectors. Works on the keys' device; graphs exist for ``params.window``
    frames at a time. With ``params.coupling`` > 0 (needs flows) PIC runs on each window's tri-diagonal
    video graph instead of on each frame alone (module docstring)."""
    frames, n = keys.shape[:2]
    motion = frame_flows(forward, backward, frames)
    if params.coupling > 0 and motion is None:
        raise ValueError("coupling > 0 needs the forward and backward flows")
    results = []
    overlap = params.overlap if params.coupling > 0 else 0  # frames alone need no shared frames
    for start, stop, keep_from, keep_to in frame_windows(frames, params.window, overlap):
        window_motion = None if motion is None else (motion[0][start:stop], motion[1][start:stop])
        affinity = frame_affinity(keys[start:stop], window_motion, params)
        if params.coupling > 0 and stop - start > 1:
            result = _coupled_pic(affinity, forward[start : stop - 1], backward[start : stop - 1], params)
        else:
            result = dense_power_iteration(affinity, params.tol, params.max_steps)
        keep = slice(keep_from - start, keep_to - start)
        results.append(PowerIteration(result.vectors[keep], result.steps[keep], result.converged[keep]))
    return PowerIteration(
        *(torch.cat([getattr(r, f) for r in results]) for f in ("vectors", "steps", "converged"))
    )


def frame_windows(frames: int, window: int, overlap: int):
    """Windows over T frames, ``window`` long, consecutive ones sharing ``overlap`` frames (0 <= overlap <
    window): yields (start, stop, keep_from, keep_to), frames [start, stop) solved together and frames
    [keep_from, keep_to) of them kept, each frame from the window it is most central in (with overlap >= 2
    every kept frame but the video's first and last has a neighbour on each side in its window)."""
    if not 0 <= overlap < window:
        raise ValueError(f"bad frame window {window} with overlap {overlap}: need 0 <= overlap < window")
    start = 0
    while True:
        stop = min(start + window, frames)
        keep_from = 0 if start == 0 else start + overlap // 2
        keep_to = frames if stop == frames else stop - (overlap - overlap // 2)
        yield start, stop, keep_from, keep_to
        if stop == frames:
            return
        start += window - overlap


def _coupled_pic(
    affinity: torch.Tensor, forward: torch.Tensor, backward: torch.Tensor, params: SpectralInitParams
) -> PowerIteration:
    """PIC on the tri-diagonal graph of a window: (W, n, n) frame graphs, (W-1, h, w, 2) flows between its
    frames; one graph of W n nodes, returned as W rows of n entries (one vector, cut in frames)."""
    frames, n = affinity.shape[:2]
    degree = affinity.sum(dim=2)
    links = _links(forward, backward, n, params.coupling * float(degree.mean()))
    total = degree.flatten() + torch.sparse.sum(links, dim=1).to_dense()

    def product(x: torch.Tensor) -> torch.Tensor:
        own = torch.bmm(affinity, x.reshape(frames, n, 1)).flatten()
        return (own + torch.sparse.mm(links, x.reshape(-1, 1)).flatten())[None]

    result = power_iteration(product, total[None], params.tol, params.max_steps)
    return PowerIteration(
        result.vectors.reshape(frames, n),
        result.steps.expand(frames),
        result.converged.expand(frames),
    )


def _links(forward: torch.Tensor, backward: torch.Tensor, n: int, weight: float) -> torch.Tensor:
    """The off-diagonal blocks of a window's video graph as one sparse (W n, W n) matrix: block (p, p+1) is
    weight * 0.5 (S(F_p) + S(B_p)^T), block (p+1, p) its transpose (a symmetric graph)."""
    rows, cols, values = [], [], []
    for p in range(forward.shape[0]):
        block = (
            0.5 * (sampling_matrix(forward[p].float()) + sampling_matrix(backward[p].float()).t())
        ).coalesce()
        i, j = block.indices()
        rows += [i + p * n, j + (p + 1) * n]
        cols += [j + (p + 1) * n, i + p * n]
        values += [block.values() * weight] * 2
    size = (n * (forward.shape[0] + 1),) * 2
    return torch.sparse_coo_tensor(
        torch.stack((torch.cat(rows), torch.cat(cols))), torch.cat(values), size, check_invariants=True
    ).coalesce()
