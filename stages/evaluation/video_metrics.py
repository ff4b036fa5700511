"""Video object segmentation metrics (SPEC "Evaluation", video part): FG-ARI, Hungarian mIoU, DAVIS-17 J&F.

All functions take label volumes: ``gt`` and ``pred`` are (T, H, W) non-negative integer arrays of one
sequence, 0 = background, any other value = an object id that keeps its identity across frames.

- ``fg_ari``: adjusted Rand index per frame over the ground-truth foreground pixels, averaged over frames.
- ``miou_hungarian``: one gt <-> prediction matching per sequence on IoUs of whole-sequence volumes.
- ``davis_jf``: the DAVIS-2017 unsupervised protocol: J and F of every (prediction, gt object) pair in every
  frame, one Hungarian matching per sequence on the frame-averaged (J + F) / 2. The BA public code instead
  matches in every frame separately, which lets identities swap between frames for free; not done here.
- ``davis_proposals``: what DAVIS scores of a prediction: at most 20 proposals (the official evaluator
  refuses more; here the 20 largest are kept).

``davis_jf`` and ``miou_hungarian`` take an optional ``void`` (T, H, W) bool volume: pixels left out of
every count (DAVIS marks them 255), as davis2017-evaluation leaves them out of J and F.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import linear_sum_assignment

# The DAVIS benchmark's boundary tolerance: a fraction of the image diagonal (davis2017-evaluation's
# bound_th). A property of the benchmark, not a tunable parameter.
DAVIS_BOUNDARY_FRACTION = 0.008
EMPTY = -1  # id of the empty proposals DAVIS pads the predictions with
# davis2017-evaluation's limit on proposals per sequence in the unsupervised task (max_n_proposals).
DAVIS_MAX_PROPOSALS = 20


def _check_volumes(gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None) -> None:
    if gt.shape != pred.shape or gt.ndim != 3:
        raise ValueError(f"gt and pred must be (T, H, W) of one shape, got {gt.shape} and {pred.shape}")
    if void is not None and (void.shape != gt.shape or void.dtype != bool):
        raise ValueError(f"void must be a bool volume of shape {gt.shape}, got {void.dtype} {void.shape}")
    if gt.min(initial=0) < 0 or pred.min(initial=0) < 0:
        raise ValueError("labels must be non-negative (0 = background)")


def keep_largest_proposals(pred: np.ndarray, max_proposals: int) -> np.ndarray:
    """(T, H, W) predicted ids -> the same with at most ``max_proposals`` ids: the largest (most pixels
    over the sequence; ties: the lower id) renumbered 1..k in their original order, the rest background 0."""
    if max_proposals < 1:
        raise ValueError(f"max_proposals must be >= 1, got {max_proposals}")
    ids, sizes = np.unique(pred[pred != 0], return_counts=True)
    if ids.size <= max_proposals:
        return pred
    kept = np.sort(ids[np.lexsort((ids, -sizes))[:max_proposals]])  # by size, then id
    lookup = np.zeros(int(ids.max()) + 1, dtype=pred.dtype)
    lookup[kept] = np.arange(1, kept.size + 1)
    return lookup[pred]


def with_background_proposal(pred: np.ndarray) -> np.ndarray:
    """(T, H, W) predicted ids with the background 0 as one more proposal, id max + 1: every cluster of a
    clustering method becomes a proposal (the BA code's evaluation; 0 is left only where nothing is)."""
    out = pred.copy()
    out[pred == 0] = int(pred.max(initial=0)) + 1
    return out


def davis_proposals(pred: np.ndarray, background: bool) -> np.ndarray:
    """What DAVIS-17 unsupervised scores of a prediction: the background as a proposal too when asked
    (:func:`with_background_proposal`), then at most DAVIS_MAX_PROPOSALS (20), the largest
    (:func:`keep_largest_proposals`)."""
    return keep_largest_proposals(with_background_proposal(pred) if background else pred, DAVIS_MAX_PROPOSALS)


def _contingency(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Counts of every (a value, b value) pair over the points of two same-shaped labelings -> (A, B)."""
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    n_b = int(ib.max(initial=-1)) + 1
    n_a = int(ia.max(initial=-1)) + 1
    return np.bincount(ia.ravel() * n_b + ib.ravel(), minlength=n_a * n_b).reshape(n_a, n_b)


def _pairs(counts: np.ndarray) -> float:
    """Number of unordered point pairs inside groups of the given sizes (float: no int64 overflow)."""
    counts = counts.astype(np.float64)
    return float((counts * (counts - 1) / 2).sum())


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index (Hubert & Arabie) of two labelings of the same points (any shape, any ints).

    ARI = (I - E) / (M - E), with I = pairs together in both, E = pairs_a * pairs_b / pairs_total,
    M = (pairs_a + pairs_b) / 2. The denominator is 0 only when both labelings put all points in one group
    or both put every point alone: the labelings are then identical, and ARI is 1 (the convention of
    scikit-learn and of DeepMind's multi_object_datasets FG-ARI, which both special-case it to 1).
    So a frame with a single gt object scores 1 when the prediction keeps it in one cluster, 0 when split.
    """
    table = _contingency(a, b)
    together = _pairs(table)
    pairs_a, pairs_b = _pairs(table.sum(axis=1)), _pairs(table.sum(axis=0))
    total = _pairs(np.array([a.size]))
    expected = pairs_a * pairs_b / total if total > 0 else 0.0
    best = (pairs_a + pairs_b) / 2
    if best == expected:
        return 1.0
    return (together - expected) / (best - expected)


def fg_ari_frames(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(T,) FG-ARI of each frame: ARI between gt ids and predicted ids over the pixels where gt != 0
    (predicted background 0 is one more cluster there); NaN for a frame without gt foreground."""
    _check_volumes(gt, pred)
    scores = np.full(gt.shape[0], np.nan)
    for t in range(gt.shape[0]):
        fg = gt[t] != 0
        if fg.any():
            scores[t] = adjusted_rand_index(gt[t][fg], pred[t][fg])
    return scores


def fg_ari(gt: np.ndarray, pred: np.ndarray) -> float:
    """FG-ARI of a sequence: the mean of the per-frame FG-ARI over frames that have gt foreground
    (NaN when no frame has any)."""
    scores = fg_ari_frames(gt, pred)
    return float(np.nanmean(scores)) if np.isfinite(scores).any() else math.nan


def _object_ids(labels: np.ndarray) -> np.ndarray:
    ids = np.unique(labels)
    return ids[ids != 0]


def miou_hungarian(gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None) -> dict:
    """mIoU over the gt objects of a sequence with one Hungarian matching for the whole sequence.

    IoU of gt object g and predicted object p = |g ∩ p| / |g ∪ p| over the (T, H, W) volume, void pixels
    left out. Gt objects
    are matched one-to-one to predicted objects (predicted background 0 is never a candidate) maximising
    the summed IoU; a gt object left without a prediction (fewer predictions than objects) scores 0.
    Returns {'mean': mean IoU over gt objects (NaN if there are none), 'per_object': {gt id: IoU},
    'match': {gt id: matched predicted id or None}}.
    """
    _check_volumes(gt, pred, void)
    if void is not None:
        gt, pred = np.where(void, 0, gt), np.where(void, 0, pred)
    gt_ids, pred_ids = _object_ids(gt), _object_ids(pred)
    per_object = {int(g): 0.0 for g in gt_ids}
    match: dict[int, int | None] = {int(g): None for g in gt_ids}
    if gt_ids.size and pred_ids.size:
        g_index = np.searchsorted(gt_ids, gt)  # index of each pixel's gt id; background -> garbage, masked
        p_index = np.searchsorted(pred_ids, pred)
        both = (gt != 0) & (pred != 0)
        inter = np.bincount(
            g_index[both] * pred_ids.size + p_index[both], minlength=gt_ids.size * pred_ids.size
        ).reshape(gt_ids.size, pred_ids.size)
        area_g = np.bincount(g_index[gt != 0], minlength=gt_ids.size)
        area_p = np.bincount(p_index[pred != 0], minlength=pred_ids.size)
        iou = inter / (area_g[:, None] + area_p[None, :] - inter)
        rows, cols = linear_sum_assignment(iou, maximize=True)
        for r, c in zip(rows, cols, strict=True):
            per_object[int(gt_ids[r])] = float(iou[r, c])
            match[int(gt_ids[r])] = int(pred_ids[c])
    mean = float(np.mean(list(per_object.values()))) if per_object else math.nan
    return {"mean": mean, "per_object": per_object, "match": match}


# ---------------------------------------------------------------------------------------------------------
# DAVIS J&F


def boundary_map(masks: np.ndarray) -> np.ndarray:
    """(..., H, W) bool masks -> bool boundary maps one pixel wide, as DAVIS's seg2bmap: a pixel is on the
    boundary when it differs from its right, lower or lower-right neighbour. Neighbours beyond the image
    repeat the edge pixel, so the image border itself is never a boundary (DAVIS's behaviour)."""
    pad = [(0, 0)] * (masks.ndim - 2) + [(0, 1), (0, 1)]
    padded = np.pad(masks, pad, mode="edge")
    right, down, diagonal = padded[..., :-1, 1:], padded[..., 1:, :-1], padded[..., 1:, 1:]
    return (masks != right) | (masks != down) | (masks != diagonal)


def disk_offsets(radius: int) -> np.ndarray:
    """(m, 2) integer (dy, dx) offsets of the disk dy^2 + dx^2 <= radius^2 (DAVIS's skimage disk)."""
    dy, dx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    inside = dy * dy + dx * dx <= radius * radius
    return np.stack([dy[inside], dx[inside]], axis=1)


def davis_boundary_radius(height: int, width: int) -> int:
    """DAVIS's boundary tolerance in pixels: ceil(0.008 * image diagonal)."""
    return math.ceil(DAVIS_BOUNDARY_FRACTION * math.hypot(height, width))


def _boundary_hits(
    pred_bound: np.ndarray, gt_bound: np.ndarray, offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Boundary pixels of each side within the disk of the other side's boundary, for every pair.

    pred_bound (P, H, W), gt_bound (G, H, W) bool. Returns pred_hit (P, G): predicted boundary pixels
    within the disk around gt boundary g; gt_hit (P, G): gt boundary pixels with a boundary pixel of p
    within their disk. Same counts as DAVIS's dilate-and-intersect, but only the sparse gt boundary pixels
    are dilated (stamped with the disk offsets), so the cost grows with the gt boundary length, not with
    the image area times the number of predictions.
    """
    height, width = gt_bound.shape[1:]
    pred_hit = np.zeros((len(pred_bound), len(gt_bound)))
    gt_hit = np.zeros_like(pred_hit)
    chunk = max(1, 2**22 // max(1, len(pred_bound) * len(offsets)))  # bounds the (P, n, m) gather
    for g, bound in enumerate(gt_bound):
        near = np.zeros((height, width), dtype=bool)
        for ys, xs in _chunks(np.nonzero(bound), chunk):
            y, x = ys[:, None] + offsets[:, 0], xs[:, None] + offsets[:, 1]  # (n, m) disk around each pixel
            inside = (y >= 0) & (y < height) & (x >= 0) & (x < width)
            near[y[inside], x[inside]] = True
            y, x = np.clip(y, 0, height - 1), np.clip(x, 0, width - 1)
            seen = pred_bound[:, y, x] & inside  # (P, n, m): a predicted boundary pixel in the disk
            gt_hit[:, g] += seen.any(axis=2).sum(axis=1)
        pred_hit[:, g] = np.count_nonzero(pred_bound & near, axis=(1, 2))
    return pred_hit, gt_hit


def _chunks(coords: tuple[np.ndarray, np.ndarray], size: int):
    for start in range(0, len(coords[0]), size):
        yield coords[0][start : start + size], coords[1][start : start + size]


def _f_measure(n_pred: np.ndarray, n_gt: np.ndarray, pred_hit: np.ndarray, gt_hit: np.ndarray) -> np.ndarray:
    """Boundary F per (pred, gt) pair from boundary pixel counts (P,), (G,) and matched counts (P, G).

    DAVIS's conventions for empty boundaries follow from one rule, an empty side has precision (pred) or
    recall (gt) 1: empty pred, non-empty gt -> P 1, R 0, F 0; the reverse -> P 0, R 1, F 0; both -> F 1.
    """
    n_pred = n_pred[:, None].astype(np.float64)
    n_gt = n_gt[None, :].astype(np.float64)
    precision = np.where(n_pred > 0, pred_hit / np.maximum(n_pred, 1), 1.0)
    recall = np.where(n_gt > 0, gt_hit / np.maximum(n_gt, 1), 1.0)
    total = precision + recall
    return np.where(total > 0, 2 * precision * recall / np.maximum(total, 1e-12), 0.0)


def _frame_scores(
    gt: np.ndarray, pred: np.ndarray, valid: np.ndarray, gt_ids: np.ndarray, n_pred: int, offsets: np.ndarray
):
    """J and F (n_pred, G) of every (prediction id 1..n_pred, gt object) pair in one (H, W) frame; only the
    ``valid`` (non-void) pixels count, and boundaries are those of the masks less the void pixels (as
    davis2017-evaluation's db_eval_iou and f_measure)."""
    n_gt = len(gt_ids)
    g_index = np.where(gt != 0, np.searchsorted(gt_ids, gt), n_gt)  # n_gt = background
    p_index = np.where(pred != 0, pred - 1, n_pred)  # prediction ids are 1..n_pred
    pairs = (g_index * (n_pred + 1) + p_index)[valid]
    table = np.bincount(pairs, minlength=(n_gt + 1) * (n_pred + 1))
    table = table.reshape(n_gt + 1, n_pred + 1)
    inter = table[:n_gt, :n_pred].T.astype(np.float64)  # (P, G)
    union = table[:n_gt].sum(axis=1)[None, :] + table[:, :n_pred].sum(axis=0)[:, None] - inter
    j = np.where(union > 0, inter / np.maximum(union, 1), 1.0)  # DAVIS: both empty -> J = 1

    gt_bound = boundary_map((gt[None] == gt_ids[:, None, None]) & valid)
    pred_bound = boundary_map((pred[None] == np.arange(1, n_pred + 1)[:, None, None]) & valid)
    pred_hit, gt_hit = _boundary_hits(pred_bound, gt_bound, offsets)
    f = _f_measure(pred_bound.sum(axis=(1, 2)), gt_bound.sum(axis=(1, 2)), pred_hit, gt_hit)
    return j, f


def jf_pair_scores(
    gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """J and F of every (prediction, gt object) pair in every frame, before any matching.

    Gt objects: the distinct non-zero ids of ``gt``. Predictions: ids 1..max(pred), as DAVIS reads result
    PNGs (an id absent from every frame is an empty proposal), then padded with empty proposals (id EMPTY)
    up to the number of gt objects. Void pixels (``void``, optional) count nowhere. Returns j, f of shape
    (P, G, T), gt_ids (G,), pred_ids (P,).
    """
    _check_volumes(gt, pred, void)
    valid = np.ones(gt.shape, dtype=bool) if void is None else ~void
    gt_ids = _object_ids(gt)
    n_pred = int(pred.max(initial=0))
    pred_ids = np.arange(1, n_pred + 1)
    n_pad = max(0, gt_ids.size - n_pred)
    pred_ids = np.concatenate([pred_ids, np.full(n_pad, EMPTY)])
    offsets = disk_offsets(davis_boundary_radius(gt.shape[1], gt.shape[2]))
    j = np.zeros((pred_ids.size, gt_ids.size, gt.shape[0]))
    f = np.zeros_like(j)
    if gt_ids.size:
        for t in range(gt.shape[0]):
            j[:n_pred, :, t], f[:n_pred, :, t] = _frame_scores(
                gt[t], pred[t], valid[t], gt_ids, n_pred, offsets
            )
        # an empty pad scores J = F = 1 where the object is absent too, 0 where it is present
        absent = ~np.stack([((gt == g) & valid).any(axis=(1, 2)) for g in gt_ids])  # (G, T)
        j[n_pred:] = absent
        f[n_pred:] = absent
    return j, f, gt_ids, pred_ids


def davis_jf(gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None) -> dict:
    """DAVIS-2017 unsupervised J&F of one sequence, with the official sequence-level matching.

    J = region IoU per frame over the non-void pixels (1 when gt and prediction are both empty in that
    frame); F = boundary
    F-measure per frame (seg2bmap boundaries, tolerance disk of radius ceil(0.008 * diagonal)). Each
    prediction is scored against each gt object in every frame; one Hungarian matching for the whole
    sequence maximises the frame-mean (J + F) / 2 summed over gt objects; every gt object gets a
    prediction (empty ones are padded in when there are fewer predictions than objects).

    Returns {'J', 'F', 'JF'}: means over the gt objects of the sequence (NaN if it has none; DAVIS's
    dataset score averages J and F over all objects of all sequences: aggregate 'per_object', not the
    sequence means), and 'per_object': {gt id: {'J': frame-mean J, 'F': frame-mean F, 'pred': matched
    prediction id or None for an empty pad}}.

    ``pred`` is scored as given: pass it through :func:`davis_proposals` first for the official limit of
    20 proposals (the official evaluator stops with an error above it; here the caller keeps the 20
    largest). Differences from davis2017-evaluation: gt objects are all ids present in the sequence (the
    official loader takes ids 1..max of the first frame; the same when every object is in frame 0);
    per-object results are keyed by gt id (the official code lists them in the order of the matched
    prediction's index, which mislabels objects but not the means).
    """
    j, f, gt_ids, pred_ids = jf_pair_scores(gt, pred, void)
    if gt_ids.size == 0:
        return {"J": math.nan, "F": math.nan, "JF": math.nan, "per_object": {}}
    score = (j.mean(axis=2) + f.mean(axis=2)) / 2  # (P, G)
    rows, cols = linear_sum_assignment(score, maximize=True)
    per_object = {}
    for p, g in sorted(zip(rows, cols, strict=True), key=lambda pair: pair[1]):
        matched = None if pred_ids[p] == EMPTY else int(pred_ids[p])
        per_object[int(gt_ids[g])] = {"J": float(j[p, g].mean()), "F": float(f[p, g].mean()), "pred": matched}
    j_mean = float(np.mean([o["J"] for o in per_object.values()]))
    f_mean = float(np.mean([o["F"] for o in per_object.values()]))
    return {"J": j_mean, "F": f_mean, "JF": (j_mean + f_mean) / 2, "per_object": per_object}


def foreground_jf(gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None) -> dict:
    """DAVIS-2016 J and F of one sequence, single-object: every non-zero id of ``gt`` and of ``pred``
    merged into one foreground each; J (IoU) and F (boundary F-measure) per frame as in :func:`davis_jf`,
    averaged over the annotated frames (those not entirely ``void``: FBMS-59 annotates every 20th frame).
    Returns {'J', 'F', 'JF', 'frames': frames scored}."""
    _check_volumes(gt, pred, void)
    frames = np.arange(gt.shape[0]) if void is None else np.flatnonzero(~void.all(axis=(1, 2)))
    if frames.size == 0:
        return {"J": math.nan, "F": math.nan, "JF": math.nan, "frames": 0}
    fg_gt = (gt[frames] != 0).astype(np.int64)
    fg_pred = (pred[frames] != 0).astype(np.int64)
    # One gt object, one proposal (id 1; an empty prediction is padded in as an empty proposal).
    j, f, _, _ = jf_pair_scores(fg_gt, fg_pred, None if void is None else void[frames])
    if j.shape[1] == 0:  # no foreground in any scored frame: DAVIS scores empty against empty as 1
        empty = float((fg_pred == 0).all())
        return {"J": empty, "F": empty, "JF": empty, "frames": int(frames.size)}
    j_mean, f_mean = float(j[0, 0].mean()), float(f[0, 0].mean())
    return {"J": j_mean, "F": f_mean, "JF": (j_mean + f_mean) / 2, "frames": int(frames.size)}
