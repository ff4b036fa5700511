"""Annotation files as users hand them to us: COCO instances json and VOC XML, checked entry by entry.

Every problem is reported with the file, the entry (``images[3] (id 7)``, ``annotations[12]``, ``object 2``)
and the key, before any work starts. Ground truth goes through ``complete_ground_truth``, which fills what
COCO allows to be left implicit and returns a dict pycocotools evaluates without a KeyError.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stages.common import rle
from stages.common.io import BadImage

MAX_LISTED = 5  # problems spelled out in one error message; the rest are counted


class DatasetError(RuntimeError):
    """A dataset that is missing or malformed on disk."""


class Problems:
    """Collects the problems of one file, then raises them as one DatasetError naming the file."""

    def __init__(self, source: str):
        self.source = source
        self.items: list[str] = []

    def add(self, entry: str, problem: str) -> None:
        self.items.append(f"{entry}: {problem}")

    def raise_any(self) -> None:
        if not self.items:
            return
        n = len(self.items)
        shown = "; ".join(self.items[:MAX_LISTED])
        more = f"; and {n - MAX_LISTED} more" if n > MAX_LISTED else ""
        head = f"{n} problems: " if n > 1 else ""
        raise DatasetError(f"{self.source}: {head}{shown}{more}")


def read_json_file(path: Path, what: str) -> Any:
    """Parse a JSON file the user gave us; a file that is not JSON (truncated, empty, binary) is a
    DatasetError naming it and where parsing stopped."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Windows editors) is fine
            return json.load(f)
    except json.JSONDecodeError as e:
        size = Path(path).stat().st_size
        hint = (
            " (the file is empty)"
            if size == 0
            else " (the file ends early: truncated?)"
            if e.pos >= size - 1
            else ""
        )
        raise DatasetError(
            f"{what} {path}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg}{hint}"
        ) from e
    except UnicodeDecodeError as e:
        raise DatasetError(f"{what} {path}: not a JSON text file (byte {e.start} is not UTF-8)") from e
    except IsADirectoryError as e:
        raise DatasetError(f"{what} {path}: is a directory, not a JSON file") from e


# ----------------------------------------------------------------------------------------------------------
# COCO


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_NUMBER_TYPES = frozenset({int, float})  # not bool


def _is_number(value: Any) -> bool:
    return type(value) in _NUMBER_TYPES and math.isfinite(value)


def _numbers(values: list) -> bool:
    """All finite numbers, summed in C: COCO files hold millions of polygon coordinates."""
    try:
        return math.isfinite(sum(values))  # a str, None or list inside raises TypeError
    except TypeError:
        return False


def _image_entry(i: int, image: Any) -> str:
    return f"images[{i}] (id {image['id']})" if isinstance(image, dict) and "id" in image else f"images[{i}]"


def _annotation_entry(i: int, ann: Any) -> str:
    return (
        f"annotations[{i}] (id {ann['id']})" if isinstance(ann, dict) and "id" in ann else f"annotations[{i}]"
    )


def _check_images(images: list, problems: Problems) -> dict[Any, dict]:
    """Image entries: a dict each, a unique integer id, a unique file_name, positive integer sizes.
    Returns id -> image entry."""
    by_id: dict[Any, dict] = {}
    entry_of: dict[Any, str] = {}
    first_of_name: dict[str, str] = {}
    for i, image in enumerate(images):
        entry = _image_entry(i, image)
        if not isinstance(image, dict):
            problems.add(entry, f"not an object: {image!r:.60}")
            continue
        if "id" not in image:
            problems.add(entry, "no 'id'")
        elif not _is_int(image["id"]):
            problems.add(entry, f"'id' must be an integer, got {image['id']!r}")
        elif image["id"] in by_id:
            problems.add(entry, f"duplicate image id {image['id']} (also {entry_of[image['id']]})")
        else:
            by_id[image["id"]], entry_of[image["id"]] = image, entry
        name = image.get("file_name")
        if name is None:
            problems.add(entry, "no 'file_name'")
        elif not isinstance(name, str) or not name:
            problems.add(entry, f"'file_name' must be a non-empty string, got {name!r}")
        elif name in first_of_name:
            problems.add(entry, f"file_name '{name}' is also {first_of_name[name]}")
        else:
            first_of_name[name] = entry
        for key in ("width", "height"):
            if key in image and not (_is_int(image[key]) and image[key] > 0):
                problems.add(entry, f"'{key}' must be a positive integer, got {image[key]!r}")
    return by_id


def segmentation_problem(seg: Any, image: dict | None) -> str | None:
    """Why a COCO segmentation is malformed (polygons or RLE), or None."""
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list | tuple) and len(size) == 2 and all(_is_int(v) for v in size)):
            return f"RLE 'size' must be [height, width], got {size!r}"
        if not isinstance(counts, str | list):
            return f"RLE 'counts' must be a string or a list, got {type(counts).__name__}"
        if (
            image
            and "height" in image
            and "width" in image
            and list(size) != [image["height"], image["width"]]
        ):
            return f"RLE size {list(size)} != the image's [height, width] {[image['height'], image['width']]}"
        return None
    if isinstance(seg, list):
        for k, poly in enumerate(seg):
            if not isinstance(poly, list) or not _numbers(poly):
                return f"polygon {k} must be a list of numbers [x1, y1, x2, y2, ...], got {poly!r:.60}"
            if len(poly) < 6 or len(poly) % 2:
                return f"polygon {k} needs an even number (>= 6) of coordinates, got {len(poly)}"
        return None
    return f"must be polygons (a list) or an RLE (a dict), got {type(seg).__name__}"


def _annotation_problems(ann: dict, images: dict[Any, dict]) -> list[str]:
    """What is wrong with one COCO annotation (usually nothing)."""
    out = []
    image = images.get(ann.get("image_id"))
    if "image_id" not in ann:
        out.append("no 'image_id'")
    elif image is None:
        out.append(f"'image_id' {ann['image_id']!r} is not the id of any image")
    seg = ann.get("segmentation")
    has_seg = not no_segmentation(seg)
    if has_seg and (why := segmentation_problem(seg, image)):
        out.append(f"'segmentation': {why}")
    if "bbox" in ann:
        box = ann["bbox"]
        if not (isinstance(box, list | tuple) and len(box) == 4 and _numbers(box)):
            out.append(f"'bbox' must be 4 numbers [x, y, width, height], got {box!r:.60}")
        elif box[2] < 0 or box[3] < 0:
            out.append(f"'bbox' has a negative width or height: {box}")
    elif not has_seg:
        out.append("no 'bbox' and no 'segmentation': nothing to evaluate against")
    if ann.get("iscrowd", 0) not in (0, 1):
        out.append(f"'iscrowd' must be 0 or 1, got {ann['iscrowd']!r}")
    if "area" in ann and not (_is_number(ann["area"]) and ann["area"] >= 0):
        out.append(f"'area' must be a number >= 0, got {ann['area']!r}")
    return out


def _check_annotations(anns: list, images: dict[Any, dict], problems: Problems) -> None:
    for i, ann in enumerate(anns):
        found = (
            _annotation_problems(ann, images) if isinstance(ann, dict) else [f"not an object: {ann!r:.60}"]
        )
        for problem in found:
            problems.add(_annotation_entry(i, ann), problem)


def no_segmentation(seg: Any) -> bool:
    return seg is None or (isinstance(seg, list) and not seg)  # hand-made box-only files write [] or null


def check_coco(data: Any, source: str) -> None:
    """Check a COCO instances dict: every image has a unique integer id and a unique file_name, every
    annotation names a known image and has a well-formed bbox or segmentation. Raises DatasetError listing
    the problems by entry and key."""
    problems = Problems(source)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        problems.add("top level", "not a COCO instances file (no 'images' list)")
        problems.raise_any()
    images = _check_images(data["images"], problems)
    anns = data.get("annotations", [])
    if not isinstance(anns, list):
        problems.add("top level", f"'annotations' must be a list, got {type(anns).__name__}")
    else:
        _check_annotations(anns, images, problems)
    problems.raise_any()


def complete_ground_truth(
    data: dict, source: str, size_of: Callable[[str], tuple[int, int]] | None = None
) -> dict:
    """A checked copy of COCO ground truth with what COCO allows to be implicit filled in.

    ``iscrowd`` missing -> 0; ``bbox`` missing -> the segmentation's box; ``area`` missing -> the mask's
    pixel count (polygons rasterised as pycocotools does), or the box's width x height for box-only
    ground truth; an empty ``segmentation`` ([] or null) is dropped; annotation ids become 1..N
    (pycocotools matches by id, so duplicate or missing ids would silently corrupt AP). An image's
    missing width/height, needed to rasterise polygons, comes from ``size_of(file_name)`` -> (height,
    width), which raises BadImage when it cannot. ``category_id`` is not needed: evaluation is
    class-agnostic. Raises DatasetError naming ``source``, the entry and the key.
    """
    check_coco(data, source)
    images = [dict(im) for im in data["images"]]
    by_id = {im["id"]: im for im in images}
    problems = Problems(source)
    annotations = []
    for i, original in enumerate(data.get("annotations", [])):
        ann = {**original, "id": i + 1}
        ann.setdefault("iscrowd", 0)
        if no_segmentation(ann.get("segmentation")):
            ann.pop("segmentation", None)
        if "segmentation" in ann and ("bbox" not in ann or "area" not in ann):
            image = by_id[ann["image_id"]]
            if not _fill_size(image, size_of, problems, i):
                continue
            mask = rle.from_segmentation(ann["segmentation"], image["height"], image["width"])
            ann.setdefault("bbox", [float(v) for v in rle.to_bbox([mask])[0]])
            ann.setdefault("area", float(rle.area([mask])[0]))
        ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
        annotations.append(ann)
    problems.raise_any()
    return {**data, "images": images, "annotations": annotations}


def _fill_size(image: dict, size_of, problems: Problems, i: int) -> bool:
    """Give an image entry its width/height from the file when it lacks them; False (and a problem) when
    that cannot be done."""
    if "height" in image and "width" in image:
        return True
    entry = f"annotations[{i}]: its image '{image['file_name']}' (id {image['id']})"
    if size_of is None:
        problems.add(entry, "has no 'width'/'height', needed to rasterise its segmentation")
        return False
    try:
        image["height"], image["width"] = size_of(image["file_name"])
    except BadImage as e:
        problems.add(entry, f"has no 'width'/'height' and its file cannot be read for them: {e}")
        return False
    return True


# ----------------------------------------------------------------------------------------------------------
# VOC


def voc_objects(path: Path, image_id: str) -> tuple[list[list[float]], tuple[int, int] | None]:
    """The boxes [xmin, ymin, xmax, ymax] (as written: 1-based, inclusive) of one VOC annotation file, and
    its <size> (height, width) when given. Raises DatasetError naming the file, the object and the key."""
    what = f"VOC annotation of image '{image_id}'"
    if not path.is_file():
        raise DatasetError(f"{what} not found: {path}")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise DatasetError(f"{what} {path}: not valid XML ({e})") from e
    problems = Problems(str(path))
    boxes = []
    for k, obj in enumerate(root.iter("object")):
        box = obj.find("bndbox")
        if box is None:
            problems.add(f"object {k}", "no <bndbox>")
            continue
        values = []
        for key in ("xmin", "ymin", "xmax", "ymax"):
            text = box.findtext(key)
            try:
                values.append(float(text))
            except (TypeError, ValueError):
                problems.add(f"object {k}", f"<{key}> must be a number, got {text!r}")
        if len(values) == 4:
            if values[2] < values[0] or values[3] < values[1]:
                problems.add(f"object {k}", f"box {values} has xmax < xmin or ymax < ymin")
            boxes.append(values)
    problems.raise_any()
    size = root.find("size")
    try:
        hw = (int(size.findtext("height")), int(size.findtext("width"))) if size is not None else None
    except (TypeError, ValueError):
        hw = None
    return boxes, hw
