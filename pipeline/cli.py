"""Command line: python -m pipeline <command> [--dataset D] [--method M] [key=value ...]."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.config import ConfigError, available, load_config

# User-facing failures: printed as one clear line, no traceback.
from pipeline.runs import RunError
from stages.backbone import WeightsError
from stages.datasets import DatasetError
from stages.export import CocoError
from stages.train import TrainingError

USER_ERRORS = (ConfigError, WeightsError, DatasetError, RunError, CocoError, TrainingError)


def _pseudolabels(cfg) -> None:
    from pipeline.pseudolabels import run

    print(run(cfg))


def _eval_corloc(cfg) -> None:
    from pipeline.evaluate import eval_corloc

    eval_corloc(cfg)


def _eval(cfg, model: str | None) -> None:
    from pipeline.evaluate import evaluate_detector, format_detector_metrics

    if model:
        print(format_detector_metrics(evaluate_detector(Path(model), cfg)))
    elif cfg.method.name == "ba":
        from pipeline.video import evaluate

        evaluate(cfg)
    else:
        raise RunError(
            "give the detector directory to evaluate (make eval MODEL=runs/selftrain/.../round2), use "
            "METHOD=ba for video metrics, or make eval-corloc for a pseudo-label run"
        )


def _train_correlator(cfg) -> None:
    from pipeline.video import train_correlator

    print(train_correlator(cfg))


def _selftrain(cfg) -> None:
    from pipeline.selftrain import run

    print(run(cfg))


COMMANDS = {
    "pseudolabels": (_pseudolabels, "discover objects and write a COCO pseudo-label file"),
    "eval-corloc": (_eval_corloc, "CorLoc of a pseudo-label run against the dataset's ground truth"),
    "selftrain": (_selftrain, "train a detector on the pseudo-labels, then self-train round after round"),
    "eval": (_eval, "detector AP/AR and CorLoc (--model), or video J&F, FG-ARI and mIoU (--method ba)"),
    "train-correlator": (_train_correlator, "train BA's temporal correlator on a video dataset"),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        s = sub.add_parser(name, help=help_text)
        s.add_argument("--dataset", default="demo", help=f"one of {available('datasets')}")
        s.add_argument("--method", default="maskcut", help=f"one of {available('methods')}")
        s.add_argument("--preset", default=None, help=f"one of {available('presets')}")
        if name == "eval":
            s.add_argument("--model", default=None, help="a detector directory (runs/selftrain/.../roundN)")
        s.add_argument(
            "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. run.workers=2"
        )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        cfg = load_config(args.dataset, args.method, args.overrides, args.preset)
        command = COMMANDS[args.command][0]
        command(cfg, args.model) if args.command == "eval" else command(cfg)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
