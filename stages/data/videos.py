"""Video datasets: a folder of frame folders, DAVIS (JPEGImages/480p + the ground-truth folder named by
``dataset.annotations``: Annotations_unsupervised/480p for DAVIS-17 unsupervised) and YouTube-VIS
(JPEGImages/<video>/ + a json). Frames are ordered numerically. Ground truth is read only to evaluate.
Listing checks the dataset's files first (the split list, the frame folders, the YouTube-VIS json entry by
entry); evaluation checks every ground-truth file before computing anything."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image

from stages.common import rle
from stages.common.export import coco_file, mask_annotation
from stages.common.io import image_size, is_image_name
from stages.common.paths import resolve
from stages.data.annotations import (
    DatasetError,
    Problems,
    complete_ground_truth,
    read_json_file,
    segmentation_problem,
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
    files = [p for p in folder.iterdir() if is_image_name(p.name) and p.is_file()]
    return tuple(p.relative_to(root).as_posix() for p in sorted(files, key=lambda p: frame_order(p.name)))


@functools.lru_cache(maxsize=1)
def _ytvis_json(path: str) -> dict:
    """A YouTube-VIS json, read and checked once: it is large and asked for per video (listing, ground
    truth). Callers only read it."""
    data = read_json_file(Path(path), "YouTube-VIS annotations")
    check_ytvis(data, path)
    return data


def _is_size(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_ytvis(data, source: str) -> None:
    """Check a YouTube-VIS json: videos with a unique integer id, a unique folder, frame file names and a
    size; annotations (when present) naming a known video, with one segmentation (or null) per frame.
    Raises DatasetError listing the problems by entry and key."""
    problems = Problems(source)
    if not isinstance(data, dict) or not isinstance(data.get("videos"), list):
        problems.add("top level", "not a YouTube-VIS file (no 'videos' list)")
        problems.raise_any()
    videos, folders = {}, {}
    for i, video in enumerate(data["videos"]):
        entry = f"videos[{i}]" + (f" (id {video['id']})" if isinstance(video, dict) and "id" in video else "")
        if not isinstance(video, dict):
            problems.add(entry, "not an object")
            continue
        names = video.get("file_names")
        if not (isinstance(names, list) and names and all(isinstance(n, str) and n for n in names)):
            problems.add(entry, f"'file_names' must be a non-empty list of frame paths, got {names!r:.60}")
        else:
            folder = Path(names[0]).parent.as_posix()
            if folder in folders:
                problems.add(entry, f"frames in '{folder}', the folder of {folders[folder]} too")
            folders[folder] = entry
        for key in ("width", "height"):
            if not _is_size(video.get(key)):
                problems.add(entry, f"'{key}' must be a positive integer, got {video.get(key)!r}")
        vid = video.get("id")
        if not (isinstance(vid, int) and not isinstance(vid, bool)):
            problems.add(entry, f"'id' must be an integer, got {vid!r}")
        elif vid in videos:
            problems.add(entry, f"duplicate video id {vid}")
        else:
            videos[vid] = video
    for i, ann in enumerate(data.get("annotations") or []):
        entry = f"annotations[{i}]"
        video = videos.get(ann.get("video_id")) if isinstance(ann, dict) else None
        if video is None:
            problems.add(entry, "not an object with the 'video_id' of a listed video")
            continue
        segs = ann.get("segmentations")
        if not isinstance(segs, list) or len(segs) != len(video.get("file_names") or []):
            n = len(segs) if isinstance(segs, list) else segs
            problems.add(
                entry, f"'segmentations' must have one entry per frame ({len(video['file_names'])}), got {n}"
            )
            continue
        frame = {"height": video["height"], "width": video["width"]}
        for t, seg in enumerate(segs):
            if seg is not None and (why := segmentation_problem(seg, frame)):
                problems.add(f"{entry} frame {t}", why)
    problems.raise_any()


def list_videos(cfg: DatasetConfig) -> list[VideoRecord]:
    """Every video of a video dataset, in a stable order."""
    root = resolve(cfg.root)
    if not root.is_dir():
        raise DatasetError(
            f"video root of dataset '{cfg.name}' not found: {root}{missing_root_hint(cfg.root)}"
        )
    return _video_kind(cfg).videos(cfg, root)


def _video_kind(cfg: DatasetConfig) -> VideoKind:
    kind = dataset_kind(cfg)
    if not isinstance(kind, VideoKind):
        raise DatasetError(f"dataset '{cfg.name}' ({cfg.kind}) holds images, not videos")
    return kind


def _folder_videos(cfg: DatasetConfig, root: Path, base: Path, names: list[str] | None) -> list[VideoRecord]:
    """One video per frame folder under ``base`` (``names``: those, in that order; None: every folder)."""
    if names is None:
        if not base.is_dir():
            raise DatasetError(f"frame folder of dataset '{cfg.name}' not found: {base}")
        names = sorted(p.name for p in base.iterdir() if p.is_dir())
    videos = [VideoRecord(i + 1, n, _frames_in(base / n, root), str(root)) for i, n in enumerate(names)]
    empty = [v.name for v in videos if not v.frames]
    if empty:
        raise DatasetError(f"videos without frames in {base}: {empty[:5]}")
    return videos


def _davis_split(root: Path, split_name: str, base: Path, year: str = "2017") -> list[str]:
    """The videos of a DAVIS split list (ImageSets/<year>/<split>.txt), each checked to have its frame
    folder."""
    split = root / "ImageSets" / year / f"{split_name}.txt"
    if not split.is_file():
        raise DatasetError(f"DAVIS split list not found: {split}")
    problems = Problems(str(split))
    names: list[str] = []
    for n, line in enumerate(split.read_text().splitlines(), start=1):
        name = line.strip()
        if not name:
            continue
        if name in names:
            problems.add(f"line {n}", f"video '{name}' is listed twice")
        elif not (base / name).is_dir():
            problems.add(f"line {n}", f"video '{name}' has no frame folder {base / name}")
        else:
            names.append(name)
    problems.raise_any()
    return names


def frame_records(cfg: DatasetConfig) -> list[ImageRecord]:
    """The frames of every video as images (for detector self-training on video pseudo-labels)."""
    frames = [f for v in list_videos(cfg) for f in v.frames]
    root = resolve(cfg.root)
    return [ImageRecord(i + 1, f, str(root / f)) for i, f in enumerate(frames)]


def davis_annotations(cfg: DatasetConfig) -> Path | None:
    """The DAVIS ground-truth folder (holding one folder of PNGs per video): ``dataset.annotations``
    relative to the dataset root (or absolute); None when the config names none."""
    return resolve(cfg.root) / cfg.annotations if cfg.annotations else None


def _davis_masks(cfg: DatasetConfig, video: VideoRecord) -> list[Path]:
    folder = davis_annotations(cfg)
    if folder is None:
        raise DatasetError(f"dataset '{cfg.name}' names no ground-truth folder (dataset.annotations)")
    return [folder / video.name / f"{Path(f).stem}.png" for f in video.frames]


def check_video_ground_truth(cfg: DatasetConfig, videos: list[VideoRecord]) -> None:
    """Before any evaluation work: every video has its ground truth (DAVIS: a mask per frame; YouTube-VIS:
    an annotations list). Raises DatasetError naming what is missing."""
    _video_kind(cfg).check_truth(cfg, videos)


def _id_map(path: Path) -> np.ndarray:
    """One DAVIS mask: a palette or grey PNG whose values are object ids."""
    with Image.open(path) as img:
        if img.mode not in ("P", "L"):
            raise DatasetError(
                f"{path}: a DAVIS mask must be a palette or grey PNG of object ids, not {img.mode}"
            )
        return np.array(img)


def evaluation_protocol(cfg: DatasetConfig) -> str:
    """How a video dataset is scored: 'objects' (DAVIS-17 unsupervised) or 'foreground' (DAVIS-2016)."""
    return _video_kind(cfg).protocol


def video_ground_truth(cfg: DatasetConfig, video: VideoRecord) -> np.ndarray:
    """(T, H, W) object ids of a video (0 = background; DAVIS's void 255 counts as background)."""
    return video_truth(cfg, video)[0]


def video_truth(cfg: DatasetConfig, video: VideoRecord) -> tuple[np.ndarray, np.ndarray | None]:
    """(T, H, W) object ids of a video (0 = background and void) and, for DAVIS, the (T, H, W) bool void
    pixels (label 255), which evaluation leaves out; None for datasets without a void label."""
    return _video_kind(cfg).truth(cfg, video)


def frames_ground_truth(cfg: DatasetConfig) -> dict | None:
    """The video ground truth as per-frame COCO instances (frames as images, ids as in ``frame_records``),
    for detector AP and CorLoc on video frames; None when the dataset has no annotations."""
    if not _video_kind(cfg).has_truth(cfg):
        return None
    ids = {r.file_name: r.id for r in frame_records(cfg)}
    videos = list_videos(cfg)
    check_video_ground_truth(cfg, videos)
    images, annotations = [], []
    for video in videos:
        truth = video_ground_truth(cfg, video)
        for frame, objects in zip(video.frames, truth, strict=True):
            height, width = objects.shape
            images.append({"id": ids[frame], "file_name": frame, "width": width, "height": height})
            annotations += [mask_annotation(objects == k, ids[frame]) for k in np.unique(objects) if k]
    return coco_file(images, annotations)


# ----------------------------------------------------------------------------------------------------------
# The video kinds


class VideoKind(DatasetKind):
    """A dataset whose items are videos; as images, it lists every frame of every video."""

    modality = "video"
    # How evaluation scores it: "objects" (DAVIS-17 unsupervised: tracks matched to objects) or
    # "foreground" (DAVIS-2016: one merged foreground per frame, J and F per sequence).
    protocol: ClassVar[str] = "objects"

    def videos(self, cfg: DatasetConfig, root: Path) -> list[VideoRecord]:
        raise NotImplementedError

    def has_truth(self, cfg: DatasetConfig) -> bool:
        return False

    def check_truth(self, cfg: DatasetConfig, videos: list[VideoRecord]) -> None:
        raise DatasetError(f"dataset '{cfg.name}' ({cfg.kind}) has no ground truth")

    def truth(self, cfg: DatasetConfig, video: VideoRecord) -> tuple[np.ndarray, np.ndarray | None]:
        raise DatasetError(f"dataset '{cfg.name}' ({cfg.kind}) has no ground truth")

    def listing(self, cfg: DatasetConfig) -> Listing:
        return Listing(frame_records(cfg), [])

    def ground_truth(self, cfg: DatasetConfig) -> dict | None:
        data = frames_ground_truth(cfg)
        return None if data is None else complete_ground_truth(data, f"ground truth of '{cfg.name}'")


@DATASET_KINDS.register("framefolders")
class FrameFolders(VideoKind):
    """A folder of videos, one folder of frames each; no ground truth."""

    def videos(self, cfg: DatasetConfig, root: Path) -> list[VideoRecord]:
        return _folder_videos(cfg, root, root, None)


@DATASET_KINDS.register("davis")
class Davis(VideoKind):
    """DAVIS: JPEGImages/480p/<video>/, the ImageSets/2017/<split>.txt list, and the ground-truth folder
    ``dataset.annotations`` of palette PNGs (object ids; 255 = void)."""

    def videos(self, cfg: DatasetConfig, root: Path) -> list[VideoRecord]:
        base = root / "JPEGImages" / DAVIS_RES
        names = _davis_split(root, cfg.split, base) if cfg.split else None
        return _folder_videos(cfg, root, base, names)

    def has_truth(self, cfg: DatasetConfig) -> bool:
        return bool(cfg.annotations and davis_annotations(cfg).is_dir())

    def check_truth(self, cfg: DatasetConfig, videos: list[VideoRecord]) -> None:
        problems = Problems(str(davis_annotations(cfg)))
        for video in videos:
            missing = [p.name for p in _davis_masks(cfg, video) if not p.is_file()]
            if missing:
                problems.add(
                    video.name,
                    f"no mask for {len(missing)} of {len(video.frames)} frames (e.g. {missing[:3]})",
                )
        problems.raise_any()

    def truth(self, cfg: DatasetConfig, video: VideoRecord) -> tuple[np.ndarray, np.ndarray | None]:
        maps = [_id_map(p) for p in _davis_masks(cfg, video)]
        sizes = {m.shape for m in maps}
        if len(sizes) > 1:
            raise DatasetError(f"{video.name}: its DAVIS masks differ in size: {sorted(sizes)}")
        ids = np.stack(maps).astype(np.int64)
        void = ids == DAVIS_VOID
        ids[void] = 0
        return ids, void


@DATASET_KINDS.register("ytvis")
class YouTubeVIS(VideoKind):
    """YouTube-VIS: JPEGImages/<video>/ and the json (``dataset.annotations``) listing videos and, for the
    training split, per-frame segmentations."""

    requires = ("annotations",)

    def videos(self, cfg: DatasetConfig, root: Path) -> list[VideoRecord]:
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

    def has_truth(self, cfg: DatasetConfig) -> bool:
        # e.g. YouTube-VIS valid.json lists videos without annotations
        return bool(cfg.annotations) and "annotations" in _ytvis_json(str(resolve(cfg.annotations)))

    def check_truth(self, cfg: DatasetConfig, videos: list[VideoRecord]) -> None:
        if not self.has_truth(cfg):
            raise DatasetError(
                f"dataset '{cfg.name}': {cfg.annotations} has no 'annotations' to evaluate against"
            )

    def truth(self, cfg: DatasetConfig, video: VideoRecord) -> tuple[np.ndarray, np.ndarray | None]:
        data = _ytvis_json(str(resolve(cfg.annotations)))
        meta = next(v for v in data["videos"] if v["id"] == video.id)
        ids = np.zeros((len(video.frames), meta["height"], meta["width"]), np.int64)
        anns = [a for a in data.get("annotations", []) if a["video_id"] == video.id]
        for k, ann in enumerate(anns, start=1):
            for t, seg in enumerate(ann["segmentations"]):
                if seg:
                    ids[t][rle.decode(rle.from_segmentation(seg, meta["height"], meta["width"]))] = k
        return ids, None


# ----------------------------------------------------------------------------------------------------------
# Single-object (foreground) datasets: DAVIS-2016, SegTrack-v2, FBMS-59. Their truth is one merged
# foreground per frame (id 1); evaluation scores them with the DAVIS-2016 protocol (``protocol``).


def _binary_masks(
    paths: list[Path | None], shape: tuple[int, int], what: str
) -> tuple[np.ndarray, np.ndarray]:
    """(T, H, W) foreground ids (1 where any non-zero, non-void value is) and void of per-frame mask files;
    a frame without a file (None: not annotated, FBMS-59's sparse frames) is void everywhere."""
    ids = np.zeros((len(paths), *shape), np.int64)
    void = np.zeros((len(paths), *shape), bool)
    for t, path in enumerate(paths):
        if path is None:
            void[t] = True
            continue
        with Image.open(path) as img:
            values = np.array(img.convert("L") if img.mode not in ("P", "L") else img)
        if values.shape != shape:
            raise DatasetError(f"{path}: {what} mask of {values.shape[::-1]} px, its frame is {shape[::-1]}")
        void[t] = values == DAVIS_VOID if img.mode == "P" else False
        ids[t] = (values != 0) & ~void[t]
    return ids, void


def _frame_shape(video: VideoRecord) -> tuple[int, int]:
    return image_size(Path(video.root) / video.frames[0])


class ForegroundKind(VideoKind):
    """A single-object video dataset: per frame one foreground mask (every annotated object merged)."""

    protocol = "foreground"

    def mask_paths(self, cfg: DatasetConfig, video: VideoRecord) -> list[Path | None]:
        raise NotImplementedError

    def has_truth(self, cfg: DatasetConfig) -> bool:
        return True

    def check_truth(self, cfg: DatasetConfig, videos: list[VideoRecord]) -> None:
        problems = Problems(f"ground truth of '{cfg.name}'")
        for video in videos:
            paths = self.mask_paths(cfg, video)
            missing = [str(p) for p in paths if p is not None and not p.is_file()]
            if missing or all(p is None for p in paths):
                problems.add(video.name, f"no mask file {missing[:2]}" if missing else "no annotated frame")
        problems.raise_any()

    def truth(self, cfg: DatasetConfig, video: VideoRecord) -> tuple[np.ndarray, np.ndarray | None]:
        return _binary_masks(self.mask_paths(cfg, video), _frame_shape(video), cfg.kind)


@DATASET_KINDS.register("davis2016")
class Davis2016(ForegroundKind):
    """DAVIS-2016: the DAVIS layout (JPEGImages/480p/<video>/, the ground-truth folder
    ``dataset.annotations``, Annotations/480p) with the 2016 list ImageSets/2016/<split>.txt; every object
    of a frame merged into one foreground (void 255 left out)."""

    def videos(self, cfg: DatasetConfig, root: Path) -> list[VideoRecord]:
        base = root / "JPEGImages" / DAVIS_RES
        names = _davis_split(root, cfg.split, base, year="2016") if cfg.split else None
        return _folder_videos(cfg, root, base, names)

    def mask_paths(self, cfg: DatasetConfig, video: VideoRecord) -> list[Path | None]:
        return _davis_masks(cfg, video)


@DATASET_KINDS.register("segtrackv2")
class SegTrackV2(ForegroundKind):
    """SegTrack-v2: JPEGImages/<video>/ frames and GroundTruth/<video>/ masks named like the frames (any
    image suffix); a video with several objects has one subfolder of masks per object (1/, 2/, ...),
    merged into one foreground."""

    def videos(self, cfg: DatasetConfig, root: Path) -> list[VideoRecord]:
        return _folder_videos(cfg, root, root / "JPEGImages", None)

    def mask_paths(self, cfg: DatasetConfig, video: VideoRecord) -> list[Path | None]:
        folder = resolve(cfg.root) / (cfg.annotations or "GroundTruth") / video.name
        objects = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        return [_by_stem(objects or [folder], Path(f).stem) for f in video.frames]

    def truth(self, cfg: DatasetConfig, video: VideoRecord) -> tuple[np.ndarray, np.ndarray | None]:
        folder = resolve(cfg.root) / (cfg.annotations or "GroundTruth") / video.name
        objects = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else [folder]
        shape = _frame_shape(video)
        ids = np.zeros((len(video.frames), *shape), np.int64)
        for obj in objects or [folder]:
            paths = [_by_stem([obj], Path(f).stem) for f in video.frames]
            ids |= _binary_masks(paths, shape, cfg.kind)[0]
        return ids, None


def _by_stem(folders: list[Path], stem: str) -> Path:
    """The image file named ``stem`` in the first folder that has one (the missing path of the first
    folder otherwise, for the error message)."""
    for folder in folders:
        for path in sorted(folder.glob(f"{stem}.*")):
            if is_image_name(path.name):
                return path
    return folders[0] / f"{stem}.png"


@DATASET_KINDS.register("fbms59")
class FBMS59(ForegroundKind):
    """FBMS-59: <split>/<video>/ frames (``dataset.split``: Trainingset or Testset) with sparse ground truth
    in <split>/<video>/GroundTruth/<frame stem>_gt.<pgm|png> (every 20th frame or so; grey levels per
    object, 0 background, all objects merged). Frames without a mask are not evaluated."""

    requires = ("split",)

    def videos(self, cfg: DatasetConfig, root: Path) -> list[VideoRecord]:
        return _folder_videos(cfg, root, root / cfg.split, None)

    def mask_paths(self, cfg: DatasetConfig, video: VideoRecord) -> list[Path | None]:
        folder = resolve(cfg.root) / cfg.split / video.name / (cfg.annotations or "GroundTruth")
        found = {}
        for path in folder.glob("*_gt.*") if folder.is_dir() else []:
            found[path.name.rsplit("_gt.", 1)[0]] = path
        return [found.get(Path(f).stem) for f in video.frames]
