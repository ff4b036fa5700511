"""Data the tests make: planted-object key maps and simple images."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from tools.bench_ncut import planted_keys as bench_planted_keys

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
    background_similarity: float = -0.3,
    offset: float = 0.0,
    noise: float = 1.5,
    dim: int = 64,
) -> tuple[torch.Tensor, list[np.ndarray]]:
    """(h*w, dim) keys of a scene where the reference graph settings matter, and each object's truth mask.

    Every patch is the unit direction of its region plus Gaussian noise of norm ``noise``: a 'sky' band
    (top 55%) and a 'ground' band with directions of cosine 0.7, objects at cosine
    ``background_similarity`` (-0.3) to both bands and ``object_similarity`` to each other. With noise 1.5
    the cosine of two patches of one object is only ~0.3 (about the cosine of the two bands),
    object-background ~-0.1: a cut at tau 0.15 separates the objects from one background, a higher tau
    also splits the bands (MaskCut then returns a band as an object), a tau below 0 joins objects and
    background. ``offset`` adds one shared vector to every key
    (as DINOv2's keys have): raw cosines are then all high, and only centred keys, or keys minus that
    vector (``hard_scene_bias``, the 'no_bias' treatment's key bias), can be cut.
    """
    rng = np.random.default_rng(seed)
    n = 2 + len(shapes)
    gram = np.full((n, n), object_similarity)
    gram[:2, :] = gram[:, :2] = background_similarity
    gram[0, 1] = gram[1, 0] = 0.7
    np.fill_diagonal(gram, 1.0)
    basis = _scene_basis(rng, dim)
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


def _scene_basis(rng: np.random.Generator, dim: int) -> np.ndarray:
    """(dim, dim) random orthonormal rows: the first directions of a scene's regions, the last its offset."""
    return np.linalg.qr(rng.standard_normal((dim, dim)))[0]


def hard_scene_bias(seed: int, offset: float, dim: int = 64) -> torch.Tensor:
    """(dim,) the shared vector ``hard_scene(..., seed, offset=offset, dim=dim)`` adds to every key: the
    scene's planted key bias."""
    return torch.from_numpy(offset * _scene_basis(np.random.default_rng(seed), dim)[-1]).float()


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


def _place_boxes(
    grid: tuple[int, int], count: int, sizes: tuple[int, int], gen: torch.Generator
) -> list[Box]:
    """``count`` non-overlapping boxes (y0, x0, y1, x1) on the grid, sides in [sizes[0], sizes[1]]."""
    h, w = grid
    while True:
        boxes, taken = [], torch.zeros(grid, dtype=torch.bool)
        for _ in range(count):
            bh, bw = torch.randint(sizes[0], sizes[1] + 1, (2,), generator=gen).tolist()
            y = int(torch.randint(0, h - bh + 1, (), generator=gen))
            x = int(torch.randint(0, w - bw + 1, (), generator=gen))
            boxes.append((y, x, y + bh, x + bw))
            if taken[y : y + bh, x : x + bw].any():
                break
            taken[y : y + bh, x : x + bw] = True
        else:
            return boxes


def paint_features(
    labels: torch.Tensor, palette: torch.Tensor, noise: float, gen: torch.Generator
) -> torch.Tensor:
    """(..., h, w) labels (0 = background, k = object k) -> (..., h*w, D) features: palette[label] plus
    Gaussian noise of std ``noise``."""
    flat = labels.reshape(*labels.shape[:-2], -1)
    clean = palette[flat]
    return clean + noise * torch.randn(clean.shape, generator=gen)


def planted_feature_maps(
    batch: int,
    grid: tuple[int, int],
    palette: torch.Tensor,
    objects: int,
    gen: torch.Generator,
    noise: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature maps of planted objects, like a frozen ViT's on simple scenes: (B, h*w, D) features and
    (B, h, w) labels (0 = background, 1..objects). palette: (1 + P, D), row 0 the background's feature;
    each map holds ``objects`` non-overlapping boxes at random places (sides 2 to half the grid), each
    with its own feature drawn from rows 1..P."""
    labels = torch.zeros(batch, *grid, dtype=torch.long)
    features = torch.empty(batch, grid[0] * grid[1], palette.shape[1])
    for i in range(batch):
        for k, (y0, x0, y1, x1) in enumerate(_place_boxes(grid, objects, (2, min(grid) // 2), gen), 1):
            labels[i, y0:y1, x0:x1] = k
        rows = torch.cat(
            [torch.zeros(1, dtype=torch.long), 1 + torch.randperm(len(palette) - 1, generator=gen)]
        )
        features[i] = paint_features(labels[i], palette[rows[: objects + 1]], noise, gen)
    return features, labels


def moving_boxes(
    frames: int, grid: tuple[int, int], count: int, side: int, gen: torch.Generator
) -> torch.Tensor:
    """(T, h, w) labels of ``count`` side x side boxes (0 = background, k = box k) moving one patch per
    frame on each axis in a random direction. A box bounces off the grid's edges, and stays put and turns
    back where its move would overlap another box, so boxes never overlap."""
    h, w = grid
    boxes = [[y, x, *(torch.randint(0, 2, (2,), generator=gen) * 2 - 1).tolist()]
             for y, x, _, _ in _place_boxes(grid, count, (side, side), gen)]  # fmt: skip

    def overlaps(k: int, y: int, x: int) -> bool:
        return any(abs(y - b[0]) < side and abs(x - b[1]) < side for j, b in enumerate(boxes) if j != k)

    labels = torch.zeros(frames, h, w, dtype=torch.long)
    for t in range(frames):
        for k, (y, x, _, _) in enumerate(boxes):
            labels[t, y : y + side, x : x + side] = k + 1
        for k, box in enumerate(boxes):
            y, x, dy, dx = box
            dy = dy if 0 <= y + dy <= h - side else -dy
            dx = dx if 0 <= x + dx <= w - side else -dx
            if overlaps(k, y + dy, x + dx):
                box[2:] = [-dy, -dx]
            else:
                box[:] = [y + dy, x + dx, dy, dx]
    return labels


def train_planted_solv(steps: int = 1100, seed: int = 0):
    """A tiny SOLV (n = 0, 3 slots of 32, 16-d features on a 6x6 grid, no token drop or merging) trained
    with the paper's loss on planted-object feature maps (two boxes, features drawn from a palette of 4
    on a background) until its slots separate them: about 1000 steps, ~30 s of one CPU core. Returns
    (model in eval mode, palette (5, 16), row 0 the background)."""
    from stages.video.solv import SOLV, SOLVConfig
    from stages.video.solv_train import FeatureBatch, SOLVTrainConfig, train_solv

    grid, dim = (6, 6), 16
    gen = torch.Generator().manual_seed(seed)
    palette = torch.randn(5, dim, generator=gen)
    cfg = SOLVConfig(
        num_slots=3, slot_dim=32, slot_iters=3, context=0, temporal_layers=1, temporal_heads=4,
        temporal_dropout=0.0, decoder_hidden=32, decoder_layers=3, scale_factor=5.0, token_drop=0.0,
        merge_slots=False, merge_threshold=0.12, merge_min_slots=1,
    )  # fmt: skip
    schedule = SOLVTrainConfig(
        steps=steps, lr=2e-3, warmup_fraction=0.0, final_lr_fraction=1.0, weight_decay=0.0, grad_clip=1.0,
        merge_periods=1, seed=seed,
    )  # fmt: skip

    def batches():
        while True:
            features, _ = planted_feature_maps(16, grid, palette, 2, gen)
            yield FeatureBatch(features[:, None], torch.ones(16, 1, dtype=torch.bool))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: more threads only add contention
    try:
        torch.manual_seed(seed)
        model = SOLV(cfg, dim, grid)
        train_solv(model, batches(), schedule)
    finally:
        torch.set_num_threads(threads)
    return model.eval(), palette


def single_object_video(
    n_frames: int, size: tuple[int, int] = (64, 96), box: int = 32, seed: int = 0
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """One bright textured square moving right 3 px a frame over a dark textured background (texture gives
    optical flow something to follow). Returns the (H, W, 3) uint8 frames and (H, W) bool object masks."""
    rng = np.random.default_rng(seed)
    h, w = size
    background = 40 + 25 * rng.random((h, w, 3))
    texture = rng.random((box, box, 3))
    frames, masks = [], []
    for t in range(n_frames):
        x = 4 + (3 * t) % max(1, w - box - 8)
        y = (h - box) // 2
        img = background.copy()
        img[y : y + box, x : x + box] = 150 + 100 * texture * np.array([1.0, 0.3, 0.3])
        mask = np.zeros((h, w), bool)
        mask[y : y + box, x : x + box] = True
        frames.append(img.astype(np.uint8))
        masks.append(mask)
    return frames, masks
