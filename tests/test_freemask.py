"""FreeMask: one coarse mask per query position, kept by maskness and Matrix NMS."""

import numpy as np
import pytest
import torch

from stages.common.masks import pairwise_iou
from stages.discovery.freemask import freemask, matrix_nms, query_masks
from tests.scenes import box_mask, iou

GRID = (24, 30)
OBJECTS = [(4, 3, 11, 11), (13, 5, 21, 12), (8, 17, 18, 27)]
# FreeSOLO's demo/inference_freemask.py: scales, threshold, sigma, top 20, score 0.7, top 20%, 95% wide
# and SOLOv2's cap of 500 masks before NMS
DEFAULTS = dict(
    scales=(1.0, 0.5, 0.25),
    mask_threshold=0.5,
    sigma=2.0,
    max_masks=20,
    min_score=0.7,
    top_margin=0.2,
    max_width=0.95,
    max_candidates=500,
)


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    yield


def region_keys(grid, boxes, noise, dim=32, seed=0, shared=0.3):
    """Keys whose direction is their region's (background or one object each; objects partly share the
    background's), with noise; also the region label of every patch."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
    labels = np.zeros(grid, int)
    for j, box in enumerate(boxes, 1):
        labels[box_mask(grid, box)] = j
    directions = np.stack([basis[0]] + [shared * basis[0] + basis[j] for j in range(1, len(boxes) + 1)])
    keys = directions[labels.reshape(-1)] + noise * rng.standard_normal((labels.size, dim)) / np.sqrt(dim)
    return torch.from_numpy(keys).float(), labels


def assert_finds_each_object_once(masks, boxes, grid):
    truth = [box_mask(grid, b) for b in boxes]
    for t in truth:
        assert max(iou(m.mask, t) for m in masks) >= 0.8
    stack = torch.from_numpy(np.stack([m.mask for m in masks]))
    overlap = pairwise_iou(stack).fill_diagonal_(0)
    assert float(overlap.max()) < 0.5  # no duplicates survive Matrix NMS
    scores = [m.score for m in masks]
    assert scores == sorted(scores, reverse=True) and min(scores) >= 0.7


def test_freemask_finds_several_objects_in_noisy_keys():
    keys, _ = region_keys(GRID, OBJECTS, noise=0.6, seed=1)
    masks = freemask(keys, GRID, **DEFAULTS)
    assert_finds_each_object_once(masks, OBJECTS, GRID)
    # the background is one more mask of its own; nothing else
    assert len(masks) <= len(OBJECTS) + 1


def test_freemask_from_synthetic_attention():
    """Queries that attend to their own region (q . k large within it): the attention maps are the masks."""
    keys, labels = region_keys(GRID, OBJECTS, noise=0.5, seed=2, shared=0.0)
    rng = np.random.default_rng(3)
    centres = torch.stack([keys[torch.from_numpy(labels.reshape(-1) == j)].mean(dim=0) for j in range(4)])
    queries = (
        4 * centres[torch.from_numpy(labels.reshape(-1))]
        + 0.5 * torch.from_numpy(rng.standard_normal(keys.shape)).float()
    )
    masks = freemask(keys, GRID, **DEFAULTS, queries=queries)
    assert_finds_each_object_once(masks, OBJECTS, GRID)


def test_freemask_fails_without_suppression_or_with_a_wrong_threshold():
    keys, _ = region_keys(GRID, OBJECTS, noise=0.6, seed=1)
    # sigma 0: no decay, so the near-duplicate masks of neighbouring queries all survive
    kept = freemask(keys, GRID, **{**DEFAULTS, "sigma": 0.0})
    overlap = pairwise_iou(torch.from_numpy(np.stack([m.mask for m in kept]))).fill_diagonal_(0)
    assert float(overlap.max()) > 0.8
    # a low mask threshold merges objects with the background they partly resemble: no mask is sharp
    loose = freemask(keys, GRID, **{**DEFAULTS, "mask_threshold": 0.3})
    assert max((iou(m.mask, box_mask(GRID, b)) for m in loose for b in OBJECTS), default=0.0) < 0.8


def test_placement_filters():
    boxes = [(0, 3, 4, 12), (10, 0, 16, 30), (12, 14, 20, 22)]  # at the top; as wide as the image; fine
    keys, _ = region_keys(GRID, boxes, noise=0.3, seed=4)
    masks = freemask(keys, GRID, **DEFAULTS)
    best = [max((iou(m.mask, box_mask(GRID, b)) for m in masks), default=0.0) for b in boxes]
    assert best[0] < 0.5 and best[1] < 0.5 and best[2] >= 0.8
    everything = freemask(keys, GRID, **{**DEFAULTS, "top_margin": 0.0, "max_width": 1.01})
    assert all(max(iou(m.mask, box_mask(GRID, b)) for m in everything) >= 0.8 for b in boxes)


def test_matrix_nms():
    a = torch.zeros(3, 10, dtype=torch.bool)
    a[0, :4] = True
    a[1, :4] = True  # a duplicate of the first
    a[2, 6:] = True  # disjoint
    decayed = matrix_nms(a, torch.tensor([0.9, 0.8, 0.7]), 2.0)
    assert torch.allclose(decayed, torch.tensor([0.9, 0.8 * np.exp(-2.0), 0.7], dtype=torch.float32))
    # compensation: a mask below a suppressed duplicate is judged against the duplicate's own overlap
    b = torch.zeros(3, 10, dtype=torch.bool)
    b[0, :4] = True
    b[1, :4] = True
    b[2, 2:6] = True  # IoU 1/3 with both
    decayed = matrix_nms(b, torch.tensor([0.9, 0.8, 0.7]), 2.0)
    assert torch.isclose(decayed[2], torch.tensor(0.7 * np.exp(-2.0 / 9), dtype=torch.float32))


def test_query_masks_cover_every_scale():
    keys = torch.randn(GRID[0] * GRID[1], 16)
    soft = query_masks(keys, GRID, (1.0, 0.5, 0.25))
    assert soft.shape == (720 + 180 + 42, 720)  # 24x30, 12x15, 6x7 query maps (floor)
    assert float(soft.min()) == 0.0 and float(soft.max(dim=1).values.min()) == pytest.approx(1.0)


def test_freemask_at_real_size():
    """A 60x60 grid (ViT-B/8 at 480 px): 4,725 queries of 3,600 patches."""
    grid = (60, 60)
    boxes = [(8, 6, 26, 24), (30, 30, 52, 55), (10, 35, 22, 52)]
    keys, _ = region_keys(grid, boxes, noise=0.5, seed=5)
    assert_finds_each_object_once(freemask(keys, grid, **DEFAULTS), boxes, grid)
