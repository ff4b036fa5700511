"""Does training on MaskCut's pseudo-labels, then self-training, improve on MaskCut on real photos? And does a
DINOv2-initialised ViTDet do better there than the random-init R50 (the only other detector available)?

``python -m tools.bench vitdet`` (part of ``make bench``; 20 CPU-minutes per training round), or
``python -m tools.bench_vitdet --minutes 2`` for a short run. On the photos set (``make photos-data``;
83 real photos, ground truth on 11):

1. MaskCut pseudo-labels of every photo (DINOv2 ViT-S/14; reused from ``runs/pseudolabels/`` when done),
   and their own CorLoc (the first mask's box, as ``make eval-corloc``).
2. For each detector, the random-init Cascade Mask R-CNN R50-FPN and the ViTDet Cascade Mask R-CNN from
   DINOv2 ViT-S/14: round 0 on the pseudo-labels and one self-training round, each for the same CPU time
   (the iteration count is set from a calibration of that detector's iteration cost), with the demo's
   CPU schedule (``cpu-tiny``: 160-224 px short side, batch 2) and everything else as ``make selftrain``.
3. Class-agnostic box AP50 (pycocotools) and CorLoc (top-1 box) of every round on the images with ground
   truth (the unannotated photos are unlabeled, not negatives: left out of AP).

CPU time is the training process's (all its threads): on a shared machine it moves much less than wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from pipeline.config import Config, load_config, replace
from stages.common.io import atomic_write_json, read_json
from stages.common.paths import REPO_ROOT

REPO = REPO_ROOT
MINUTES = 20.0  # CPU minutes per training round (make bench)
DETECTORS = (
    ("R50-FPN, random init", "cascade_mask_rcnn_R_50_FPN"),
    ("ViTDet-S, DINOv2 init", "cascade_mask_rcnn_vitdet_s14"),
)
SHORT_NAMES = {"r50": DETECTORS[0][1], "vitdet": DETECTORS[1][1]}  # --detectors
CALIBRATION_STEPS = 4  # iterations timed after one warm-up


def section() -> list[str]:
    """The ``vitdet`` section of ``python -m tools.bench`` (full budget, fresh training runs)."""
    return run(MINUTES)


# ----------------------------------------------------------------------------------------------------------
# Timing training


class _Clock:
    """CPU and wall seconds of every detectron2 training run started while it is installed."""

    def __init__(self):
        self.runs: list[dict[str, float]] = []

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        from detectron2.engine import HookBase

        from stages.detection import train

        build, clock = train.build_trainer, self

        class Timer(HookBase):
            def before_train(self):
                self.start = (time.process_time(), time.perf_counter())
                self.steps: list[float] = []

            def after_step(self):
                self.steps.append(time.process_time())

            def after_train(self):
                cpu, wall = time.process_time() - self.start[0], time.perf_counter() - self.start[1]
                clock.runs.append({"cpu_s": cpu, "wall_s": wall, "steps": self.steps})

        def timed_trainer(d2cfg):
            trainer = build(d2cfg)
            trainer.register_hooks([Timer()])
            return trainer

        train.build_trainer = timed_trainer
        try:
            yield
        finally:
            train.build_trainer = build


def calibrate(cfg: Config, labels: Path, work: Path) -> float:
    """CPU seconds per round-0 training iteration of ``cfg``'s detector on ``labels``: the median of
    ``CALIBRATION_STEPS`` iterations after a warm-up one, in a throw-away run in ``work``."""
    import statistics

    from pipeline import selftrain
    from stages.data.datasets import resolve
    from stages.detection import train
    from stages.features.backbone import resolve_device

    shutil.rmtree(work, ignore_errors=True)  # a calibration left by a stopped bench would not train again
    work.mkdir(parents=True)
    d2 = train.detectron_cfg(
        cfg.train, 0, work, selftrain.initial_weights(cfg, work), resolve_device(cfg.backbone.device).type
    )
    d2.merge_from_list(["SOLVER.MAX_ITER", CALIBRATION_STEPS + 1, "SOLVER.CHECKPOINT_PERIOD", 1000])
    d2.DATASETS.TRAIN, d2.DATASETS.TEST = ("bench-vitdet-calibration",), ()
    train.register_labels("bench-vitdet-calibration", labels, str(resolve(cfg.dataset.root)))
    clock = _Clock()
    with clock.installed():
        train.train(d2)
    steps = clock.runs[-1]["steps"]
    return statistics.median(b - a for a, b in zip(steps[:-1], steps[1:], strict=True))


def schedule(iterations: int) -> list:
    """detectron2 overrides for a round of ``iterations``: CutLER's round-0 shape (lr step at half, warm-up
    a twentieth), the only checkpoint at the end."""
    return [
        "SOLVER.MAX_ITER", iterations, "SOLVER.STEPS", [max(1, iterations // 2)],
        "SOLVER.WARMUP_ITERS", max(1, iterations // 20), "SOLVER.CHECKPOINT_PERIOD", iterations + 1,
    ]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Metrics on the annotated images


def metrics(round_dir: Path, cfg: Config, gt: dict) -> dict:
    """Box AP50 and top-1 CorLoc of a round's detector on the images of ``gt`` (those with annotations),
    from the predictions the round's own evaluation kept (computed here when missing). Box AP only: part
    of the ground truth is boxes without masks (``evaluate_ap`` then scores boxes alone)."""
    from pipeline.evaluate import detector_metrics

    result = detector_metrics(round_dir, cfg, gt)
    return {"ap50": result["ap"]["bbox"]["AP50"], "corloc": result["corloc"]}


def annotated_ground_truth(cfg: Config) -> dict:
    """The ground truth of the images that have annotations, whatever the run's dataset.evaluate_on (runs
    saved before the key score all images)."""
    from stages.data.datasets import ground_truth_coco

    return ground_truth_coco(replace(cfg, **{"dataset.evaluate_on": "annotated"}).dataset)


# ----------------------------------------------------------------------------------------------------------
# The benchmark


def run(minutes: float, out: Path | None = None, models: tuple[str, ...] | None = None) -> list[str]:
    """Train and evaluate the detectors (``models``: their ``train.model`` names, default both); returns the
    report lines. ``out``: keep the training runs there (and resume them), else they go to a temporary
    directory removed at the end."""
    from pipeline import pseudolabels, selftrain
    from pipeline.evaluate import eval_corloc
    from pipeline.runs import RunError, resolve_backbone
    from tools import photos_data

    photos_data.make_photos(REPO / "data")
    base = resolve_backbone(load_config("photos", "maskcut", preset="cpu-tiny"))
    labels = pseudolabels.run(base)  # in runs/pseudolabels/, shared with `make pseudolabels DATASET=photos`
    pl_corloc = eval_corloc(base)
    gt = annotated_ground_truth(base)
    n_labels = len(read_json(labels)["annotations"])
    budget = 60 * minutes
    rows = []
    with _workspace(out) as work:
        calibration = read_json(work / "calibration.json") if (work / "calibration.json").exists() else {}
        for label, model in DETECTORS:
            if models is not None and model not in models:
                continue
            cfg = replace(base, **{"train.model": model, "run.out_dir": str(work)})
            try:
                cfg = selftrain.resolve_detector(cfg)[0]
            except RunError as e:
                rows.append((label, None, str(e)))
                continue
            if model not in calibration:
                calibration[model] = calibrate(cfg, labels, work / "calibration" / model)
                atomic_write_json(work / "calibration.json", calibration)
            rows += _train_and_measure(cfg, label, calibration[model], budget, gt)
    return _report(base, gt, n_labels, pl_corloc, budget, rows)


@contextlib.contextmanager
def _workspace(out: Path | None) -> Iterator[Path]:
    """The training runs' out_dir, whose ``pseudolabels`` is the shared runs/pseudolabels."""
    runs = REPO / "runs"
    (runs / "pseudolabels").mkdir(parents=True, exist_ok=True)
    work = Path(out) if out else Path(tempfile.mkdtemp(dir=runs, prefix="bench-vitdet-"))
    work.mkdir(parents=True, exist_ok=True)
    link = work / "pseudolabels"
    if not link.exists():
        link.symlink_to((runs / "pseudolabels").resolve(), target_is_directory=True)
    try:
        yield work
    finally:
        if not out:
            shutil.rmtree(work, ignore_errors=True)


def _train_and_measure(cfg: Config, label: str, s_per_it: float, budget: float, gt: dict) -> list[tuple]:
    from pipeline import selftrain

    # One schedule for both rounds (train.opts shapes the run's hash): the rounds cost the same per iteration.
    iterations = max(1, math.floor(budget / s_per_it))
    cfg = replace(cfg, **{"train.opts": [*cfg.train.opts, *schedule(iterations)]})
    rows = []
    for r in (0, 1):
        clock = _Clock()
        with clock.installed():
            last = selftrain.run(replace(cfg, **{"train.rounds": r + 1}))
        result = {
            "iterations": iterations,
            "spent": clock.runs[-1] if clock.runs else None,  # None: trained before (--out)
            **read_json(last / selftrain.SUMMARY),
            **metrics(last, cfg, gt),
        }
        rows.append((f"{label}, round {r}", result, None))
    return rows


def _report(base: Config, gt: dict, n_labels: int, pl_corloc: dict, budget: float, rows: list) -> list[str]:
    n_images = len(read_json(REPO / "data" / "photos" / "annotations.json")["images"])
    lines = [
        f"photos: {n_images} images, {len(gt['images'])} with ground truth ({len(gt['annotations'])} "
        f"objects); MaskCut pseudo-labels ({base.backbone.arch}); {budget / 60:.1f} CPU-min per training "
        "round; AP50 (box) and CorLoc on the annotated images",
        f"{'':34s} {'iters':>6s} {'CPU min':>8s} {'wall min':>9s} {'labels':>7s} {'AP50':>6s}  CorLoc",
        f"{'MaskCut pseudo-labels (first box)':34s} {'':24s} {n_labels:>7d} {'':>6s}  {_corloc(pl_corloc)}",
    ]
    results = {}
    for name, m, error in rows:
        if error:
            lines.append(f"{name:34s} not run: {error}")
            continue
        results[name] = m
        spent = m["spent"]
        times = (
            f"{spent['cpu_s'] / 60:8.1f} {spent['wall_s'] / 60:9.1f}" if spent else f"{'(earlier run)':>18s}"
        )
        lines.append(
            f"{name:34s} {m['iterations']:6d} {times} {m['labels_in']:7d} {100 * m['ap50']:6.1f}  "
            f"{_corloc(m['corloc'])}"
        )
        if "predictions_kept" in m:
            lines.append(
                f"{'':34s} its labels: {m['predictions_kept']} predictions >= {m['threshold']} and "
                f"{m['previous_kept']} pseudo-masks they do not cover"
            )
    r0, r1 = (results.get(f"{DETECTORS[1][0]}, round {r}") for r in (0, 1))
    if r0 and r1:
        beats = r0["corloc"]["corloc"] >= pl_corloc["corloc"]
        holds = r1["corloc"]["corloc"] >= r0["corloc"]["corloc"] and r1["ap50"] >= r0["ap50"]
        lines.append(
            f"goal: ViTDet round 0 CorLoc >= the pseudo-labels': {_yes(beats)}; "
            f"self-training round no worse than round 0 (CorLoc and AP50): {_yes(holds)}"
        )
    return lines


def _corloc(c: dict) -> str:
    return f"{100 * c['corloc']:5.1f}% ({c['hits']}/{c['images']})"


def _yes(ok: bool) -> str:
    return "yes" if ok else "NO"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Train the random-init R50 and the DINOv2 ViTDet on MaskCut's labels of the photos set "
        "for the same CPU time, self-train one round, and print AP50 and CorLoc (README 'Self-training')."
    )
    parser.add_argument("--minutes", type=float, default=MINUTES, help="CPU minutes per training round")
    parser.add_argument("--out", type=Path, default=None, help="keep (and resume) the training runs here")
    parser.add_argument(
        "--detectors", nargs="+", choices=sorted(SHORT_NAMES), default=sorted(SHORT_NAMES),
        help="train only these (default: both, for the same CPU time each)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        sys.exit(f"error: --minutes must be > 0, got {args.minutes}")
    from tools.bench import machine

    print(f"machine: {machine()}", flush=True)
    start = time.perf_counter()
    lines = run(args.minutes, args.out, tuple(SHORT_NAMES[d] for d in args.detectors))
    print("== vitdet", *lines, f"[vitdet: {time.perf_counter() - start:.0f} s]", sep="\n", flush=True)


if __name__ == "__main__":
    main()
