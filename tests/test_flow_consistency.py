"""The flow-consistent global optimisation pulls a wrong frame back to its neighbours along the flow, keeps
right frames as they are, and runs long videos in bounded windows."""

import pytest
import torch

import stages.video.flow_consistency as flow_consistency
import stages.video.power_iteration as power_iteration
from stages.video.flow_consistency import FlowConsistencyParams, flow_consistent_masks
from stages.video.power_iteration import SpectralInitParams, foreground, soft_masks, spectral_vectors
from tools.bench_sslvos import planted_video

WRONG = 3  # the frame whose initial mask is wrong


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum() / (a | b).sum().clamp_min(1))


def moving_square(frames=7, grid=(24, 32), speed=3, seed=0):
    """A square moving ``speed`` cells right per frame over a static background: truth masks, exact forward
    and backward flows, and noisy soft initial masks (0.85 inside, 0.1 outside) in which frame WRONG shows
    the object at a distractor place instead."""
    h, w = grid
    truth = torch.zeros(frames, h, w, dtype=torch.bool)
    for p in range(frames):
        truth[p, 12:20, 2 + speed * p : 10 + speed * p] = True
    forward, backward = torch.zeros(frames - 1, h, w, 2), torch.zeros(frames - 1, h, w, 2)
    for p in range(frames - 1):
        forward[p][truth[p]] = torch.tensor([float(speed), 0.0])
        backward[p][truth[p + 1]] = torch.tensor([-float(speed), 0.0])
    g = torch.Generator().manual_seed(seed)
    init = (0.1 + 0.75 * truth.float() + 0.05 * torch.randn(frames, h, w, generator=g)).clamp(0, 1)
    init[WRONG] = (0.1 + 0.05 * torch.randn(h, w, generator=g)).clamp(0, 1)
    init[WRONG, 2:10, 20:28] = 0.85
    return truth, forward, backward, init


def masks_of(soft: torch.Tensor) -> torch.Tensor:
    """The public code's final split: 2-means per frame, the smaller cluster is the object."""
    return foreground(soft.flatten(1), "two_means").reshape(soft.shape)


def test_wrong_frame_is_pulled_back_to_its_neighbours():
    truth, forward, backward, init = moving_square()
    assert iou(masks_of(init)[WRONG], truth[WRONG]) == 0.0
    out = flow_consistent_masks(init, forward, backward, FlowConsistencyParams(flow_weight=0.5))
    masks = masks_of(out)
    assert iou(masks[WRONG], truth[WRONG]) >= 0.9
    for p in range(len(truth)):
        if p != WRONG:
            assert iou(masks[p], truth[p]) >= 0.95


def test_the_flow_is_followed_in_its_direction():
    """Flows used against the motion (what sampling mask p at x + F_p(x) and comparing it with mask p+1
    amounts to) move the recovered object to the wrong place."""
    truth, forward, backward, init = moving_square()
    params = FlowConsistencyParams(flow_weight=0.5)
    right = masks_of(flow_consistent_masks(init, forward, backward, params))
    reversed_flow = masks_of(flow_consistent_masks(init, -forward, -backward, params))
    assert iou(right[WRONG], truth[WRONG]) >= 0.9
    assert iou(reversed_flow[WRONG], truth[WRONG]) < 0.5


def test_consistency_weight_sets_how_far_the_wrong_frame_moves():
    """At the paper's weights (flow 0.01 against init 1.0) the wrong frame moves towards its neighbours but
    only a little; more weight moves it further; right frames stay right at every weight."""
    truth, forward, backward, init = moving_square()
    pulled = []
    for weight in (0.0, FlowConsistencyParams().flow_weight, 0.1, 0.5):
        out = flow_consistent_masks(init, forward, backward, FlowConsistencyParams(flow_weight=weight))
        pulled.append(float(out[WRONG][truth[WRONG]].mean()))
        masks = masks_of(out)
        assert all(iou(masks[p], truth[p]) >= 0.95 for p in range(len(truth)) if p != WRONG)
        if weight == 0.0:
            torch.testing.assert_close(out, init.clamp(1e-3, 1 - 1e-3), atol=1e-4, rtol=0)
    assert pulled == sorted(pulled) and pulled[1] > pulled[0] + 0.005
    assert pulled[1] < 0.5 < pulled[3]


def test_windows_agree_with_the_whole_sequence():
    video = planted_video(30, (12, 16), 32, noise=1.2, seed=3)
    init = soft_masks(
        spectral_vectors(video.keys, video.forward, video.backward, SpectralInitParams()).vectors
    )
    init = init.reshape(video.truth.shape)
    whole = flow_consistent_masks(init, video.forward, video.backward, FlowConsistencyParams(flow_weight=0.3))
    params = FlowConsistencyParams(flow_weight=0.3, window=10, overlap=4)
    windowed = flow_consistent_masks(init, video.forward, video.backward, params)
    assert float((whole - windowed).abs().max()) < 0.1
    assert iou(masks_of(whole), masks_of(windowed)) >= 0.97


def test_bad_input_is_refused():
    truth, forward, backward, init = moving_square()
    params = FlowConsistencyParams()
    with pytest.raises(ValueError, match="flows of shape"):
        flow_consistent_masks(init, forward[1:], backward, params)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        flow_consistent_masks(init * 2, forward, backward, params)
    with pytest.raises(ValueError, match="overlap"):
        flow_consistent_masks(init, forward, backward, FlowConsistencyParams(window=4, overlap=4))
    with pytest.raises(ValueError, match="at least 2x2"):
        flow_consistent_masks(init[:, :1], forward[:, :1], backward[:, :1], params)


def test_hundred_frame_video_runs_in_bounded_windows(monkeypatch):
    """Real size (100 frames, 30x40 patches, ViT-S keys): the whole core runs, its frame graphs and its
    optimisation never hold more than a window of frames, and it finds the moving object."""
    frames, grid = 100, (30, 40)
    video = planted_video(frames, grid, 384, noise=1.0, seed=11)
    init_params, opt_params = SpectralInitParams(window=8), FlowConsistencyParams(window=24, overlap=6)
    graph_frames, optimised_frames = [], []

    def counting_affinity(keys, motion, params):
        graph_frames.append(keys.shape[0])
        return affinity(keys, motion, params)

    def counting_window(logits, *args):
        optimised_frames.append(logits.shape[0])
        return window(logits, *args)

    affinity, window = power_iteration.frame_affinity, flow_consistency.optimise_window
    monkeypatch.setattr(power_iteration, "frame_affinity", counting_affinity)
    monkeypatch.setattr(flow_consistency, "optimise_window", counting_window)

    vectors = spectral_vectors(video.keys, video.forward, video.backward, init_params).vectors
    out = flow_consistent_masks(
        soft_masks(vectors).reshape(frames, *grid), video.forward, video.backward, opt_params
    )
    assert out.shape == (frames, *grid) and bool(torch.isfinite(out).all())
    assert sum(graph_frames) == frames and max(graph_frames) <= init_params.window
    assert max(optimised_frames) <= opt_params.window and len(optimised_frames) >= 5
    masks = masks_of(out)
    assert sum(iou(masks[p], video.truth[p]) for p in range(frames)) / frames >= 0.8
