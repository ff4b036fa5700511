"""Parity and speed of the torch refinement (stages/refinement/dense_crf_torch.py,
stages/refinement/bilateral_solver_torch.py) against the reference (pydensecrf, scipy:
stages/refinement/refine.py) on real photos.

    python -m tools.bench_refine [--max-photos N]    (all photos: ``python -m tools.bench refine``)

Photos: the demo sets (data/demo, the frames of data/demo-video) and every photograph in the scikit-image
wheel that the demo assembler keeps in data/.sources (synthetic images and the demo's own copies left out),
fitted to 640 px like the demo's. Masks as MaskCut refines them: its working image (a 476 px square with the
default DINOv2-S/14) with its patch masks, plus the ground-truth masks of the demo sets made blocky at the
patch size. Every mask goes through both refiners, reference and torch (which takes the masks of one image
together). Reported: mask IoU of torch against the reference (two empty masks agree), its median and share
>= 0.95, agreement of the IoU < min_iou rejection, and time per mask: on this CPU with torch on one thread
(pydensecrf and scipy use one; a pipeline worker gets one core), and on CUDA when there is one.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.config import load_config
from pipeline.runs import load_backbone, resolve_backbone
from stages.discovery.base import keys_to_masks
from stages.features.backbone import network_image, prepare_image
from stages.refinement.bilateral_solver_torch import bilateral_refine as bilateral_torch
from stages.refinement.dense_crf_torch import crf_refine as crf_torch
from stages.refinement.refine import RefineConfig, bilateral_refine, crf_refine, mask_iou
from tools.demo_data import MAX_SIDE, SKIMAGE, fit_size

DATA = Path("data")
# Photographs of the scikit-image wheel not already in the demo set (its synthetic images, the horse
# silhouette, logos and tiny crops are no photos of the kind the pipeline meets).
SKIMAGE_PHOTOS = (
    "brick.png",
    "camera.png",
    "cell.png",
    "clock_motion.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "moon.png",
    "motorcycle_right.png",
    "page.png",
    "retina.jpg",
    "text.png",
)
# Parity goal of issue 15: median IoU >= 0.98 and IoU >= 0.95 on 95% of masks.
GOOD_IOU = 0.95


@dataclass
class Photo:
    name: str
    rgb: np.ndarray  # HxWx3 uint8, longer side <= MAX_SIDE
    truth: list[np.ndarray] = field(default_factory=list)  # HxW bool ground-truth masks, when known


@dataclass
class Tally:
    """Outcomes of one refiner: per device torch ran on, the IoU of each mask against the reference and
    whether both implementations keep or reject it alike; total seconds per implementation."""

    ious: dict[str, list[float]] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)  # photo and mask index of each IoU, in order
    agree: dict[str, int] = field(default_factory=dict)
    rejected_by_both: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def add_time(self, key: str, seconds: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds

    def add_masks(self, device: str, photo: str, raw, expected, got, min_iou: float) -> None:
        if device == "CPU":
            self.labels += [f"{photo}#{i}" for i in range(len(raw))]
        for mask, ref, out in zip(raw, expected, got, strict=True):
            # mask_iou calls two empty masks a mismatch (right for rejection); here they give the same answer.
            same = 1.0 if not (ref.any() or out.any()) else mask_iou(ref, out)
            self.ious.setdefault(device, []).append(same)
            ref_rejects = mask_iou(mask, ref) < min_iou
            torch_rejects = mask_iou(mask, out) < min_iou
            self.agree[device] = self.agree.get(device, 0) + (ref_rejects == torch_rejects)
            both = ref_rejects and torch_rejects
            self.rejected_by_both[device] = self.rejected_by_both.get(device, 0) + both


def photos(root: Path = DATA) -> list[Photo]:
    """Every photo this machine has from the demo assembler's sources, with ground truth where known."""
    out = _coco_photos(root / "demo")
    out += _davis_photos(root / "demo-video")
    wheels = sorted((root / ".sources").glob(SKIMAGE.pattern))
    if wheels:
        with zipfile.ZipFile(wheels[0]) as wheel:
            for name in SKIMAGE_PHOTOS:
                rgb = _fitted(Image.open(io.BytesIO(wheel.read(f"skimage/data/{name}"))))
                out.append(Photo(f"skimage/{name}", rgb))
    return out


def _fitted(image: Image.Image) -> np.ndarray:
    image = image.convert("RGB")
    return np.array(image.resize(fit_size(*image.size, MAX_SIDE), Image.LANCZOS))


def _coco_photos(root: Path) -> list[Photo]:
    data = json.loads((root / "annotations.json").read_text())
    out = []
    for image in data["images"]:
        h, w = image["height"], image["width"]
        truth = [
            mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], h, w))).astype(bool)
            for a in data["annotations"]
            if a["image_id"] == image["id"]
        ]
        rgb = np.array(Image.open(root / "images" / image["file_name"]).convert("RGB"))
        out.append(Photo(f"demo/{image['file_name']}", rgb, truth))
    return out


def _davis_photos(root: Path) -> list[Photo]:
    out = []
    for frame in sorted((root / "JPEGImages" / "480p").glob("*/*.jpg")):
        video = frame.parent.name
        ids = np.array(Image.open(root / "Annotations" / "480p" / video / f"{frame.stem}.png"))
        truth = [ids == i for i in np.unique(ids) if i != 0]
        out.append(Photo(f"demo-video/{video}/{frame.name}", _fitted(Image.open(frame)), truth))
    return out


def blocky(mask: np.ndarray, patch: int) -> np.ndarray:
    """A ground-truth mask as a ViT would give it: patches at least half covered, upsampled to pixels."""
    h, w = mask.shape
    gh, gw = -(-h // patch), -(-w // patch)
    padded = np.zeros((gh * patch, gw * patch), bool)
    padded[:h, :w] = mask
    cover = padded.reshape(gh, patch, gw, patch).mean(axis=(1, 3)) >= 0.5
    return cover.repeat(patch, axis=0).repeat(patch, axis=1)[:h, :w]


def _resized(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return np.array(Image.fromarray(mask).resize((shape[1], shape[0]), Image.NEAREST))


def coarse_masks(photo: Photo, backbone, method) -> tuple[np.ndarray, list[np.ndarray], int]:
    """MaskCut's working image of a photo, its coarse masks (patch masks, then the photo's ground truth
    made blocky at that size; empty ones left out) and how many of them are patch masks."""
    p = backbone.patch
    work = network_image(photo.rgb, p, method.resize)
    feats = backbone(prepare_image(work, p, None)[None].to(backbone.device))
    try:
        patch_masks = keys_to_masks(feats.keys[0, 1:], feats.grid, method, backbone.family)
    except np.linalg.LinAlgError:  # a degenerate graph: no patch masks for this photo
        patch_masks = []
    masks = [m.repeat(p, axis=0).repeat(p, axis=1)[: work.shape[0], : work.shape[1]] for m in patch_masks]
    masks = [m for m in masks if m.any()]
    truth = [blocky(_resized(t, work.shape[:2]), p) for t in photo.truth]
    return work, masks + [t for t in truth if t.any()], len(masks)


def _timed(fn: Callable, device: torch.device | None = None):
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def compare(
    photo: str, image: np.ndarray, masks: list[np.ndarray], refine: RefineConfig, tallies: dict[str, Tally]
) -> None:
    """Refine ``masks`` with both implementations of both refiners and add the outcomes to ``tallies``."""
    refiners = {
        "crf": (crf_refine, crf_torch, refine.crf),
        "bilateral": (bilateral_refine, bilateral_torch, refine.bilateral),
    }
    threads = torch.get_num_threads()
    t_image = torch.from_numpy(image.copy())
    t_masks = torch.from_numpy(np.stack(masks))
    for name, (reference, on_torch, params) in refiners.items():
        tally = tallies[name]
        seconds, expected = _timed(partial(_one_by_one, reference, image, masks, params))
        tally.add_time("reference", seconds)
        torch.set_num_threads(1)
        seconds, got = _timed(partial(on_torch, t_image, t_masks, params))
        torch.set_num_threads(threads)
        tally.add_time("torch on the CPU, 1 thread", seconds)
        tally.add_masks("CPU", photo, masks, expected, got.numpy(), refine.min_iou)
        if torch.cuda.is_available():
            cuda = torch.device("cuda")
            on_gpu = partial(on_torch, t_image.to(cuda), t_masks.to(cuda), params)
            on_gpu()  # warm-up: the first CUDA calls load kernels
            seconds, got = _timed(on_gpu, cuda)
            tally.add_time("torch on CUDA", seconds)
            tally.add_masks("CUDA", photo, masks, expected, got.cpu().numpy(), refine.min_iou)


def _one_by_one(reference: Callable, image: np.ndarray, masks: list[np.ndarray], params) -> list[np.ndarray]:
    return [reference(image, m, params) for m in masks]


def report(root: Path = DATA, max_photos: int | None = None) -> list[str]:
    """The bench's lines: photos and masks used, then parity and time per refiner (the first
    ``max_photos`` photos only, when given)."""
    if not (root / "demo" / "annotations.json").exists():
        return [f"no demo data under {root}/: run `make demo-data` first"]
    cfg = resolve_backbone(load_config("demo", "maskcut"))
    backbone = load_backbone(cfg)
    tallies = {"crf": Tally(), "bilateral": Tally()}
    patch_masks = truth_masks = 0
    all_photos = photos(root)[:max_photos]
    for i, photo in enumerate(all_photos):
        image, masks, from_patches = coarse_masks(photo, backbone, cfg.method)
        patch_masks += from_patches
        truth_masks += len(masks) - from_patches
        if masks:
            compare(photo.name, image, masks, cfg.refine, tallies)
        print(f"  [{i + 1}/{len(all_photos)}] {photo.name}", file=sys.stderr, flush=True)
    by_source: dict[str, int] = {}
    for photo in all_photos:
        by_source[photo.name.split("/")[0]] = by_source.get(photo.name.split("/")[0], 0) + 1
    lines = [
        f"{len(all_photos)} photos ({', '.join(f'{k} {v}' for k, v in by_source.items())}) at MaskCut's "
        f"working size with {cfg.backbone.arch}: {patch_masks} MaskCut patch masks, {truth_masks} blocky "
        "ground-truth masks"
    ]
    for name, label in (("crf", "dense CRF (pydensecrf)"), ("bilateral", "bilateral solver (scipy)")):
        lines += _summary(label, tallies[name])
    return lines


def _summary(label: str, tally: Tally) -> list[str]:
    if not tally.ious:
        return [f"{label}: no masks"]
    lines = []
    for device, ious in tally.ious.items():
        n = len(ious)
        good = sum(iou >= GOOD_IOU for iou in ious) / n
        median = statistics.median(ious)
        met = "met" if median >= 0.98 and good >= 0.95 else "NOT met"
        worst = sorted(zip(ious, tally.labels, strict=True))[:3]
        lines.append(
            f"{label}: torch on {device} vs the reference, {n} masks: IoU median {median:.4f}, "
            f">= {GOOD_IOU} on {100 * good:.1f}% (min {min(ious):.4f}; goal median >= 0.98 and 95%: {met}); "
            f"same keep/reject decision on {tally.agree[device]}/{n} "
            f"({tally.rejected_by_both[device]} rejected by both); lowest: "
            + ", ".join(f"{label} {iou:.3f}" for iou, label in worst)
        )
    n = len(next(iter(tally.ious.values())))
    reference = tally.seconds["reference"]
    times = ", ".join(
        f"{key} {1000 * s / n:.0f} ms ({reference / s:.1f}x)"
        for key, s in tally.seconds.items()
        if key != "reference"
    )
    lines.append(f"  time per mask: reference {1000 * reference / n:.0f} ms; {times}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-photos", type=int, default=None, help="only the first N photos (a quick look)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    print(*report(DATA, args.max_photos), sep="\n")
    print(f"[{time.perf_counter() - start:.0f} s]", file=sys.stderr)


if __name__ == "__main__":
    main()
