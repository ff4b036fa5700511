"""The sharded-stage driver: every stage that maps a list of items through a model runs here (image
pseudo-labels, video pseudo-labels, detector inference for relabelling and evaluation).

The items are cut into shards. Ray actors hold the model (built once per actor by a picklable factory) and
send each shard's result back through Ray as a small record (``ShardOutput``: JSON-ready data and a few
files such as overlays). Only this process writes: it validates each shard, writes its files, then its
shard file atomically, so a shard file exists exactly when its shard is done and valid. Re-running skips
done shards; a killed run loses no finished shard. Workers never receive an output path: images and
weights are the only files they read, so the nodes of a cluster need no shared file system for outputs.

When a worker process dies (killed, out of memory) its actor is replaced and the shard goes back to the
front of the queue, up to ``run.shard_retries`` times; shards are only ever handed to live actors. A shard
that still fails, or whose worker raises, is reported by name; the other shards go on.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import ray
from tqdm import tqdm

from pipeline.config import RunConfig
from pipeline.runs import RunError, write_jsonl
from stages.common.export import CocoError, CocoWriter
from stages.common.io import atomic_write_bytes, atomic_write_json, read_json
from stages.features.backbone import resolve_device

# Shard files carry this format number; files without it (written before shards were validated when
# written) are validated when merged.
SHARD_FORMAT = 2
_VERSION_KEY = re.compile(r'^\{"format": \d+, "version": ("(?:[^"\\]|\\.)*")')

# Test-only hooks (deterministic kill points; never set in normal use):
# the driver kills itself (SIGKILL) right after writing the N-th shard file of a stage;
EXIT_AFTER_SHARDS = "PIPELINE_TEST_EXIT_AFTER_SHARDS"
# a worker kills its own process when it starts one of the shards K1,K2,...: "<marker>:<K1>,<K2>" does it
# once per shard (the worker creates the file <marker>.<K> first), ":<K1>,<K2>" every time. The driver
# forwards it to the actors' environment.
WORKER_EXIT = "PIPELINE_TEST_WORKER_EXIT"


@dataclass
class ShardOutput:
    """What a worker sends back for one shard."""

    data: dict  # the shard file's content (JSON-ready)
    files: dict[str, bytes] = field(default_factory=dict)  # more files, relative to the stage's files_dir
    stats: dict = field(default_factory=dict)  # timings and counts (benchmarks)


Worker = Callable[[int, list], ShardOutput]  # (shard index, items) -> output


def _one(item: Any) -> int:
    return 1


def _accept(data: dict) -> None:
    return None


@dataclass(frozen=True)
class ShardedStage:
    """One stage as the driver runs it."""

    name: str  # progress bar and messages
    shards: list[list]  # the items of each shard, in output order
    factory: Callable[[], Worker]  # picklable; builds the worker inside each actor; holds no output path
    shard_dir: Path  # the driver writes shard-00000.json, ... here
    files_dir: Path | None = None  # ShardOutput.files go under here; None: the stage writes none
    check: Callable[[dict], None] = _accept  # validates a shard's data before it is written (ValueError)
    size: Callable[[Any], int] = _one  # progress units of an item (a video counts its frames)
    item_name: Callable[[Any], str] = str  # how an item is named in error messages
    # The code version that writes this stage's shards (e.g. 'maskcut v1', from the method's ``version``):
    # recorded in each shard file; a finished shard of another version is computed again.
    version: str = ""

    def shard_file(self, index: int) -> Path:
        # Indexes above 99,999 simply get more digits: names stay unique. Shards are always read by index,
        # never in directory-listing order (which would put shard-100000 before shard-10001).
        return self.shard_dir / f"shard-{index:05d}.json"

    def shard_label(self, index: int) -> str:
        """A shard's name for messages: its file name, item count and first item."""
        items = self.shards[index]
        first = f", first {self.item_name(items[0])}" if items else ""
        return f"shard-{index:05d} ({len(items)} {'item' if len(items) == 1 else 'items'}{first})"

    def todo(self) -> list[int]:
        """Shards to compute: those without a shard file, and those written by another code version."""
        return [i for i in range(len(self.shards)) if not self.done(i)]

    def done(self, index: int) -> bool:
        path = self.shard_file(index)
        return path.exists() and self.written_by(path) == self.version

    @staticmethod
    def written_by(path: Path) -> str:
        """The code version a shard file records ('' when none). Read from the file's first bytes: the
        driver writes it second, after the format."""
        with open(path, "rb") as f:
            head = f.read(256).decode("utf-8", "replace")
        found = _VERSION_KEY.search(head)
        return json.loads(found.group(1)) if found else ""

    def read(self, index: int) -> dict:
        """A finished shard's data; shards from before SHARD_FORMAT are validated here."""
        data = read_json(self.shard_file(index))
        data.pop("version", None)
        if data.pop("format", None) != SHARD_FORMAT:
            try:
                self.check(data)
            except ValueError as e:  # CocoError among them
                raise RunError(f"{self.shard_file(index)} is invalid ({e}); delete it and re-run") from e
        return data


# ----------------------------------------------------------------------------------------------------------
# Ray


@ray.remote
class ShardActor:
    def __init__(self, factory: Callable[[], Worker], threads: int):
        import torch

        torch.set_num_threads(threads)
        self.work = factory()

    def run(self, index: int, items: list) -> ShardOutput:
        _worker_exit_for_test(index)
        return self.work(index, items)


def _worker_exit_for_test(index: int) -> None:
    hook = os.environ.get(WORKER_EXIT)
    if not hook:
        return
    marker, _, shards = hook.rpartition(":")
    if index not in {int(k) for k in shards.split(",")}:
        return
    if marker:
        try:
            os.close(os.open(f"{marker}.{index}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return  # died in this shard once already
    os.kill(os.getpid(), signal.SIGKILL)


def ensure_ray(address: str | None, object_store_mb: int) -> None:
    """Connect to the configured cluster (or RAY_ADDRESS), else start a local one of our own; reuse the one
    this process already started."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local single-user use: no token prompt/warning
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        # address="local": our own instance even when another Ray runs on this machine (`ray start`, another
        # user's or project's), which ray.init() would otherwise attach to through /tmp/ray.
        ray.init(
            address="local",
            object_store_memory=object_store_mb * 2**20,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )


def default_workers(threads_per_worker: int, use_gpu: bool) -> int:
    resources = ray.cluster_resources()
    if use_gpu:
        return max(1, int(resources.get("GPU", 0)))
    return max(1, int(resources.get("CPU", 1)) // threads_per_worker)


@dataclass
class ShardReport:
    done: int = 0  # shards finished in this call
    failed: dict[int, str] = field(default_factory=dict)  # shard index -> error
    retried: int = 0  # shard attempts lost to a dead worker and run again
    stats: list[dict] = field(default_factory=list)  # the workers' ShardOutput.stats


def run_stage(stage: ShardedStage, run: RunConfig, device: str) -> ShardReport:
    """Run every unfinished shard of ``stage`` on the Ray cluster and worker count that ``run`` asks for,
    with one GPU per actor when ``device`` resolves to CUDA. When every shard is done already, Ray is not
    even started. Raises RunError naming every shard that failed (the finished ones are kept)."""
    todo = stage.todo()
    if not todo:
        print(f"{stage.name}: all {len(stage.shards)} shards already done", file=sys.stderr)
        return ShardReport()
    stale = [i for i in todo if stage.shard_file(i).exists()]
    if stale:
        print(
            f"{stage.name}: {len(stale)} finished shards were written by another version of the code "
            f"({stage.written_by(stage.shard_file(stale[0])) or 'unversioned'}, now "
            f"{stage.version or 'unversioned'}): computing them again",
            file=sys.stderr,
        )
    finished = len(stage.shards) - len(todo)
    if finished:
        print(
            f"{stage.name}: resuming: {finished} of {len(stage.shards)} shards already done, "
            f"{len(todo)} to compute",
            file=sys.stderr,
        )
    use_gpu = resolve_device(device).type == "cuda"
    ensure_ray(run.ray_address, run.object_store_mb)
    workers = run.workers or default_workers(run.threads_per_worker, use_gpu)
    report = run_shards(stage, workers, run.threads_per_worker, use_gpu, run.shard_retries)
    if report.failed:
        failed = "; ".join(f"{stage.shard_label(i)}: {error}" for i, error in sorted(report.failed.items()))
        raise RunError(
            f"{len(report.failed)} of {len(stage.shards)} {stage.name} shards failed ({report.done} finished "
            f"now, kept in {stage.shard_dir}; re-run to do only the rest): {failed}"
        )
    return report


def _actor_options(threads: int, use_gpu: bool) -> dict:
    # max_restarts=0: a dead actor stays dead and the driver replaces it, so that no shard is ever handed to
    # an actor that is dead or restarting.
    options = {"num_cpus": threads, "num_gpus": 1 if use_gpu else 0, "max_restarts": 0}
    hooks = {k: v for k, v in os.environ.items() if k == WORKER_EXIT}
    if hooks:
        options["runtime_env"] = {"env_vars": hooks}
    return options


class _ActorPool:
    """The live actors of a stage: an idle one gets the next shard; a dead one is replaced by a new actor
    and never given work again."""

    def __init__(self, stage: ShardedStage, size: int, threads: int, use_gpu: bool):
        self.stage, self.threads = stage, threads
        self.options = _actor_options(threads, use_gpu)
        self.idle = [self._new() for _ in range(size)]
        self.running: dict[ray.ObjectRef, tuple[int, Any]] = {}

    def _new(self):
        return ShardActor.options(**self.options).remote(self.stage.factory, self.threads)

    def __enter__(self) -> _ActorPool:
        return self

    def __exit__(self, *exc) -> None:
        for actor in self.idle + [actor for _, actor in self.running.values()]:
            ray.kill(actor)

    def submit(self, queue: deque) -> None:
        while queue and self.idle:
            i = queue.popleft()
            actor = self.idle.pop()
            self.running[actor.run.remote(i, self.stage.shards[i])] = (i, actor)

    def next_result(self) -> tuple[int, ShardOutput | ray.exceptions.RayError]:
        """The next shard to finish: its output, or the error of its worker (raised or died)."""
        (ref,), _ = ray.wait(list(self.running), num_returns=1)
        i, actor = self.running.pop(ref)
        try:
            out = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            if e.actor_init_failed:  # the model cannot even load: no shard can succeed
                raise RunError(f"{self.stage.name} workers cannot start: {_last_line(e)}") from e
            self.idle.append(self._new())
            return i, e
        except ray.exceptions.RayTaskError as e:
            out = e
        self.idle.append(actor)
        return i, out


def run_shards(
    stage: ShardedStage, workers: int, threads_per_worker: int, use_gpu: bool, retries: int
) -> ShardReport:
    """Run every unfinished shard on ``workers`` actors, with a progress bar over items; returns what
    happened (failed shards are reported, not raised). A shard whose worker died goes back to the front of
    the queue, ``retries`` times at most."""
    report = ShardReport()
    todo = stage.todo()
    if not todo:
        return report
    total = sum(stage.size(item) for shard in stage.shards for item in shard)
    done_items = total - sum(stage.size(item) for i in todo for item in stage.shards[i])
    queue, attempts = deque(todo), dict.fromkeys(todo, 0)
    bar = tqdm(total=total, initial=done_items, unit="img", desc=stage.name, dynamic_ncols=True)
    with bar, _ActorPool(stage, min(workers, len(todo)), threads_per_worker, use_gpu) as pool:
        while queue or pool.running:
            pool.submit(queue)
            i, out = pool.next_result()
            attempts[i] += 1
            if isinstance(out, ray.exceptions.RayActorError):
                if attempts[i] <= retries:
                    report.retried += 1
                    queue.appendleft(i)
                    tqdm.write(f"{stage.name}: the worker of {stage.shard_label(i)} died; retrying it")
                    continue
                _fail(report, stage, i, f"its worker died {attempts[i]} times ({_last_line(out)})")
            elif isinstance(out, ray.exceptions.RayTaskError):
                _fail(report, stage, i, _last_line(out))
            else:
                _finish(report, stage, i, out)
            bar.update(sum(stage.size(item) for item in stage.shards[i]))
    return report


def _finish(report: ShardReport, stage: ShardedStage, index: int, out: ShardOutput) -> None:
    try:
        _write_shard(stage, index, out)
    except ValueError as e:  # CocoError among them
        _fail(report, stage, index, f"invalid output: {e}")
        return
    report.done += 1
    report.stats.append(out.stats)
    _driver_exit_for_test(report.done)


def _last_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[-1] if lines else type(e).__name__


def _fail(report: ShardReport, stage: ShardedStage, index: int, error: str) -> None:
    report.failed[index] = error
    tqdm.write(f"{stage.name}: {stage.shard_label(index)} failed: {error}")


def _write_shard(stage: ShardedStage, index: int, out: ShardOutput) -> None:
    """Validate a shard's output, write its files, then (last: it marks the shard done) its shard file."""
    stage.check(out.data)
    for name, data in out.files.items():
        relative = PurePosixPath(name)
        if stage.files_dir is None or relative.is_absolute() or ".." in relative.parts:
            raise ValueError(f"a worker sent the file '{name}', which this stage does not write")
        atomic_write_bytes(stage.files_dir / relative, data)
    atomic_write_json(stage.shard_file(index), {"format": SHARD_FORMAT, "version": stage.version, **out.data})


def _driver_exit_for_test(written: int) -> None:
    limit = os.environ.get(EXIT_AFTER_SHARDS)
    if limit and written >= int(limit):
        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------------------------------------
# Merging image shards ({"images", "annotations", "failures"}) into one COCO file


def iter_shards(stage: ShardedStage) -> Iterator[dict]:
    """The finished shards' data, one at a time, in order."""
    for i in range(len(stage.shards)):
        yield stage.read(i)


def merge_coco(stage: ShardedStage, out: Path, failures_out: Path, skipped: list[dict] = ()) -> dict:
    """Stream the shards' images and annotations into one COCO file (written atomically; memory holds one
    shard at a time and the set of image ids) and write their failures as JSON lines, after ``skipped``
    (dataset entries that are not images, ``Listing.skipped``). Returns counts and the failures."""
    failures = []
    with CocoWriter(out) as coco:
        for i, shard in enumerate(iter_shards(stage)):
            try:
                coco.add(shard["images"], shard["annotations"])
            except CocoError as e:
                raise RunError(f"{stage.shard_file(i)}: {e}") from e
            failures += shard["failures"]
        coco.commit()
    write_jsonl(failures_out, [*skipped, *failures])
    return {
        "images": coco.n_images + len(failures),
        "labelled": coco.n_images,  # decoded and run through the method, with masks or without
        "with_masks": coco.n_annotated,
        "failed": len(failures),
        "skipped": len(skipped),
        "annotations": coco.n_annotations,
        "failures": [*skipped, *failures],
    }
