"""Data the tests make: planted-object key maps and simple images."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from pipeline.bench_ncut import planted_keys as bench_planted_keys

Box = tuple[int, int, int, int]  # y0, x0, y1, x1 on the patch grid (end exclusive)


def planted_keys(
    grid: tuple[int, int], boxes: list[Box], noise: float = 0.3, dim: int = 64, seed: int = 0
) -> tuple[torch.Tensor, list[np.ndarray]]:
    """The benchmark's planted keys with every object in one direction (scaled by 5, as raw keys are not
    unit length), and the (h, w) bool truth mask of each box."""
    keys = bench_planted_keys(grid, boxes, noise, dim, np.random.default_rng(seed), shared=True)
    truth = []
    for y0, x0, y1, x1 in boxes:
        mask = np.zeros(grid, bool)
        mask[y0:y1, x0:x1] = True
        truth.append(mask)
    return 5 * keys, truth


def object_image(height: int, width: int, box: Box, seed: int = 0) -> np.ndarray:
    """A dark, slightly noisy image with one bright red rectangle (pixel box y0, x0, y1, x1)."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 40.0)
    y0, x0, y1, x1 = box
    img[y0:y1, x0:x1] = (200, 60, 60)
    return np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8)


def write_image_folder(root, n: int, size: tuple[int, int] = (96, 128)) -> list[str]:
    """n object images under root (some in a subfolder, png and jpg); returns their relative names."""
    names = []
    for i in range(n):
        name = f"sub/img{i}.jpg" if i % 3 == 0 else f"img{i}.png"
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(object_image(*size, (20, 10 + 6 * i, 64, 60 + 6 * i), seed=i)).save(path)
        names.append(name)
    return names


def write_davis_videos(
    root,
    n_videos: int = 2,
    n_frames: int = 6,
    size: tuple[int, int] = (64, 96),
    annotations: str = "Annotations_unsupervised/480p",
) -> list[str]:
    """Videos of two coloured squares moving over a dark noisy background, in DAVIS layout (JPEGImages/480p,
    palette PNGs with ids 1 and 2 under ``annotations`` (the DAVIS-17 unsupervised folder by default),
    ImageSets/2017/val.txt). Returns the video names."""
    h, w = size
    names = [f"video{v}" for v in range(n_videos)]
    for v, name in enumerate(names):
        rng = np.random.default_rng(v)
        frames_dir = root / "JPEGImages" / "480p" / name
        ann_dir = root / annotations / name
        frames_dir.mkdir(parents=True)
        ann_dir.mkdir(parents=True)
        for t in range(n_frames):
            img = np.full((h, w, 3), 30.0) + rng.normal(0, 4, (h, w, 3))
            ids = np.zeros((h, w), np.uint8)
            for k, (colour, y, x) in enumerate(
                [((220, 40, 40), 8, 4 + 4 * t), ((40, 200, 60), 36, 70 - 4 * t)], 1
            ):
                img[y : y + 20, x : x + 20] = colour
                ids[y : y + 20, x : x + 20] = k
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(frames_dir / f"{t:05d}.png")
            label = Image.fromarray(ids, mode="P")
            label.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
            label.save(ann_dir / f"{t:05d}.png")
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("\n".join(names) + "\n")
    return names


def textured_scene(height: int = 480, width: int = 640, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A photo-like test image for refinement: an orange mug (ellipse body, rectangular handle) on a
    table of colour stripes under a darker wall, with noise. Returns (HxWx3 uint8 image, HxW bool object)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.indices((height, width)) / max(height, width)
    img = np.empty((height, width, 3))
    stripes = np.sin(2 * np.pi * (7 * xs + 2 * ys))[..., None]
    img[:] = (110, 120, 95) + 25 * stripes * np.array([1.0, 0.6, -0.4])
    img[ys < 0.25] = (70, 75, 90)  # the wall
    cy, cx = 0.42, 0.5
    body = ((ys - cy) / 0.2) ** 2 + ((xs - cx) / 0.14) ** 2 < 1
    handle = (np.abs(ys - cy) < 0.07) & (xs > cx + 0.12) & (xs < cx + 0.2)
    obj = body | handle
    img[obj] = (225, 130, 40)
    img += rng.normal(0, 6, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), obj


def blocky(mask: np.ndarray, patch: int = 16, cover: float = 0.3) -> np.ndarray:
    """The patch-level version of a mask, as a ViT gives it: patches at least ``cover`` covered."""
    h, w = mask.shape
    grid = mask.reshape(h // patch, patch, w // patch, patch).mean(axis=(1, 3)) >= cover
    return np.kron(grid, np.ones((patch, patch))).astype(bool)
