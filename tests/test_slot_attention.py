"""Invariant slot attention (stages/video/slot_attention.py): slot frames, token-drop bookkeeping, and that it
separates planted objects once trained."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from stages.video.slot_attention import (
    MAX_SCALE,
    MIN_SCALE,
    InvariantSlotAttention,
    coordinate_grid,
    relative_grid,
    slot_position_scale,
)
from tests.synthetic import planted_feature_maps

pytestmark = pytest.mark.usefixtures("one_thread")


def test_coordinate_grid_is_raster_order_in_minus_one_to_one():
    coords = coordinate_grid((3, 4))
    assert coords.shape == (12, 2)
    assert coords[0].tolist() == [-1.0, -1.0] and coords[-1].tolist() == [1.0, 1.0]
    assert coords[3].tolist() == [1.0, -1.0]  # end of the first row: x varies fastest
    assert coords[4].tolist() == [-1.0, 0.0]


def test_position_and_scale_are_the_attention_centre_and_spread():
    grid = (6, 8)
    coords = coordinate_grid(grid)
    box = torch.zeros(grid)
    box[1:4, 2:7] = 1
    single = torch.zeros(grid)
    single[5, 0] = 1
    attn = torch.stack([box, 3 * box, single + 1e-12]).reshape(1, 3, -1)  # any total: normalised inside
    position, scale = slot_position_scale(attn, coords)
    inside = coords[box.reshape(-1) > 0].numpy()
    np.testing.assert_allclose(position[0, 0], inside.mean(0), atol=1e-6)
    np.testing.assert_allclose(scale[0, 0], inside.std(0), atol=1e-5)
    assert torch.equal(position[0, 0], position[0, 1]) and torch.equal(scale[0, 0], scale[0, 1])
    np.testing.assert_allclose(position[0, 2], coords[5 * 8], atol=1e-6)
    torch.testing.assert_close(scale[0, 2], torch.full((2,), MIN_SCALE))  # one patch: clipped, not 0
    assert float(scale.max()) <= MAX_SCALE
    rel = relative_grid(coords, position, scale, 5.0)
    assert rel.shape == (1, 3, 48, 2)
    np.testing.assert_allclose(rel[0, 0, 13], (coords[13] - position[0, 0]) / (5 * scale[0, 0]), rtol=1e-6)


def _isa(grid=(6, 8), dim=16, slots=4) -> InvariantSlotAttention:
    torch.manual_seed(0)
    return InvariantSlotAttention(dim, slots, 32, 3, grid).eval()


def test_patches_carry_their_grid_positions_in_any_order():
    isa = _isa()
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(2, 48, 16, generator=gen)
    index = torch.stack([torch.randperm(48, generator=gen)[:24] for _ in range(2)])
    kept = features.gather(1, index[..., None].expand(-1, -1, 16))
    out = isa(kept, index)
    perm = torch.randperm(24, generator=gen)
    shuffled = isa(kept[:, perm], index[:, perm])
    torch.testing.assert_close(shuffled.slots, out.slots, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shuffled.attn, out.attn[:, :, perm], atol=1e-6, rtol=1e-5)
    # the same features placed elsewhere on the grid bind differently: the index is used
    moved = isa(kept, (index + 1) % 48)
    assert not torch.allclose(moved.slots, out.slots, atol=1e-3)
    # all patches without an index = the identity index
    full = isa(features)
    torch.testing.assert_close(isa(features, torch.arange(48).expand(2, -1)).slots, full.slots)
    assert torch.allclose(full.attn.sum(dim=1), torch.ones(2, 48))


def test_shared_initialisation_gives_equal_frames_equal_slots():
    isa = _isa()
    features = torch.randn(1, 48, 16, generator=torch.Generator().manual_seed(2))
    out = isa(torch.cat([features, features, torch.randn(1, 48, 16)]))
    assert torch.equal(out.slots[0], out.slots[1])
    assert not torch.allclose(out.slots[0], out.slots[2], atol=1e-3)


def test_missing_token_index_for_a_partial_frame_is_an_error():
    with pytest.raises(ValueError, match="token_index"):
        _isa()(torch.randn(1, 20, 16))


def _matched_iou(attn: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Per map and region, the IoU of the region with its slot's argmax mask, slots matched one-to-one
    to regions (Hungarian on IoU)."""
    regions = int(labels.max()) + 1
    best = attn.argmax(dim=1).view_as(labels)
    out = []
    for pred, truth in zip(best, labels, strict=True):
        iou = np.zeros((regions, attn.shape[1]))
        for r in range(regions):
            for s in range(attn.shape[1]):
                a, b = truth == r, pred == s
                iou[r, s] = float((a & b).sum()) / float((a | b).sum())
        rows, cols = linear_sum_assignment(-iou)
        out.append(iou[rows, cols])
    return np.concatenate(out)


def test_trained_isa_separates_planted_objects(planted_solv):
    """SOLV's invariant slot attention, trained with the paper's loss on feature maps of two boxes
    (random places and sizes, features drawn from a palette) on a background (the session's
    ``planted_solv``), on 64 new maps: each region (the two objects and the background) is the argmax
    region of its own slot, matched IoU >= 0.8 on average and >= 0.5 for 95% of the regions."""
    model, palette = planted_solv
    features, labels = planted_feature_maps(64, model.grid, palette, 2, torch.Generator().manual_seed(7))
    with torch.no_grad():
        attn = model.binder(features).attn
    iou = _matched_iou(attn, labels)
    assert iou.mean() >= 0.8, f"mean matched IoU {iou.mean():.3f}"
    assert np.quantile(iou, 0.05) >= 0.5, f"5% quantile of matched IoU {np.quantile(iou, 0.05):.3f}"
