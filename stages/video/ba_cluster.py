"""BA ("Betrayed by Attention") video clustering: object tracks from a spatio-temporal attention matrix.

Input: ``attn`` (N, K), one row per query patch of the video (N = T*h*w, frame-major, each frame in raster
order), one column per key (the keys of every k-th frame). Row i is the attention distribution of patch i
over the keys; patches of one object attend alike, in every frame, so grouping rows groups patches into
object tracks that span the whole video.

Distance. ``symmetric_kl`` is the *sum* KL(p||q) + KL(q||p), the distance of the BA public code (its
``kl_distance``: cross entropies minus self entropies), which SPEC's thresholds tau = 1.0 / 1.6 refer to.

Clustering (SPEC "BA (videos)"). A round is one greedy pass over the current items (rows, later
centroids): items are taken in index order; the first item not yet absorbed becomes a leader and absorbs
every item not yet absorbed whose distance to it is <= tau (itself included); the new centroid is the mean
of the absorbed members. Rounds repeat on the centroids until a round leaves the count unchanged (every
leader absorbed only itself, so the centroids are unchanged too) or ``max_rounds`` rounds have run.
Finally every row joins its nearest centroid. Labels are numbered 0..C-1 by first appearance in row order.

Two choices, each with the BA public code's behaviour as the config default (configs/methods/ba.yaml):
- ``smooth`` (code: on): the first round, on 3-frame windows, first replaces each row by the normalised
  mean of its tau-neighbours and only then absorbs (SPEC's plain round when off).
- ``weights``: a merged centroid is the plain mean of its member centroids (``'equal'``, the code), or
  the mean of all rows it stands for (``'members'``: centroids weighted by their member counts).
Both plain alternatives stay as options because they do better on the demo video with the frozen
DINOv2 attention (README, "Videos: BA").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import torch

# Floor under probabilities before the log. Softmax attention over thousands of keys underflows to 0 in
# float32, and 0 * log 0 would be NaN; a floor this small changes the distance by far less than tau.
LOG_FLOOR = 1e-12

CentroidWeights = Literal["equal", "members"]


def symmetric_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Pairwise symmetric KL divergence between rows: (N, K), (M, K) distributions -> (N, M).

    D[i, j] = KL(p_i || q_j) + KL(q_j || p_i) = sum_k (p_ik - q_jk)(log p_ik - log q_jk), the *sum* of the two
    divergences (BA's convention). Expanded as sum p log p + sum q log q - p . log q - q . log p, so the
    whole matrix costs two matrix products (one when ``q is p``). Probabilities are floored at LOG_FLOOR
    inside the logs only. Rounding can leave tiny negative values; they are clamped to 0 (the divergence
    is non-negative).
    """
    log_p = p.clamp_min(LOG_FLOOR).log()
    self_p = (p * log_p).sum(dim=1, keepdim=True)  # (N, 1): minus the entropy of each p row
    if q is p:  # all pairs of one set: the two cross terms are transposes, one product is enough
        cross = p @ log_p.T
        return (self_p + self_p.T - cross - cross.T).clamp_min(0)
    log_q = q.clamp_min(LOG_FLOOR).log()
    self_q = (q * log_q).sum(dim=1).unsqueeze(0)  # (1, M)
    cross = p @ log_q.T + log_p @ q.T  # (N, M)
    return (self_p + self_q - cross).clamp_min(0)


def _greedy_absorb(dist: torch.Tensor, tau: float) -> torch.Tensor:
    """One round of greedy absorption on an (n, n) distance matrix -> (n,) group of each item, 0..c-1.

    Items are visited in index order; the loop runs once per *group* (not per item): the lowest-index free
    item is the next leader, and its group is every free item within tau, found with one masked row.
    Groups are numbered in the order their leaders were found.
    """
    within = dist <= tau
    within.fill_diagonal_(True)  # a leader always absorbs itself, whatever rounding left on the diagonal
    free = torch.ones(dist.shape[0], dtype=torch.bool, device=dist.device)
    group = torch.empty(dist.shape[0], dtype=torch.long, device=dist.device)
    n_groups = 0
    while bool(free.any()):
        leader = int(torch.argmax(free.to(torch.uint8)))  # argmax returns the first maximum: lowest index
        members = within[leader] & free
        group[members] = n_groups
        free &= ~members
        n_groups += 1
    return group


def _merge(
    rows: torch.Tensor, weights: torch.Tensor, group: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean of the rows of each group -> (c, K) centroids and (c,) total weights."""
    n_groups = int(group.max()) + 1
    total = torch.zeros(n_groups, dtype=weights.dtype, device=rows.device).index_add_(0, group, weights)
    summed = torch.zeros(n_groups, rows.shape[1], dtype=rows.dtype, device=rows.device)
    summed.index_add_(0, group, rows * weights.unsqueeze(1))
    return summed / total.unsqueeze(1), total


def smooth_rows(rows: torch.Tensor, tau: float, chunk: int = 4096) -> torch.Tensor:
    """Each row replaced by the normalised mean of the rows within ``tau`` of it (itself included): the
    BA code's first-round smoothing. (n, K) distributions -> (n, K); ``chunk`` rows at a time bound the
    (chunk, n) neighbourhood matrix."""
    out = torch.empty_like(rows)
    for start in range(0, rows.shape[0], chunk):
        part = rows[start : start + chunk]
        within = (symmetric_kl(part, rows) <= tau).to(rows.dtype)
        within[:, start : start + part.shape[0]].fill_diagonal_(1)  # a row is always its own neighbour
        summed = within @ rows
        out[start : start + part.shape[0]] = summed / summed.sum(dim=1, keepdim=True)
    return out


def first_round(
    blocks: Iterable[torch.Tensor], tau: float, smooth: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorption on each block of rows on its own -> centroids and member counts, in block order (so the
    leaders stay in global row order). With ``smooth``, the rows of a block are first smoothed
    (:func:`smooth_rows`) and the centroids are means of smoothed rows. Blocks can be produced lazily:
    only one exists at a time."""
    centroids, counts = [], []
    for rows in blocks:
        rows = _normalised(rows)
        if smooth:
            rows = smooth_rows(rows, tau)
        group = _greedy_absorb(symmetric_kl(rows, rows), tau)
        c, w = _merge(rows, torch.ones(rows.shape[0], dtype=rows.dtype, device=rows.device), group)
        centroids.append(c)
        counts.append(w)
    return torch.cat(centroids), torch.cat(counts)


def merge_rounds(
    centroids: torch.Tensor, counts: torch.Tensor, tau: float, rounds: int, weights: CentroidWeights
) -> torch.Tensor:
    """Further absorption rounds on the centroids until their count stops changing (at most ``rounds``).
    A merged centroid is the mean of its members, each weighted by its member count (``'members'``: the
    mean of all rows it stands for) or equally (``'equal'``: the BA code)."""
    if weights not in ("equal", "members"):
        raise ValueError(f"weights must be 'equal' or 'members', got {weights!r}")
    for _ in range(rounds):
        group = _greedy_absorb(symmetric_kl(centroids, centroids), tau)
        if int(group.max()) + 1 == centroids.shape[0]:
            break  # every leader absorbed only itself: nothing can change any more
        centroids, counts = _merge(
            centroids, counts if weights == "members" else torch.ones_like(counts), group
        )
    return centroids


def _normalised(rows: torch.Tensor) -> torch.Tensor:
    rows = rows if rows.dtype == torch.float64 else rows.float()
    return rows / rows.sum(dim=1, keepdim=True)


def first_appearance_labels(labels: torch.Tensor) -> torch.Tensor:
    """Renumber integer labels (any shape) 0..C-1 in the order each value first appears (flattened order)."""
    flat = labels.reshape(-1)
    values, inverse = torch.unique(flat, return_inverse=True)
    positions = torch.arange(flat.numel(), device=flat.device)
    first = torch.full((values.numel(),), flat.numel(), dtype=torch.long, device=flat.device)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    rank = torch.empty_like(first)
    rank[torch.argsort(first)] = torch.arange(values.numel(), device=flat.device)
    return rank[inverse].reshape(labels.shape)


def nearest_centroid(rows: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(N, K) rows, (C, K) centroids -> (N,) index of the nearest centroid by symmetric KL (ties: lowest
    index)."""
    return symmetric_kl(rows, centroids).argmin(dim=1)


def cluster_blocks(
    blocks: Callable[[], Iterable[torch.Tensor]],
    tau: float,
    max_rounds: int,
    *,
    smooth: bool,
    weights: CentroidWeights,
) -> torch.Tensor:
    """BA clustering of attention rows that come in blocks -> (N,) long labels, N = all rows in order.

    ``blocks()`` yields the (n_i, K) row blocks, one at a time; it is called twice (absorption, then the
    assignment), so only one block needs to exist at once. The first round absorbs within each block
    (smoothed first when ``smooth``), later rounds merge centroids (``weights``, see
    :func:`merge_rounds`); each (unsmoothed) row then takes its nearest centroid. Labels are numbered by
    first appearance in row order; a centroid that wins no row leaves no label.
    """
    centroids, counts = first_round(blocks(), tau, smooth)
    centroids = merge_rounds(centroids, counts, tau, max_rounds - 1, weights)
    return first_appearance_labels(torch.cat([nearest_centroid(_normalised(b), centroids) for b in blocks()]))


def cluster_attention(
    attn: torch.Tensor,
    tau: float,
    max_rounds: int,
    first_round_block: int | None = None,
    *,
    smooth: bool,
    weights: CentroidWeights,
) -> torch.Tensor:
    """BA hierarchical clustering of attention rows: (N, K) attention -> (N,) long labels 0..C-1.

    attn: one distribution per row (rows are renormalised to sum 1; any float dtype, computed in float32 or
    float64). tau: symmetric-KL threshold (SPEC: 1.0; 1.6 merges all foreground). max_rounds: at most this
    many absorption rounds in all (>= 1); the loop usually stops earlier, when the count stops changing.
    first_round_block: None = the first round sees all N rows at once (memory N x N). An int runs the
    first round on consecutive blocks of that many rows, each on its own, as the BA code does on 3-frame
    windows (pass 3*h*w); memory is then block x block, and later rounds work on the centroids of all blocks.
    smooth, weights: see :func:`cluster_blocks` (the BA code: True, 'equal').
    """
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
    if attn.ndim != 2 or attn.shape[0] == 0:
        raise ValueError(f"attn must be a non-empty (N, K) matrix, got shape {tuple(attn.shape)}")
    if first_round_block is not None and first_round_block < 1:
        raise ValueError(f"first_round_block must be >= 1 or None, got {first_round_block}")
    block = first_round_block or attn.shape[0]
    return cluster_blocks(
        lambda: (attn[s : s + block] for s in range(0, attn.shape[0], block)),
        tau,
        max_rounds,
        smooth=smooth,
        weights=weights,
    )


def border_mask(h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """(h, w) bool: True on the first and last row and column of the patch grid."""
    mask = torch.zeros(h, w, dtype=torch.bool, device=device)
    mask[[0, -1], :] = True
    mask[:, [0, -1]] = True
    return mask


def background_cluster(labels: torch.Tensor, rule: Literal["border", "largest"]) -> int:
    """The background among the clusters of a video: (T, h, w) non-negative labels -> the background label.

    Border count of a cluster = its patches on the border of the patch grid (first/last row and column of
    each frame; a corner counts once), summed over frames. Size = its patches over all frames.
    rule 'border': most border patches; ties -> larger size; then lower label.
    rule 'largest': largest size; ties -> more border patches; then lower label.
    """
    if rule not in ("border", "largest"):
        raise ValueError(f"rule must be 'border' or 'largest', got {rule!r}")
    n_labels = int(labels.max()) + 1
    border = border_mask(labels.shape[1], labels.shape[2], labels.device).expand_as(labels)
    on_border = torch.bincount(labels[border], minlength=n_labels).tolist()
    size = torch.bincount(labels.reshape(-1), minlength=n_labels).tolist()
    primary, secondary = (on_border, size) if rule == "border" else (size, on_border)
    present = [c for c in range(n_labels) if size[c] > 0]
    # max() keeps the first of equal keys, so equal (primary, secondary) go to the lower label
    return max(present, key=lambda c: (primary[c], secondary[c]))


def instance_tracks(labels: torch.Tensor, background: int) -> torch.Tensor:
    """(T, h, w) cluster labels -> (T, h, w) long tracks: 0 = the background cluster, 1..K = the other
    clusters numbered by first appearance in (t, y, x) order. A cluster spans frames, so its number is the
    object's identity in every frame."""
    foreground = labels != background
    tracks = torch.zeros(labels.shape, dtype=torch.long, device=labels.device)
    if foreground.any():
        tracks[foreground] = first_appearance_labels(labels[foreground]) + 1
    return tracks
