"""Image datasets: listing images and reading ground truth (used for evaluation only).

Kinds: a folder of images (recursive), COCO (images + instances json), VOC (ImageSets list + XML) and
COCO20k (a file list over COCO train2014). Paths come from the dataset config; relative paths are taken
from the repository root. Listing a dataset checks its files first (stages/annotations.py): a malformed
file stops the run before any work, with the file, the entry and the key named.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import CONFIG_DIR, DatasetConfig
from stages.annotations import (
    DatasetError,
    Problems,
    check_coco,
    complete_ground_truth,
    read_json_file,
    voc_objects,
)
from stages.io import BadImage, image_size, is_image_name

REPO_ROOT = CONFIG_DIR.parent


@dataclass(frozen=True)
class ImageRecord:
    id: int
    file_name: str  # relative to the dataset's image root
    path: str  # absolute


@dataclass(frozen=True)
class Listing:
    records: list[ImageRecord]
    # Entries of an image folder that are not taken: {"file_name", "reason"} (failures.jsonl rows).
    skipped: list[dict]


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
    return image_listing(cfg).records


def image_listing(cfg: DatasetConfig) -> Listing:
    """The dataset's images (``list_images``) and, for an image folder, what in it is not taken and why."""
    if cfg.kind in VIDEO_KINDS:
        from stages.videos import frame_records  # video frames as images (self-training on video labels)

        return Listing(frame_records(cfg), [])
    hint = " (run `make demo-data`)" if cfg.name == "demo" else " (set DATA=/path or dataset.root=...)"
    root = _existing(cfg.root, f"image root of dataset '{cfg.name}'", hint)
    if cfg.kind == "imagefolder":
        names, skipped = scan_folder(root)
        return Listing([ImageRecord(i + 1, n, str(root / n)) for i, n in enumerate(names)], skipped)
    if cfg.kind == "voc":
        ids = list(_voc_objects(cfg, root))
        return Listing(
            [ImageRecord(i + 1, _voc_file(s), str(root / _voc_file(s))) for i, s in enumerate(ids)], []
        )
    images = _coco_json(cfg)["images"]
    if cfg.kind == "coco20k":
        images = _coco20k_images(cfg, images)
    images = sorted(images, key=lambda im: im["id"])
    return Listing([ImageRecord(im["id"], im["file_name"], str(root / im["file_name"])) for im in images], [])


# ----------------------------------------------------------------------------------------------------------
# Image folders


def _folder_order(name: str) -> list[str]:
    return name.split("/")  # the order of sorted pathlib paths (part by part), which runs were listed in


def scan_folder(root: Path) -> tuple[list[str], list[dict]]:
    """Image files under ``root`` (recursive) as sorted root-relative names, and every entry not taken,
    with the reason: files of formats Pillow does not read, folders named like images, broken links and
    link loops, FIFOs and devices. Linked folders are followed once (a link back to a folder already
    listed is skipped, not followed round)."""
    images: list[str] = []
    skipped: list[dict] = []
    seen = {root.resolve()}
    stack = [root]

    def skip(path: Path, reason: str) -> None:
        skipped.append({"file_name": path.relative_to(root).as_posix(), "reason": f"skipped: {reason}"})

    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as e:
            skip(folder, f"folder cannot be read ({e.strerror})")
            continue
        for entry in entries:
            path = Path(entry.path)
            try:
                mode = os.stat(path).st_mode  # follows links
            except OSError as e:
                skip(path, _unreachable(path, e))
                continue
            if stat.S_ISDIR(mode):
                real = path.resolve()
                if real in seen:
                    skip(path, f"link to a folder listed already ({real}): not followed again")
                    continue
                seen.add(real)
                stack.append(path)
                if is_image_name(entry.name):
                    skip(path, "a folder named like an image (the files in it are listed on their own)")
            elif not stat.S_ISREG(mode):
                skip(path, "not a regular file (a FIFO, socket or device)")
            elif is_image_name(entry.name):
                images.append(path.relative_to(root).as_posix())
            else:
                skip(path, f"not an image format Pillow reads ('{path.suffix or entry.name}')")
    return sorted(images, key=_folder_order), sorted(skipped, key=lambda s: _folder_order(s["file_name"]))


def _unreachable(path: Path, error: OSError) -> str:
    if error.errno == errno.ELOOP:
        return "symbolic link loop"
    if path.is_symlink():
        return f"broken symbolic link (to {os.readlink(path)})"
    return f"cannot be read ({error.strerror})"


# ----------------------------------------------------------------------------------------------------------
# VOC


def _voc_file(image_id: str) -> str:
    return f"JPEGImages/{image_id}.jpg"


def _voc_objects(cfg: DatasetConfig, root: Path) -> dict[str, tuple[list, tuple[int, int] | None]]:
    """image id -> (boxes as written, <size> (height, width) or None) for every image of the split list,
    every annotation file checked; problems are raised together, named by file."""
    split = _existing(str(root / "ImageSets" / "Main" / f"{cfg.split}.txt"), "VOC image list")
    problems = Problems(str(split))
    out: dict[str, tuple] = {}
    for n, line in enumerate(split.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        image_id = line.split()[0]
        if image_id in out:
            problems.add(f"line {n}", f"image '{image_id}' is listed twice")
            continue
        try:
            out[image_id] = voc_objects(root / "Annotations" / f"{image_id}.xml", image_id)
        except DatasetError as e:
            problems.add(f"line {n}", str(e))
    problems.raise_any()
    return out


def _voc_ground_truth(cfg: DatasetConfig) -> dict:
    """VOC boxes as COCO ground truth (boxes only). Sizes are those of the decoded image (EXIF orientation
    applied, as every stage reads it), else the XML's <size> when the image cannot be read.
    xmin and ymin get -1: VOC boxes are 1-based and inclusive (the CorLoc protocol of LOST/TokenCut)."""
    root = resolve(cfg.root)
    objects = _voc_objects(cfg, root)
    images, anns = [], []
    for i, (image_id, (boxes, xml_size)) in enumerate(objects.items(), start=1):
        try:
            height, width = image_size(root / _voc_file(image_id))
        except BadImage as e:
            if xml_size is None:
                raise DatasetError(
                    f"{root / _voc_file(image_id)}: {e}, and its annotation gives no <size>"
                ) from e
            height, width = xml_size
        images.append({"id": i, "file_name": _voc_file(image_id), "width": width, "height": height})
        for x0, y0, x1, y1 in boxes:
            anns.append({"image_id": i, "category_id": 1, "bbox": [x0 - 1, y0 - 1, x1 - x0 + 1, y1 - y0 + 1]})
    data = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "fg"}]}
    return complete_ground_truth(data, str(root / "Annotations"))


# ----------------------------------------------------------------------------------------------------------
# COCO and COCO20k


def _coco_json(cfg: DatasetConfig) -> dict:
    path = _existing(cfg.annotations, f"annotations of dataset '{cfg.name}'")
    data = read_json_file(path, f"annotations of dataset '{cfg.name}'")
    check_coco(data, str(path))
    return data


def _coco20k_images(cfg: DatasetConfig, images: list[dict]) -> list[dict]:
    split = _existing(cfg.split, "COCO20k file list")
    wanted = {Path(line.strip()).name for line in split.read_text().splitlines() if line.strip()}
    images = [im for im in images if Path(im["file_name"]).name in wanted]
    missing = sorted(wanted - {Path(im["file_name"]).name for im in images})
    if missing:
        raise DatasetError(
            f"{split}: {len(missing)} listed files are not images of {cfg.annotations} (e.g. {missing[:3]})"
        )
    return images


# ----------------------------------------------------------------------------------------------------------
# Ground truth: one loader for every evaluation


def ground_truth_coco(cfg: DatasetConfig) -> dict | None:
    """The dataset's ground truth as a checked, complete COCO instances dict (``complete_ground_truth``:
    iscrowd, area and bbox on every annotation), what every evaluation reads: CorLoc, AP, and video
    frames. VOC gives boxes only (so box AP only). None for an image folder or a video dataset without
    annotations."""
    if cfg.kind == "imagefolder":
        return None
    if cfg.kind in VIDEO_KINDS:
        from stages.videos import frames_ground_truth

        data = frames_ground_truth(cfg)
        return None if data is None else complete_ground_truth(data, f"ground truth of '{cfg.name}'")
    if cfg.kind == "voc":
        return _voc_ground_truth(cfg)
    data = _coco_json(cfg)
    if cfg.kind == "coco20k":
        keep = {im["id"] for im in _coco20k_images(cfg, data["images"])}
        data = {
            **data,
            "images": [im for im in data["images"] if im["id"] in keep],
            "annotations": [a for a in data.get("annotations", []) if a["image_id"] in keep],
        }
    root = resolve(cfg.root)
    return complete_ground_truth(data, str(resolve(cfg.annotations)), lambda name: image_size(root / name))


def ground_truth_boxes(cfg: DatasetConfig) -> dict[str, np.ndarray]:
    """file_name -> (k, 4) float boxes [x0, y0, x1, y1] for CorLoc, from ``ground_truth_coco``; crowd
    boxes are left out."""
    data = ground_truth_coco(cfg)
    if data is None:
        raise DatasetError(f"dataset '{cfg.name}' ({cfg.kind}) has no ground truth")
    return coco_boxes(data)


def coco_boxes(data: dict) -> dict[str, np.ndarray]:
    """file_name -> (k, 4) float [x0, y0, x1, y1] boxes of a complete COCO ground truth, crowd left out."""
    by_image: dict[int, list] = {}
    for ann in data.get("annotations", []):
        if not ann["iscrowd"]:
            x, y, w, h = ann["bbox"]
            by_image.setdefault(ann["image_id"], []).append([x, y, x + w, y + h])
    names = {im["id"]: im["file_name"] for im in data["images"]}
    return {names[i]: np.asarray(b, dtype=float) for i, b in by_image.items() if i in names}
