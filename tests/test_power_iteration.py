"""Power iteration clustering and the ssl-vos spectral initialisation find planted objects and agree with
the dense eigensolver, on feature maps the tests build."""

import numpy as np
import pytest
import torch

from stages.discovery.ncut import dense_fiedler
from stages.video.optical_flow import sampling_matrix
from stages.video.power_iteration import (
    SpectralInitParams,
    dense_power_iteration,
    foreground,
    frame_affinity,
    frame_flows,
    frame_windows,
    soft_masks,
    spectral_vectors,
    two_means,
)
from tools.bench_sslvos import planted_video

PARAMS = SpectralInitParams()


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum() / (a | b).sum().clamp_min(1))


@pytest.mark.parametrize(
    "grid, dim, noise, likeness, seed",
    [
        ((30, 40), 32, 1.2, 0.3, 0),
        ((30, 40), 32, 1.0, 0.3, 1),
        ((24, 36), 32, 1.2, 0.3, 2),
        ((20, 50), 32, 1.1, 0.3, 3),
    ],
)
def test_pic_finds_planted_object_and_matches_dense_eigenvector(grid, dim, noise, likeness, seed):
    video = planted_video(1, grid, dim, noise, likeness, seed=seed)
    affinity = frame_affinity(video.keys, None, PARAMS)
    truth = video.truth.flatten(1)
    # Not trivially separable: many object-background pairs are edges, many same-side pairs are not.
    edge = affinity[0] > PARAMS.tau
    same_side = truth[0][:, None] == truth[0][None, :]
    assert float(edge[~same_side].float().mean()) > 0.08
    assert float((~edge[same_side]).float().mean()) > 0.05

    result = dense_power_iteration(affinity, PARAMS.tol, PARAMS.max_steps)
    assert bool(result.converged.all())
    fiedler = dense_fiedler(affinity[0]).float()
    # the vector itself approximates the dense second eigenvector (its degree-based start does not)
    assert abs(float(torch.nn.functional.cosine_similarity(result.vectors[0], fiedler, dim=0))) > 0.99
    pic = foreground(result.vectors)
    dense = foreground(fiedler[None])
    assert iou(pic, dense) >= 0.95
    assert iou(pic, truth) >= 0.85


def test_batched_pic_equals_one_graph_at_a_time():
    video = planted_video(6, (12, 16), 32, seed=4)
    affinity = frame_affinity(video.keys, None, PARAMS)
    batched = dense_power_iteration(affinity)
    for p in range(6):
        alone = dense_power_iteration(affinity[p])
        assert torch.equal(batched.steps[p : p + 1], alone.steps)
        torch.testing.assert_close(batched.vectors[p : p + 1], alone.vectors, rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_pic_on_gpu_matches_cpu():
    video = planted_video(4, (30, 40), 64, seed=5)
    cpu = spectral_vectors(video.keys, video.forward, video.backward, PARAMS)
    gpu = spectral_vectors(video.keys.cuda(), video.forward.cuda(), video.backward.cuda(), PARAMS)
    assert torch.equal(foreground(cpu.vectors), foreground(gpu.vectors).cpu())


def test_two_means_is_the_best_split():
    rng = np.random.default_rng(0)
    values = torch.from_numpy(
        np.concatenate([rng.normal(0, 1, (5, 30)), rng.normal(3, 0.5, (5, 12))], axis=1)
    )
    high = two_means(values)
    for row, mask in zip(values, high, strict=True):
        ordered = row.sort().values

        def sse(split, ordered=ordered):
            low, top = ordered[:split], ordered[split:]
            return float(((low - low.mean()) ** 2).sum() + ((top - top.mean()) ** 2).sum())

        best = min(range(1, len(row)), key=sse)
        assert int(mask.sum()) == len(row) - best
        assert float(row[mask].min()) > float(row[~mask].max())


def test_foreground_is_the_smaller_cluster_whatever_the_sign():
    vec = torch.tensor([[0.1, 0.2, 0.15, 0.9, 0.95, 0.12, 0.11, 0.13]])
    expected = torch.tensor([[False, False, False, True, True, False, False, False]])
    for split in ("mean", "two_means"):
        assert torch.equal(foreground(vec, split), expected)
        assert torch.equal(foreground(-vec, split), expected)
    with pytest.raises(ValueError, match="split"):
        foreground(vec, "median")
    masks = soft_masks(-vec)
    assert float(masks[expected].min()) > float(masks[~expected].max())  # the object is high
    assert float(masks.min()) == 0.0 and float(masks.max()) == 1.0


def test_flow_similarity_enters_the_graph_with_its_weight():
    """Identical keys: only the flow tells the object (moving right) from the background (static) apart."""
    keys = torch.ones(1, 4, 8)
    motion = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])[None]
    params = SpectralInitParams(tau=-1.0, flow_weight=0.25)
    affinity = frame_affinity(keys, (motion, motion), params)[0]
    # (cos keys + w cos forward + w cos backward) / (1 + 2 w), a zero flow vector having cosine 0
    assert float(affinity[0, 1]) == pytest.approx(1.0)
    assert float(affinity[0, 2]) == pytest.approx(1 / 1.5)
    assert float(affinity[2, 3]) == pytest.approx(1 / 1.5)
    torch.testing.assert_close(frame_affinity(keys, None, params)[0], torch.ones(4, 4))


@pytest.mark.parametrize("seed", [6, 7, 8])
def test_flow_feature_finds_an_object_the_keys_barely_show(seed):
    """Object keys close to the background's (cosine 0.7) under heavy noise: the keys alone miss it, the
    motion cue recovers it (weight 0.3), and the paper's weight 0.1 already helps."""
    video = planted_video(3, (20, 24), 32, noise=1.0, likeness=0.7, seed=seed)
    truth = video.truth.flatten(1)

    def found(flow_weight):
        result = spectral_vectors(
            video.keys, video.forward, video.backward, SpectralInitParams(flow_weight=flow_weight)
        )
        return iou(foreground(result.vectors), truth)

    keys_only = found(0.0)
    assert keys_only < 0.4
    assert found(0.3) >= 0.7
    assert found(PARAMS.flow_weight) >= keys_only + 0.08


def test_first_and_last_frames_borrow_the_missing_flow():
    forward = torch.arange(2 * 2 * 3 * 2, dtype=torch.float32).reshape(2, 2, 3, 2)
    backward = -forward - 100
    own_forward, own_backward = frame_flows(forward, backward, 3)
    assert torch.equal(own_forward[0], forward[0].flatten(0, 1))
    assert torch.equal(own_forward[2], backward[1].flatten(0, 1))  # the last frame has no p -> p+1
    assert torch.equal(own_backward[0], forward[0].flatten(0, 1))  # the first frame has no p -> p-1
    assert torch.equal(own_backward[2], backward[1].flatten(0, 1))
    assert frame_flows(None, None, 3) is None
    with pytest.raises(ValueError, match="flows"):
        frame_flows(forward[:1], backward, 3)


def test_windows_do_not_change_per_frame_vectors():
    video = planted_video(7, (12, 16), 32, seed=7)
    whole = spectral_vectors(video.keys, video.forward, video.backward, SpectralInitParams(window=16))
    chunked = spectral_vectors(video.keys, video.forward, video.backward, SpectralInitParams(window=3))
    assert torch.equal(whole.steps, chunked.steps)
    torch.testing.assert_close(whole.vectors, chunked.vectors, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "frames, window, overlap", [(1, 4, 1), (10, 4, 1), (10, 5, 2), (23, 8, 3), (8, 8, 2)]
)
def test_frame_windows_keep_every_frame_once(frames, window, overlap):
    kept = []
    for start, stop, keep_from, keep_to in frame_windows(frames, window, overlap):
        assert stop - start <= window and start <= keep_from < keep_to <= stop
        if 0 < keep_from and keep_to < frames:  # an inner kept frame has overlap // 2 frames of context
            assert keep_from - start >= overlap // 2 and stop - keep_to >= overlap // 2
        kept += range(keep_from, keep_to)
    assert kept == list(range(frames))
    with pytest.raises(ValueError, match="overlap"):
        list(frame_windows(frames, window, window))


def test_coupled_pic_solves_the_tridiagonal_video_graph():
    """Matrix-free PIC on the window's tri-diagonal graph gives the dense eigenvector of that graph, built
    explicitly here."""
    frames, grid = 4, (8, 10)
    n = grid[0] * grid[1]
    video = planted_video(frames, grid, 32, noise=1.0, seed=8)
    params = SpectralInitParams(coupling=0.2, flow_weight=0.0, tol=1e-6, max_steps=5000)
    coupled = spectral_vectors(video.keys, video.forward, video.backward, params)
    assert bool(coupled.converged.all())

    affinity = frame_affinity(video.keys, None, params).double()
    graph = torch.block_diag(*affinity)
    weight = params.coupling * float(affinity.sum(dim=2).mean())
    for p in range(frames - 1):
        link = 0.5 * (
            sampling_matrix(video.forward[p]).to_dense() + sampling_matrix(video.backward[p]).to_dense().T
        )
        graph[p * n : (p + 1) * n, (p + 1) * n : (p + 2) * n] = weight * link
        graph[(p + 1) * n : (p + 2) * n, p * n : (p + 1) * n] = weight * link.T
    dense = dense_fiedler(graph).float()
    cosine = torch.nn.functional.cosine_similarity(dense, coupled.vectors.flatten(), dim=0)
    assert abs(float(cosine)) > 0.999
    # ... and differs from the frames solved alone (the coupling is really there)
    alone = spectral_vectors(video.keys, video.forward, video.backward, SpectralInitParams(flow_weight=0.0))
    alone_cosine = torch.nn.functional.cosine_similarity(dense, alone.vectors.flatten(), dim=0)
    assert abs(float(alone_cosine)) < 0.99


def test_coupled_windows_cover_a_long_video():
    video = planted_video(11, (10, 12), 32, seed=9)
    params = SpectralInitParams(coupling=0.05, window=4, overlap=2)
    result = spectral_vectors(video.keys, video.forward, video.backward, params)
    assert result.vectors.shape == (11, 120)
    assert bool(torch.isfinite(result.vectors).all())
    with pytest.raises(ValueError, match="coupling"):
        spectral_vectors(video.keys, None, None, params)


def test_equal_degrees_do_not_hide_the_clusters():
    """Two equal cliques: every degree is the same, so the degree-based start vector is empty after the
    trivial part is removed; a fixed pseudo-random start still finds the two clusters."""
    affinity = torch.zeros(1, 32, 32)
    affinity[0, :16, :16] = affinity[0, 16:, 16:] = 1.0
    result = dense_power_iteration(affinity)
    assert bool(result.converged.all())
    side = result.vectors[0] > 0
    assert bool((side[:16] == side[0]).all() and (side[16:] != side[0]).all())
    no_structure = dense_power_iteration(torch.ones(1, 20, 20))  # W x = 0 for every non-trivial x
    assert bool(torch.isfinite(no_structure.vectors).all())
    assert not bool(foreground(no_structure.vectors).any())  # no object
    with pytest.raises(ValueError, match="positive degrees"):
        dense_power_iteration(torch.zeros(1, 5, 5))
