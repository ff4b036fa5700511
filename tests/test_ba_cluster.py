"""BA clustering of attention rows (stages/video/ba_cluster.py) on attention the tests make."""

from __future__ import annotations

import math

import pytest
import torch

from stages.video.ba_cluster import (
    background_cluster,
    cluster_attention,
    first_appearance_labels,
    instance_tracks,
    smooth_rows,
    symmetric_kl,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def grouped_rows(
    n_groups: int, per_group: int, keys: int, spread: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows softmax(base_g + spread * noise): each group has its own random peaked base distribution over
    ``keys`` keys. Rows are shuffled so the groups interleave. Returns (N, keys) float64 rows and the
    (N,) group of each row."""
    g = torch.Generator().manual_seed(seed)
    base = 3.0 * torch.randn(n_groups, keys, generator=g, dtype=torch.float64)
    truth = torch.arange(n_groups).repeat_interleave(per_group)
    logits = base[truth] + spread * torch.randn(truth.numel(), keys, generator=g, dtype=torch.float64)
    order = torch.randperm(truth.numel(), generator=g)
    return logits[order].softmax(dim=1), truth[order]


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when the labelings are equal up to renaming the labels."""
    pairs = torch.unique(torch.stack([a, b]), dim=1)
    return pairs.shape[1] == torch.unique(a).numel() == torch.unique(b).numel()


def n_clusters(labels: torch.Tensor) -> int:
    return int(torch.unique(labels).numel())


def reference_clustering(
    rows: torch.Tensor, tau: float, max_rounds: int, smooth: bool = False, weights: str = "members"
) -> torch.Tensor:
    """The clustering written item by item (the slow way), to check the masked version against: SPEC's
    plain rounds (smooth=False, weights='members'), or the BA code's (smoothed first round, equal-weight
    merges)."""
    items = list(rows)
    if smooth:  # each row -> the normalised sum of the rows within tau of it
        dist = symmetric_kl(rows, rows)
        items = [
            sum(rows[j] for j in range(len(rows)) if j == i or dist[i, j] <= tau) for i in range(len(rows))
        ]
        items = [item / item.sum() for item in items]
    counts = [1.0] * rows.shape[0]
    for r in range(max_rounds):
        dist = symmetric_kl(torch.stack(items), torch.stack(items))
        free = [True] * len(items)
        new_items, new_counts = [], []
        for i in range(len(items)):
            if not free[i]:
                continue
            members = [j for j in range(len(items)) if free[j] and (j == i or dist[i, j] <= tau)]
            for j in members:
                free[j] = False
            w = [counts[j] if (weights == "members" or r == 0) else 1.0 for j in members]
            new_items.append(sum(items[j] * wj for j, wj in zip(members, w, strict=True)) / sum(w))
            new_counts.append(sum(counts[j] for j in members))
        changed = len(new_items) != len(items)
        items, counts = new_items, new_counts
        if not changed:
            break
    nearest = symmetric_kl(rows, torch.stack(items)).argmin(dim=1)
    return first_appearance_labels(nearest)


BA_CODE = {"smooth": True, "weights": "equal"}  # the BA code's clustering (the config's defaults)
PLAIN = {"smooth": False, "weights": "members"}  # SPEC's plain rounds


# ---------------------------------------------------------------------------------------------------------
# symmetric_kl


def test_symmetric_kl_is_the_sum_of_both_divergences():
    p = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    q = torch.tensor([[0.9, 0.1]], dtype=torch.float64)
    kl_pq = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    kl_qp = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert symmetric_kl(p, q).item() == pytest.approx(kl_pq + kl_qp, abs=1e-12)  # 0.8789, not the mean


def test_symmetric_kl_matches_elementwise_formula():
    g = torch.Generator().manual_seed(0)
    p = (2 * torch.randn(5, 16, generator=g, dtype=torch.float64)).softmax(dim=1)
    q = (2 * torch.randn(7, 16, generator=g, dtype=torch.float64)).softmax(dim=1)
    diff = p[:, None, :] - q[None, :, :]
    log_diff = p.log()[:, None, :] - q.log()[None, :, :]
    direct = (diff * log_diff).sum(dim=2)
    assert torch.allclose(symmetric_kl(p, q), direct, atol=1e-10)
    assert torch.allclose(symmetric_kl(q, p), direct.T, atol=1e-10)  # symmetric
    assert torch.allclose(symmetric_kl(p, p).diagonal(), torch.zeros(5, dtype=torch.float64), atol=1e-10)
    assert (direct > 0.1).all()  # the rows are distinct, so the check above compares real values
    # all pairs of one set take a shortcut (one product); it must agree with the general path
    assert torch.allclose(symmetric_kl(p, p), symmetric_kl(p, p.clone()), atol=1e-10)


def test_symmetric_kl_is_finite_with_zero_probabilities():
    p = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    d = symmetric_kl(p, p)
    assert torch.isfinite(d).all()
    assert d[0, 1] > 1.0 and d[0, 0] == pytest.approx(0.0, abs=1e-5)


# ---------------------------------------------------------------------------------------------------------
# cluster_attention


@pytest.mark.parametrize("mode", [BA_CODE, PLAIN], ids=["ba-code", "plain"])
def test_recovers_distinct_groups(mode):
    rows, truth = grouped_rows(n_groups=4, per_group=30, keys=48, spread=0.3, seed=1)
    labels = cluster_attention(rows, tau=1.0, max_rounds=100, **mode)
    assert same_partition(labels, truth)


@pytest.mark.parametrize("mode", [BA_CODE, PLAIN], ids=["ba-code", "plain"])
def test_float32_input_and_first_round_blocks_give_the_same_groups(mode):
    rows, truth = grouped_rows(n_groups=3, per_group=40, keys=48, spread=0.3, seed=2)
    assert same_partition(cluster_attention(rows.float(), tau=1.0, max_rounds=100, **mode), truth)
    blocked = cluster_attention(rows, tau=1.0, max_rounds=100, first_round_block=25, **mode)
    assert same_partition(blocked, truth)


@pytest.mark.parametrize("mode", [BA_CODE, PLAIN], ids=["ba-code", "plain"])
def test_low_tau_splits_and_high_tau_merges(mode):
    rows, truth = grouped_rows(n_groups=3, per_group=30, keys=48, spread=0.5, seed=3)
    # within a group rows differ by about 2 * spread^2 * keys / keys-ish; far below the between-group gap
    assert n_clusters(cluster_attention(rows, tau=1.0, max_rounds=100, **mode)) == 3
    assert n_clusters(cluster_attention(rows, tau=0.05, max_rounds=100, **mode)) > 3
    assert n_clusters(cluster_attention(rows, tau=1e6, max_rounds=100, **mode)) == 1


@pytest.mark.parametrize("mode", [BA_CODE, PLAIN], ids=["ba-code", "plain"])
def test_threshold_between_two_close_groups_merges_them(mode):
    g = torch.Generator().manual_seed(4)
    base = 3.0 * torch.randn(3, 32, generator=g, dtype=torch.float64)
    base[1] = base[0] + 0.6 * torch.randn(32, generator=g, dtype=torch.float64)  # group 1 is near group 0
    truth = torch.arange(3).repeat_interleave(20)
    rows = (base[truth] + 0.1 * torch.randn(60, 32, generator=g, dtype=torch.float64)).softmax(dim=1)
    gap_01 = symmetric_kl(base[:1].softmax(1), base[1:2].softmax(1)).item()
    gap_02 = symmetric_kl(base[:1].softmax(1), base[2:3].softmax(1)).item()
    assert 0.2 < gap_01 < 5 < gap_02  # the construction does what the test needs
    assert same_partition(cluster_attention(rows, tau=0.1, max_rounds=100, **mode), truth)
    merged = cluster_attention(rows, tau=gap_01 * 1.5, max_rounds=100, **mode)
    assert same_partition(merged, torch.tensor([0] * 40 + [1] * 20))


# tau where later rounds still merge: smoothing makes the first round absorb more
@pytest.mark.parametrize("mode, tau", [(BA_CODE, 0.3), (PLAIN, 1.0)], ids=["ba-code", "plain"])
def test_matches_item_by_item_reference_over_several_rounds(mode, tau):
    # rows spread over a 2-D continuum: the first round leaves centroids that later rounds merge further
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(2, 24, generator=g, dtype=torch.float64)
    t = 8 * torch.rand(120, 2, generator=g, dtype=torch.float64)
    rows = (t @ directions + 0.2 * torch.randn(120, 24, generator=g, dtype=torch.float64)).softmax(dim=1)
    one_round = cluster_attention(rows, tau=tau, max_rounds=1, **mode)
    two_rounds = cluster_attention(rows, tau=tau, max_rounds=2, **mode)
    full = cluster_attention(rows, tau=tau, max_rounds=100, **mode)
    assert torch.equal(one_round, reference_clustering(rows, tau, 1, **mode))
    assert torch.equal(full, reference_clustering(rows, tau, 100, **mode))
    assert torch.equal(two_rounds, reference_clustering(rows, tau, 2, **mode))
    # later rounds did merge something, and the third round still did (so the loop really iterates)
    assert n_clusters(full) < n_clusters(two_rounds) < n_clusters(one_round)


@pytest.mark.parametrize("mode", [BA_CODE, PLAIN], ids=["ba-code", "plain"])
def test_labels_are_deterministic_and_numbered_by_first_appearance(mode):
    rows, _ = grouped_rows(n_groups=4, per_group=25, keys=32, spread=0.4, seed=6)
    a = cluster_attention(rows, tau=1.0, max_rounds=100, **mode)
    b = cluster_attention(rows.clone(), tau=1.0, max_rounds=100, **mode)
    assert torch.equal(a, b)
    seen = -1
    for label in a.tolist():  # each new label is the next integer
        assert label <= seen + 1
        seen = max(seen, label)
    assert seen == n_clusters(a) - 1


def test_smoothing_in_chunks_equals_all_at_once_and_averages_the_neighbours():
    rows, _ = grouped_rows(n_groups=3, per_group=20, keys=32, spread=0.4, seed=8)
    whole = smooth_rows(rows, 1.0)
    assert torch.allclose(smooth_rows(rows, 1.0, chunk=7), whole, atol=1e-12)
    near = symmetric_kl(rows, rows)[5] <= 1.0
    assert 1 < int(near.sum()) < len(rows)  # a real neighbourhood, not one row nor all
    assert torch.allclose(whole[5], rows[near].sum(0) / rows[near].sum(), atol=1e-12)
    assert torch.allclose(smooth_rows(rows, -1.0), rows, atol=1e-15)  # no neighbour but itself: unchanged


def test_bad_arguments_raise():
    rows = torch.full((4, 3), 1 / 3)
    with pytest.raises(ValueError):
        cluster_attention(rows, tau=1.0, max_rounds=0, **BA_CODE)
    with pytest.raises(ValueError):
        cluster_attention(rows, tau=1.0, max_rounds=5, first_round_block=0, **BA_CODE)


@pytest.mark.parametrize("mode", [BA_CODE, PLAIN], ids=["ba-code", "plain"])
def test_video_attention_to_tracks_end_to_end(mode):
    """Three frames of a 6x8 patch grid: background plus two squares that move; attention of each query
    patch goes to the key patches (every frame's) of its own object."""
    T, h, w = 3, 6, 8
    truth = torch.zeros(T, h, w, dtype=torch.long)
    for t in range(T):
        truth[t, 1:3, 1 + t : 3 + t] = 1
        truth[t, 3:5, 5 - t : 7 - t] = 2
    flat = truth.reshape(-1)
    g = torch.Generator().manual_seed(7)
    logits = 6.0 * (flat[:, None] == flat[None, :]).double()
    noise = 0.3 * torch.randn(flat.numel(), flat.numel(), generator=g, dtype=torch.float64)
    rows = (logits + noise).softmax(dim=1)
    labels = cluster_attention(rows, tau=1.0, max_rounds=100, first_round_block=h * w, **mode).reshape(
        T, h, w
    )
    background = background_cluster(labels, rule="border")
    tracks = instance_tracks(labels, background)
    assert torch.equal(tracks, truth)  # object 1 appears first in (t, y, x) order, as in the truth


# ---------------------------------------------------------------------------------------------------------
# background and tracks


def test_background_is_the_border_cluster_even_when_not_largest():
    labels = torch.zeros(2, 6, 6, dtype=torch.long)
    labels[:, 1:5, 1:6] = 1  # 20 patches per frame, 4 of them on the right border
    labels[:, 0, :] = 2  # the top row: 6 patches, all on the border
    # label 0 keeps the left column and bottom row below the top row: 10 patches, all on the border
    border = torch.zeros(6, 6, dtype=torch.bool)
    border[[0, -1], :] = True
    border[:, [0, -1]] = True
    counts = torch.bincount(labels[:, border].reshape(-1), minlength=3)
    sizes = torch.bincount(labels.reshape(-1), minlength=3)
    assert sizes[1] > sizes[0] and counts[0] > counts[1]  # the case the test is about
    assert background_cluster(labels, rule="border") == 0
    assert background_cluster(labels, rule="largest") == 1


def test_background_ties_go_to_the_larger_cluster():
    labels = torch.zeros(1, 6, 6, dtype=torch.long)
    labels[0, :3, :] = 3  # top half and bottom half: 10 border patches each
    labels[0, 3:, :] = 5
    labels[0, 4, 2:4] = 4  # an interior blob taken out of cluster 5 makes 5 smaller
    assert background_cluster(labels, rule="border") == 3
    labels[0, 4, 2:4] = 5
    labels[0, 1, 2:4] = 4  # now cluster 3 is the smaller one
    assert background_cluster(labels, rule="border") == 5


def test_instance_tracks_number_foreground_by_first_appearance():
    labels = torch.tensor(
        [
            [[7, 7, 7], [7, 2, 9]],
            [[7, 9, 7], [7, 2, 7]],
        ]
    )
    tracks = instance_tracks(labels, background=7)
    expected = torch.tensor(
        [
            [[0, 0, 0], [0, 1, 2]],
            [[0, 2, 0], [0, 1, 0]],
        ]
    )
    assert torch.equal(tracks, expected)
    assert torch.equal(instance_tracks(torch.full((2, 2, 2), 3), background=3), torch.zeros(2, 2, 2).long())
