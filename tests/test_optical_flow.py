"""Optical flow: DIS recovers known motion, flows resize and warp consistently, occlusions are found, and
RAFT loads only from a local checkpoint."""

import numpy as np
import pytest
import torch

from stages.video.optical_flow import (
    RaftFlow,
    dis_flow,
    matched,
    resize_flow,
    sampling_matrix,
    sequence_flows,
    warp,
)
from tools.bench_sslvos import textured_frames


@pytest.mark.parametrize("preset, tolerance", [("medium", 0.05), ("fast", 0.2), ("ultrafast", 0.3)])
@pytest.mark.parametrize("shift", [(3, -2), (-5, 1)])
def test_dis_recovers_a_translation(preset, tolerance, shift):
    first, second = textured_frames(2, (120, 160), shift, seed=1)
    flow = dis_flow(first, second, preset)
    assert flow.shape == (120, 160, 2) and flow.dtype == np.float32
    interior = flow[16:-16, 16:-16]
    assert np.abs(interior - np.array(shift, np.float32)).mean() < tolerance
    # the convention: first(x) = second(x + flow(x))
    y, x = 60, 80
    dx, dy = np.rint(flow[y, x]).astype(int)
    assert np.array_equal(first[y, x], second[y + dy, x + dx])


def test_sequence_flows_go_both_ways():
    frames = textured_frames(3, (96, 128), (2, 1), seed=2)
    forward, backward = sequence_flows(frames)
    assert forward.shape == backward.shape == (2, 96, 128, 2)
    assert np.abs(forward[:, 16:-16, 16:-16] - np.array([2, 1])).mean() < 0.1
    assert np.abs(backward[:, 16:-16, 16:-16] - np.array([-2, -1])).mean() < 0.1
    with pytest.raises(ValueError, match="at least 2"):
        sequence_flows(frames[:1])


def test_dis_refuses_bad_frames():
    frame = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="differ in size"):
        dis_flow(frame, np.zeros((32, 40, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        dis_flow(frame.astype(np.float32), frame)
    with pytest.raises(ValueError, match="preset"):
        dis_flow(frame, frame, "slow")


def test_resize_flow_keeps_displacements_meaningful():
    flow = torch.zeros(2, 60, 80, 2)
    flow[..., 0], flow[..., 1] = 8.0, -4.0  # pixels of the 60x80 grid
    small = resize_flow(flow, (15, 20))
    assert small.shape == (2, 15, 20, 2)
    torch.testing.assert_close(small[..., 0], torch.full((2, 15, 20), 2.0))
    torch.testing.assert_close(small[..., 1], torch.full((2, 15, 20), -1.0))
    large = resize_flow(flow[0], (120, 160))
    torch.testing.assert_close(large[..., 0], torch.full((120, 160), 16.0))


def test_warp_is_the_sampling_matrix_and_follows_the_flow():
    g = torch.Generator().manual_seed(0)
    h, w = 9, 11
    maps = torch.rand(3, h, w, generator=g)
    flow = 3 * torch.randn(3, h, w, 2, generator=g)
    warped, inside = warp(maps, flow)
    for b in range(3):
        expected = sampling_matrix(flow[b]) @ maps[b].flatten()
        torch.testing.assert_close(warped[b].flatten(), expected, atol=1e-5, rtol=0)
    # a map moved 2 columns right, warped back by the flow (2, 0): the original where the sample is inside
    shifted = torch.roll(maps, 2, dims=2)
    back, inside = warp(shifted, torch.tensor([2.0, 0.0]).expand(3, h, w, 2))
    torch.testing.assert_close(back[:, :, : w - 2], maps[:, :, : w - 2])
    assert bool(inside[:, :, : w - 2].all()) and not bool(inside[:, :, w - 2 :].any())


def test_forward_backward_check_finds_occlusions():
    """A square moving 3 columns right over a static background: the background it covers (in front of
    it) and the background it uncovers (behind it) fail the check; everything else passes."""
    h, w, speed = 12, 20, 3
    first = torch.zeros(h, w, dtype=torch.bool)
    first[3:8, 4:9] = True
    second = torch.roll(first, speed, dims=1)
    forward, backward = torch.zeros(1, h, w, 2), torch.zeros(1, h, w, 2)
    forward[0][first] = torch.tensor([float(speed), 0.0])
    backward[0][second] = torch.tensor([-float(speed), 0.0])
    covered = second & ~first  # background of the first frame that the object covers in the second
    uncovered = first & ~second  # background of the second frame that the object uncovered
    assert torch.equal(matched(forward, backward)[0], ~covered)
    assert torch.equal(matched(backward, forward)[0], ~uncovered)


def test_raft_needs_a_local_checkpoint(tmp_path):
    missing = tmp_path / "raft_small.pth"
    with pytest.raises(FileNotFoundError, match="RAFT checkpoint not found") as error:
        RaftFlow(missing, small=True)
    assert str(missing) in str(error.value)


def test_raft_loads_a_torchvision_checkpoint_and_returns_pixel_flow(tmp_path):
    from torchvision.models.optical_flow import raft_small

    torch.manual_seed(0)
    path = tmp_path / "raft_small.pth"
    torch.save(raft_small(weights=None).state_dict(), path)  # random weights: the shapes are the point
    raft = RaftFlow(path, small=True, iterations=2)
    first, second = textured_frames(2, (130, 150), (2, 1), seed=3)
    flow = raft(first, second)
    assert flow.shape == (130, 150, 2) and flow.dtype == np.float32 and np.isfinite(flow).all()
    with pytest.raises(ValueError, match="at least 128x128"):
        raft(first[:100], second[:100])
    with pytest.raises(ValueError, match="not a torchvision RAFT large"):
        RaftFlow(path, small=False)
