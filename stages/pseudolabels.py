"""The pseudo-label stage's workers. Images: backbone features -> a registered image method -> refinement ->
COCO annotations. Videos: frames -> a registered video method -> tracks.

The methods live in ``stages/discovery/`` and ``stages/video/`` (registered in ``METHODS``); this module maps
their patch masks back to pixels and runs one shard of items (paths in, JSON-ready records out; the
pipeline's driver writes them)."""

from __future__ import annotations

import io
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from stages.common.export import encode_mask, mask_annotation
from stages.common.io import BadImage, load_rgb
from stages.data.datasets import ImageRecord
from stages.data.videos import VideoRecord
from stages.discovery.base import ImageMethod, PatchFeatures, ScoredMask, load_methods
from stages.discovery.ncut import patch_box
from stages.features.backbone import Backbone, ViTFeatures, input_size, network_image, prepare_image
from stages.refinement.refine import RefineConfig, refine_masks
from stages.video.base import VideoMethod


@dataclass
class ImageObjects:
    boxes: list[list[float]]  # [x, y, w, h] in image pixels from the patch masks, discovery order
    masks: list[np.ndarray]  # refined (H, W) bool masks; masks rejected by refinement are left out
    scores: list[float | None] | None = None  # per mask: the method's object score (ScoredMask), or None


def to_pixels(
    rgb: np.ndarray,
    work_rgb: np.ndarray,
    patch_masks: list[np.ndarray] | list[ScoredMask],
    patch: int,
    refine: str,
    cfg: RefineConfig,
    device: str | torch.device = "cpu",
) -> ImageObjects:
    """Patch masks -> boxes and refined masks at the original image size.

    ``work_rgb`` is the image the network saw before padding (``network_image``). Masks are upsampled to it,
    refined there (on ``device`` when ``cfg.backend`` picks torch there), then resized to the original size;
    boxes follow SPEC ([xmin*p, ymin*p, (xmax+1)*p, (ymax+1)*p], clipped) and are scaled the same way. A
    ``ScoredMask``'s score follows its refined mask into ``scores`` (None for a bare mask).
    """
    height, width = rgb.shape[:2]
    work_h, work_w = work_rgb.shape[:2]
    sx, sy = width / work_w, height / work_h
    out = ImageObjects([], [], [])
    pixel_masks, scores = [], []
    for item in patch_masks:
        mask, score = (item.mask, item.score) if isinstance(item, ScoredMask) else (item, None)
        if not mask.any():  # a method's "no object here" (e.g. its no-object rule): nothing to box
            continue
        x0, y0, x1, y1 = patch_box(mask, patch)
        x1, y1 = min(x1, work_w), min(y1, work_h)
        out.boxes.append([x0 * sx, y0 * sy, (x1 - x0) * sx, (y1 - y0) * sy])
        pixel_masks.append(mask.repeat(patch, axis=0).repeat(patch, axis=1)[:work_h, :work_w])
        scores.append(score)
    refined_masks = refine_masks(work_rgb, pixel_masks, refine, cfg, device)
    for refined, score in zip(refined_masks, scores, strict=True):
        if refined is not None and refined.any():
            out.masks.append(_resize_mask(refined, height, width))
            out.scores.append(score)
    return out


def _resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    if mask.shape == (height, width):
        return mask
    soft = Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.BILINEAR)
    return np.asarray(soft) > 127


# ----------------------------------------------------------------------------------------------------------
# The stage: a model-holding worker runs shards of images


class Discoverer:
    """Holds the backbone and a registered image method built from its config; turns images into objects.

    ``method_cfg`` is the method's config section: its ``resize`` and ``refine`` are the stage's settings.
    ``refine_pool``: where the refinement runs (``to_pixels`` calls submitted to it, e.g. a process pool),
    so that the backbone pass of the next batch overlaps it; None refines in this process, in turn. Either
    way the objects are the same.
    """

    def __init__(
        self,
        backbone: Backbone,
        method: ImageMethod,
        method_cfg: Any,
        refine: RefineConfig,
        max_patches: int,
        refine_pool: Executor | None = None,
    ):
        self.backbone = backbone
        self.method = method
        self.resize = method_cfg.resize
        self.refiner = method_cfg.refine
        self.refine = refine
        self.max_patches = max_patches
        self.refine_pool = refine_pool
        self.want = ("keys", *(n for n in method.needs if n != "key_bias"))
        self.key_bias = backbone.key_bias if "key_bias" in method.needs else None

    @classmethod
    def from_config(
        cls,
        backbone: Backbone,
        method_cfg: Any,
        refine: RefineConfig,
        max_patches: int,
        refine_pool: Executor | None = None,
    ) -> Discoverer:
        """The discoverer of the registered image method ``method_cfg.name``, built from its section."""
        method = load_methods().get(method_cfg.name).from_config(method_cfg)
        return cls(backbone, method, method_cfg, refine, max_patches, refine_pool)

    def check(self, rgb: np.ndarray) -> None:
        """Raise BadImage for images too small or too large for the patch graph."""
        height, width = rgb.shape[:2]
        p = self.backbone.patch
        if min(height, width) < 2 * p:
            raise BadImage(f"tiny: {width}x{height} px is less than 2 patches of {p} px")
        h, w = input_size(height, width, p, self.resize)
        if (h // p) * (w // p) > self.max_patches:
            raise BadImage(
                f"huge: {width}x{height} px gives {(h // p) * (w // p)} patches > run.max_patches="
                f"{self.max_patches} (resize it, or raise run.max_patches if memory allows)"
            )

    def __call__(self, images: list[np.ndarray], batch_size: int) -> list[ImageObjects | BadImage]:
        """Objects of each image (or why it failed); images of the same input size share a forward pass."""
        p = self.backbone.patch
        # Resized once: the network's tensor and the refinement both use this image.
        works = [network_image(rgb, p, self.resize) for rgb in images]
        tensors = [prepare_image(work, p, None) for work in works]
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, t in enumerate(tensors):
            by_size.setdefault(tuple(t.shape), []).append(i)
        results: list[ImageObjects | BadImage | Future | None] = [None] * len(images)
        for indices in by_size.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                feats = self.backbone(torch.stack([tensors[i] for i in chunk]), want=self.want)
                for b, i in enumerate(chunk):
                    results[i] = self._objects(images[i], self._features(feats, b, works[i]))
        # A refinement that raised raises here, as it would have in this process.
        return [r.result() if isinstance(r, Future) else r for r in results]

    def _features(self, feats: ViTFeatures, b: int, work: np.ndarray) -> PatchFeatures:
        """Image ``b`` of a batch's features, as the method takes them."""

        def one(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[b]

        queries = one(feats.queries)
        return PatchFeatures(
            keys=feats.keys[b, 1:],
            grid=feats.grid,
            family=self.backbone.family,
            patch=self.backbone.patch,
            image=work,
            cls_key=feats.keys[b, 0],
            queries=None if queries is None else queries[1:],
            attention=one(feats.attention),
            tokens=one(feats.tokens),
            key_bias=self.key_bias,
        )

    def _objects(self, rgb: np.ndarray, feats: PatchFeatures) -> ImageObjects | BadImage | Future:
        """The image's objects, or the future ones when refinement runs in ``refine_pool``."""
        try:
            masks = self.method(feats)
        except np.linalg.LinAlgError as e:  # a degenerate graph LAPACK cannot solve: this image only
            return BadImage(f"eigensolver failed: {e}")
        args = (rgb, feats.image, masks, self.backbone.patch, self.refiner, self.refine, self.backbone.device)
        if self.refine_pool is None:
            return to_pixels(*args)
        return self.refine_pool.submit(to_pixels, *args)


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
        scores = objects.scores or [None] * len(objects.masks)
        annotations += [mask_annotation(m, rec.id, s) for m, s in zip(objects.masks, scores, strict=True)]
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


# ----------------------------------------------------------------------------------------------------------
# Videos: one video per shard


def run_video(
    discoverer: VideoMethod, video: VideoRecord, overlay: bool, pairs: list[str] | None = None
) -> tuple[dict, bytes | None]:
    """Tracks of one video: returns the shard's data ({"video", "tracks", "failures"}, JSON-ready) and, when
    ``overlay``, an animated GIF of them. ``pairs``: the paths of the video's pair files when the method
    has a ``pair_cache`` (a missing one fails the video). An unreadable frame fails the video (recorded
    with the frame's name), not the run. Writes nothing."""
    try:
        frames = [load_rgb(Path(video.root) / f) for f in video.frames]
    except BadImage as e:
        return {"video": None, "tracks": [], "failures": [{"video": video.name, "reason": str(e)}]}, None
    if len({f.shape for f in frames}) > 1:
        frames = [np.array(Image.fromarray(f).resize(frames[0].shape[1::-1])) for f in frames]
    if pairs is None:
        ids = discoverer(frames)
    else:
        missing = [p for p in pairs if not Path(p).is_file()]
        if missing:
            reason = (
                f"no pair file {missing[0]} (a frame could not be read; or the file was deleted: delete "
                "its stage's shards folder beside it to compute it again)"
            )
            return {"video": None, "tracks": [], "failures": [{"video": video.name, "reason": reason}]}, None
        ids = discoverer(frames, pairs)
    height, width = ids.shape[1:]
    tracks = [
        {"track_id": k, "segmentations": [encode_mask(m) if m.any() else None for m in ids == k]}
        for k in range(1, int(ids.max()) + 1)
    ]
    meta = {
        "id": video.id,
        "name": video.name,
        "file_names": list(video.frames),
        "width": width,
        "height": height,
    }
    data = {"video": meta, "tracks": tracks, "failures": []}
    return data, gif(frames, ids) if overlay else None


def pair_names(video: VideoRecord) -> list[str]:
    """A video's pair files (``PairCache``) relative to the cache's folder: <video>/<frame p's stem>.npy."""
    return [f"{video.name}/{Path(f).stem}.npy" for f in video.frames[:-1]]


def run_pairs(
    compute: Callable[[np.ndarray, np.ndarray], bytes], folder: str, pairs: list[tuple[VideoRecord, int]]
) -> tuple[dict, dict[str, bytes]]:
    """The pair files of (video, frame p) pairs: frames p and p+1 through ``compute``. Returns the shard's
    data ({"pairs": file names, "failures"}) and the files (name under ``folder`` -> bytes). A pair with an
    unreadable frame is left out and recorded (its video then fails by name). Writes nothing."""
    files, failures = {}, []
    for video, t in pairs:
        name = pair_names(video)[t]
        try:
            first, second = (load_rgb(Path(video.root) / f) for f in video.frames[t : t + 2])
        except BadImage as e:
            failures.append({"pair": name, "reason": str(e)})
            continue
        if first.shape != second.shape:  # as run_video: frames are brought to the first one's size
            second = np.array(Image.fromarray(second).resize(first.shape[1::-1]))
        files[f"{folder}/{name}"] = compute(first, second)
    return {"pairs": sorted(files), "failures": failures}, files


def validate_video_shard(shard: dict) -> None:
    """A video shard before it is written: every track has one segmentation (or None) per frame, each an RLE
    of the video's size with str counts. Raises ValueError naming the video and the track."""
    video = shard["video"]
    if video is None:
        return
    size = [video["height"], video["width"]]
    for track in shard["tracks"]:
        where = f"video '{video['name']}', track {track['track_id']}"
        if len(track["segmentations"]) != len(video["file_names"]):
            raise ValueError(
                f"{where}: {len(track['segmentations'])} masks for {len(video['file_names'])} frames"
            )
        for seg in track["segmentations"]:
            if seg is not None and (list(seg["size"]) != size or not isinstance(seg["counts"], str)):
                raise ValueError(f"{where}: a mask is not an RLE of size {size} with str counts")


def gif(frames: list[np.ndarray], ids: np.ndarray, max_width: int = 480) -> bytes:
    """An animated GIF of the frames with each track in its own colour, for a quick look."""
    colours = np.random.default_rng(0).integers(40, 255, (int(ids.max()) + 1, 3))
    colours[0] = 0
    scale = min(1.0, max_width / frames[0].shape[1])
    size = (int(frames[0].shape[1] * scale), int(frames[0].shape[0] * scale))
    shown = []
    for frame, frame_ids in zip(frames, ids, strict=True):
        blend = np.where(frame_ids[..., None] > 0, 0.45 * frame + 0.55 * colours[frame_ids], frame)
        shown.append(Image.fromarray(blend.astype(np.uint8)).resize(size))
    out = io.BytesIO()
    shown[0].save(out, format="GIF", save_all=True, append_images=shown[1:], duration=200, loop=0)
    return out.getvalue()
