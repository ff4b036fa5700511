"""Command line: python -m pipeline [--debug] <command> [--dataset D] [--method M] [key=value ...]."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from pipeline.config import ConfigError, available, load_config, load_run_config

# User-facing failures: printed as one clear line, no traceback.
from pipeline.runs import RunError
from stages.common.export import CocoError
from stages.common.paths import REPO_ROOT
from stages.data.datasets import DatasetError
from stages.detect import NotADetector
from stages.detection.train import TrainingError
from stages.features.backbone import WeightsError

USER_ERRORS = (ConfigError, WeightsError, DatasetError, RunError, CocoError, TrainingError, NotADetector)


def _pseudolabels(cfg, args) -> None:
    from pipeline.pseudolabels import run

    print(run(cfg))


def _eval_corloc(cfg, args) -> None:
    from pipeline.evaluate import eval_corloc

    eval_corloc(cfg, args.run)


def _eval(cfg, args) -> None:
    from pipeline.evaluate import evaluate_detector, format_detector_metrics

    if args.model:
        print(format_detector_metrics(evaluate_detector(Path(args.model), cfg)))
    elif cfg.modality == "video":
        from pipeline.evaluate import evaluate_video

        evaluate_video(cfg, args.run)
    else:
        raise RunError(
            "give the detector directory to evaluate (make eval MODEL=runs/selftrain/.../round2), use a "
            "video method (METHOD=ba, METHOD=solv, METHOD=sslvos) for video metrics, or make eval-corloc for "
            "a pseudo-label run"
        )


def _train_correlator(cfg, args) -> None:
    from pipeline.train_correlator import train_correlator

    print(train_correlator(cfg))


def _train_solv(cfg, args) -> None:
    from pipeline.train_solv import train

    print(train(cfg))


def _train_found(cfg, args) -> None:
    from pipeline.train_found import train_found

    print(train_found(cfg))


def _selftrain(cfg, args) -> None:
    from pipeline.selftrain import run

    print(run(cfg))


def _config(cfg, args) -> None:
    import yaml

    from pipeline.resolve import resolve
    from pipeline.runs import RunDir

    cfg = resolve(cfg)
    print(f"# pseudo-label run: {args.run or RunDir.for_config(cfg, 'pseudolabels').path}")
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")


COMMANDS = {
    "config": (_config, "print the fully resolved configuration these options give, as a run saves it"),
    "pseudolabels": (_pseudolabels, "discover objects and write a COCO pseudo-label file"),
    "eval-corloc": (_eval_corloc, "CorLoc of a pseudo-label run against the dataset's ground truth"),
    "selftrain": (_selftrain, "train a detector on the pseudo-labels, then self-train round after round"),
    "eval": (
        _eval,
        "detector AP/AR and CorLoc (--model), or video J&F, FG-ARI and mIoU (--method ba, solv, sslvos)",
    ),
    "train-correlator": (_train_correlator, "train BA's temporal correlator on a video dataset"),
    "train-solv": (_train_solv, "train SOLV's model on a video dataset (--method solv)"),
    "train-found": (
        _train_found,
        "train FOUND's 1x1-convolution head on a dataset's images (--method found)",
    ),
}


DEBUG_HELP = "on any error, print the full traceback instead of one line"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    # Also accepted after the command; SUPPRESS keeps the subcommand from resetting a --debug given before.
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    sub = p.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        s = sub.add_parser(name, help=help_text, parents=[debug])
        s.add_argument("--dataset", default="demo", help=f"one of {available('datasets')}")
        s.add_argument("--method", default="maskcut", help=f"one of {available('methods')}")
        s.add_argument("--preset", default=None, help=f"one of {available('presets')}")
        if name == "eval":
            s.add_argument("--model", default=None, help="a detector directory (runs/selftrain/.../roundN)")
        if name in ("eval", "eval-corloc", "config"):
            s.add_argument(
                "--run",
                default=None,
                type=Path,
                help="a pseudo-label run directory (runs/pseudolabels/...): its saved config is used, "
                "--dataset, --method and --preset are ignored",
            )
        s.add_argument(
            "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. run.workers=2"
        )
    return p


def _ours(filename: str) -> bool:
    """A file of this project's own code (not an installed package, not this module)."""
    path = Path(filename)
    return path.is_relative_to(REPO_ROOT) and "site-packages" not in path.parts and path != Path(__file__)


def _where(frame: traceback.FrameSummary) -> str:
    """A traceback frame as 'file:line in function', the file relative to site-packages or the repository."""
    parts = Path(frame.filename).parts
    if "site-packages" in parts:
        name = "/".join(parts[len(parts) - parts[::-1].index("site-packages") :])
    elif Path(frame.filename).is_relative_to(REPO_ROOT):
        name = Path(frame.filename).relative_to(REPO_ROOT).as_posix()
    else:
        name = frame.filename
    return f"{name}:{frame.lineno} in {frame.name}"


def describe(error: BaseException) -> str:
    """One line for an unexpected exception: its type, its message, the file it names (OSError) or that our
    code noted on it (``add_note``), where it was raised, and the project code that called into it."""
    message = str(error).strip().splitlines()
    line = f"{type(error).__name__}: {message[0] if message else repr(error)}"
    filename = getattr(error, "filename", None)
    if filename and str(filename) not in line:
        line += f" (file {filename})"
    for note in getattr(error, "__notes__", ()):
        line += f" ({note})"
    frames = traceback.extract_tb(error.__traceback__)
    if frames:
        line += f", raised at {_where(frames[-1])}"
        ours = [f for f in frames[:-1] if _ours(f.filename)]
        if ours and not _ours(frames[-1].filename):
            line += f", called from {_where(ours[-1])}"
    return line


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user error is one line (exit 2); an unexpected exception is one line too (exit 1),
    with the traceback only under --debug."""
    args = parser().parse_args(argv)
    try:
        if getattr(args, "run", None) is not None:
            cfg = load_run_config(args.run, args.overrides)
        else:
            cfg = load_config(args.dataset, args.method, args.overrides, args.preset)
        COMMANDS[args.command][0](cfg, args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped (| head): as a Unix tool, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141
    except Exception as e:
        if args.debug:
            raise
        if isinstance(e, USER_ERRORS):
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"error: unexpected {describe(e)}. Re-run with --debug for the traceback.", file=sys.stderr)
        return 1
    return 0
