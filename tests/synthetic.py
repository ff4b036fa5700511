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


Shape = tuple[str, int, int, int, int]  # 'box' or 'ellipse', then its bounding box y0, x0, y1, x1 (exclusive)


def shape_mask(grid: tuple[int, int], shape: Shape) -> np.ndarray:
    """(h, w) bool mask of a box or of the ellipse inscribed in the box."""
    kind, y0, x0, y1, x1 = shape
    yy, xx = np.mgrid[0 : grid[0], 0 : grid[1]]
    if kind == "box":
        return (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)
    cy, cx, ry, rx = (y0 + y1 - 1) / 2, (x0 + x1 - 1) / 2, (y1 - y0) / 2, (x1 - x0) / 2
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def hard_scene(
    grid: tuple[int, int],
    shapes: list[Shape],
    seed: int,
    object_similarity: float = 0.0,
    offset: float = 0.0,
    noise: float = 1.5,
    dim: int = 64,
) -> tuple[torch.Tensor, list[np.ndarray]]:
    """(h*w, dim) keys of a scene where the reference graph settings matter, and each object's truth mask.

    Every patch is the unit direction of its region plus Gaussian noise of norm ``noise``: a 'sky' band
    (top 55%) and a 'ground' band with directions of cosine 0.7, objects at cosine -0.3 to both bands and
    ``object_similarity`` to each other. With noise 1.5 the cosine of two patches of one object is only
    ~0.3 (about the cosine of the two bands), object-background ~-0.1: a cut at tau 0.15 separates the
    objects from one background, a higher tau also splits the bands (MaskCut then returns a band as an
    object), a tau below 0 joins objects and background. ``offset`` adds one shared vector to every key
    (as DINOv2's keys have): raw cosines are then all high, and only centred keys can be cut.
    """
    rng = np.random.default_rng(seed)
    n = 2 + len(shapes)
    gram = np.full((n, n), object_similarity)
    gram[:2, :] = gram[:, :2] = -0.3
    gram[0, 1] = gram[1, 0] = 0.7
    np.fill_diagonal(gram, 1.0)
    basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
    directions = np.linalg.cholesky(gram) @ basis[:n]  # unit rows with exactly that Gram matrix
    h, w = grid
    region = np.where(np.arange(h)[:, None] < 0.55 * h, 0, 1).repeat(w, axis=1)
    truth: list[np.ndarray] = []
    for j, shape in enumerate(shapes):
        inside = shape_mask(grid, shape)
        region[inside] = 2 + j
        truth = [t & ~inside for t in truth] + [inside]
    keys = directions[region] + noise * rng.standard_normal((h, w, dim)) / np.sqrt(dim) + offset * basis[-1]
    return torch.from_numpy(keys.reshape(h * w, dim)).float(), truth


def box_iou(a, b) -> float:
    """IoU of two [x0, y0, x1, y1] boxes (written here, apart from the code under test)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area_a, area_b = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
    return float(w * h / (area_a + area_b - w * h))


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
