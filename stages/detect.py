"""A trained detector as a self-contained directory, and the inference stage that runs it over images.

A detector directory holds ``model_final.pth`` (weights), ``config.yaml`` (the full detectron2 config)
and ``metadata.json`` (which data, method, round and commit made it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image

from stages.common.export import mask_annotation
from stages.common.io import BadImage, as_rgb, load_rgb
from stages.data.datasets import ImageRecord
from stages.detection.train import FINAL_WEIGHTS as WEIGHTS
from stages.features.backbone import resolve_device

CONFIG = "config.yaml"
METADATA = "metadata.json"


class NotADetector(FileNotFoundError):
    """A path given as a detector directory that is not one (missing, a file, or a directory without
    ``model_final.pth`` and ``config.yaml``); the message says which, and names the rounds of a self-training
    run directory."""


@dataclass
class Detections:
    boxes: np.ndarray  # (N, 4) float [x0, y0, x1, y1], best score first
    masks: np.ndarray  # (N, H, W) bool
    scores: np.ndarray  # (N,)


class Detector:
    """Callable detector: ``det(image) -> Detections`` on an HxWx3 uint8 RGB array, a PIL image or an image
    file (read with the project's decoder, ``load_rgb``, as training and evaluation read it): ``as_rgb``.
    BadImage for an array of another shape or dtype, an unreadable file, or anything else (one image per
    call)."""

    def __init__(self, cfg, max_detections: int | None = None):
        from detectron2.engine import DefaultPredictor

        # Registers the ROI heads and the ViTDet backbone a config may name, in any process.
        import stages.detection.droploss  # noqa: F401
        import stages.detection.vitdet  # noqa: F401

        cfg = cfg.clone()
        cfg.defrost()
        if max_detections is not None:
            cfg.TEST.DETECTIONS_PER_IMAGE = max_detections
        self.cfg = cfg
        self.predictor = DefaultPredictor(cfg)

    def __call__(self, image: np.ndarray | str | Path | PIL.Image.Image) -> Detections:
        rgb = as_rgb(image)
        # DefaultPredictor takes BGR and converts to the model's INPUT.FORMAT (RGB) itself
        inst = self.predictor(np.ascontiguousarray(rgb[:, :, ::-1]))["instances"].to("cpu")
        order = inst.scores.argsort(descending=True)
        inst = inst[order]
        masks = (
            inst.pred_masks.numpy() if inst.has("pred_masks") else np.zeros((len(inst), *rgb.shape[:2]), bool)
        )
        return Detections(inst.pred_boxes.tensor.numpy(), masks.astype(bool), inst.scores.numpy())


def detector_cfg(model_dir: Path, device: str = "auto"):
    """The detectron2 config stored in a detector directory, pointed at its weights and the device."""
    from stages.detection.detectron_config import cutler_cfg

    model_dir = Path(model_dir)
    check_detector_dir(model_dir)
    cfg = cutler_cfg()
    cfg.merge_from_file(str(model_dir / CONFIG))
    cfg.MODEL.WEIGHTS = str(model_dir / WEIGHTS)
    cfg.MODEL.DEVICE = resolve_device(device).type
    return cfg


def check_detector_dir(model_dir: Path) -> None:
    """Raise NotADetector unless ``model_dir`` holds a detector (``model_final.pth`` and ``config.yaml``)."""
    if not model_dir.exists():
        raise NotADetector(f"{model_dir}: no such detector directory")
    if not model_dir.is_dir():
        raise NotADetector(f"{model_dir} is a file, not a detector directory (one holding {WEIGHTS})")
    missing = [name for name in (WEIGHTS, CONFIG) if not (model_dir / name).is_file()]
    if not missing:
        return
    rounds = sorted(
        (p.name for p in model_dir.glob("round*") if (p / WEIGHTS).is_file()), key=lambda n: (len(n), n)
    )
    if (model_dir / "labels.json").is_file() and WEIGHTS in missing:
        hint = "; it is a self-training round whose training has not finished (run make selftrain again)"
    elif rounds:
        hint = f"; it holds the rounds {', '.join(rounds)}: give one of them, e.g. {model_dir / rounds[-1]}"
    elif any(model_dir.glob("round*/labels.json")):
        hint = "; it is a self-training run none of whose rounds has finished training"
    else:
        hint = ""
    raise NotADetector(f"{model_dir} is not a detector directory: no {' or '.join(missing)}{hint}")


def load_detector(model_dir: str | Path, device: str = "auto", max_detections: int | None = None) -> Detector:
    """Load a detector directory produced by self-training: ``det = load_detector(path); det(rgb)`` (or
    ``det("photo.jpg")``). Raises BadImage for a file that cannot be decoded."""
    return Detector(detector_cfg(Path(model_dir), device), max_detections)


def run_shard(detector: Detector, records: list[ImageRecord]) -> dict:
    """Detect objects in one shard of images: returns the shard's data ({"images", "annotations",
    "failures"}, JSON-ready; scored COCO annotations, each with the detector's own box as ``det_bbox``).
    Unreadable images are recorded, not raised. Writes nothing."""
    images, annotations, failures = [], [], []
    for rec in records:
        try:
            rgb = load_rgb(Path(rec.path))
        except BadImage as e:
            failures.append({"id": rec.id, "file_name": rec.file_name, "reason": str(e)})
            continue
        height, width = rgb.shape[:2]
        images.append({"id": rec.id, "file_name": rec.file_name, "width": width, "height": height})
        det = detector(rgb)
        for box, mask, score in zip(det.boxes, det.masks, det.scores, strict=True):
            if mask.any():
                x0, y0, x1, y1 = (float(v) for v in box)
                # bbox stays the mask's (these become training labels); the regressed box is kept for box AP
                annotations.append(
                    {**mask_annotation(mask, rec.id, score), "det_bbox": [x0, y0, x1 - x0, y1 - y0]}
                )
    return {"images": images, "annotations": annotations, "failures": failures}
