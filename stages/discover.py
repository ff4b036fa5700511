"""The image pseudo-label stage: backbone keys -> discovery method -> refinement -> COCO annotations.

The methods themselves live in stages/maskcut.py, tokencut.py and lost.py; this module maps their patch
masks back to pixels and runs one shard of images (paths in, JSON-ready records out; the pipeline's driver
writes them).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.config import MethodConfig, RefineConfig
from stages.backbone import Backbone, input_size, network_image, prepare_image
from stages.datasets import ImageRecord
from stages.export import mask_annotation
from stages.io import BadImage, load_rgb
from stages.lost import lost
from stages.maskcut import maskcut
from stages.ncut import patch_box
from stages.refine import refine_mask
from stages.tokencut import tokencut


def find_objects(
    keys: torch.Tensor, grid: tuple[int, int], cfg: MethodConfig, family: str
) -> list[np.ndarray]:
    """Patch keys (h*w, d) of one image -> (h, w) bool masks from the configured method, in order."""
    if cfg.name == "lost":
        return [lost(keys, grid, cfg.k)]
    graph = cfg.graph[family]
    if cfg.name == "tokencut":
        return [tokencut(keys, grid, graph.tau, cfg.eps, graph.center_keys, cfg.solver)]
    return maskcut(
        keys,
        grid,
        graph.tau,
        cfg.eps,
        graph.center_keys,
        cfg.n_masks,
        cfg.max_overlap,
        cfg.min_area,
        cfg.solver,
    )


@dataclass
class ImageObjects:
    boxes: list[list[float]]  # [x, y, w, h] in image pixels from the patch masks, discovery order
    masks: list[np.ndarray]  # refined (H, W) bool masks; masks rejected by refinement are left out


def to_pixels(
    rgb: np.ndarray,
    work_rgb: np.ndarray,
    patch_masks: list[np.ndarray],
    patch: int,
    refine: str,
    cfg: RefineConfig,
) -> ImageObjects:
    """Patch masks -> boxes and refined masks at the original image size.

    ``work_rgb`` is the image the network saw before padding (``network_image``). Masks are upsampled to it,
    refined there, then resized to the original size; boxes follow SPEC ([xmin*p, ymin*p, (xmax+1)*p,
    (ymax+1)*p], clipped) and are scaled the same way.
    """
    height, width = rgb.shape[:2]
    work_h, work_w = work_rgb.shape[:2]
    sx, sy = width / work_w, height / work_h
    out = ImageObjects([], [])
    for mask in patch_masks:
        x0, y0, x1, y1 = patch_box(mask, patch)
        x1, y1 = min(x1, work_w), min(y1, work_h)
        out.boxes.append([x0 * sx, y0 * sy, (x1 - x0) * sx, (y1 - y0) * sy])
        pixels = mask.repeat(patch, axis=0).repeat(patch, axis=1)[:work_h, :work_w]
        refined = refine_mask(work_rgb, pixels, refine, cfg)
        if refined is not None and refined.any():
            out.masks.append(_resize_mask(refined, height, width))
    return out


def _resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    if mask.shape == (height, width):
        return mask
    soft = Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.BILINEAR)
    return np.asarray(soft) > 127


# ----------------------------------------------------------------------------------------------------------
# The stage: a model-holding worker runs shards of images


class Discoverer:
    """Holds the backbone and the method's settings; turns images into objects."""

    def __init__(self, backbone: Backbone, method: MethodConfig, refine: RefineConfig, max_patches: int):
        self.backbone = backbone
        self.method = method
        self.refine = refine
        self.max_patches = max_patches

    def check(self, rgb: np.ndarray) -> None:
        """Raise BadImage for images too small or too large for the patch graph."""
        height, width = rgb.shape[:2]
        p = self.backbone.patch
        if min(height, width) < 2 * p:
            raise BadImage(f"tiny: {width}x{height} px is less than 2 patches of {p} px")
        h, w = input_size(height, width, p, self.method.resize)
        if (h // p) * (w // p) > self.max_patches:
            raise BadImage(
                f"huge: {width}x{height} px gives {(h // p) * (w // p)} patches > run.max_patches="
                f"{self.max_patches} (resize it, or raise run.max_patches if memory allows)"
            )

    def __call__(self, images: list[np.ndarray], batch_size: int) -> list[ImageObjects | BadImage]:
        """Objects of each image (or why it failed); images of the same input size share a forward pass."""
        p = self.backbone.patch
        # Resized once: the network's tensor and the refinement both use this image.
        works = [network_image(rgb, p, self.method.resize) for rgb in images]
        tensors = [prepare_image(work, p, None) for work in works]
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, t in enumerate(tensors):
            by_size.setdefault(tuple(t.shape), []).append(i)
        results: list[ImageObjects | BadImage | None] = [None] * len(images)
        for indices in by_size.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                feats = self.backbone(torch.stack([tensors[i] for i in chunk]))
                for i, keys in zip(chunk, feats.keys[:, 1:], strict=True):
                    results[i] = self._objects(images[i], works[i], keys, feats.grid)
        return results

    def _objects(
        self, rgb: np.ndarray, work_rgb: np.ndarray, keys: torch.Tensor, grid: tuple[int, int]
    ) -> ImageObjects | BadImage:
        try:
            masks = find_objects(keys, grid, self.method, self.backbone.family)
        except np.linalg.LinAlgError as e:  # a degenerate graph LAPACK cannot solve: this image only
            return BadImage(f"eigensolver failed: {e}")
        return to_pixels(rgb, work_rgb, masks, self.backbone.patch, self.method.refine, self.refine)


def run_shard(
    discoverer: Discoverer,
    records: list[ImageRecord],
    batch_size: int,
    overlay_ids: frozenset[int] = frozenset(),
) -> tuple[dict, dict[str, bytes]]:
    """Discover objects in one shard of images: returns the shard's data ({"images", "annotations",
    "failures"}, JSON-ready) and PNG overlays (file name -> bytes) of the images whose id is in
    ``overlay_ids``. Writes nothing.

    Bad images (unreadable, truncated, tiny, huge) are recorded with their reason, not raised.
    """
    good, rgbs, failures = [], [], []
    for rec in records:
        try:
            rgb = load_rgb(Path(rec.path))
            discoverer.check(rgb)
        except BadImage as e:
            failures.append({"id": rec.id, "file_name": rec.file_name, "reason": str(e)})
            continue
        good.append(rec)
        rgbs.append(rgb)
    images, annotations, overlays = [], [], {}
    for rec, rgb, objects in zip(good, rgbs, discoverer(rgbs, batch_size), strict=True):
        if isinstance(objects, BadImage):
            failures.append({"id": rec.id, "file_name": rec.file_name, "reason": str(objects)})
            continue
        height, width = rgb.shape[:2]
        images.append(
            {
                "id": rec.id,
                "file_name": rec.file_name,
                "width": width,
                "height": height,
                "discovery_boxes": objects.boxes,
            }
        )
        annotations += [mask_annotation(m, rec.id) for m in objects.masks]
        if rec.id in overlay_ids:
            overlays[f"{rec.id:08d}.png"] = overlay_png(rgb, objects)
    return {"images": images, "annotations": annotations, "failures": failures}, overlays


def overlay_png(rgb: np.ndarray, objects: ImageObjects) -> bytes:
    """A PNG of the image with its masks and discovery boxes drawn, for a quick look."""
    from detectron2.utils.colormap import colormap
    from detectron2.utils.visualizer import Visualizer

    vis = Visualizer(rgb)
    # Drawn apart: a mask rejected by refinement keeps its box, so there can be more boxes than masks.
    if objects.masks:
        palette = colormap(rgb=True, maximum=1)  # fixed colours: the same image gives the same PNG bytes
        colours = [palette[k % len(palette)] for k in range(len(objects.masks))]
        vis.overlay_instances(masks=objects.masks, assigned_colors=colours)
    for x, y, w, h in objects.boxes:
        vis.draw_box((x, y, x + w, y + h))
    out = io.BytesIO()
    Image.fromarray(vis.output.get_image()).save(out, format="PNG")
    return out.getvalue()
