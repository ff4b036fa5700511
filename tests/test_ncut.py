"""The fast (Lanczos) Fiedler solver gives the dense reference's answers, on graphs the tests build."""

import numpy as np
import pytest
import torch

from stages.discovery.maskcut import maskcut
from stages.discovery.ncut import (
    binary_affinity,
    bipartition,
    canonical_sign,
    fiedler_vector,
    isolate_nodes,
    lanczos_fiedler,
    unit_keys,
)
from stages.discovery.tokencut import tokencut
from tests.synthetic import planted_keys
from tools.bench_ncut import two_cliques

EPS = 1e-5


def object_keys(grid, boxes, noise, seed, dim=64):
    """Keys (h*w, dim): background b, object j its own direction o_j - 0.5 b (anti-correlated with the
    background), plus noise. Unlike tests.synthetic.planted_keys, objects differ from each other."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=g))[0]
    keys = basis[0].repeat(h, w, 1)
    for j, (y0, x0, y1, x1) in enumerate(boxes):
        keys[y0:y1, x0:x1] = basis[1 + j] - 0.5 * basis[0]
    return (keys + noise * torch.randn(h, w, dim, generator=g) / dim**0.5).reshape(h * w, dim)


def agreement(affinity):
    """(IoU of the two bipartitions v > mean, cosine of the two vectors) of dense vs fast."""
    dense, fast = fiedler_vector(affinity, "dense"), fiedler_vector(affinity, "fast")
    a, b = bipartition(dense), bipartition(fast)
    iou = (a & b).sum() / (a | b).sum()
    return float(iou), float(dense @ fast / (dense.norm() * fast.norm()))


def assert_same(affinity):
    iou, cosine = agreement(affinity)
    assert iou >= 0.99
    assert cosine > 1 - 1e-6


@pytest.mark.parametrize(
    "grid, boxes, noise, tau",
    [
        ((20, 24), [(3, 4, 10, 12)], 0.5, 0.2),
        ((20, 24), [(2, 2, 8, 9), (12, 14, 18, 22), (2, 15, 7, 22)], 0.9, 0.15),
        ((24, 20), [(5, 5, 15, 15), (16, 2, 22, 8)], 1.3, 0.2),  # noisy: many edges cross tau
        ((17, 41), [(2, 3, 9, 14), (8, 25, 15, 38)], 0.7, 0.15),  # non-square
        ((9, 50), [(1, 10, 7, 20)], 0.6, 0.2),  # long and thin
    ],
)
def test_fast_matches_dense_on_planted_graphs(grid, boxes, noise, tau):
    assert_same(binary_affinity(unit_keys(object_keys(grid, boxes, noise, seed=len(boxes)), False), tau, EPS))


def test_fast_matches_dense_on_centred_keys_with_tau_zero():
    """The DINOv2 setting: centred keys, tau 0, so about half of all pairs are edges."""
    keys = object_keys((18, 26), [(2, 3, 12, 11), (6, 15, 16, 24)], noise=1.0, seed=5)
    assert_same(binary_affinity(unit_keys(keys, True), 0.0, EPS))


@pytest.mark.parametrize(
    "boxes, noise, tau, zeroed",
    [
        ([(3, 4, 10, 12), (12, 14, 18, 22)], 0.5, 0.15, (3, 4, 10, 12)),
        ([(3, 4, 10, 12), (12, 14, 18, 22)], 0.5, 0.15, (0, 0, 20, 6)),
        ([(3, 4, 10, 12), (12, 14, 18, 22)], 0.5, 0.15, (12, 14, 18, 22)),
        # The object is joined to the rest by eps edges only: lambda2 ~ 1e-4, so the isolated rows sit
        # 1e-4 |mean(v)| from the threshold, closer than float32 rounding puts them.
        ([(3, 4, 10, 12)], 0.3, 0.5, (12, 14, 18, 22)),
    ],
)
def test_isolated_nodes_land_on_the_dense_side(boxes, noise, tau, zeroed):
    """MaskCut's taken patches have zero features, so eps-only rows: their v_i = mean(v) / (1 - lambda2)
    sit within lambda2 / (1 - lambda2) * |mean(v)| of the cut threshold; both solvers must put them on the
    same side (and the rest of the graph must agree too)."""
    grid = (20, 24)
    keys = object_keys(grid, boxes, noise=noise, seed=1)
    taken = torch.zeros(grid, dtype=torch.bool)
    taken[zeroed[0] : zeroed[2], zeroed[1] : zeroed[3]] = True
    feats = unit_keys(keys, False).masked_fill(taken.reshape(-1, 1), 0.0)
    affinity = binary_affinity(feats, tau, EPS)
    dense, fast = (bipartition(fiedler_vector(affinity, s)) for s in ("dense", "fast"))
    isolated = taken.reshape(-1).numpy()
    assert np.array_equal(dense[isolated], fast[isolated])
    assert np.array_equal(dense, fast)
    vec = fiedler_vector(affinity, "fast")
    assert torch.unique(vec[torch.from_numpy(isolated)]).numel() == 1  # the float64 closed form, exactly


def test_disconnected_cliques():
    """Two cliques joined only by eps edges: lambda2 ~ 2 eps; the cut separates the cliques."""
    n, first = 300, 110
    side = torch.arange(n) < first
    affinity = two_cliques(n, first, EPS)
    result = lanczos_fiedler(affinity)
    assert result.converged and result.value < 1e-3
    for solver in ("dense", "fast"):
        cut = bipartition(fiedler_vector(affinity, solver))
        assert np.array_equal(cut, side.numpy()) or np.array_equal(cut, ~side.numpy())
    assert_same(affinity)


def test_disconnected_objects_and_background():
    """Objects whose keys match nothing else: several nearly disconnected components at once."""
    keys = object_keys((20, 24), [(2, 2, 8, 9), (12, 14, 18, 22)], noise=0.2, seed=3)
    assert_same(binary_affinity(unit_keys(keys, False), 0.5, EPS))


def test_fast_result_is_an_eigenpair():
    keys = object_keys((16, 20), [(3, 3, 11, 10)], noise=0.8, seed=2)
    affinity = binary_affinity(unit_keys(keys, False), 0.2, EPS).double()
    result = lanczos_fiedler(affinity)
    d = affinity.sum(1)
    v = result.vector
    residual = (d * v - affinity @ v) - result.value * d * v
    assert result.converged and result.steps < 60
    assert float(residual.norm() / (d * v).norm()) < 1e-6
    assert float(v @ (d * v)) == pytest.approx(1.0)  # scaled like LAPACK's: v^T D v = 1
    assert abs(float(v @ d)) < 1e-8  # D-orthogonal to the constant vector


def test_degenerate_eigenspace_gives_a_valid_vector():
    """Three equal cliques, eps-joined: lambda2 = lambda3, so any vector of that 2-D eigenspace is a
    correct answer; the fast solver must return one of them (not the same one as LAPACK)."""
    labels = torch.arange(240) // 80
    affinity = torch.where(labels[:, None] == labels[None, :], 1.0, EPS).double()
    v = lanczos_fiedler(affinity).vector
    d = affinity.sum(1)
    lam = float(v @ (d * v - affinity @ v)) / float(v @ (d * v))
    assert lam == pytest.approx(3 * EPS / (1 + 2 * EPS), rel=1e-6)
    assert float((d * v - affinity @ v - lam * d * v).norm()) < 1e-9
    means = torch.stack([v[labels == k].mean() for k in range(3)])
    assert float(means.abs().max()) > 0  # constant on each clique, not all zero
    assert float(torch.stack([v[labels == k].std() for k in range(3)]).max()) < 1e-9


def test_canonical_sign():
    v = torch.tensor([0.1, -0.9, 0.3, 0.2])
    assert torch.equal(canonical_sign(v), -v)
    assert torch.equal(canonical_sign(-v), -v)
    tie = torch.tensor([0.0, -0.5, 0.3, 0.5 * (1 - 1e-6)])  # |v| tied: the lowest index (1) is made positive
    assert torch.equal(canonical_sign(tie), -tie)
    assert torch.equal(canonical_sign(-tie), -tie)


def test_equal_cliques_get_the_same_sign_from_both_solvers():
    """Two equal cliques: v = +c on one, -c on the other, so the largest magnitude does not pick a sign;
    the tie rule must, the same way for both solvers (MaskCut's seed and flip depend on it)."""
    affinity = two_cliques(200, 100, EPS)
    dense, fast = fiedler_vector(affinity, "dense"), fiedler_vector(affinity, "fast")
    assert float(dense[0]) > 0 and float(fast[0]) > 0
    assert np.array_equal(bipartition(dense), bipartition(fast))


def test_maskcut_and_tokencut_outputs_equal_between_solvers():
    grid = (24, 30)
    boxes = [(2, 2, 9, 10), (14, 15, 21, 25), (3, 19, 8, 28)]
    keys = object_keys(grid, boxes, noise=0.6, seed=7)
    masks = {s: maskcut(keys, grid, 0.15, EPS, False, 3, 0.5, 0.01, s) for s in ("dense", "fast")}
    assert len(masks["dense"]) == 3
    assert len(masks["fast"]) == 3
    assert all(np.array_equal(a, b) for a, b in zip(masks["dense"], masks["fast"], strict=True))
    dense, fast = (tokencut(keys, grid, 0.2, EPS, False, s) for s in ("dense", "fast"))
    assert dense.any() and np.array_equal(dense, fast)


def test_tokencut_with_tied_seeds_picks_an_object_with_either_solver():
    """All three objects alike: every object patch has the same v (up to rounding), so the seed argmax |v|
    is decided by rounding, in tokencut, not in the eigensolve. Either solver must still return exactly
    one of the objects; which one may differ."""
    grid = (24, 30)
    keys, truth = planted_keys(grid, [(2, 2, 9, 10), (14, 15, 21, 25), (3, 19, 8, 28)])
    for solver in ("dense", "fast"):
        mask = tokencut(keys, grid, 0.2, EPS, False, solver)
        assert any(np.array_equal(mask, t) for t in truth)


def test_errors():
    affinity = torch.ones(5, 5)
    with pytest.raises(ValueError, match="unknown eigensolver"):
        fiedler_vector(affinity, "lobpcg")
    affinity[2] = 0.0
    affinity[:, 2] = 0.0
    with pytest.raises(np.linalg.LinAlgError):
        fiedler_vector(affinity, "fast")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_fast_on_gpu_matches_cpu():
    keys = object_keys((20, 24), [(3, 4, 10, 12), (12, 14, 18, 22)], noise=0.7, seed=4)
    affinity = binary_affinity(unit_keys(keys, False), 0.15, EPS)
    cpu = fiedler_vector(affinity, "fast")
    gpu = fiedler_vector(affinity.cuda(), "fast")
    assert gpu.device.type == "cuda"
    assert np.array_equal(bipartition(cpu), bipartition(gpu))
    assert float(cpu @ gpu.cpu() / (cpu.norm() * gpu.cpu().norm())) > 1 - 1e-9


@pytest.mark.parametrize("tau", [0.15, 0.0, -0.1])
def test_isolate_nodes_equals_recomputing_the_graph(tau):
    keys = object_keys((12, 15), [(2, 2, 8, 9)], noise=0.8, seed=6)
    feats = unit_keys(keys, tau == 0.0)
    taken = torch.zeros(180, dtype=torch.bool)
    taken[torch.tensor([0, 5, 17, 18, 19, 100, 179])] = True
    recomputed = binary_affinity(feats.masked_fill(taken[:, None], 0.0), tau, EPS)
    assert torch.equal(isolate_nodes(binary_affinity(feats, tau, EPS), taken, tau, EPS), recomputed)


def test_complete_graph_gives_a_valid_vector():
    """Every pair connected: lambda2 = ... = lambdan = 1 and every row is constant; any vector
    D-orthogonal to 1 is a correct answer, and the solver must return one (finite, non-zero)."""
    affinity = torch.ones(50, 50)
    for solver in ("dense", "fast"):
        v = fiedler_vector(affinity, solver)
        assert bool(torch.isfinite(v).all()) and float(v.abs().max()) > 0
        assert abs(float(v.sum())) < 1e-9


@pytest.mark.parametrize("n, blocks", [(7, 1), (50, 8), (333, 8), (64, 3)])
def test_triangular_affinity_equals_the_full_product(n, blocks):
    gen = torch.Generator().manual_seed(n)
    feats = torch.nn.functional.normalize(torch.randn(n, 16, generator=gen), dim=1)
    feats[::5] = 0.0  # taken rows
    full = torch.where(feats @ feats.T > 0.1, 1.0, torch.tensor(EPS, dtype=torch.float32))
    assert torch.equal(binary_affinity(feats, 0.1, EPS, blocks=blocks), full)
