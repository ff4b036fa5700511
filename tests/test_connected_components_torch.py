"""Hole filling and largest component in torch (stages/refinement/connected_components_torch.py) against
scipy, which the reference refinement uses; the on-device path (label propagation) is checked on the CPU
here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from stages.refinement.connected_components_torch import (
    _fill_holes_on_device,
    _largest_component_on_device,
    fill_holes,
    label_components,
    largest_component,
)
from stages.refinement.refine import largest_component as reference_largest_component


def random_masks(count: int, shape: tuple[int, int], seed: int) -> np.ndarray:
    """Blobby masks with holes, several components, thin diagonal contacts and equal-sized twins."""
    rng = np.random.default_rng(seed)
    masks = []
    for i in range(count):
        noise = ndimage.gaussian_filter(rng.normal(size=shape), sigma=rng.uniform(0.8, 4))
        mask = noise > np.quantile(noise, rng.uniform(0.3, 0.9))
        if i % 5 == 0:  # two equal squares: the tie goes to the one that starts first in raster order
            mask = np.zeros(shape, bool)
            mask[2:6, 10:14] = True
            mask[8:12, 1:5] = True
        masks.append(mask)
    masks.append(np.zeros(shape, bool))
    masks.append(np.ones(shape, bool))
    return np.stack(masks)


def spiral(size: int) -> np.ndarray:
    """A one-pixel-wide spiral wall enclosing a long corridor: many propagation steps to converge."""
    mask = np.zeros((size, size), bool)
    top, left, bottom, right = 0, 0, size - 1, size - 1
    while top < bottom and left < right:
        mask[top, left : right + 1] = True
        mask[top : bottom + 1, right] = True
        mask[bottom, left : right + 1] = True
        mask[top + 2 : bottom + 1, left] = True
        top, left, bottom, right = top + 2, left + 2, bottom - 2, right - 2
    return mask


@pytest.mark.parametrize("shape", [(24, 31), (64, 48)])
def test_device_path_matches_scipy(shape):
    masks = random_masks(300, shape, seed=shape[0])
    holes = _fill_holes_on_device(torch.from_numpy(masks)).numpy()
    largest = _largest_component_on_device(torch.from_numpy(masks)).numpy()
    for mask, filled, biggest in zip(masks, holes, largest, strict=True):
        assert np.array_equal(filled, ndimage.binary_fill_holes(mask))
        assert np.array_equal(biggest, reference_largest_component(mask))


def test_cpu_path_matches_the_reference():
    masks = random_masks(40, (40, 40), seed=7)
    filled = fill_holes(torch.from_numpy(masks)).numpy()
    largest = largest_component(torch.from_numpy(masks)).numpy()
    for mask, a, b in zip(masks, filled, largest, strict=True):
        assert np.array_equal(a, ndimage.binary_fill_holes(mask))
        assert np.array_equal(b, reference_largest_component(mask))


def test_labels_are_the_first_pixel_of_each_component():
    masks = np.stack([spiral(61), ~spiral(61)])
    labels = label_components(torch.from_numpy(masks)).numpy()
    for mask, got in zip(masks, labels, strict=True):
        expected, count = ndimage.label(mask)
        assert count >= 1
        for k in range(1, count + 1):
            first = np.flatnonzero(expected == k)[0]
            assert (got[expected == k] == first).all()
        assert (got[~mask] == mask.size).all()
    # The corridor winds from the border to the centre: filling has to follow all of it to leave it open.
    filled = _fill_holes_on_device(torch.from_numpy(masks[:1]))[0].numpy()
    assert np.array_equal(filled, ndimage.binary_fill_holes(masks[0]))
