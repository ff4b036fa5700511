"""What a dataset kind is: a class registered by name in ``DATASET_KINDS``, chosen by ``dataset.kind``.

A kind lists its items (images; video kinds also their videos), checks its own files when it lists them,
and reads its ground truth for evaluation. Image kinds live in ``stages/data/datasets.py``, video kinds in
``stages/data/videos.py``; adding a kind is one registered class there and one ``configs/datasets`` file.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import ClassVar, Literal

from stages.common.registry import Registry
from stages.common.schema import fail, section


@dataclass(frozen=True)
class ImageRecord:
    id: int
    file_name: str  # relative to the dataset's image root
    path: str  # absolute


@dataclass(frozen=True)
class Listing:
    records: list[ImageRecord]
    # Entries of an image folder that are not taken: {"file_name", "reason"} (failures.jsonl rows).
    skipped: list[dict]


@section
class DatasetConfig:
    name: str
    kind: str  # a registered dataset kind (DATASET_KINDS): imagefolder, coco, voc, coco20k, framefolders, ...
    root: str | None  # image (or video) root; relative paths are relative to the repository
    # COCO instances json (coco, coco20k); YouTube-VIS json (ytvis); DAVIS: the ground-truth folder under
    # the root (davis17: Annotations_unsupervised/480p); relative json paths are taken from the repository
    annotations: str | None
    # VOC: ImageSets/Main/<split>.txt; COCO20k: the file list; DAVIS: ImageSets/2017/<split> (davis2016:
    # ImageSets/2016/<split>.txt); FBMS-59: the set's folder (Trainingset, Testset)
    split: str | None
    # Which images of the ground truth AP scores (configs/defaults.yaml): all, or annotated ones only.
    evaluate_on: Literal["all", "annotated"]

    def validate(self, key: str) -> None:
        kinds = load_kinds()
        if self.kind not in kinds:
            fail(f"{key}.kind", f"unknown dataset kind '{self.kind}' (known: {', '.join(kinds.names())})")
        if not self.root:
            fail(f"{key}.root", f"dataset '{self.name}' needs its image root (make ... DATA=/path)")
        kind = kinds.get(self.kind)
        if "annotations" in kind.requires and not self.annotations:
            fail(f"{key}.annotations", f"a {self.kind} dataset needs its instances json")
        if "split" in kind.requires and not self.split:
            fail(f"{key}.split", f"a {self.kind} dataset needs its image list")


class DatasetKind:
    """Base of the registered dataset kinds (the classes are registered; kinds hold no state)."""

    modality: ClassVar[str] = "image"  # "image", or "video" for kinds whose items are videos
    requires: ClassVar[tuple[str, ...]] = ()  # config keys the kind cannot do without: annotations, split

    def listing(self, cfg: DatasetConfig) -> Listing:
        """The dataset's images in a stable order (a video kind: every frame of every video), checked."""
        raise NotImplementedError

    def ground_truth(self, cfg: DatasetConfig) -> dict | None:
        """Checked, complete COCO instances of the images (``complete_ground_truth``); None without any."""
        raise NotImplementedError


DATASET_KINDS: Registry[type[DatasetKind]] = Registry("dataset kind")


def load_kinds() -> Registry[type[DatasetKind]]:
    """``DATASET_KINDS`` with every kind registered (the modules defining kinds imported once)."""
    for module in ("stages.data.datasets", "stages.data.videos"):
        importlib.import_module(module)
    return DATASET_KINDS


def dataset_kind(cfg: DatasetConfig) -> DatasetKind:
    """The kind of ``cfg.kind``, ready to list items and read ground truth."""
    return load_kinds().get(cfg.kind)()


# The data folders this project assembles itself, by the make target that builds each.
_ASSEMBLED = {"demo": "make demo-data", "demo-video": "make demo-data", "photos": "make photos-data"}


def missing_root_hint(root: str) -> str:
    """What to do about a dataset root that does not exist: the make target when it is the place where
    this project assembles one of its own sets (data/demo/...), else to give the path."""
    parts = root.replace("\\", "/").split("/")
    if len(parts) >= 2 and parts[0] == "data" and parts[1] in _ASSEMBLED:
        return f" (run `{_ASSEMBLED[parts[1]]}`)"
    return " (give its path: DATA=/path or dataset.root=...)"


def video_kinds() -> list[str]:
    return [name for name, kind in load_kinds() if kind.modality == "video"]
