"""File and image I/O shared by the stages: atomic writes and tolerant image loading."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
_COPY_BUFFER = 1 << 20


class BadImage(Exception):
    """An input image that cannot be used; the run records the reason and goes on."""


@contextlib.contextmanager
def atomic_open(path: Path) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: written under a temporary name in the same directory and
    renamed into place when the block ends, so readers never see half a file; removed on error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see ``atomic_open``)."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_copy(source: Path, target: Path) -> None:
    """Copy a file atomically, streaming (the file may be larger than memory)."""
    with open(source, "rb") as src, atomic_open(target) as out:
        shutil.copyfileobj(src, out, _COPY_BUFFER)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data))


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


class JsonListsWriter:
    """Writes a JSON object whose first keys hold long lists, item by item, without keeping the lists in
    memory: each list is spooled to an anonymous temporary file beside the target, and ``commit`` joins them
    (then the small trailing keys) into the target atomically. The bytes equal ``json.dumps`` of the whole
    dict with the keys in that order. Use as a context manager: the spools are dropped on exit."""

    def __init__(self, path: Path, keys: tuple[str, ...]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.spools = {key: tempfile.TemporaryFile(dir=self.path.parent) for key in keys}
        self.counts = dict.fromkeys(keys, 0)

    def __enter__(self) -> JsonListsWriter:
        return self

    def __exit__(self, *exc) -> None:
        for spool in self.spools.values():
            spool.close()

    def add(self, key: str, items: Iterable[Any]) -> None:
        """Append items to list ``key``."""
        spool = self.spools[key]
        for item in items:
            spool.write(((", " if self.counts[key] else "") + json.dumps(item)).encode())
            self.counts[key] += 1

    def commit(self, tail: dict[str, Any]) -> None:
        """Write the target: the lists, then ``tail``'s keys."""
        with atomic_open(self.path) as out:
            for n, (key, spool) in enumerate(self.spools.items()):
                out.write(f"{', ' if n else '{'}{json.dumps(key)}: [".encode())
                spool.seek(0)
                shutil.copyfileobj(spool, out, _COPY_BUFFER)
                out.write(b"]")
            for key, value in tail.items():
                out.write(f", {json.dumps(key)}: {json.dumps(value)}".encode())
            out.write(b"}")


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
