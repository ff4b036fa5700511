"""COCO instance files: masks to annotations, validation, atomic writing (whole, or streamed by shard)."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

from stages.common import rle
from stages.common.io import JsonListsWriter, atomic_write_text

# The one class of class-agnostic labels ("fg", foreground), defined once: pseudo-labels and detections are
# COCO files with CATEGORIES; YouTube-VIS tracks and VOC ground truth list FOREGROUND alone.
FOREGROUND = {"id": 1, "name": "fg"}
CATEGORIES = [{**FOREGROUND, "supercategory": "fg"}]


def encode_mask(mask: np.ndarray) -> dict:
    """(H, W) bool -> compressed RLE with str counts (JSON-ready)."""
    return rle.encode(mask)


def mask_annotation(mask: np.ndarray, image_id: int, score: float | None = None) -> dict:
    """A class-agnostic annotation for one mask: RLE, area = mask pixels, bbox [x, y, w, h] of the mask."""
    segmentation = rle.encode(mask)
    ann = {
        "image_id": image_id,
        "category_id": 1,
        "iscrowd": 0,
        "segmentation": segmentation,
        "area": int(mask.sum()),
        "bbox": [float(v) for v in rle.to_bbox([segmentation])[0]],
    }
    if score is not None:
        ann["score"] = float(score)
    return ann


def _numbered(annotations: Iterable[dict], first_id: int) -> Iterable[dict]:
    return (
        {"id": first_id + i, **{k: v for k, v in a.items() if k != "id"}} for i, a in enumerate(annotations)
    )


def coco_file(images: list[dict], annotations: list[dict]) -> dict:
    """Assemble a COCO instances dict; annotation ids are assigned 1..N in the given order."""
    return {"images": images, "annotations": list(_numbered(annotations, 1)), "categories": CATEGORIES}


class CocoError(ValueError):
    """A COCO file that would be wrong on disk."""


def _name(ann: dict, image: dict | None) -> str:
    who = f"annotation {ann['id']}" if "id" in ann else "an annotation"
    return f"{who} of '{image['file_name']}'" if image else who


def validate_annotations(images: dict[int, dict], annotations: list[dict]) -> None:
    """Check what downstream tools trust blindly, for annotations of the images ``images`` (id -> image):
    known image ids, str RLE counts, RLE size equal to the image's (height, width), area = mask area,
    bbox = the mask's box. Raises CocoError naming the annotation and its image file."""
    for ann in annotations:
        image = images.get(ann["image_id"])
        if image is None:
            raise CocoError(f"{_name(ann, None)}: unknown image_id {ann['image_id']}")
        segmentation = ann["segmentation"]
        if not isinstance(segmentation.get("counts"), str):
            raise CocoError(f"{_name(ann, image)}: RLE counts must be a str")
        if list(segmentation["size"]) != [image["height"], image["width"]]:
            raise CocoError(
                f"{_name(ann, image)}: mask size {segmentation['size']} != image (height, width) "
                f"{[image['height'], image['width']]}"
            )
    segmentations = [a["segmentation"] for a in annotations]
    for ann, area, box in zip(annotations, rle.area(segmentations), rle.to_bbox(segmentations), strict=True):
        if ann["area"] != int(area):
            raise CocoError(f"{_name(ann, images[ann['image_id']])}: area {ann['area']} != mask area {area}")
        if not np.allclose(ann["bbox"], box):
            raise CocoError(
                f"{_name(ann, images[ann['image_id']])}: bbox {ann['bbox']} != mask box {box.tolist()}"
            )


def _images_by_id(images: list[dict]) -> dict[int, dict]:
    by_id = {}
    for image in images:
        if image["id"] in by_id:
            first = by_id[image["id"]]["file_name"]
            raise CocoError(f"duplicate image id {image['id']} ('{first}', '{image['file_name']}')")
        by_id[image["id"]] = image
    return by_id


def validate_shard(shard: dict) -> None:
    """A shard of images with their annotations ({"images", "annotations", ...}, annotations without ids
    yet): unique image ids, and every annotation as ``validate_annotations`` checks it."""
    validate_annotations(_images_by_id(shard["images"]), shard["annotations"])


def validate_coco(data: dict) -> None:
    """A whole COCO dict: unique image and annotation ids, every annotation checked
    (``validate_annotations``), then loaded with pycocotools."""
    images = _images_by_id(data["images"])
    if len({a["id"] for a in data["annotations"]}) != len(data["annotations"]):
        raise CocoError("duplicate annotation ids")
    validate_annotations(images, data["annotations"])
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
        coco.createIndex()


def write_coco(path: Path, data: dict) -> None:
    """Validate, then write atomically: a reader sees the old file or the whole new one."""
    validate_coco(data)
    atomic_write_text(path, json.dumps(data))


class CocoWriter:
    """Streams a COCO instances file to disk piece by piece (a shard's images and their annotations), for
    files larger than memory; annotation ids are assigned 1..N in order. The bytes equal ``write_coco`` of
    the whole. Each piece must be valid on its own (``validate_shard``); across pieces, image ids must be
    unique and every annotation's image must come in its own piece or an earlier one (CocoError).

    ``with CocoWriter(path) as coco: coco.add(images, annotations) ...; coco.commit()``; the file appears
    only on commit."""

    def __init__(self, path: Path):
        self.lists = JsonListsWriter(path, ("images", "annotations"))
        self.image_ids: set[int] = set()
        self.annotated_ids: set[int] = set()

    def __enter__(self) -> CocoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.lists.__exit__(*exc)

    @property
    def n_images(self) -> int:
        return self.lists.counts["images"]

    @property
    def n_annotations(self) -> int:
        return self.lists.counts["annotations"]

    @property
    def n_annotated(self) -> int:
        """Images with at least one annotation."""
        return len(self.annotated_ids)

    def add(self, images: list[dict], annotations: list[dict]) -> None:
        for image in images:
            if image["id"] in self.image_ids:
                raise CocoError(f"duplicate image id {image['id']} ('{image['file_name']}')")
            self.image_ids.add(image["id"])
        for ann in annotations:
            if ann["image_id"] not in self.image_ids:
                raise CocoError(f"{_name(ann, None)}: unknown image_id {ann['image_id']}")
            self.annotated_ids.add(ann["image_id"])
        self.lists.add("images", images)
        self.lists.add("annotations", _numbered(annotations, self.n_annotations + 1))

    def commit(self) -> None:
        self.lists.commit({"categories": CATEGORIES})
