"""Hole filling and the largest connected component of boolean masks in torch, on the masks' device.

Both follow scipy.ndimage, which the reference refinement (``stages.refinement.refine``) uses:
4-connectivity, a hole is background not 4-connected to the image border, and among equally large components
the one whose first pixel comes first in raster order wins. CPU tensors go through scipy itself (faster
there); on other devices components are labelled by min-label propagation with pointer jumping, so masks
never leave the device.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

# Propagation steps between convergence checks (each check waits for the device).
_CHECK_EVERY = 8


def label_components(masks: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool -> (B, H, W) int64: for a True pixel, the raster index (within its mask) of the first
    pixel of its 4-connected component; H*W for False pixels."""
    b, h, w = masks.shape
    n = h * w
    index = torch.arange(n, device=masks.device).reshape(1, h, w).expand(b, h, w)
    labels = torch.where(masks, index, n).reshape(b, n)
    previous = None
    while previous is None or not torch.equal(labels, previous):
        previous = labels
        for _ in range(_CHECK_EVERY):
            grid = labels.reshape(b, h, w)
            # Each label is the index of a pixel of the same component and never above the pixel's own
            # index, so taking the smallest neighbouring label and then the label of one's label (pointer
            # jumping) only ever moves to the component's first pixel.
            smallest = grid.clone()
            smallest[:, 1:] = torch.minimum(smallest[:, 1:], grid[:, :-1])
            smallest[:, :-1] = torch.minimum(smallest[:, :-1], grid[:, 1:])
            smallest[:, :, 1:] = torch.minimum(smallest[:, :, 1:], grid[:, :, :-1])
            smallest[:, :, :-1] = torch.minimum(smallest[:, :, :-1], grid[:, :, 1:])
            smallest = torch.where(masks, smallest, n).reshape(b, n)
            padded = torch.cat([smallest, smallest.new_full((b, 1), n)], 1)
            labels = torch.gather(padded, 1, smallest)
    return labels.reshape(b, h, w)


def fill_holes(masks: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool -> the masks with every hole (background not 4-connected to the border) filled."""
    if masks.device.type == "cpu":
        return _per_mask(ndimage.binary_fill_holes, masks)
    return _fill_holes_on_device(masks)


def largest_component(masks: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool -> the largest 4-connected component of each mask (an empty mask stays empty)."""
    if masks.device.type == "cpu":
        return _per_mask(_largest_component_numpy, masks)
    return _largest_component_on_device(masks)


def _per_mask(fn, masks: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(masks)
    for i, mask in enumerate(masks.numpy()):
        out[i] = torch.from_numpy(fn(mask))
    return out


def _largest_component_numpy(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)  # default structure in 2D: 4-connectivity
    if count == 0:
        return mask.copy()
    return labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1


def _fill_holes_on_device(masks: torch.Tensor) -> torch.Tensor:
    b, h, w = masks.shape
    background = label_components(~masks).reshape(b, -1)
    border = torch.zeros(h, w, dtype=torch.bool, device=masks.device)
    border[[0, -1], :] = True
    border[:, [0, -1]] = True
    reaches_border = torch.zeros(b, h * w + 1, dtype=torch.bool, device=masks.device)
    reaches_border.scatter_(1, background[:, border.reshape(-1)], True)
    reaches_border[:, h * w] = False  # the label of foreground pixels
    return ~torch.gather(reaches_border, 1, background).reshape(b, h, w)


def _largest_component_on_device(masks: torch.Tensor) -> torch.Tensor:
    b, h, w = masks.shape
    labels = label_components(masks).reshape(b, -1)
    sizes = torch.zeros(b, h * w + 1, dtype=torch.int64, device=masks.device)
    sizes.scatter_add_(1, labels, torch.ones_like(labels))
    sizes[:, h * w] = 0
    # argmax takes the first of equal sizes: the component whose first pixel comes first, as scipy's labels.
    best = sizes.argmax(1, keepdim=True)
    return ((labels == best) & masks.reshape(b, -1)).reshape(b, h, w)
