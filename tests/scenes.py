"""Synthetic scenes for the issue-12 methods: keys shaped like DINOv2's (a large key bias shared by every
patch, image content on top, a smooth positional field, noise), CLS attention, and matching images."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

Box = tuple[int, int, int, int]  # y0, x0, y1, x1 on the patch grid (end exclusive)


@dataclass
class Scene:
    keys: torch.Tensor  # (h*w, d) raw keys
    bias: torch.Tensor  # (d,) the key bias every key carries
    truth: list[np.ndarray]  # (h, w) bool mask per object
    grid: tuple[int, int]

    @property
    def union(self) -> np.ndarray:
        return np.any(self.truth, axis=0) if self.truth else np.zeros(self.grid, bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def box_mask(grid: tuple[int, int], box: Box) -> np.ndarray:
    mask = np.zeros(grid, bool)
    mask[box[0] : box[2], box[1] : box[3]] = True
    return mask


def biased_scene(
    grid: tuple[int, int],
    boxes: list[Box],
    noise: float = 0.3,
    field: float = 0.25,
    shared: float = 0.4,
    dim: int = 48,
    seed: int = 0,
) -> Scene:
    """Keys = bias (norm 4, the same for every patch, like DINOv2's) + content + smooth field + noise.

    Background content is a unit direction c; object j's is a unit direction sharing ``shared`` of c (so
    objects and background are alike in part, as real ones are). ``field``: amplitude of a smooth
    positional wave along two more directions (the structure a blank image's keys still have); ``noise``:
    per-patch Gaussian noise of about that norm. With no boxes it is an image with no object."""
    rng = np.random.default_rng(seed)
    h, w = grid
    basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
    bias = 4.0 * basis[0]
    content = basis[1]
    keys = np.tile(content, (h, w, 1))
    truth = []
    for j, box in enumerate(boxes):
        mask = box_mask(grid, box)
        direction = shared * content + np.sqrt(1 - shared**2) * basis[2 + j]
        keys[mask] = direction
        truth.append(mask)
    ys, xs = np.mgrid[0:h, 0:w] / max(h, w)
    wave = np.cos(2 * np.pi * ys)[..., None] * basis[-1] + np.sin(2 * np.pi * xs)[..., None] * basis[-2]
    keys = keys + field * wave + noise * rng.standard_normal((h, w, dim)) / np.sqrt(dim)
    keys = keys + bias
    return Scene(
        torch.from_numpy(keys.reshape(h * w, dim)).float(), torch.from_numpy(bias).float(), truth, grid
    )


def cls_attention(
    truth: np.ndarray, heads: int = 6, focused: int = 3, decoy: Box | None = None, seed: int = 0
) -> torch.Tensor:
    """(heads, h*w) CLS attention rows (softmax-like, each summing to 1): the first ``focused`` heads
    attend to the object patches of ``truth`` (sparse); the others spread over the whole image, noisy,
    and their attention is lowest on the ``decoy`` box (patches of an object, if the box is one: a head
    sum without FOUND's sparsity weights then puts the background seed there)."""
    rng = np.random.default_rng(seed)
    h, w = truth.shape
    rows = []
    for head in range(heads):
        if head < focused:
            logits = 4.0 * truth + 0.3 * rng.standard_normal((h, w))
        else:
            logits = 0.05 * rng.standard_normal((h, w))  # smooth, nearly uniform
            if decoy is not None:
                logits[decoy[0] : decoy[2], decoy[1] : decoy[3]] -= 6.0
        att = np.exp(logits)
        rows.append(att.reshape(-1) / att.sum())
    return torch.from_numpy(np.stack(rows)).float()


def scene_image(grid: tuple[int, int], patch: int, truth: list[np.ndarray], seed: int = 0) -> np.ndarray:
    """A (h*patch, w*patch, 3) uint8 picture of the scene: a grey-green background, each object a flat
    colour of its own, mild noise."""
    rng = np.random.default_rng(seed)
    colours = [(200, 40, 40), (40, 60, 210), (230, 200, 30), (200, 40, 200)]
    img = np.empty((*grid, 3))
    img[:] = (90, 110, 90)
    for j, mask in enumerate(truth):
        img[mask] = colours[j % len(colours)]
    img = img.repeat(patch, axis=0).repeat(patch, axis=1)
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
