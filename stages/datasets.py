"""Image datasets: listing images and reading ground-truth boxes (used for evaluation only).

Kinds: a folder of images (recursive), COCO (images + instances json), VOC (ImageSets list + XML) and
COCO20k (a file list over COCO train2014). Paths come from the dataset config; relative paths are taken
from the repository root.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.config import CONFIG_DIR, DatasetConfig
from stages.io import IMAGE_SUFFIXES, read_json

REPO_ROOT = CONFIG_DIR.parent


class DatasetError(RuntimeError):
    """A dataset that is missing or malformed on disk."""


@dataclass(frozen=True)
class ImageRecord:
    id: int
    file_name: str  # relative to the dataset's image root
    path: str  # absolute


def resolve(path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


def _existing(path: str, what: str, hint: str = "") -> Path:
    p = resolve(path)
    if not p.exists():
        raise DatasetError(f"{what} not found: {p}{hint}")
    return p


VIDEO_KINDS = ("framefolders", "davis", "ytvis")


def list_images(cfg: DatasetConfig) -> list[ImageRecord]:
    """Every image of the dataset, in a stable order, with its id and root-relative file name."""
    if cfg.kind in VIDEO_KINDS:
        from stages.videos import frame_records  # video frames as images (self-training on video labels)

        return frame_records(cfg)
    hint = " (run `make demo-data`)" if cfg.name == "demo" else " (set DATA=/path or dataset.root=...)"
    root = _existing(cfg.root, f"image root of dataset '{cfg.name}'", hint)
    if cfg.kind == "imagefolder":
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        names = [p.relative_to(root).as_posix() for p in files]
        return [ImageRecord(i + 1, n, str(root / n)) for i, n in enumerate(names)]
    if cfg.kind == "voc":
        return [
            ImageRecord(i + 1, f"JPEGImages/{s}.jpg", str(root / "JPEGImages" / f"{s}.jpg"))
            for i, s in enumerate(_voc_ids(cfg, root))
        ]
    images = _coco_json(cfg)["images"]
    if cfg.kind == "coco20k":
        wanted = _coco20k_names(cfg)
        images = [im for im in images if Path(im["file_name"]).name in wanted]
        if len(images) != len(wanted):
            raise DatasetError(
                f"{len(wanted) - len(images)} files of the COCO20k list are not in {cfg.annotations}"
            )
    images = sorted(images, key=lambda im: im["id"])
    return [ImageRecord(int(im["id"]), im["file_name"], str(root / im["file_name"])) for im in images]


def _voc_ids(cfg: DatasetConfig, root: Path) -> list[str]:
    split = _existing(str(root / "ImageSets" / "Main" / f"{cfg.split}.txt"), "VOC image list")
    return [line.split()[0] for line in split.read_text().splitlines() if line.strip()]


def _coco_json(cfg: DatasetConfig) -> dict:
    data = read_json(_existing(cfg.annotations, f"annotations of dataset '{cfg.name}'"))
    if "images" not in data:
        raise DatasetError(f"{cfg.annotations}: not a COCO file (no 'images')")
    return data


def _coco20k_names(cfg: DatasetConfig) -> set[str]:
    text = _existing(cfg.split, "COCO20k file list").read_text()
    return {Path(line.strip()).name for line in text.splitlines() if line.strip()}


def ground_truth_boxes(cfg: DatasetConfig) -> dict[str, np.ndarray]:
    """file_name -> (k, 4) float boxes [x0, y0, x1, y1] for CorLoc; crowd boxes are left out.

    VOC boxes are 1-based and inclusive: xmin and ymin get -1 (the CorLoc protocol of LOST/TokenCut).
    """
    if cfg.kind == "voc":
        root = resolve(cfg.root)
        return {
            f"JPEGImages/{s}.jpg": _voc_boxes(root / "Annotations" / f"{s}.xml") for s in _voc_ids(cfg, root)
        }
    data = ground_truth_coco(cfg)
    if data is None:
        raise DatasetError(f"dataset '{cfg.name}' ({cfg.kind}) has no ground truth")
    return coco_boxes(data)


def coco_boxes(data: dict) -> dict[str, np.ndarray]:
    """file_name -> (k, 4) float [x0, y0, x1, y1] boxes of a COCO instances dict, crowd boxes left out."""
    by_image: dict[int, list] = {}
    for ann in data.get("annotations", []):
        if not ann.get("iscrowd", 0):
            x, y, w, h = ann["bbox"]
            by_image.setdefault(ann["image_id"], []).append([x, y, x + w, y + h])
    names = {im["id"]: im["file_name"] for im in data["images"]}
    return {names[i]: np.asarray(b, dtype=float) for i, b in by_image.items() if i in names}


def _voc_boxes(path: Path) -> np.ndarray:
    boxes = []
    for obj in ET.parse(path).getroot().iter("object"):
        bb = obj.find("bndbox")
        x0, y0, x1, y1 = (float(bb.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append([x0 - 1, y0 - 1, x1, y1])
    return np.asarray(boxes, dtype=float).reshape(-1, 4)


def ground_truth_coco(cfg: DatasetConfig) -> dict | None:
    """The dataset's ground truth as a COCO instances dict for AP (VOC: boxes only, so box AP only);
    None for an image folder."""
    if cfg.kind == "imagefolder":
        return None
    if cfg.kind in VIDEO_KINDS:
        from stages.videos import frames_ground_truth

        return frames_ground_truth(cfg)
    if cfg.kind != "voc":
        data = _coco_json(cfg)
        if cfg.kind == "coco20k":
            keep = {r.id for r in list_images(cfg)}
            data = {
                **data,
                "images": [im for im in data["images"] if im["id"] in keep],
                "annotations": [a for a in data.get("annotations", []) if a["image_id"] in keep],
            }
        return data
    images, anns = [], []
    boxes = ground_truth_boxes(cfg)
    for rec in list_images(cfg):
        with Image.open(rec.path) as im:
            width, height = im.size
        images.append({"id": rec.id, "file_name": rec.file_name, "width": width, "height": height})
        for x0, y0, x1, y1 in boxes[rec.file_name]:
            w, h = float(x1 - x0), float(y1 - y0)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": rec.id,
                    "category_id": 1,
                    "iscrowd": 0,
                    "bbox": [float(x0), float(y0), w, h],
                    "area": w * h,
                }
            )
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "fg"}]}
