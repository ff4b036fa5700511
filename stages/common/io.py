"""File and image I/O shared by the stages: atomic writes and the project's one image decoder."""

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
from PIL import ExifTags, Image

ORIENTATION = {  # EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose)
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Pillow formats that only identify a file and cannot decode its pixels here (stubs without a handler,
# WMF/EMF outside Windows, MPEG headers, IPTC records): files with their suffixes are not taken as images.
UNDECODED_FORMATS = frozenset({"BUFR", "GRIB", "HDF5", "IPTC", "MPEG", "WMF"})


def _image_suffixes() -> tuple[str, ...]:
    Image.init()  # registers every plugin, so the list does not depend on what was imported before
    return tuple(
        sorted(
            ext
            for ext, fmt in Image.registered_extensions().items()
            if fmt in Image.OPEN and fmt not in UNDECODED_FORMATS
        )
    )


# Lower case, with the dot: every format Pillow reads (.jpg, .tif, .gif, ...).
IMAGE_SUFFIXES = _image_suffixes()
_COPY_BUFFER = 1 << 20


def is_image_name(name: str | Path) -> bool:
    """True when the file name's suffix is one of a format Pillow decodes (case-insensitive)."""
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


class BadImage(Exception):
    """An input image that cannot be used; the run records the reason and goes on."""


def checked_rgb(image: np.ndarray) -> np.ndarray:
    """``image`` as an (H, W, 3) uint8 RGB array (as given, not converted); BadImage saying what it is
    otherwise (a grey 2-D array, RGBA, floats, channels first)."""
    rgb = np.asarray(image)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise BadImage(f"expected an (H, W, 3) uint8 RGB array, got shape {rgb.shape} dtype {rgb.dtype}")
    return rgb


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask would briefly set it
    for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: Path) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: written under a temporary name in the same directory and
    renamed into place when the block ends, so readers never see half a file; removed on error.

    The file gets the mode a plain open() would give it (0666 less the umask): mkstemp creates it 0600,
    which would hide a run from the other users of a shared file system."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
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


# ----------------------------------------------------------------------------------------------------------
# Decoding: every stage reads images through load_rgb (discovery, BA, training, relabelling, evaluation,
# the detector API), so a file looks the same to all of them.


def to_8_bit(values: np.ndarray) -> np.ndarray:
    """High-bit-depth pixel values -> uint8, scaled by the image's own bit depth.

    Integer data is divided by 2**b - 1, b the smallest even number of bits >= 8 that holds the image's
    maximum: sensors store 10, 12 or 14 bits in 16-bit files, so a 12-bit image (0..4095) spans 0..255 like
    a full 16-bit one (0..65535) does, instead of staying nearly black. Float data in [0, 1] is taken as is,
    other float data is divided by its maximum. Negative values become 0.
    """
    values = np.asarray(values)
    top = float(values.max(initial=0))
    if np.issubdtype(values.dtype, np.floating):
        scale = 1.0 if top <= 1.0 else top
    else:
        bits = max(8, int(top).bit_length())
        scale = float(2 ** (bits + bits % 2) - 1)
    scaled = values.astype(np.float64) / scale * 255.0 + 0.5
    return np.clip(scaled, 0, 255).astype(np.uint8)


def _rawmode(img: Image.Image) -> str:
    if not img.tile:
        return ""
    args = img.tile[0].args
    return args if isinstance(args, str) else str(args[0]) if args else ""


def _deep_colour(path: Path) -> np.ndarray:
    """A 16-bit-per-channel colour (or grey + alpha) file, which Pillow cuts to 8 bits, as (H, W, 3) uint16
    RGB read by OpenCV (alpha dropped)."""
    import cv2

    arr = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise BadImage("unreadable: OpenCV cannot decode this 16-bit colour file")
    if arr.ndim == 2 or arr.shape[2] <= 2:  # grey (+ alpha)
        grey = arr if arr.ndim == 2 else arr[:, :, 0]
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.ascontiguousarray(arr[:, :, 2::-1])  # BGR(A) -> RGB


def _upright(arr: np.ndarray, orientation: int) -> np.ndarray:
    """An (H, W, C) array turned by an EXIF orientation, with Pillow's own transposes."""
    method = ORIENTATION.get(orientation)
    if method is None:
        return arr
    planes = [np.asarray(Image.fromarray(arr[:, :, c]).transpose(method)) for c in range(arr.shape[2])]
    return np.stack(planes, axis=2)


def _decode(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        # Pillow reads 16-bit colour PNG/TIFF as 8-bit RGB (top byte): those are decoded by OpenCV instead.
        deep = img.mode in ("RGB", "RGBA", "LA") and ";16" in _rawmode(img)
        img.load()  # multi-frame files (GIF, TIFF pages, APNG): the first frame
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
        arr = _deep_colour(Path(path)) if deep else _pil_to_rgb(img)
    if arr.dtype != np.uint8:
        arr = to_8_bit(arr)
    return np.array(_upright(arr, orientation))  # a writable copy: torch.from_numpy warns on read-only arrays


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    """(H, W, 3) array of a decoded Pillow image: uint8, or its 16/32-bit grey data repeated (to_8_bit)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return np.repeat(np.asarray(img)[:, :, None], 3, axis=2)
    if img.mode == "La":  # premultiplied: Pillow converts it only through LA
        img = img.convert("LA")
    return np.asarray(img.convert("RGB"))  # palette, grey, alpha (dropped), CMYK, YCbCr, ...


def as_rgb(image: Any) -> np.ndarray:
    """What a user hands a detector or ``discover()`` as an (H, W, 3) uint8 RGB array: an image file path
    (``load_rgb``), a Pillow image (converted as ``load_rgb`` converts a file's modes; its EXIF orientation
    is not applied: Pillow has decoded it already) or an (H, W, 3) uint8 RGB array (``checked_rgb``: taken as
    given). BadImage otherwise, saying what is accepted."""
    if isinstance(image, str | Path):
        return load_rgb(Path(image))
    if isinstance(image, Image.Image):
        arr = _pil_to_rgb(image)
        return np.array(arr if arr.dtype == np.uint8 else to_8_bit(arr))
    if isinstance(image, np.ndarray):
        return checked_rgb(image)
    raise BadImage(
        "expected one image: a file path, a PIL image or an (H, W, 3) uint8 RGB array, got "
        + type(image).__name__
    )


def load_rgb(path: Path) -> np.ndarray:
    """An image file as an (H, W, 3) uint8 RGB array: the project's one decoder.

    EXIF orientation applied; multi-frame files give their first frame; palette, grey, alpha (dropped),
    CMYK and YCbCr images converted by Pillow; 16-bit and 32-bit data scaled by its bit depth (``to_8_bit``).
    Raises BadImage for unreadable, truncated or oversized files, with the reason.
    """
    try:
        return _decode(Path(path))
    except Image.DecompressionBombError as e:
        raise BadImage(f"huge: {e}") from e
    except (Image.UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        # PIL reports truncated and corrupt data as OSError/SyntaxError/ValueError depending on the codec
        raise BadImage(f"unreadable: {e}") from e


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image as ``load_rgb`` returns it (EXIF orientation applied), from the header
    only. Raises BadImage like ``load_rgb``."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            if img.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8):  # quarter turns
                width, height = height, width
            return height, width
    except Image.DecompressionBombError as e:
        raise BadImage(f"huge: {e}") from e
    except (Image.UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"unreadable: {e}") from e
