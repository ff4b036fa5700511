"""Batch-level copy-paste augmentation (SPEC "CutLER training").

For each image of a training batch (the *target*), another image of the batch (the *source*) gives a random
1..n-1 of its n instances (the one instance when n = 1). Their union bounding box is cut out of the source,
scaled by one ratio drawn uniformly from ``ratio_range`` (nearest for masks, antialiased bilinear for pixels)
and pasted at a random offset that keeps it fully inside the target; only the pixels under the pasted masks
change. Pasted objects lie on top: existing masks lose the pixels they cover, and an existing mask that
loses pixels and keeps fewer than ``min_area`` is dropped. All boxes are recomputed from the masks.

Works on detectron2's training batch: a list of dicts with "image" (uint8 CxHxW tensor) and "instances"
(``Instances`` with gt_boxes, gt_classes and gt_masks as ``BitMasks``; set ``INPUT.MASK_FORMAT="bitmask"``).
Images of one batch may differ in size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch
from detectron2.structures import BitMasks, Boxes, Instances
from torch.nn import functional as F


def crop_and_scale(
    image: torch.Tensor, masks: torch.Tensor, ratio: float, max_hw: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut the union bounding box of some masks out of an image and scale it.

    Args:
        image: (C, H, W) uint8, the source image.
        masks: (k, H, W) bool, the objects to cut out; their union must not be empty.
        ratio: scale factor. It is lowered further where needed so the patch fits in ``max_hw``.
        max_hw: (height, width) the patch may not exceed (the target image's size).

    Returns:
        patch_image (C, h, w) uint8 and patch_masks (k, h, w) bool, with h, w >= 1. A mask thinner than
        the scale can resolve may come out empty.
    """
    union = _any(masks, dim=0)
    if not bool(union.any()):
        raise ValueError("cannot cut out empty masks")
    x0, y0, x1, y1 = (int(v) for v in boxes_from_masks(union[None])[0])
    h0, w0 = y1 - y0, x1 - x0
    ratio = min(ratio, max_hw[0] / h0, max_hw[1] / w0)
    size = (min(max(1, round(h0 * ratio)), max_hw[0]), min(max(1, round(w0 * ratio)), max_hw[1]))
    crop_masks = masks[:, y0:y1, x0:x1].unsqueeze(0).float()
    patch_masks = F.interpolate(crop_masks, size=size, mode="nearest-exact")[0] > 0.5
    crop_image = image[:, y0:y1, x0:x1].unsqueeze(0).float()
    # Antialiasing keeps strong down-scaling (ratio 0.3) from aliasing the object's texture.
    scaled = F.interpolate(crop_image, size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return scaled.round().clamp(0, 255).to(torch.uint8), patch_masks


def paste(
    image: torch.Tensor,
    masks: torch.Tensor,
    patch_image: torch.Tensor,
    patch_masks: torch.Tensor,
    top: int,
    left: int,
    min_area: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paste masked objects onto an image, on top of its existing masks.

    Args:
        image: (C, H, W) uint8 target image (not modified).
        masks: (n, H, W) bool existing masks of the target (not modified).
        patch_image, patch_masks: (C, h, w) uint8 and (k, h, w) bool, from :func:`crop_and_scale`.
        top, left: where the patch's top-left corner lands; the patch must lie fully inside the image.
        min_area: an existing mask that loses pixels and keeps fewer than this many is dropped (so is one
            that loses all of them); untouched masks are all kept, whatever their size.

    Returns:
        new_image (C, H, W) uint8: patch pixels where any patch mask is set, the target's elsewhere;
        kept_masks (m, H, W) bool: the surviving existing masks, minus the pasted pixels, in order;
        keep (n,) bool: which existing masks survive;
        pasted (k, H, W) bool: the patch masks placed in the target frame.
    """
    height, width = image.shape[-2:]
    h, w = patch_masks.shape[-2:]
    if not (0 <= top <= height - h and 0 <= left <= width - w):
        raise ValueError(f"a {h}x{w} patch at ({top}, {left}) does not fit in a {height}x{width} image")
    window = (slice(None), slice(top, top + h), slice(left, left + w))
    cover = patch_masks.any(dim=0)  # (h, w)
    new_image = image.clone()
    new_image[window] = torch.where(cover, patch_image, image[window])
    pasted = patch_masks.new_zeros((patch_masks.shape[0], height, width))
    pasted[window] = patch_masks

    # Occlusion happens only inside the window: count there, and count whole masks only where pixels went.
    lost = _count(masks[window] & cover)
    occluded = lost > 0
    left_over = _area(masks[occluded]) - lost[occluded]
    keep = ~occluded
    keep[occluded] = (left_over >= min_area) & (left_over > 0)
    kept_masks = masks[keep]
    kept_masks[window] &= ~cover
    return new_image, kept_masks, keep, pasted


def _count(masks: torch.Tensor) -> torch.Tensor:
    """Pixels set in each of (n, ...) bool masks, as int64 (n,); summing a uint8 view is much faster."""
    return masks.flatten(1).view(torch.uint8).sum(dim=1, dtype=torch.int64)


def _area(masks: torch.Tensor) -> torch.Tensor:
    """:func:`_count` of (n, H, W) masks, summing inside each mask's box (objects are smaller than images)."""
    boxes = boxes_from_masks(masks).long().tolist()
    areas = [_count(m[None, y0:y1, x0:x1]).item() for m, (x0, y0, x1, y1) in zip(masks, boxes, strict=True)]
    return torch.tensor(areas, dtype=torch.int64, device=masks.device)


def _any(masks: torch.Tensor, dim: int) -> torch.Tensor:
    """``masks.any(dim)`` for bool masks; the max of a uint8 view is about 10x faster on CPU."""
    return masks.view(torch.uint8).amax(dim=dim) > 0


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """Tight XYXY boxes (x1, y1 exclusive, like ``BitMasks.get_bounding_boxes``) of (n, H, W) bool masks.

    Returns an (n, 4) float32 tensor on the masks' device; an empty mask gets the all-zero box.
    """
    height, width = masks.shape[-2:]
    rows, cols = _any(masks, dim=2).to(torch.uint8), _any(masks, dim=1).to(torch.uint8)  # (n, H), (n, W)
    # argmax returns the first maximal index: the first set row / column, from either end.
    y0, y1 = rows.argmax(dim=1), height - rows.flip(1).argmax(dim=1)
    x0, x1 = cols.argmax(dim=1), width - cols.flip(1).argmax(dim=1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    boxes[rows.amax(dim=1) == 0] = 0.0
    return boxes


def _without_masks(instances: Instances, index: torch.Tensor, image_size: tuple[int, int]) -> Instances:
    """The indexed rows of all fields but gt_masks (so the big masks are not copied for nothing)."""
    fields = {k: v[index] for k, v in instances.get_fields().items() if k != "gt_masks"}
    return Instances(image_size, **fields)


def _paste_from(target: dict, source: dict, ratio_range, min_area: int, rng: np.random.Generator) -> dict:
    """One target dict with objects of one source dict pasted in (a new dict; the inputs are untouched)."""
    src = source["instances"]
    n = len(src)
    if n == 0:
        return target
    count = 1 if n == 1 else int(rng.integers(1, n))  # 1..n-1
    chosen = torch.as_tensor(np.sort(rng.choice(n, size=count, replace=False)), dtype=torch.long)
    ratio = float(rng.uniform(ratio_range[0], ratio_range[1]))
    src_masks = _bitmask_tensor(src)[chosen]
    if not _any(src_masks.flatten(), dim=0):  # nothing to paste (empty source masks)
        return target
    image = target["image"]
    size = tuple(image.shape[-2:])
    patch_image, patch_masks = crop_and_scale(source["image"], src_masks, ratio, size)
    h, w = patch_masks.shape[-2:]
    top, left = int(rng.integers(0, size[0] - h + 1)), int(rng.integers(0, size[1] - w + 1))

    tgt = target["instances"]
    tgt_masks = _bitmask_tensor(tgt) if len(tgt) else patch_masks.new_zeros((0, *size))
    new_image, kept_masks, keep, pasted = paste(
        image, tgt_masks, patch_image, patch_masks, top, left, min_area
    )
    nonempty = patch_masks.flatten(1).any(dim=1)  # a thin object can vanish when scaled down

    pasted_inst = _without_masks(src, chosen[nonempty], size)
    instances = Instances.cat([_without_masks(tgt, keep, size), pasted_inst]) if len(tgt) else pasted_inst
    instances.gt_masks = BitMasks(torch.cat([kept_masks, pasted[nonempty]]))
    instances.gt_boxes = Boxes(boxes_from_masks(instances.gt_masks.tensor))
    return {**target, "image": new_image, "instances": instances}


def _bitmask_tensor(instances: Instances) -> torch.Tensor:
    masks = instances.gt_masks
    if not isinstance(masks, BitMasks):
        raise TypeError(
            f"copy-paste needs gt_masks as BitMasks (INPUT.MASK_FORMAT='bitmask'), got {type(masks)}"
        )
    return masks.tensor


def copy_paste(
    batch: list[dict], ratio_range: tuple[float, float], min_area: int, rng: np.random.Generator
) -> list[dict]:
    """Copy-paste objects between the images of one training batch.

    Args:
        batch: detectron2 training dicts ("image" uint8 CxHxW, "instances" with gt_masks as BitMasks).
        ratio_range: (low, high) of the uniform scale ratio of the pasted objects.
        min_area: pixel area under which an occluded existing mask is dropped.
        rng: the only source of randomness (seed it for reproducible batches).

    Returns:
        A new list of the same length. Entry i is batch[i] with objects of a random other image j != i pasted
        in (a new dict, other keys shared), or batch[i] itself when image j has no instances.
        Instances: the surviving existing ones (original order, classes kept, masks occluded) followed by
        the pasted ones (source order, classes kept); gt_boxes recomputed from gt_masks for all.
        A batch of one image is returned unchanged; the input dicts are never modified.
    """
    if len(batch) < 2:
        return list(batch)
    out = []
    for t, target in enumerate(batch):
        s = int(rng.integers(len(batch) - 1))
        s += s >= t  # a uniform choice among the other images
        out.append(_paste_from(target, batch[s], ratio_range, min_area, rng))
    return out


class CopyPasteLoader:
    """Iterable wrapper that applies :func:`copy_paste` to every batch of a detectron2 training loader."""

    def __init__(
        self,
        loader: Iterable[list[dict]],
        ratio_range: tuple[float, float],
        min_area: int,
        rng: np.random.Generator,
    ):
        lo, hi = ratio_range
        if not 0 < lo <= hi:
            raise ValueError(f"ratio_range must satisfy 0 < low <= high, got {ratio_range}")
        self.loader = loader
        self.ratio_range = (float(lo), float(hi))
        self.min_area = int(min_area)
        self.rng = rng

    @classmethod
    def from_config(cls, cfg, loader: Iterable[list[dict]], rng: np.random.Generator) -> Iterable[list[dict]]:
        """The loader wrapped with ``cfg.INPUT.COPY_PASTE`` settings, or unchanged when it is disabled."""
        cp = cfg.INPUT.COPY_PASTE
        return cls(loader, tuple(cp.RATIO_RANGE), cp.MIN_AREA, rng) if cp.ENABLED else loader

    def __iter__(self) -> Iterator[list[dict]]:
        for batch in self.loader:
            yield copy_paste(batch, self.ratio_range, self.min_area, self.rng)

    def __len__(self) -> int:
        return len(self.loader)  # a TypeError for infinite loaders, like the loader itself
