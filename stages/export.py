"""COCO instance files: masks to annotations, validation with pycocotools, atomic writing."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from stages.io import atomic_write_text

CATEGORIES = [{"id": 1, "name": "fg", "supercategory": "fg"}]


def encode_mask(mask: np.ndarray) -> dict:
    """(H, W) bool -> compressed RLE with str counts (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def mask_annotation(mask: np.ndarray, image_id: int, score: float | None = None) -> dict:
    """A class-agnostic annotation for one mask: RLE, area = mask pixels, bbox [x, y, w, h] of the mask."""
    rle = encode_mask(mask)
    ann = {
        "image_id": image_id,
        "category_id": 1,
        "iscrowd": 0,
        "segmentation": rle,
        "area": int(mask.sum()),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
    }
    if score is not None:
        ann["score"] = float(score)
    return ann


def coco_file(images: list[dict], annotations: list[dict]) -> dict:
    """Assemble a COCO instances dict; annotation ids are assigned 1..N in the given order."""
    anns = [{"id": i + 1, **{k: v for k, v in a.items() if k != "id"}} for i, a in enumerate(annotations)]
    return {"images": images, "annotations": anns, "categories": CATEGORIES}


class CocoError(ValueError):
    """A COCO file that would be wrong on disk."""


def validate_coco(data: dict) -> None:
    """Check what downstream tools trust blindly: unique ids, known image ids, RLE size equal to the image's
    (height, width), str counts, area = mask area, bbox = the mask's box. Then load it with pycocotools."""
    images = {im["id"]: im for im in data["images"]}
    if len(images) != len(data["images"]):
        raise CocoError("duplicate image ids")
    if len({a["id"] for a in data["annotations"]}) != len(data["annotations"]):
        raise CocoError("duplicate annotation ids")
    rles = []
    for ann in data["annotations"]:
        image = images.get(ann["image_id"])
        if image is None:
            raise CocoError(f"annotation {ann['id']}: unknown image_id {ann['image_id']}")
        rle = ann["segmentation"]
        if not isinstance(rle.get("counts"), str):
            raise CocoError(f"annotation {ann['id']}: RLE counts must be a str")
        if list(rle["size"]) != [image["height"], image["width"]]:
            raise CocoError(
                f"annotation {ann['id']}: mask size {rle['size']} != image (height, width) "
                f"{[image['height'], image['width']]} of '{image['file_name']}'"
            )
        rles.append({"size": rle["size"], "counts": rle["counts"].encode("ascii")})
    if rles:
        areas = mask_utils.area(rles)
        boxes = mask_utils.toBbox(rles)
        for ann, area, box in zip(data["annotations"], areas, boxes, strict=True):
            if ann["area"] != int(area):
                raise CocoError(f"annotation {ann['id']}: area {ann['area']} != mask area {int(area)}")
            if not np.allclose(ann["bbox"], box):
                raise CocoError(f"annotation {ann['id']}: bbox {ann['bbox']} != mask box {box.tolist()}")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
        coco.createIndex()


def write_coco(path: Path, data: dict) -> None:
    """Validate, then write atomically: a reader sees the old file or the whole new one."""
    validate_coco(data)
    atomic_write_text(path, json.dumps(data))
