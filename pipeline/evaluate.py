"""Evaluation entry points that read a finished run and the dataset's ground truth."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from pipeline.config import Config
from pipeline.detect import detections_for_ap, predict
from pipeline.pseudolabels import OUTPUT, TRACKS
from pipeline.resolve import resolve
from pipeline.runs import RunDir, RunError
from stages.common import rle
from stages.common.io import atomic_write_json, read_json
from stages.data.datasets import coco_boxes, ground_truth_coco, list_images
from stages.data.videos import check_video_ground_truth, evaluation_protocol, list_videos, video_truth
from stages.detect import check_detector_dir
from stages.evaluation.coco_ap import evaluate_ap
from stages.evaluation.corloc import corloc
from stages.evaluation.video_metrics import (
    davis_jf,
    davis_proposals,
    fg_ari,
    foreground_jf,
    miou_hungarian,
    with_background_proposal,
)


def first_boxes(pseudolabels: dict) -> dict[str, np.ndarray | None]:
    """file_name -> the first discovered box [x0, y0, x1, y1] (MaskCut: its first mask's), None if none."""
    out = {}
    for image in pseudolabels["images"]:
        boxes = image.get("discovery_boxes") or []
        x, y, w, h = boxes[0] if boxes else (0, 0, 0, 0)
        out[image["file_name"]] = np.array([x, y, x + w, y + h]) if boxes else None
    return out


def pseudolabel_run(cfg: Config, run_dir: Path | None) -> Path:
    """The pseudo-label run directory to evaluate: ``run_dir`` when given (``--run``/``RUN=``), else the
    one ``cfg`` shapes."""
    return Path(run_dir) if run_dir is not None else RunDir.for_config(resolve(cfg), "pseudolabels").path


def eval_corloc(cfg: Config, run_dir: Path | None = None) -> dict:
    """CorLoc of a pseudo-label run against its dataset's ground truth; saved as corloc.json in the run.
    The run is ``run_dir`` (its saved config is then ``cfg``, see ``load_run_config``) or the one of
    ``cfg``'s settings."""
    cfg = resolve(cfg)
    gt = ground_truth_coco(cfg.dataset)  # first: a malformed file is named before the run is looked for
    if gt is None:
        raise RunError(f"dataset '{cfg.dataset.name}' ({cfg.dataset.kind}) has no ground truth")
    run_path = pseudolabel_run(cfg, run_dir)
    path = run_path / OUTPUT
    if not path.exists():
        if any(run_path.glob("round*/summary.json")):
            raise RunError(
                f"{run_path} is a self-training run: evaluate one of its rounds with make eval "
                f"MODEL={run_path}/round<r> (eval-corloc takes a pseudo-label run)"
            )
        raise RunError(
            f"no pseudo-labels at {path}: run `make pseudolabels` with the same settings first, or give "
            "the run directory (RUN=runs/pseudolabels/...)"
        )
    labels = read_json(path)
    warn_size_mismatches(gt["images"], labels["images"], cfg.dataset.annotations)
    result = corloc(first_boxes(labels), coco_boxes(gt))
    result = {"dataset": cfg.dataset.name, "method": cfg.method.name, "backbone": cfg.backbone.arch, **result}
    atomic_write_json(run_path / "corloc.json", result)
    absent = result["absent"]
    note = (
        f"; {absent} of them not labelled by the run, counted as {'a miss' if absent == 1 else 'misses'}: "
        f"{_names(absent_files(labels, gt))} (unreadable: see {run_path / 'failures.jsonl'}; or not in the "
        "run's image list: the annotation file changed since)"
        if absent
        else ""
    )
    print(
        f"CorLoc {cfg.method.name} ({cfg.backbone.arch}) on {cfg.dataset.name}: "
        f"{100 * result['corloc']:.1f}% ({result['hits']}/{result['images']} images{note})",
        file=sys.stderr,
    )
    return result


def absent_files(labels: dict, gt: dict) -> list[str]:
    """Files of annotated ground-truth images that ``labels`` (a run's output) has no entry for."""
    have = {im["file_name"] for im in labels["images"]}
    annotated = {a["image_id"] for a in gt.get("annotations", [])}
    return [im["file_name"] for im in gt["images"] if im["id"] in annotated and im["file_name"] not in have]


def _names(items: list[str], limit: int = 3, sep: str = ", ") -> str:
    return sep.join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def warn_size_mismatches(declared: list[dict], read: list[dict], source: str | None) -> None:
    """One warning line when the ground truth's width/height of an image differ from its file's, as the
    run read it (``read``: images with file_name, width, height): boxes are then compared in two pixel
    grids. Images without a declared size, or not read, are not compared."""
    sizes = {im["file_name"]: (im["width"], im["height"]) for im in read}
    wrong = [
        f"{im['file_name']} {im['width']}x{im['height']}, file {sizes[im['file_name']][0]}x"
        f"{sizes[im['file_name']][1]}"
        for im in declared
        if "width" in im and "height" in im and im["file_name"] in sizes
        and (im["width"], im["height"]) != sizes[im["file_name"]]
    ]  # fmt: skip
    if wrong:
        print(
            f"warning: {len(wrong)} image(s) of the ground truth ({source or 'the dataset'}) declare a "
            f"width x height other than their file's: {_names(wrong, sep='; ')}. Boxes are scored in "
            "the files' pixels: check the annotation file.",
            file=sys.stderr,
        )


def top1_boxes(predictions: dict) -> dict[str, np.ndarray | None]:
    """file_name -> the detector's highest-scoring box [x0, y0, x1, y1] (None without detections)."""
    names = {im["id"]: im["file_name"] for im in predictions["images"]}
    best: dict[int, dict] = {}
    for a in predictions["annotations"]:
        if a["image_id"] not in best or a["score"] > best[a["image_id"]]["score"]:
            best[a["image_id"]] = a
    out = {name: None for name in names.values()}
    for image_id, a in best.items():
        x, y, w, h = a["det_bbox"]
        out[names[image_id]] = np.array([x, y, x + w, y + h])
    return out


def evaluate_detector(model_dir: Path, cfg: Config, gt: dict | None = None) -> dict:
    """Class-agnostic box and mask AP/AR (100 detections) and top-1-box CorLoc of a detector directory on
    ``cfg.dataset`` (``gt``: its ground_truth_coco, when the caller has it already); predictions
    (resumable) and metrics are kept under model_dir/eval/<dataset>/. Raises NotADetector (before any
    work) when ``model_dir`` holds no detector."""
    check_detector_dir(Path(model_dir))
    gt = gt if gt is not None else ground_truth_coco(cfg.dataset)
    if gt is None or not gt.get("annotations"):
        raise RunError(f"dataset '{cfg.dataset.name}' has no ground truth to evaluate against")
    metrics = {**detector_metrics(model_dir, cfg, gt), "evaluate_on": cfg.dataset.evaluate_on}
    atomic_write_json(Path(model_dir) / "eval" / cfg.dataset.name / "metrics.json", metrics)
    return metrics


def detector_metrics(model_dir: Path, cfg: Config, gt: dict) -> dict:
    """``evaluate_detector``'s metrics on the images of ``gt`` (all the dataset's, or the annotated ones:
    dataset.evaluate_on), without writing metrics.json: {"ap", "corloc", "images_scored", "images"}. The
    detector runs on those images only; its predictions are read from (or made into) the shards of
    ``predictions_dir``."""
    scored = {im["id"] for im in gt["images"]}
    records = list_images(cfg.dataset)
    subset = [r for r in records if r.id in scored]
    preds = predict(Path(model_dir), subset, predictions_dir(Path(model_dir), cfg, subset), 100, cfg)
    warn_size_mismatches(gt["images"], preds["images"], cfg.dataset.annotations)
    if preds["failures"]:
        failed = [f"{f['file_name']} ({f['reason']})" for f in preds["failures"]]
        print(
            f"warning: the detector could not read {len(failed)} of the {len(subset)} scored images, scored "
            f"as images without detections: {_names(failed)}",
            file=sys.stderr,
        )
    metrics = {
        "ap": evaluate_ap(gt, detections_for_ap(preds), max_dets=100),
        "corloc": corloc(top1_boxes(preds), coco_boxes(gt)),
        "images_scored": len(subset),
        "images": len(records),
        "unreadable": [f["file_name"] for f in preds["failures"]],
    }
    boxes_only = sum("segmentation" not in a for a in gt["annotations"])
    if "segm" not in metrics["ap"] and boxes_only:
        metrics["no_mask_ap"] = (
            f"{boxes_only} of the {len(gt['annotations'])} ground-truth objects are boxes without masks"
        )
    return metrics


def predictions_dir(model_dir: Path, cfg: Config, records: list) -> Path:
    """Where a detector's predictions on ``records`` are kept: model_dir/eval/<dataset>/predictions-<key>,
    the key a digest of the images (id and file) and the shard size. Shards are found by index, so a
    ground truth that scores other images, or a changed image list, must not find another set's shards."""
    listing = json.dumps([cfg.run.shard_size, [[r.id, r.file_name] for r in records]])
    key = hashlib.sha256(listing.encode()).hexdigest()[:10]
    return model_dir / "eval" / cfg.dataset.name / f"predictions-{key}"


def format_detector_metrics(metrics: dict) -> str:
    lines = []
    if "images_scored" in metrics:
        rule = f" (dataset.evaluate_on={metrics['evaluate_on']})" if "evaluate_on" in metrics else ""
        lines.append(f"AP on {metrics['images_scored']} of the dataset's {metrics['images']} images{rule}")
    lines.append("        AP    AP50  AP75  AR100")
    for kind, m in metrics["ap"].items():
        lines.append(f"{kind:6s}" + "".join(f"{100 * m[k]:6.1f}" for k in ("AP", "AP50", "AP75", "AR100")))
    if "no_mask_ap" in metrics:
        lines.append(f"segm  not scored: {metrics['no_mask_ap']}")
    c = metrics["corloc"]
    lines.append(f"CorLoc (top-1 box) {100 * c['corloc']:.1f}% ({c['hits']}/{c['images']})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Videos


def predicted_ids(tracks: dict, video_id: int, shape: tuple[int, int, int]) -> np.ndarray:
    """(T, H, W) predicted track ids of one video from ytvis.json (later tracks win on overlap)."""
    ids = np.zeros(shape, np.int64)
    for k, track in enumerate((a for a in tracks["annotations"] if a["video_id"] == video_id), start=1):
        for t, seg in enumerate(track["segmentations"]):
            if seg is not None:
                ids[t][rle.decode(seg)] = k
    return ids


def evaluate_video(cfg: Config, run_dir: Path | None = None) -> dict:
    """DAVIS J&F (sequence-level matching), FG-ARI and Hungarian mIoU of a video run (BA, SOLV) against
    ground truth.

    Proposals, as the BA code evaluates them: every cluster, the background one too (the complement of the
    tracks; pseudo-labels leave it out). J&F follows davis2017-evaluation's unsupervised protocol: at most
    20 proposals per sequence (the 20 largest are kept) and void pixels left out of J and F (and of mIoU).
    FG-ARI is unchanged by the background proposal (predicted background already is one cluster there).
    The run is ``run_dir`` when given, else the one of ``cfg``'s settings.
    """
    cfg = resolve(cfg)
    run_path = pseudolabel_run(cfg, run_dir)
    if not (run_path / TRACKS).exists():
        raise RunError(
            f"no {cfg.method.name} tracks at {run_path}: run `make pseudolabels "
            f"METHOD={cfg.method.name}` with the same settings, or give its run directory (RUN=)"
        )
    tracks = read_json(run_path / TRACKS)
    videos = list_videos(cfg.dataset)
    check_video_ground_truth(cfg.dataset, videos)  # every video's, before any is scored
    if evaluation_protocol(cfg.dataset) == "foreground":
        return _evaluate_foreground(cfg, run_path, tracks, videos)
    per_video, js, fs, ious = {}, [], [], []
    for video in videos:
        gt, void = video_truth(cfg.dataset, video)
        pred = predicted_ids(tracks, video.id, gt.shape)
        jf = davis_jf(gt, davis_proposals(pred, background=True), void)
        miou = miou_hungarian(gt, with_background_proposal(pred), void)
        js += [o["J"] for o in jf["per_object"].values()]
        fs += [o["F"] for o in jf["per_object"].values()]
        ious += list(miou["per_object"].values())
        per_video[video.name] = {
            "J&F": jf["JF"],
            "J": jf["J"],
            "F": jf["F"],
            "FG-ARI": fg_ari(gt, pred),
            "mIoU": miou["mean"],
        }
    j, f = float(np.mean(js)), float(np.mean(fs))
    result = {
        "J&F": (j + f) / 2,
        "J": j,
        "F": f,
        "FG-ARI": float(np.nanmean([v["FG-ARI"] for v in per_video.values()])),
        "mIoU": float(np.mean(ious)),
        "videos": per_video,
    }
    atomic_write_json(run_path / "metrics.json", result)
    print(
        f"{cfg.method.name} on {cfg.dataset.name}: J&F {100 * result['J&F']:.1f} "
        f"(J {100 * j:.1f}, F {100 * f:.1f}), "
        f"FG-ARI {100 * result['FG-ARI']:.1f}, mIoU {100 * result['mIoU']:.1f}",
        file=sys.stderr,
    )
    return result


def _evaluate_foreground(cfg: Config, run_path: Path, tracks: dict, videos: list) -> dict:
    """The DAVIS-2016 protocol (single-object datasets): every track merged into one predicted foreground,
    J and F per frame against the merged ground truth, averaged over each sequence's annotated frames, then
    over sequences (``video_metrics.foreground_jf``)."""
    per_video = {}
    for video in videos:
        gt, void = video_truth(cfg.dataset, video)
        pred = predicted_ids(tracks, video.id, gt.shape)
        per_video[video.name] = foreground_jf(gt, pred, void)
    j = float(np.mean([v["J"] for v in per_video.values()]))
    f = float(np.mean([v["F"] for v in per_video.values()]))
    result = {"protocol": "DAVIS-2016", "J&F": (j + f) / 2, "J": j, "F": f, "videos": per_video}
    atomic_write_json(run_path / "metrics.json", result)
    print(
        f"{cfg.method.name} on {cfg.dataset.name} (DAVIS-2016 protocol, {len(videos)} sequences): "
        f"J&F {100 * result['J&F']:.1f} (J {100 * j:.1f}, F {100 * f:.1f})",
        file=sys.stderr,
    )
    return result
