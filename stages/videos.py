"""Video datasets: a folder of frame folders, DAVIS (JPEGImages/480p + the ground-truth folder named by
``dataset.annotations``: Annotations_unsupervised/480p for DAVIS-17 unsupervised) and YouTube-VIS
(JPEGImages/<video>/ + a json). Frames are ordered numerically. Ground truth is read only to evaluate."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.config import DatasetConfig
from stages.datasets import DatasetError, ImageRecord, resolve
from stages.export import coco_file, mask_annotation
from stages.io import IMAGE_SUFFIXES, read_json

DAVIS_RES = "480p"  # the DAVIS layout's resolution folder
DAVIS_VOID = 255  # DAVIS's label of pixels that count nowhere (object borders, unclear regions)


@dataclass(frozen=True)
class VideoRecord:
    id: int
    name: str
    frames: tuple[str, ...]  # file names relative to the dataset root, in temporal order
    root: str


def frame_order(name: str) -> tuple:
    """Sort key: the numbers in a file name compare as numbers (frame2 < frame10)."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", Path(name).stem))


def _frames_in(folder: Path, root: Path) -> tuple[str, ...]:
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    return tuple(p.relative_to(root).as_posix() for p in sorted(files, key=lambda p: frame_order(p.name)))


@functools.lru_cache(maxsize=1)
def _ytvis_json(path: str) -> dict:
    """A YouTube-VIS json, read once: it is large and asked for per video (listing, ground truth). Callers
    only read it."""
    return read_json(Path(path))


def list_videos(cfg: DatasetConfig) -> list[VideoRecord]:
    """Every video of a video dataset, in a stable order."""
    root = resolve(cfg.root)
    if not root.is_dir():
        hint = " (run `make demo-data`)" if cfg.name.startswith("demo") else " (set DATA=/path)"
        raise DatasetError(f"video root of dataset '{cfg.name}' not found: {root}{hint}")
    if cfg.kind == "ytvis":
        videos = _ytvis_json(str(resolve(cfg.annotations)))["videos"]
        return [
            VideoRecord(
                int(v["id"]),
                Path(v["file_names"][0]).parent.name,
                tuple(f"JPEGImages/{f}" for f in v["file_names"]),
                str(root),
            )
            for v in videos
        ]
    base = root / "JPEGImages" / DAVIS_RES if cfg.kind == "davis" else root
    if cfg.kind == "davis" and cfg.split:
        split = root / "ImageSets" / "2017" / f"{cfg.split}.txt"
        if not split.is_file():
            raise DatasetError(f"DAVIS split list not found: {split}")
        names = [line.strip() for line in split.read_text().splitlines() if line.strip()]
    else:
        names = sorted(p.name for p in base.iterdir() if p.is_dir())
    videos = [VideoRecord(i + 1, n, _frames_in(base / n, root), str(root)) for i, n in enumerate(names)]
    empty = [v.name for v in videos if not v.frames]
    if empty:
        raise DatasetError(f"videos without frames in {base}: {empty[:5]}")
    return videos


def frame_records(cfg: DatasetConfig) -> list[ImageRecord]:
    """The frames of every video as images (for detector self-training on video pseudo-labels)."""
    frames = [f for v in list_videos(cfg) for f in v.frames]
    root = resolve(cfg.root)
    return [ImageRecord(i + 1, f, str(root / f)) for i, f in enumerate(frames)]


def davis_annotations(cfg: DatasetConfig) -> Path | None:
    """The DAVIS ground-truth folder (holding one folder of PNGs per video): ``dataset.annotations``
    relative to the dataset root (or absolute); None when the config names none."""
    return resolve(cfg.root) / cfg.annotations if cfg.annotations else None


def video_ground_truth(cfg: DatasetConfig, video: VideoRecord) -> np.ndarray:
    """(T, H, W) object ids of a video (0 = background; DAVIS's void 255 counts as background)."""
    return video_truth(cfg, video)[0]


def video_truth(cfg: DatasetConfig, video: VideoRecord) -> tuple[np.ndarray, np.ndarray | None]:
    """(T, H, W) object ids of a video (0 = background and void) and, for DAVIS, the (T, H, W) bool void
    pixels (label 255), which evaluation leaves out; None for datasets without a void label."""
    if cfg.kind == "davis":
        folder = davis_annotations(cfg)
        if folder is None:
            raise DatasetError(f"dataset '{cfg.name}' names no ground-truth folder (dataset.annotations)")
        maps = [np.array(Image.open(folder / video.name / f"{Path(f).stem}.png")) for f in video.frames]
        ids = np.stack(maps).astype(np.int64)
        void = ids == DAVIS_VOID
        ids[void] = 0
        return ids, void
    if cfg.kind == "ytvis":
        data = _ytvis_json(str(resolve(cfg.annotations)))
        meta = next(v for v in data["videos"] if v["id"] == video.id)
        ids = np.zeros((len(video.frames), meta["height"], meta["width"]), np.int64)
        anns = [a for a in data.get("annotations", []) if a["video_id"] == video.id]
        for k, ann in enumerate(anns, start=1):
            for t, seg in enumerate(ann["segmentations"]):
                if seg:
                    rle = (
                        seg
                        if isinstance(seg, dict)
                        else mask_utils.merge(mask_utils.frPyObjects(seg, meta["height"], meta["width"]))
                    )
                    if isinstance(rle.get("counts"), list):
                        rle = mask_utils.frPyObjects(rle, meta["height"], meta["width"])
                    ids[t][mask_utils.decode(rle).astype(bool)] = k
        return ids, None
    raise DatasetError(f"dataset '{cfg.name}' ({cfg.kind}) has no ground truth")


def frames_ground_truth(cfg: DatasetConfig) -> dict | None:
    """The video ground truth as per-frame COCO instances (frames as images, ids as in ``frame_records``),
    for detector AP and CorLoc on video frames; None when the dataset has no annotations."""
    if cfg.kind == "framefolders" or (cfg.kind == "ytvis" and not cfg.annotations):
        return None
    if cfg.kind == "davis" and not (cfg.annotations and davis_annotations(cfg).is_dir()):
        return None
    ids = {r.file_name: r.id for r in frame_records(cfg)}
    images, annotations = [], []
    for video in list_videos(cfg):
        truth = video_ground_truth(cfg, video)
        for frame, objects in zip(video.frames, truth, strict=True):
            height, width = objects.shape
            images.append({"id": ids[frame], "file_name": frame, "width": width, "height": height})
            annotations += [mask_annotation(objects == k, ids[frame]) for k in np.unique(objects) if k]
    return coco_file(images, annotations)
