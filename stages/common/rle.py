"""COCO run-length-encoded (RLE) masks through pycocotools, safe at any count.

Every pycocotools mask call of the stages and runs goes through here (the demo-data builder calls area()
on one RLE at a time), because pycocotools 2.0.11 was written for numpy 1 and one of its calls breaks
under numpy 2's strict integer casting once a list is long enough: ``mask.area`` builds a throwaway
``np.array((n,), dtype=np.uint8)`` from the list length, which numpy 2 refuses for n >= 256
(``OverflowError: Python integer 256 out of bounds for uint8``). ``area`` below hands it at most 255 RLEs
at a time. The other calls were checked at realistic sizes (hundreds to 90,000 RLEs, 500x375 masks,
300x300 IoU matrices) and behave; they are wrapped only so that str and bytes counts are handled in one
place. (``mask.decode`` warns under numpy 2 that its ``__array__`` takes no ``copy`` argument; a
DeprecationWarning with the pinned numpy 2.4.6.)

RLEs here are dicts ``{"size": [height, width], "counts": str | bytes}`` (COCO's compressed form); the
functions returning RLEs give str counts, ready for JSON.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pycocotools import mask as mask_utils

# The longest list pycocotools' area() takes under numpy 2 (see the module docstring).
_AREA_CHUNK = 255


def _coded(rle: dict) -> dict:
    """The RLE as pycocotools wants it: bytes counts."""
    counts = rle["counts"]
    return {
        "size": list(rle["size"]),
        "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
    }


def _coded_all(rles: Sequence[dict]) -> list[dict]:
    return [_coded(r) for r in rles]


def encode(mask: np.ndarray) -> dict:
    """(H, W) bool mask -> RLE with str counts."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def decode(rle: dict) -> np.ndarray:
    """RLE -> (H, W) bool mask."""
    return mask_utils.decode(_coded(rle)).astype(bool)


def area(rles: Sequence[dict]) -> np.ndarray:
    """Pixels of each RLE, (n,) int64, for any n (pycocotools' own call fails from 256 RLEs on)."""
    coded = _coded_all(rles)
    parts = [mask_utils.area(coded[i : i + _AREA_CHUNK]) for i in range(0, len(coded), _AREA_CHUNK)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def to_bbox(rles: Sequence[dict]) -> np.ndarray:
    """Tight [x, y, w, h] box of each RLE, (n, 4) float64 (all zeros for an empty mask)."""
    if not rles:
        return np.zeros((0, 4))
    return np.asarray(mask_utils.toBbox(_coded_all(rles)), dtype=np.float64).reshape(-1, 4)


def iou(a: Sequence[dict], b: Sequence[dict]) -> np.ndarray:
    """Mask IoU of every RLE of ``a`` with every RLE of ``b``, (len(a), len(b)) float64; none is a crowd."""
    if not a or not b:
        return np.zeros((len(a), len(b)))
    return np.asarray(mask_utils.iou(_coded_all(a), _coded_all(b), [0] * len(b))).reshape(len(a), len(b))


def merge(rles: Sequence[dict]) -> dict:
    """The union of several RLEs of one image, as one RLE with str counts."""
    out = mask_utils.merge(_coded_all(rles), intersect=False)
    return {"size": list(out["size"]), "counts": out["counts"].decode("ascii")}


def from_polygons(polygons: list[list[float]], height: int, width: int) -> dict:
    """COCO polygons ([x0, y0, x1, y1, ...] each) of one object -> one RLE with str counts (their union).

    Raises ValueError for a polygon of fewer than 3 points: pycocotools would take a first polygon of 4
    numbers for a box and fail with a TypeError."""
    short = [p for p in polygons if len(p) < 6]
    if short:
        raise ValueError(f"a polygon needs at least 3 points (6 numbers), got {len(short[0])} numbers")
    return merge(mask_utils.frPyObjects(polygons, height, width))


def from_segmentation(segmentation: list | dict, height: int, width: int) -> dict:
    """A COCO segmentation in any of its forms (polygons, uncompressed RLE with list counts, compressed RLE)
    of an image of ``height`` x ``width`` -> compressed RLE with str counts."""
    if isinstance(segmentation, list):
        return from_polygons(segmentation, height, width)
    if isinstance(segmentation["counts"], list):
        out = mask_utils.frPyObjects(segmentation, height, width)
        return {"size": list(out["size"]), "counts": out["counts"].decode("ascii")}
    counts = segmentation["counts"]
    return {
        "size": list(segmentation["size"]),
        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
    }
