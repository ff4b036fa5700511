"""Image datasets: listing images and reading ground truth (used for evaluation only).

Kinds: a folder of images (recursive), COCO (images + instances json), VOC (ImageSets list + XML) and
COCO20k (a file list over COCO train2014). Paths come from the dataset config; relative paths are taken
from the repository root. Listing a dataset checks its files first (stages/data/annotations.py): a malformed
file stops the run before any work, with the file, the entry and the key named.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import numpy as np

from stages.common.export import FOREGROUND
from stages.common.io import BadImage, image_size, is_image_name
from stages.common.paths import resolve
from stages.data.annotations import (
    DatasetError,
    Problems,
    check_coco,
    complete_ground_truth,
    read_json_file,
    voc_objects,
)
from stages.data.base import (
    DATASET_KINDS,
    DatasetConfig,
    DatasetKind,
    ImageRecord,
    Listing,
    dataset_kind,
    missing_root_hint,
)


def _existing(path: str, what: str, hint: str = "") -> Path:
    p = resolve(path)
    if not p.exists():
        raise DatasetError(f"{what} not found: {p}{hint}")
    return p


def list_images(cfg: DatasetConfig) -> list[ImageRecord]:
    """Every image of the dataset, in a stable order, with its id and root-relative file name."""
    return image_listing(cfg).records


def image_listing(cfg: DatasetConfig) -> Listing:
    """The dataset's images (``list_images``) and, for an image folder, what in it is not taken and why.
    A video dataset gives every frame of every video (self-training on video labels)."""
    return dataset_kind(cfg).listing(cfg)


def _image_root(cfg: DatasetConfig) -> Path:
    return _existing(cfg.root, f"image root of dataset '{cfg.name}'", missing_root_hint(cfg.root))


def _coco_listing(root: Path, images: list[dict]) -> Listing:
    images = sorted(images, key=lambda im: im["id"])
    return Listing([ImageRecord(im["id"], im["file_name"], str(root / im["file_name"])) for im in images], [])


@DATASET_KINDS.register("imagefolder")
class ImageFolder(DatasetKind):
    """A folder of images, recursive; no ground truth."""

    def listing(self, cfg: DatasetConfig) -> Listing:
        root = _image_root(cfg)
        names, skipped = scan_folder(root)
        return Listing([ImageRecord(i + 1, n, str(root / n)) for i, n in enumerate(names)], skipped)

    def ground_truth(self, cfg: DatasetConfig) -> dict | None:
        return None


@DATASET_KINDS.register("voc")
class Voc(DatasetKind):
    """PASCAL VOC: JPEGImages/, Annotations/*.xml and the ImageSets/Main/<split>.txt list; boxes only."""

    requires = ("split",)

    def listing(self, cfg: DatasetConfig) -> Listing:
        root = _image_root(cfg)
        ids = list(_voc_objects(cfg, root))
        return Listing(
            [ImageRecord(i + 1, _voc_file(s), str(root / _voc_file(s))) for i, s in enumerate(ids)], []
        )

    def ground_truth(self, cfg: DatasetConfig) -> dict | None:
        return _voc_ground_truth(cfg)


@DATASET_KINDS.register("coco")
class Coco(DatasetKind):
    """COCO: an image root and an instances json."""

    requires = ("annotations",)

    def listing(self, cfg: DatasetConfig) -> Listing:
        root = _image_root(cfg)
        return _coco_listing(root, self.coco(cfg)["images"])

    def coco(self, cfg: DatasetConfig) -> dict:
        return _coco_json(cfg)

    def ground_truth(self, cfg: DatasetConfig) -> dict | None:
        root = resolve(cfg.root)
        return complete_ground_truth(
            self.coco(cfg), str(resolve(cfg.annotations)), lambda name: image_size(root / name)
        )


@DATASET_KINDS.register("coco20k")
class Coco20k(Coco):
    """COCO20k: COCO train2014's instances restricted to a file list (``dataset.split``)."""

    requires = ("annotations", "split")

    def coco(self, cfg: DatasetConfig) -> dict:
        data = _coco_json(cfg)
        keep = {im["id"] for im in _coco20k_images(cfg, data["images"])}
        return {
            **data,
            "images": [im for im in data["images"] if im["id"] in keep],
            "annotations": [a for a in data.get("annotations", []) if a["image_id"] in keep],
        }


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
    data = {"images": images, "annotations": anns, "categories": [FOREGROUND]}
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
    annotations. With ``evaluate_on: annotated`` only the images that have annotations are kept."""
    gt = dataset_kind(cfg).ground_truth(cfg)
    if gt is None or cfg.evaluate_on == "all":
        return gt
    annotated = {a["image_id"] for a in gt["annotations"]}
    return {**gt, "images": [im for im in gt["images"] if im["id"] in annotated]}


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
