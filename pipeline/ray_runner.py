"""Run shards of work on Ray actors that each hold a model, writing one file per finished shard.

The worker is built once per actor by a picklable factory; it takes (shard index, items), writes its
shard file atomically and returns a small summary dict. A shard whose file exists is done: re-running
skips it, and killing the run loses no finished shard.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from tqdm import tqdm

from pipeline.config import RunConfig
from stages.backbone import resolve_device

Worker = Callable[[int, list], dict]


@ray.remote
class ShardActor:
    def __init__(self, factory: Callable[[], Worker], threads: int):
        import torch

        torch.set_num_threads(threads)
        self.work = factory()

    def run(self, index: int, items: list) -> dict:
        return self.work(index, items)


def ensure_ray(address: str | None, object_store_mb: int) -> None:
    """Connect to the configured cluster (or RAY_ADDRESS), else start a local one; reuse a running one."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local single-user use: no token prompt/warning
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(
            object_store_memory=object_store_mb * 2**20,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )


def default_workers(threads_per_worker: int, use_gpu: bool) -> int:
    resources = ray.cluster_resources()
    if use_gpu:
        return max(1, int(resources.get("GPU", 0)))
    return max(1, int(resources.get("CPU", 1)) // threads_per_worker)


def run_configured(
    run: RunConfig,
    device: str,
    factory: Callable[[], Worker],
    shards: list[list],
    shard_file: Callable[[int], Path],
    desc: str,
    size: Callable[[Any], int] = lambda item: 1,
) -> ShardReport:
    """``run_shards`` on the Ray cluster and worker count that the run config asks for, with one GPU per
    actor when ``device`` resolves to CUDA. When every shard is already done, Ray is not even started."""
    if all(shard_file(i).exists() for i in range(len(shards))):
        print(f"{desc}: all {len(shards)} shards already done", file=sys.stderr)
        return ShardReport()
    use_gpu = resolve_device(device).type == "cuda"
    ensure_ray(run.ray_address, run.object_store_mb)
    workers = run.workers or default_workers(run.threads_per_worker, use_gpu)
    return run_shards(factory, shards, shard_file, workers, run.threads_per_worker, use_gpu, desc, size)


@dataclass
class ShardReport:
    done: int = 0  # shards finished in this call
    failed: dict[int, str] = field(default_factory=dict)  # shard index -> error
    summaries: list[dict] = field(default_factory=list)


def run_shards(
    factory: Callable[[], Worker],
    shards: list[list],
    shard_file: Callable[[int], Path],
    workers: int,
    threads_per_worker: int,
    use_gpu: bool,
    desc: str,
    size: Callable[[Any], int] = lambda item: 1,
) -> ShardReport:
    """Run every shard whose file is missing on ``workers`` actors, with a progress bar over items.

    A shard that raises (or whose actor dies) is reported and left unfinished; the others go on.
    """
    report = ShardReport()
    todo = [i for i in range(len(shards)) if not shard_file(i).exists()]
    total = sum(size(item) for shard in shards for item in shard)
    done_items = total - sum(size(item) for i in todo for item in shards[i])
    if not todo:
        return report
    workers = min(workers, len(todo))
    options = {"num_cpus": threads_per_worker, "num_gpus": 1 if use_gpu else 0, "max_restarts": 1}
    actors = [ShardActor.options(**options).remote(factory, threads_per_worker) for _ in range(workers)]
    queue = list(todo)
    running: dict[ray.ObjectRef, tuple[int, Any]] = {}
    with tqdm(total=total, initial=done_items, unit="img", desc=desc, dynamic_ncols=True) as bar:
        for actor in actors:
            if queue:
                i = queue.pop(0)
                running[actor.run.remote(i, shards[i])] = (i, actor)
        while running:
            (ref,), _ = ray.wait(list(running), num_returns=1)
            i, actor = running.pop(ref)
            try:
                report.summaries.append(ray.get(ref))
                report.done += 1
            except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as e:
                report.failed[i] = str(e).strip().splitlines()[-1]
                tqdm.write(f"{desc}: shard {i} failed: {report.failed[i]}")
            bar.update(sum(size(item) for item in shards[i]))
            if queue:
                j = queue.pop(0)
                running[actor.run.remote(j, shards[j])] = (j, actor)
    for actor in actors:
        ray.kill(actor)
    return report
