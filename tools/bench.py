"""`make bench`: throughput and peak memory of each stage on fixed synthetic workloads, with the reference
formulation beside it as a ratio. Not a test: it prints numbers for the README's performance section.

Sections (``python -m tools.bench [section ...]``, ``make bench SECTIONS="..."``; all by default, about 3
hours on 2 CPU cores, 2 of them ``vitdet``):
  discovery  MaskCut (N=3, 60x60 patches, ViT-B/8 keys) and TokenCut (30x40, ViT-S/16 keys): fast vs
             dense eigensolver, and the 200-graph parity report
  stages     MaskCut end to end at ViT-B/8 480x480 (random weights): backbone (lean vs full forward),
             discovery, CRF, export; end to end vs the backbone alone
  ray        discovery on precomputed features with 1 and 2 Ray workers
  detector   training iterations/s and inference images/s, Cascade and Mask R-CNN, tiny and reference size
  merge      the pseudo-label merge at ImageNet-1k size (1.28 M images, 2-3 masks each): time, peak memory
  sslvos     ssl-vos core: PIC vs dense eigensolve per frame, init and optimisation frames/s, DIS flow
  solv       SOLV training steps/s and inference frames/s at the paper's sizes (tools/bench_solv.py)
  refine     torch dense CRF and bilateral solver vs the references on real photos: parity, time per mask
  methods    images/s of every image discovery method (tools/bench_methods.py), one synthetic workload
  endtoend   every registered image method end to end per image on the demo photos with its default
             backbone and refinement vs the backbone pass alone, its parts, refinement in another process;
             Ray 2 workers vs 1 (tools/bench_endtoend.py)
  gpu        MaskCut end to end on a GPU (DINOv2-S/14 and ViT-B/8 shapes, torch vs reference refinement):
             images/s and the GPU's busy fraction (tools/bench_gpu.py); skipped without CUDA
  vitdet     R50 (random init) vs ViTDet (DINOv2 init) trained on MaskCut's labels of real photos for the
             same CPU time, then self-trained: AP50 and CorLoc (tools/bench_vitdet.py; about 2 hours)
Each section runs in a fresh process, so its peak memory (RSS; GPU memory on a GPU) is its own.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import queue as queues
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # GPU work is queued: time it done, not queued


def timed(fn, reps: int) -> tuple[float, object]:
    """Shortest wall time of ``reps`` calls (after one warm-up call when reps > 1) and the last result. The
    shortest, not the median: on a shared machine other work only ever adds time."""
    out = fn() if reps > 1 else None
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        _sync()
        best = min(best, time.perf_counter() - start)
    return best, out


def timed_pair(first, second, reps: int) -> tuple[float, float]:
    """Shortest wall times of two calls timed alternately (after a warm-up of each), so that background
    load drifting over a long run hits both alike."""
    first(), second()
    best = [float("inf"), float("inf")]
    for _ in range(reps):
        for i, fn in enumerate((first, second)):
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            best[i] = min(best[i], time.perf_counter() - start)
    return best[0], best[1]


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), {gpu}"
    )


# ----------------------------------------------------------------------------------------------------------
# Sections: each returns lines to print


def discovery() -> list[str]:
    from tools.bench_ncut import parity_report, time_discovery

    device = "cuda" if torch.cuda.is_available() else "cpu"
    lines = []
    for method, grid, dim, dense_reps, fast_reps in (
        ("maskcut", (60, 60), 768, 1, 5),
        ("tokencut", (30, 40), 384, 3, 20),
        ("tokencut", (60, 60), 384, 1, 5),
    ):
        r = time_discovery(method, grid, dim, dense_reps, fast_reps, device)
        lines.append(
            f"{method:8s} {grid[0]}x{grid[1]} d={dim}: dense {r['dense_s']:.3f} s/img, "
            f"fast {r['fast_s']:.4f} s/img -> {r['speedup']:.0f}x ({1 / r['fast_s']:.1f} img/s); "
            f"eigensolve {r['dense_solve_s']:.3f} s vs {1000 * r['fast_solve_s']:.1f} ms "
            f"({r['solve_speedup']:.0f}x); graph {1000 * r['affinity_s']:.0f} ms; "
            f"same masks: {r['same_masks']}"
        )
    p = parity_report(200)
    lines.append(
        f"parity on {p['graphs']} graphs: bipartition IoU >= 0.99 on {100 * p['same_bipartition']:.1f}% of "
        f"all; on {100 * p['regular_same_bipartition']:.1f}% of the {p['regular']} with a unique answer "
        f"(lambda3 - lambda2 >= 1e-8); {p['near_degenerate']} without one: the fast answer is a valid "
        f"eigenvector in {p['near_degenerate_valid']}; float64 retries {p['float64_pass']}; "
        f"Lanczos steps median {p['steps_median']:.0f}, max {p['steps_max']}"
    )
    return lines


def _workload(n: int, size: tuple[int, int] = (480, 640)) -> list[np.ndarray]:
    """Fixed synthetic photos: textured background and three coloured shapes."""
    rng = np.random.default_rng(0)
    images = []
    for _ in range(n):
        yy, xx = np.mgrid[: size[0], : size[1]]
        img = 90 + 30 * np.sin(xx / 23.0)[..., None] + rng.normal(0, 8, (*size, 3))
        for colour, (y, x, r) in zip(
            ((220, 60, 40), (40, 90, 220), (230, 220, 60)), rng.integers(60, 400, (3, 3)), strict=True
        ):
            img[(yy - y) ** 2 + (xx - x) ** 2 < (r // 3 + 30) ** 2] = colour
        images.append(np.clip(img, 0, 255).astype(np.uint8))
    return images


def _plain_forward(arch: str, x: torch.Tensor):
    """The reference feature pass: timm's own forward_features of the same architecture built for x's size
    (every block in full, the final norm), random weights, on x's device; what a plain model(x) costs."""
    import timm

    from stages.features.backbone import ARCHS

    spec = ARCHS[arch]
    kwargs = {**spec.timm_kwargs, "img_size": tuple(x.shape[-2:])}
    model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **kwargs).eval().to(x.device)

    @torch.inference_mode()
    def forward():
        return model.forward_features(x)

    return forward


def stages() -> list[str]:
    from pipeline.config import load_config
    from stages.common.export import mask_annotation
    from stages.discovery.base import keys_to_masks
    from stages.features.backbone import Backbone, network_image, prepare_image
    from stages.pseudolabels import Discoverer, to_pixels

    cfg = load_config("demo", "maskcut")
    backbone = Backbone("dino_vitb8", None, cfg.backbone.device, random_init=True)
    images = _workload(2)
    x = torch.stack([prepare_image(im, 8, cfg.method.resize) for im in images[:1]]).to(backbone.device)
    lean, full = timed_pair(lambda: backbone(x), _plain_forward("dino_vitb8", x), 3)
    keys = backbone(x).keys[0, 1:]
    discover, masks = timed(lambda: keys_to_masks(keys, (60, 60), cfg.method, "dino"), 3)
    work = network_image(images[0], 8, cfg.method.resize)
    refine, _ = timed(lambda: to_pixels(images[0], work, masks, 8, "crf", cfg.refine), 2)
    pixel_masks = to_pixels(images[0], work, masks, 8, "none", cfg.refine).masks
    export, _ = timed(lambda: [mask_annotation(m, 1) for m in pixel_masks], 3)
    discoverer = Discoverer.from_config(backbone, cfg.method, cfg.refine, cfg.run.max_patches)
    backbone_alone, end_to_end = timed_pair(lambda: backbone(x), lambda: discoverer(images[:1], 1), 5)
    lines = [
        f"backbone ViT-B/8 480x480 (random weights): lean keys-only pass {lean:.2f} s/img "
        f"({1 / lean:.2f} img/s) vs timm's full forward_features {full:.2f} s ({full / lean:.2f}x)",
        f"discovery MaskCut N=3 ({len(masks)} masks): {1000 * discover:.0f} ms/img "
        f"({1 / discover:.1f} img/s)",
        f"refinement dense CRF, {len(masks)} masks at 480x480: {refine:.2f} s/img ({1 / refine:.2f} img/s)",
        f"export RLE annotations: {1000 * export:.1f} ms/img",
        f"end to end per image (resize, backbone, MaskCut, CRF) {end_to_end:.2f} s vs the backbone "
        f"pass alone {backbone_alone:.2f} s: {end_to_end / backbone_alone:.2f}x "
        f"(backbone + discovery: {(backbone_alone + discover) / backbone_alone:.2f}x; from the parts above, "
        f"lean pass + discovery + CRF: {(lean + discover + refine) / lean:.2f}x)",
    ]
    if backbone.device.type == "cuda":  # backbone.precision=bfloat16 is meant for GPUs (no bf16 units here)
        bf16 = Backbone("dino_vitb8", None, cfg.backbone.device, random_init=True, precision="bfloat16")
        half, _ = timed(lambda: bf16(x), 3)
        lines.append(f"backbone.precision=bfloat16: {half:.3f} s/img ({lean / half:.2f}x the float32 pass)")
    return lines


def _ray_factory(path: str):
    """A Ray worker: loads the keys and the method once, then times discovery on its shard's images."""
    from pipeline.config import load_config
    from pipeline.driver import ShardOutput
    from stages.discovery.base import keys_to_masks

    keys = torch.load(path, weights_only=True)
    method = load_config("demo", "maskcut").method
    keys_to_masks(keys[0], (60, 60), method, "dino")  # warm-up: first-call allocations are not throughput

    def work(index: int, items: list[int]) -> ShardOutput:
        start = time.time()
        for i in items:
            keys_to_masks(keys[i], (60, 60), method, "dino")
        stamps = {"start": start, "end": time.time(), "images": len(items), "worker": os.getpid()}
        return ShardOutput({}, stats=stamps)

    return work


def _steady_rate(stamps: list[dict]) -> float:
    """Images/s of all workers together while all of them run: actors start seconds apart (imports, the
    model) and finish apart, so only shards inside that common window count; each worker's rate is its
    images over its busy time there, and the rates add up."""
    workers = {s["worker"] for s in stamps}
    begin = max(min(s["start"] for s in stamps if s["worker"] == w) for w in workers)
    end = min(max(s["end"] for s in stamps if s["worker"] == w) for w in workers)
    rate = 0.0
    for w in workers:
        mine = [s for s in stamps if s["worker"] == w and s["start"] >= begin and s["end"] <= end]
        if mine:
            rate += sum(s["images"] for s in mine) / sum(s["end"] - s["start"] for s in mine)
    return rate


def ray_scaling() -> list[str]:
    import functools

    import ray

    from pipeline.driver import ShardedStage, run_shards
    from tools.bench_ncut import planted_keys

    rng = np.random.default_rng(0)
    keys = torch.stack(
        [planted_keys((60, 60), [(5, 5, 20, 25), (30, 30, 50, 55)], 0.6, 768, rng) for _ in range(4)]
    )
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", object_store_memory=100 * 2**20)
    time.sleep(5)  # let Ray's own daemons finish starting: they compete for the two cores at first
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "keys.pt")
        torch.save(keys, path)
        rates = {1: 0.0, 2: 0.0}
        for attempt in range(3):  # interleaved, best of three: background noise hits both alike
            for workers in (1, 2):
                out = Path(tmp) / f"{attempt}-{workers}"
                out.mkdir()
                shards = [[i % 4 for i in range(j, j + 4)] for j in range(0, 64, 4)]
                stage = ShardedStage(
                    f"{workers} worker(s)", shards, functools.partial(_ray_factory, path), out
                )
                report = run_shards(stage, workers, 1, False, retries=0)
                rate = _steady_rate(report.stats)
                rates[workers] = max(rates[workers], rate)
        lines.append(
            f"discovery on precomputed features (MaskCut N=3, 60x60, 1 torch thread per worker, while all "
            f"workers run): "
            f"1 worker {rates[1]:.2f} img/s, 2 workers {rates[2]:.2f} img/s -> {rates[2] / rates[1]:.2f}x"
        )
    ray.shutdown()
    return lines


def _mask_pool(n: int, size: tuple[int, int], rng: np.random.Generator) -> list[dict]:
    """``n`` realistic object masks as annotations (RLE, area, box): blobs with ragged outlines covering
    5-60% of the image, encoded once so that simulated shards cost no encoding."""
    from stages.common.export import mask_annotation

    height, width = size
    yy, xx = np.mgrid[:height, :width]
    pool = []
    for _ in range(n):
        cy, cx = rng.uniform(0.25, 0.75) * height, rng.uniform(0.25, 0.75) * width
        radius = rng.uniform(0.12, 0.45) * min(height, width)
        turns = np.linspace(0, 2 * np.pi, 720, endpoint=False)  # the outline's radius at 720 angles
        wobble = 1 + sum(rng.uniform(0, 0.15) * np.sin(k * turns + rng.uniform(0, 6.3)) for k in range(2, 9))
        step = ((np.arctan2(yy - cy, xx - cx) + np.pi) / (2 * np.pi) * 720).astype(int) % 720
        pool.append(mask_annotation(np.hypot(yy - cy, xx - cx) < radius * wobble[step], 0))
    return pool


def merge() -> list[str]:
    """The pseudo-label merge at ImageNet-1k size: 1,281,167 images (500x375) in shards of 16, 2-3 masks
    each. Shard files are assembled as text from a pool of encoded masks (so the generator costs little);
    validation, which the driver runs on each shard as it writes it, is timed on a sample of shards; then
    merge_coco streams all of them into one COCO file, timed, with the process's peak memory."""
    from pipeline.driver import SHARD_FORMAT, ShardedStage, merge_coco
    from stages.common.export import validate_shard
    from stages.data.datasets import ImageRecord

    n_images, shard_size, size = 1_281_167, 16, (375, 500)
    rng = np.random.default_rng(0)
    pool = _mask_pool(200, size, rng)
    # Each pool mask as shard-file text after its image id: '{"image_id": <id>' + tail.
    tails = [json.dumps({**a, "image_id": 0}).removeprefix('{"image_id": 0') for a in pool]
    records = [
        ImageRecord(
            i + 1, f"train/n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG", f"/data/imagenet/train/{i}.JPEG"
        )
        for i in range(n_images)
    ]
    shards = [records[i : i + shard_size] for i in range(0, n_images, shard_size)]
    with tempfile.TemporaryDirectory() as tmp:
        stage = ShardedStage("merge", shards, factory=None, shard_dir=Path(tmp) / "shards")
        stage.shard_dir.mkdir()
        masks, sample, validate_s = 0, range(0, len(shards), 100), 0.0
        for i, shard in enumerate(shards):
            images = [
                json.dumps({"id": r.id, "file_name": r.file_name, "width": size[1], "height": size[0]})
                for r in shard
            ]
            annotations = [
                f'{{"image_id": {r.id}{tails[k]}'
                for r in shard
                for k in rng.integers(0, len(pool), int(rng.integers(2, 4)))
            ]
            masks += len(annotations)
            text = (
                f'{{"format": {SHARD_FORMAT}, "images": [{", ".join(images)}], '
                f'"annotations": [{", ".join(annotations)}], "failures": []}}'
            )
            if i in sample:
                data = json.loads(text)
                start = time.perf_counter()
                validate_shard(data)
                validate_s += time.perf_counter() - start
            stage.shard_file(i).write_text(text)  # as the driver writes it, less the fsync
        on_disk = sum(p.stat().st_size for p in stage.shard_dir.iterdir())
        before = _peak_rss_mb()
        start = time.perf_counter()
        counts = merge_coco(stage, Path(tmp) / "pseudolabels.json", Path(tmp) / "failures.jsonl")
        seconds = time.perf_counter() - start
        out_gb = (Path(tmp) / "pseudolabels.json").stat().st_size / 2**30
    rle_chars = np.mean([len(a["segmentation"]["counts"]) for a in pool])
    per_shard = validate_s / len(sample)
    return [
        f"{len(shards)} shards of {shard_size} images ({n_images} images, {masks} masks of 500x375, RLE "
        f"{rle_chars:.0f} chars on average; {on_disk / 2**30:.2f} GB of shard files)",
        f"validation of each shard as the driver writes it: {1000 * per_shard:.1f} ms per shard (on "
        f"{len(sample)} shards), {per_shard * len(shards) / 60:.1f} min over the whole run",
        f"merge into one COCO file ({counts['annotations']} annotations, {out_gb:.2f} GB): {seconds:.0f} s "
        f"({seconds / 60:.1f} min); peak RSS {_peak_rss_mb():.0f} MB (before the merge, holding the image "
        f"list: {before:.0f} MB)",
    ]


def detector() -> list[str]:
    images = _workload(2)
    return [
        _time_detector(model, label, schedule, size, images)
        for model in ("cascade_mask_rcnn_R_50_FPN", "mask_rcnn_R_50_FPN")
        for label, schedule, size in (("tiny", ["tiny_cpu"], 224), ("reference", [], 800))
    ]


def _time_detector(model: str, label: str, schedule: list[str], size: int, images: list[np.ndarray]) -> str:
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from pipeline.config import load_config
    from stages.detect import Detector
    from stages.detection.train import detectron_cfg

    train_cfg = load_config("demo", "maskcut", [f"train.model={model}", f"train.schedule={schedule}"]).train
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:  # the saved weights are hundreds of MB
        d2 = detectron_cfg(train_cfg, 0, Path(tmp), "", device)
        d2.INPUT.MIN_SIZE_TEST = size
        batch = _training_batch(images, size, d2.SOLVER.IMS_PER_BATCH if label == "tiny" else 2)
        net = build_model(d2)
        net.train()
        opt = torch.optim.SGD(net.parameters(), lr=1e-4)

        def step():
            with EventStorage(0):  # detectron2's losses log into the current storage
                opt.zero_grad()
                sum(net(batch).values()).backward()
                opt.step()

        train_s, _ = timed(step, 2)
        d2.MODEL.WEIGHTS = str(Path(tmp) / "w.pth")
        torch.save({"model": net.state_dict()}, d2.MODEL.WEIGHTS)
        det = Detector(d2)
        infer_s, _ = timed(lambda: det(images[0]), 2)
    return (
        f"{model} {label} ({size} px short side, batch {len(batch)}): training {1 / train_s:.3f} it/s "
        f"({train_s:.1f} s/it), inference {1 / infer_s:.2f} img/s"
    )


def _training_batch(images: list[np.ndarray], size: int, batch: int) -> list[dict]:
    """detectron2 training inputs: images resized to ``size`` short side, two box+mask objects each."""
    from detectron2.structures import BitMasks, Boxes, Instances
    from PIL import Image

    out = []
    for img in (images * batch)[:batch]:
        h, w = img.shape[:2]
        scale = size / min(h, w)
        hh, ww = round(h * scale), round(w * scale)
        resized = np.array(Image.fromarray(img).resize((ww, hh)))
        masks = torch.zeros(2, hh, ww, dtype=torch.bool)
        masks[0, hh // 8 : hh // 2, ww // 8 : ww // 2] = True
        masks[1, hh // 2 : 7 * hh // 8, ww // 2 : 7 * ww // 8] = True
        inst = Instances((hh, ww))
        inst.gt_masks = BitMasks(masks)
        inst.gt_boxes = Boxes(inst.gt_masks.get_bounding_boxes().tensor)
        inst.gt_classes = torch.zeros(2, dtype=torch.long)
        out.append(
            {
                "image": torch.from_numpy(resized).permute(2, 0, 1),
                "instances": inst,
                "height": hh,
                "width": ww,
            }
        )
    return out


def sslvos() -> list[str]:
    from tools.bench_sslvos import report

    return report()


def solv() -> list[str]:
    from tools.bench_solv import main

    return main()


def refine() -> list[str]:
    from tools.bench_refine import report

    return report()


def methods() -> list[str]:
    from tools.bench_methods import main

    return main()


def endtoend() -> list[str]:
    from tools.bench_endtoend import main

    return main()


def gpu() -> list[str]:
    from tools.bench_gpu import lines

    return lines()


def vitdet() -> list[str]:
    from tools.bench_vitdet import section

    return section()


SECTIONS = {
    "discovery": discovery,
    "stages": stages,
    "ray": ray_scaling,
    "detector": detector,
    "merge": merge,
    "sslvos": sslvos,
    "solv": solv,
    "refine": refine,
    "methods": methods,
    "endtoend": endtoend,
    "gpu": gpu,
    "vitdet": vitdet,
}


def _child(name: str, queue) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    start = time.perf_counter()
    lines = SECTIONS[name]()
    gpu = (
        f", GPU peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MB" if torch.cuda.is_available() else ""
    )
    lines.append(f"[{name}: {time.perf_counter() - start:.0f} s, peak RSS {_peak_rss_mb():.0f} MB{gpu}]")
    queue.put(lines)


def main(argv: list[str] | None = None) -> None:
    names = (argv if argv is not None else sys.argv[1:]) or list(SECTIONS)
    if {"-h", "--help"} & set(names):
        print(f"usage: python -m tools.bench [SECTION ...]  (default: every section, ~3 h)\n{__doc__}")
        return
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        sys.exit(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    print(f"machine: {machine()}", flush=True)
    from tools import bench  # by module name, not __main__: spawned children import it again

    ctx = mp.get_context("spawn")
    for name in names:
        queue = ctx.Queue()
        proc = ctx.Process(target=bench._child, args=(name, queue))
        proc.start()
        lines = None
        while lines is None and proc.is_alive():
            try:
                lines = queue.get(timeout=5)
            except queues.Empty:  # still running
                continue
        proc.join()
        if lines is None:
            lines = [f"(section failed: exit code {proc.exitcode}; its error is printed above)"]
        print(f"== {name}", *lines, sep="\n", flush=True)


if __name__ == "__main__":
    main()
