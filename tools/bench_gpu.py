"""Issue 15's GPU check: MaskCut end to end on a GPU, as the pipeline's model worker runs it, and how busy
the GPU is meanwhile.

    python -m tools.bench gpu               # a section of `make bench`; says it is skipped without CUDA
    python -m tools.bench_gpu --device cpu --seconds 0 --images 2    # the same code on a CPU, a dry run

For each backbone (DINOv2-S/14, the default; and ViT-B/8, MaskCut's reference, at its shapes with random
weights when its DINO weights are not on disk: timing only) and each refinement (``refine.backend=auto``,
the torch CRF on the GPU; ``reference``, pydensecrf in the worker, in turn), the Discoverer runs the demo
and photos images (decoded beforehand: no disk reads) in the config's batch size, pass after pass until
``seconds`` have gone by. It prints images/s and the GPU's busy fraction: the mean of ``nvidia-smi``'s
utilisation (the share of each sample period in which a kernel ran), sampled every 100 ms.
The issue's goal: with the torch refinement, the GPU busy at least 70% of the time.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import load_config
from pipeline.runs import load_backbone, resolve_backbone
from stages.common.export import mask_annotation
from stages.common.io import load_rgb
from stages.data.datasets import image_listing
from stages.features.backbone import find_weights
from stages.pseudolabels import Discoverer

BUSY_GOAL = 0.70
BACKBONES = {
    "DINOv2-S/14": ["backbone.arch=dinov2_vits14"],
    "ViT-B/8": ["backbone.arch=dino_vitb8"],
}
REFINEMENTS = ("auto", "reference")


def busy_fraction(samples: str) -> float | None:
    """Mean of ``nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits`` lines (percent, one
    per sample) as a fraction; None when there is no sample. Lines that are not numbers ("[N/A]") are
    skipped."""
    values = [float(line) for line in samples.split() if line.replace(".", "", 1).isdigit()]
    return sum(values) / len(values) / 100 if values else None


class BusySampler:
    """Samples the GPU's utilisation with ``nvidia-smi`` while the ``with`` block runs; ``fraction`` is the
    mean busy fraction afterwards, or None without nvidia-smi (then ``why`` says so)."""

    def __init__(self, gpu: int = 0, period_ms: int = 100):
        self.command = [
            "nvidia-smi", f"--id={gpu}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
            f"-lms={period_ms}",
        ]  # fmt: skip
        self.fraction: float | None = None
        self.why = ""
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> BusySampler:
        if shutil.which("nvidia-smi") is None:
            self.why = "no nvidia-smi on PATH"
        else:
            self._proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        out, _ = self._proc.communicate()
        self.fraction = busy_fraction(out)
        if self.fraction is None:
            self.why = f"nvidia-smi gave no samples (exit code {self._proc.returncode})"


def _images(limit: int | None) -> list[np.ndarray]:
    """The demo photos, then the photos set when ``make photos-data`` has built it, decoded."""
    records = []
    for dataset in ("demo", "photos"):
        cfg = load_config(dataset, "maskcut").dataset
        if Path(cfg.root).is_dir():
            records += image_listing(cfg).records
    return [load_rgb(Path(r.path)) for r in records[:limit]]


def _config(backbone: list[str], refine: str, device: str):
    overrides = [*backbone, f"refine.backend={refine}", f"backbone.device={device}"]
    cfg = load_config("demo", "maskcut", overrides)
    if find_weights(cfg.backbone.arch, cfg.backbone.weights) is None:
        cfg = load_config("demo", "maskcut", [*overrides, "backbone.random_init=true"])
    return resolve_backbone(cfg)


def _throughput(discoverer: Discoverer, images: list[np.ndarray], batch: int, seconds: float) -> tuple:
    """Images/s of passes over ``images`` until ``seconds`` have gone by (one pass at least), after a
    warm-up batch (CUDA's first calls load kernels), and the GPU's busy fraction meanwhile (a BusySampler).
    A pass with pydensecrf takes about a minute on the demo and photos images."""

    def one_pass(some: list[np.ndarray]) -> int:
        for objects in discoverer(some, batch):
            [mask_annotation(m, 1) for m in getattr(objects, "masks", [])]
        return len(some)

    one_pass(images[:batch])
    with BusySampler() as busy:
        start = time.perf_counter()
        done = one_pass(images)
        while time.perf_counter() - start < seconds:
            done += one_pass(images)
        elapsed = time.perf_counter() - start
    return done / elapsed, busy


def _row(label: str, cfg, rate: float, busy: BusySampler) -> str:
    weights = "random weights, shapes only" if cfg.backbone.random_init else "its weights"
    if busy.fraction is None:
        shown = f"not measured ({busy.why})"
    else:
        shown = f"{100 * busy.fraction:.0f}%"
        if cfg.refine.backend == "auto":
            shown += (
                f" (goal >= {100 * BUSY_GOAL:.0f}%: {'met' if busy.fraction >= BUSY_GOAL else 'NOT met'})"
            )
    return (
        f"  {label} ({cfg.backbone.arch}, {weights}), batch {cfg.backbone.batch_size}, "
        f"refine.backend={cfg.refine.backend}: {rate:.1f} img/s, GPU busy {shown}"
    )


def lines(device: str = "cuda", seconds: float = 20.0, limit: int | None = None) -> list[str]:
    """The check's report lines; on a machine without CUDA (and ``device="cuda"``) one line saying so."""
    if device == "cuda" and not torch.cuda.is_available():
        return ["skipped: no CUDA device (this check is for a GPU machine: python -m tools.bench gpu)"]
    images = _images(limit)
    out = [f"{len(images)} demo and photos images on {device}, MaskCut, passes for {seconds:.0f} s each:"]
    for label, backbone in BACKBONES.items():
        rates = {}
        for refine in REFINEMENTS:
            cfg = _config(backbone, refine, device)
            discoverer = Discoverer.from_config(
                load_backbone(cfg.backbone, cfg.seed), cfg.method, cfg.refine, cfg.run.max_patches
            )
            rates[refine], busy = _throughput(discoverer, images, cfg.backbone.batch_size, seconds)
            out.append(_row(label, cfg, rates[refine], busy))
        out.append(
            f"  {label}: end to end with torch refinement {rates['auto'] / rates['reference']:.2f}x reference"
        )
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run of the code")
    parser.add_argument("--seconds", type=float, default=20.0, help="timed passes last at least this long")
    parser.add_argument("--images", type=int, default=None, help="use only the first N images")
    args = parser.parse_args(argv)
    print(*lines(args.device, args.seconds, args.images), sep="\n", flush=True)


if __name__ == "__main__":
    main()
