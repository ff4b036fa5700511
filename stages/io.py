"""File and image I/O shared by the stages: atomic writes and tolerant image loading."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


class BadImage(Exception):
    """An input image that cannot be used; the run records the reason and goes on."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data))


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, palette, alpha, CMYK and 16/32-bit images become 8-bit RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        if img.mode == "F":
            top = max(float(arr.max()), 1e-12)
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    return img.convert("RGB")


def load_rgb(path: Path) -> np.ndarray:
    """An image file as an HxWx3 uint8 array, EXIF rotation applied (as detectron2 reads it).

    Raises BadImage for unreadable, truncated or oversized files.
    """
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            return np.array(_to_rgb(img))  # writable: torch.from_numpy warns on read-only arrays
    except Image.DecompressionBombError as e:
        raise BadImage(f"huge: {e}") from e
    except (Image.UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        # PIL reports truncated and corrupt data as OSError/SyntaxError/ValueError depending on the codec
        raise BadImage(f"unreadable: {e}") from e
