"""Video metrics (stages/evaluation/video_metrics.py) against values worked out by hand on tiny label
volumes."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from stages.evaluation.video_metrics import (
    DAVIS_MAX_PROPOSALS,
    adjusted_rand_index,
    boundary_map,
    davis_boundary_radius,
    davis_jf,
    davis_proposals,
    fg_ari,
    fg_ari_frames,
    jf_pair_scores,
    keep_largest_proposals,
    miou_hungarian,
    with_background_proposal,
)


def square(shape: tuple[int, int], y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
    """(H, W) bool with the rows y0..y1-1 and columns x0..x1-1 set."""
    mask = np.zeros(shape, dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def swapped_sequence() -> tuple[np.ndarray, np.ndarray]:
    """Two frames of 8x8, two 2x2 objects far apart; the prediction swaps their ids in frame 1."""
    gt = np.zeros((2, 8, 8), dtype=np.int64)
    gt[:, 0:2, 0:2] = 1
    gt[:, 5:7, 5:7] = 2
    pred = gt.copy()
    pred[1][gt[1] == 1] = 2
    pred[1][gt[1] == 2] = 1
    return gt, pred


def disappearing_sequence() -> np.ndarray:
    """Three frames of 8x8: object 1 in every frame, object 2 in frames 0 and 2 only."""
    gt = np.zeros((3, 8, 8), dtype=np.int64)
    gt[:, 1:4, 1:4] = 1
    gt[[0, 2], 5:7, 4:7] = 2
    return gt


# ---------------------------------------------------------------------------------------------------------
# FG-ARI


def test_ari_hand_computed():
    # contingency [[3, 1], [0, 4]]: together 3 + 6 = 9 pairs, gt 12, pred 3 + 10 = 13, total 28
    # ARI = (9 - 12*13/28) / (12.5 - 12*13/28) = 96 / 194
    gt = np.array([1, 1, 1, 1, 2, 2, 2, 2])
    pred = np.array([5, 5, 5, 7, 7, 7, 7, 7])
    assert adjusted_rand_index(gt, pred) == pytest.approx(96 / 194, abs=1e-12)


def test_ari_degenerate_cases():
    one = np.ones(6, dtype=int)
    assert adjusted_rand_index(one, one * 4) == 1.0  # one gt object kept whole: 0/0, by convention 1
    assert adjusted_rand_index(one, np.array([1, 1, 1, 2, 2, 2])) == 0.0  # one gt object split: 0
    assert adjusted_rand_index(np.arange(5), np.arange(5) + 3) == 1.0  # all singletons on both sides
    assert adjusted_rand_index(np.array([3]), np.array([0])) == 1.0  # a single point


def test_fg_ari_per_frame_mean_ignores_background_and_empty_frames():
    gt = np.zeros((3, 4, 4), dtype=np.int64)
    pred = np.zeros_like(gt)
    gt[0, 0, :] = 1
    gt[0, 1, :] = 2
    pred[0, 0, :3] = 5
    pred[0, 0, 3] = 7
    pred[0, 1, :] = 7  # frame 0: the hand-computed 96/194 case
    gt[1, 2:, :2] = 3
    pred[1, 2:, :2] = 1  # frame 1: perfect
    # frame 2 has no gt foreground: not counted
    expected = (96 / 194 + 1.0) / 2
    assert fg_ari(gt, pred) == pytest.approx(expected, abs=1e-12)
    assert np.isnan(fg_ari_frames(gt, pred)[2])
    noisy = pred.copy()
    noisy[gt == 0] = np.arange((gt == 0).sum()) % 4  # predictions on gt background do not count
    assert fg_ari(gt, noisy) == pytest.approx(expected, abs=1e-12)


def test_fg_ari_is_invariant_to_label_permutation():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 4, size=(3, 8, 8))
    pred = rng.integers(0, 5, size=(3, 8, 8))
    pred[gt == 1] = 2  # some agreement, so the score is not near 0 by chance alone
    permutation = np.array([3, 0, 4, 1, 2])
    score = fg_ari(gt, pred)
    assert fg_ari(gt, permutation[pred]) == pytest.approx(score, abs=1e-12)
    assert score != pytest.approx(fg_ari(gt, rng.integers(0, 5, size=(3, 8, 8))), abs=1e-3)


def test_fg_ari_counts_predicted_background_as_a_cluster():
    gt = np.ones((1, 2, 4), dtype=np.int64)
    pred = np.ones_like(gt)
    pred[0, 1] = 0  # half the object predicted as background: a split, ARI 0
    assert fg_ari(gt, pred) == 0.0


# ---------------------------------------------------------------------------------------------------------
# Hungarian mIoU


def test_miou_perfect_with_other_ids():
    gt = disappearing_sequence()
    pred = np.choose(gt, [0, 9, 4])  # ids 1 -> 9, 2 -> 4
    result = miou_hungarian(gt, pred)
    assert result["mean"] == 1.0 and result["match"] == {1: 9, 2: 4}


def test_miou_one_matching_per_sequence_penalises_swapped_ids():
    gt, pred = swapped_sequence()
    # each object: 4 px per frame, shared with the same pred id in one frame only: IoU = 4 / (8 + 8 - 4)
    result = miou_hungarian(gt, pred)
    assert result["per_object"] == pytest.approx({1: 1 / 3, 2: 1 / 3})
    assert result["mean"] == pytest.approx(1 / 3)


def test_miou_more_clusters_than_objects_and_unmatched_objects():
    gt = np.zeros((2, 8, 8), dtype=np.int64)
    gt[:, 2:6, 2:6] = 1  # 16 px per frame
    gt[:, 7, 0:2] = 2
    pred = np.zeros_like(gt)
    pred[:, 2:5, 2:6] = 1  # 12 px of object 1: IoU 24 / 32
    pred[:, 5, 2:6] = 2  # its last row: IoU 8 / 32
    pred[:, 0, 6:8] = 3  # a false positive: IoU 0 with both objects
    result = miou_hungarian(gt, pred)
    assert result["per_object"][1] == pytest.approx(0.75)
    assert result["match"][1] == 1
    assert result["per_object"][2] == 0.0
    assert result["mean"] == pytest.approx(0.375)
    only_one = miou_hungarian(gt, (gt == 1).astype(np.int64))  # object 2 gets no prediction at all
    assert only_one["per_object"] == {1: 1.0, 2: 0.0} and only_one["match"][2] is None


def test_miou_predicted_background_is_not_part_of_any_prediction():
    gt = square((4, 4), 0, 0, 4, 4)[None].astype(np.int64)  # 16 px
    pred = np.zeros_like(gt)
    pred[0, :2] = 1  # 8 px of it; the other 8 predicted background
    assert miou_hungarian(gt, pred)["per_object"] == {1: 0.5}


def test_miou_without_objects_is_nan():
    empty = np.zeros((2, 4, 4), dtype=np.int64)
    assert np.isnan(miou_hungarian(empty, empty + 1)["mean"])


# ---------------------------------------------------------------------------------------------------------
# DAVIS J&F building blocks


def seg2bmap_by_rules(seg: np.ndarray) -> np.ndarray:
    """DAVIS's boundary rules spelled out per pixel: compare with the right, lower and lower-right
    neighbours; in the last column only with the lower one, in the last row only with the right one,
    never at the last pixel."""
    h, w = seg.shape
    out = np.zeros_like(seg)
    for y in range(h):
        for x in range(w):
            if y < h - 1 and x < w - 1:
                out[y, x] = (
                    seg[y, x] != seg[y, x + 1] or seg[y, x] != seg[y + 1, x] or seg[y, x] != seg[y + 1, x + 1]
                )
            elif x == w - 1 and y < h - 1:
                out[y, x] = seg[y, x] != seg[y + 1, x]
            elif y == h - 1 and x < w - 1:
                out[y, x] = seg[y, x] != seg[y, x + 1]
    return out


def test_boundary_map_hand_computed_and_against_rules():
    got = boundary_map(square((6, 6), 1, 1, 3, 3))
    expected = np.zeros((6, 6), dtype=bool)
    for y, x in [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0), (1, 2), (2, 1), (2, 2)]:
        expected[y, x] = True
    assert np.array_equal(got, expected)
    rng = np.random.default_rng(1)
    masks = rng.random((5, 7, 9)) < 0.4
    assert np.array_equal(boundary_map(masks), np.stack([seg2bmap_by_rules(m) for m in masks]))
    assert not boundary_map(np.ones((4, 4), dtype=bool)).any()  # the image border is not a boundary


def dense_f(pred_mask: np.ndarray, gt_mask: np.ndarray, radius: int) -> float:
    """DAVIS's f_measure the dense way: dilate both boundary maps with scipy, intersect, count."""
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    disk = x * x + y * y <= radius * radius
    pb, gb = boundary_map(pred_mask), boundary_map(gt_mask)
    if not pb.any() or not gb.any():
        return float(not pb.any() and not gb.any())
    precision = (pb & ndimage.binary_dilation(gb, structure=disk)).sum() / pb.sum()
    recall = (gb & ndimage.binary_dilation(pb, structure=disk)).sum() / gb.sum()
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


@pytest.mark.parametrize("upscale", [5, 37])  # images 35x40 (radius 1) and 259x296 (radius 4)
def test_boundary_f_matches_dense_dilation(upscale):
    rng = np.random.default_rng(upscale)
    coarse = rng.integers(0, 4, size=(2, 7, 8))
    gt = np.kron(coarse, np.ones((upscale, upscale), dtype=np.int64))
    pred = np.roll(gt, 2, axis=2)  # near misses, within the tolerance or not depending on the radius
    speckle = rng.random(gt.shape) < 0.01
    pred[speckle] = rng.integers(0, 6, size=speckle.sum())
    radius = davis_boundary_radius(*gt.shape[1:])
    assert radius == (1 if upscale == 5 else 4)
    _, f, gt_ids, pred_ids = jf_pair_scores(gt, pred)
    for t in range(gt.shape[0]):
        for p, pid in enumerate(pred_ids):
            for g, gid in enumerate(gt_ids):
                expected = dense_f(pred[t] == pid, gt[t] == gid, radius)
                assert f[p, g, t] == pytest.approx(expected, abs=1e-12), (t, pid, gid)
    assert 0 < f.mean() < 1  # a mix of hits and misses, not a trivial case


def test_boundary_radius_follows_davis():
    assert davis_boundary_radius(480, 854) == 8  # ceil(0.008 * 979.7)
    assert davis_boundary_radius(8, 8) == 1


def test_jf_pair_scores_hand_computed_shift():
    # 6x6, gt square rows 1-2 cols 1-2, prediction the same square two columns to the right. Boundaries
    # (8 px each) meet within the radius-1 disk at 5 of 8 pixels each way: P = R = F = 5/8; J = 0.
    gt = square((6, 6), 1, 1, 3, 3)[None].astype(np.int64)
    pred = square((6, 6), 1, 3, 3, 5)[None].astype(np.int64)
    j, f, gt_ids, pred_ids = jf_pair_scores(gt, pred)
    assert j.shape == (1, 1, 1) and j[0, 0, 0] == 0.0
    assert f[0, 0, 0] == pytest.approx(5 / 8)
    result = davis_jf(gt, pred)
    assert result["JF"] == pytest.approx(5 / 16)


# ---------------------------------------------------------------------------------------------------------
# DAVIS J&F


def test_davis_perfect_prediction_scores_one():
    gt = disappearing_sequence()
    result = davis_jf(gt, np.choose(gt, [0, 2, 1]))  # ids swapped consistently: still perfect
    assert result["J"] == 1.0 and result["F"] == 1.0 and result["JF"] == 1.0
    assert result["per_object"][1]["pred"] == 2 and result["per_object"][2]["pred"] == 1


def test_davis_sequence_matching_penalises_swapped_ids_where_per_frame_matching_does_not():
    gt, pred = swapped_sequence()
    result = davis_jf(gt, pred)
    # whichever prediction an object gets, it is right in one frame of two and far away in the other
    assert result["J"] == pytest.approx(0.5) and result["F"] == pytest.approx(0.5)
    assert result["JF"] == pytest.approx(0.5)
    # the BA code's per-frame matching on the same pair scores would report a perfect 1.0
    j, f, _, _ = jf_pair_scores(gt, pred)
    per_frame = []
    for t in range(j.shape[2]):
        rows, cols = linear_sum_assignment(j[:, :, t] + f[:, :, t], maximize=True)
        per_frame.append((j[rows, cols, t].mean() + f[rows, cols, t].mean()) / 2)
    assert np.mean(per_frame) == pytest.approx(1.0)


def test_davis_object_that_disappears_and_reappears():
    gt = disappearing_sequence()
    false_positive = gt.copy()
    false_positive[1, 5:7, 4:7] = 2  # object 2 also predicted in frame 1, where it is absent
    result = davis_jf(gt, false_positive)
    # object 2: frames 0 and 2 perfect, frame 1 J = 0 and F = 0 (P 0, R 1): means 2/3
    assert result["per_object"][2]["J"] == pytest.approx(2 / 3)
    assert result["per_object"][2]["F"] == pytest.approx(2 / 3)
    assert result["JF"] == pytest.approx((1 + 2 / 3) / 2)
    # no prediction for object 2 at all: it is matched to an empty pad, right only in frame 1 (both empty)
    missing = davis_jf(gt, (gt == 1).astype(np.int64))
    assert missing["per_object"][2] == pytest.approx({"J": 1 / 3, "F": 1 / 3, "pred": None})
    assert missing["JF"] == pytest.approx((1 + 1 / 3) / 2)


def test_davis_more_clusters_than_objects_matches_the_best_one():
    # 8x8, object rows 2-5 cols 2-5; cluster 1 = rows 2-4 (J 12/16, its boundary is within one pixel of the
    # gt boundary everywhere: F 1), cluster 2 = row 5 (J 4/16, P 1, R 9/16, F 18/25)
    gt = square((8, 8), 2, 2, 6, 6)[None].astype(np.int64)
    pred = np.zeros_like(gt)
    pred[0, 2:5, 2:6] = 1
    pred[0, 5, 2:6] = 2
    j, f, _, pred_ids = jf_pair_scores(gt, pred)
    assert list(pred_ids) == [1, 2]
    assert j[:, 0, 0] == pytest.approx([0.75, 0.25])
    assert f[:, 0, 0] == pytest.approx([1.0, 18 / 25])
    result = davis_jf(gt, pred)
    assert result["per_object"][1]["pred"] == 1
    assert result["JF"] == pytest.approx(0.875)
    assert fg_ari(gt, pred) == 0.0  # FG-ARI does punish the split


def test_davis_matching_uses_j_and_f_not_j_alone():
    # 16x16 (radius 1), a 6x6 object in two frames. Prediction 1, in frame 0 only: the object plus a far
    # 8 px line (J 36/44, poor boundary). Prediction 2, in frame 1 only: the object shifted one column
    # (J 30/42, F 1). J alone would pick prediction 1 (mean 9/22 > 5/14); (J + F) / 2 picks prediction 2.
    gt = np.zeros((2, 16, 16), dtype=np.int64)
    gt[:, 4:10, 4:10] = 1
    pred = np.zeros_like(gt)
    pred[0, 4:10, 4:10] = 1
    pred[0, 14, 4:12] = 1
    pred[1, 4:10, 5:11] = 2
    j, f, _, _ = jf_pair_scores(gt, pred)
    assert j[:, 0].mean(axis=1) == pytest.approx([9 / 22, 5 / 14])  # J prefers prediction 1
    assert f[1, 0, 1] == 1.0
    result = davis_jf(gt, pred)
    assert result["per_object"][1] == pytest.approx({"J": 5 / 14, "F": 0.5, "pred": 2})


def test_davis_without_objects_is_nan():
    empty = np.zeros((1, 6, 6), dtype=np.int64)
    assert np.isnan(davis_jf(empty, empty)["JF"])


# ---------------------------------------------------------------------------------------------------------
# The DAVIS-17 unsupervised protocol: void pixels, at most 20 proposals, every cluster a proposal


def void_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One 12x12 frame (boundary radius 1): gt object rows 3-6 cols 3-6 (16 px) with void bands two rows
    thick above and below it (rows 1-2 and 7-8, cols 2-7: DAVIS marks object borders 255); the prediction
    covers rows 1-8 cols 3-6 (32 px): right on the object, 16 px over the void bands."""
    gt = square((12, 12), 3, 3, 7, 7)[None].astype(np.int64)
    void = np.zeros_like(gt, dtype=bool)
    void[0, 1:3, 2:8] = void[0, 7:9, 2:8] = True
    pred = square((12, 12), 1, 3, 9, 7)[None].astype(np.int64)
    return gt, pred, void


def test_void_pixels_do_not_change_j():
    gt, pred, void = void_case()
    assert davis_jf(gt, pred)["J"] == pytest.approx(16 / 32)  # counted: the void bands are false positives
    assert davis_jf(gt, pred, void)["J"] == 1.0  # left out: the prediction is exact where it counts
    # whatever the prediction does on void pixels, J stays the same
    scribbled = pred.copy()
    scribbled[void] = 1 - scribbled[void]
    assert davis_jf(gt, scribbled, void)["J"] == 1.0
    j, _, _, _ = jf_pair_scores(gt, scribbled, void)
    assert j[0, 0, 0] == 1.0
    # and void takes nothing away from a real miss: a prediction shifted off the object keeps its J
    shifted = square((12, 12), 3, 5, 7, 9)[None].astype(np.int64)
    assert davis_jf(gt, shifted, void)["J"] == davis_jf(gt, shifted)["J"] == pytest.approx(8 / 24)


def test_void_pixels_are_left_out_of_f_and_miou():
    gt, pred, void = void_case()
    # boundaries of the masks less the void pixels: both become the 4x4 square, F = 1; with the void
    # bands counted, the prediction's top and bottom edges lie two pixels off (radius 1): F < 1
    assert davis_jf(gt, pred)["F"] < 0.9 and davis_jf(gt, pred, void)["F"] == 1.0
    assert miou_hungarian(gt, pred)["mean"] == pytest.approx(16 / 32)
    assert miou_hungarian(gt, pred, void)["mean"] == 1.0
    with pytest.raises(ValueError, match="void"):
        davis_jf(gt, pred, void.astype(np.uint8))


def test_a_25_proposal_sequence_is_cut_to_the_20_largest():
    # 25 proposals in a 2-frame 20x20 sequence, proposal k covering k + 2 pixels (rows of a strip), so
    # the 20 largest are 6..25; the gt object is proposal 3 (too small to stay), then 24 (kept).
    pred = np.zeros((2, 20, 20), dtype=np.int64)
    for k in range(1, 26):
        flat = pred[0].reshape(-1)
        start = sum(j + 2 for j in range(1, k))
        flat[start : start + k + 2] = k
    pred[1] = pred[0]
    assert len(np.unique(pred)) - 1 == 25
    cut = keep_largest_proposals(pred, DAVIS_MAX_PROPOSALS)
    assert DAVIS_MAX_PROPOSALS == 20 and set(np.unique(cut)) == set(range(21))
    for k in range(1, 6):  # the five smallest became background
        assert (cut[pred == k] == 0).all()
    for k in range(6, 26):  # the others keep their pixels, renumbered 1..20 in order
        assert (cut[pred == k] == k - 5).all()
    assert davis_proposals(pred, background=False).max() == 20
    # the same cut in J&F: gt = proposal 3 scores nothing once cut; gt = proposal 24 scores 1
    assert davis_jf(pred == 3, davis_proposals(pred, background=False))["J"] < 0.5
    assert davis_jf((pred == 24).astype(np.int64), davis_proposals(pred, background=False))["J"] == 1.0
    assert keep_largest_proposals(pred, 30) is pred  # 25 <= 30: untouched


def test_ties_at_the_cut_keep_the_lower_id():
    pred = np.array([[[1, 2, 3, 3]]])
    assert keep_largest_proposals(pred, 2).tolist() == [[[1, 0, 2, 2]]]  # 1 and 2 tie: 1 stays


def test_the_background_cluster_is_a_proposal_too():
    gt = np.zeros((1, 6, 6), dtype=np.int64)
    gt[0, 1:5, 1:5] = 1
    # a clustering that calls the object "background" and the border ring an object
    pred = np.where(gt == 1, 0, 1)
    assert davis_jf(gt, pred)["J"] == 0.0 and miou_hungarian(gt, pred)["mean"] == 0.0
    proposals = with_background_proposal(pred)
    assert set(np.unique(proposals)) == {1, 2} and (proposals[gt == 1] == 2).all()
    assert davis_jf(gt, proposals)["JF"] == 1.0 and miou_hungarian(gt, proposals)["mean"] == 1.0
    assert davis_jf(gt, davis_proposals(pred, background=True))["JF"] == 1.0
    assert fg_ari(gt, proposals) == fg_ari(gt, pred)  # one more cluster id changes no grouping
