"""FOUND's light model: training its 1x1-convolution head on a dataset's images (``make train-found``,
resumable), and finding the head a FOUND run discovers with (``resolve_found_head``, ``method.head``).

Image sizes: FOUND trains on 224x224 crops of randomly rescaled images (its configs/found_DUTS-TR.yaml:
crop_size 224, random_scale 0.1-3.0, Gaussian blur), a new crop at every step, so its backbone runs at every
step. Here each image gives one fixed view instead, its shorter side resized to ``method.training.crop_size``
(224) and centre-cropped to a square (``training_view``): every input has the same size, so batches stack,
and the frozen backbone outputs and coarse targets are computed once and cached, so that steps after the
first epoch do not rerun the backbone (on a CPU the backbone, not the 1x1 convolution, is the cost). The
head is a 1x1 convolution: it sees single patch keys, so what it learns does not depend on the input size,
and discovery runs it on the whole image at its own size (``method.resize``).

Caching: the coarse targets (h*w bools per image) of every image are computed in a first pass and written
to the run directory (a resumed run reads them back); the treated keys and views are kept in memory up to
``method.training.feature_cache_mb`` (least recently used out first) and recomputed per batch beyond it, in
fixed chunks of ``backbone.batch_size`` images, so that a recomputed feature is bit-identical to a cached one.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from pipeline.config import Config, replace
from pipeline.memory_cache import BudgetCache
from pipeline.runs import (
    RunDir,
    RunError,
    load_backbone,
    resolve_backbone,
    trained_steps,
    warn_if_partly_trained,
)
from stages.common.io import BadImage, atomic_write_bytes, load_rgb
from stages.common.paths import resolve
from stages.common.state_dicts import UnreadableCheckpoint, read_torch_file
from stages.data.base import ImageRecord
from stages.data.datasets import list_images
from stages.discovery.base import PatchFeatures, treated_keys
from stages.discovery.found import (
    Found,
    FoundBatch,
    FoundState,
    keys_to_map,
    refine_patch_masks,
    train,
)
from stages.features.backbone import ARCHS, Backbone, prepare_image

CHECKPOINT = "found_head.pth"
TARGETS = "targets.pt"
STAGE = "found_head"
TRAINED = "trained"  # method.head value: the head make train-found wrote for this dataset and backbone
# Keys of the method section that say how a head is used, not how it is trained: out of the run's hash.
USE_KEYS = ("method.head", "method.min_patches", "method.resize", "method.refine")


def trained_checkpoint(cfg: Config) -> Path:
    """Where ``make train-found`` writes the head of ``cfg``'s dataset, backbone and training settings
    (``cfg``'s backbone resolved)."""
    return RunDir.for_config(cfg, STAGE, USE_KEYS).path / CHECKPOINT


def resolve_found_head(cfg: Config) -> Config:
    """Fix method.head to an absolute checkpoint path: the configured file, or for ``trained`` the head
    trained on this dataset with this backbone and settings; null stays null (training-free FOUND).
    RunError naming the key and the path when the file is missing."""
    head = cfg.method.head
    if head is None:
        return cfg
    if head == TRAINED:
        path = trained_checkpoint(cfg)
        if not path.is_file():
            raise RunError(
                f"config key 'method.head': no head trained for dataset '{cfg.dataset.name}' with backbone "
                f"{cfg.backbone.arch} and these method.training settings ({path}): run `make train-found "
                f"DATASET={cfg.dataset.name}` with the same settings first"
            )
        warn_if_partly_trained(path, cfg.method.training.max_steps, "FOUND head", "make train-found")
    else:
        path = resolve(Path(head).expanduser())
        if not path.is_file():
            raise RunError(f"config key 'method.head': no such file '{path}'")
    check_head_fits(path, cfg.backbone.arch)
    return replace(cfg, **{"method.head": str(path)})


def check_head_fits(path: Path, arch: str) -> None:
    """RunError naming method.head when the checkpoint at ``path`` is not a FOUND head, or reads keys of
    another width than backbone ``arch`` gives (a head trained with another backbone): caught here once,
    not on every image."""
    not_a_head = (
        f"config key 'method.head': '{path}' is not a FOUND head checkpoint (make train-found writes one)"
    )
    try:
        state = read_torch_file(path)
    except UnreadableCheckpoint as e:
        raise RunError(
            f"config key 'method.head': {e}: not a FOUND head (make train-found writes one)"
        ) from e
    channels = state.get("channels") if isinstance(state, dict) else None
    if not isinstance(channels, int):
        raise RunError(f"{not_a_head}: no 'channels' entry")
    if channels != ARCHS[arch].channels:
        raise RunError(
            f"config key 'method.head': the head '{path}' reads keys of {channels} channels, backbone {arch} "
            f"gives {ARCHS[arch].channels}: train one with this backbone (make train-found)"
        )


def training_view(rgb: np.ndarray, side: int, patch: int) -> np.ndarray:
    """The fixed-size picture the head is trained on: ``rgb`` (H, W, 3) uint8 resized (LANCZOS) so that its
    shorter side is ``side`` rounded down to a multiple of ``patch``, then centre-cropped to that square."""
    side = max(patch, side // patch * patch)
    height, width = rgb.shape[:2]
    scale = side / min(height, width)
    new_h, new_w = max(side, round(height * scale)), max(side, round(width * scale))
    resized = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), Image.LANCZOS))
    top, left = (new_h - side) // 2, (new_w - side) // 2
    return resized[top : top + side, left : left + side].copy()  # writable: torch.from_numpy takes it


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The dataset positions of step ``step``'s batch: the steps cut the concatenation of per-epoch
    shuffles (epoch e shuffled by a generator seeded with (seed, e)) into runs of ``batch_size``, so every
    image is seen equally often (FOUND: a shuffled DataLoader) and a resumed run gets the same batches."""
    start = step * batch_size
    out: list[np.ndarray] = []
    epoch, offset = divmod(start, n)
    while sum(len(part) for part in out) < batch_size:
        order = np.random.default_rng([seed, epoch]).permutation(n)
        out.append(order[offset : offset + batch_size - sum(len(part) for part in out)])
        epoch, offset = epoch + 1, 0
    return np.concatenate(out)


class TrainingViews:
    """The frozen inputs of the head's training for the dataset's readable images: each one's treated
    keys (C, h, w) float32 on the training view, and the view (for the bilateral solver).

    Computed in fixed chunks of ``chunk`` consecutive images (the same forward passes whenever a chunk is
    computed again: bit-identical features) and kept up to ``budget_mb`` (least recently used chunk out
    first; 0 = recompute every batch)."""

    def __init__(
        self,
        backbone: Backbone,
        method: Found,
        records: list[ImageRecord],
        side: int,
        chunk: int,
        budget_mb: int,
    ):
        self.backbone, self.method, self.records = backbone, method, records
        self.side, self.chunk = side, chunk
        self.treatment = method.cfg.keys[backbone.family]
        self.key_bias = backbone.key_bias
        self.cache: BudgetCache[int, tuple[torch.Tensor, list[np.ndarray]]] = BudgetCache(budget_mb, _nbytes)

    def compute(self, chunk: int) -> tuple[torch.Tensor, list[np.ndarray], list[PatchFeatures]]:
        """One chunk's keys (n, C, h, w), views and full features (with the CLS attention, for targets)."""
        p = self.backbone.patch
        views = [
            training_view(load_rgb(Path(r.path)), self.side, p)
            for r in self.records[chunk * self.chunk : (chunk + 1) * self.chunk]
        ]
        out = self.backbone(
            torch.stack([prepare_image(v, p, None) for v in views]), want=("keys", "attention")
        )
        feats = [
            PatchFeatures(
                keys=out.keys[b, 1:].float(),
                grid=out.grid,
                family=self.backbone.family,
                patch=p,
                image=view,
                attention=out.attention[b].float(),
                key_bias=self.key_bias.to(out.keys.device),
            )
            for b, view in enumerate(views)
        ]
        maps = torch.stack([keys_to_map(treated_keys(f, self.treatment), f.grid) for f in feats]).cpu()
        return maps, views, feats

    def get(self, indices: np.ndarray) -> tuple[torch.Tensor, list[np.ndarray]]:
        """Keys (B, C, h, w) and views of dataset positions ``indices``; a chunk not in the cache is computed
        once per call, however many of its images the batch holds."""
        chunks: dict[int, tuple[torch.Tensor, list[np.ndarray]]] = {}
        for chunk in dict.fromkeys(i // self.chunk for i in indices.tolist()):
            if chunk in self.cache:
                chunks[chunk] = self.cache.get(chunk)
            else:
                maps, views, _ = self.compute(chunk)
                chunks[chunk] = (maps, views)
                self.cache.put(chunk, chunks[chunk])
        pairs = [divmod(i, self.chunk) for i in indices.tolist()]
        return torch.stack([chunks[c][0][b] for c, b in pairs]), [chunks[c][1][b] for c, b in pairs]


def _nbytes(chunk: tuple[torch.Tensor, list[np.ndarray]]) -> int:
    maps, views = chunk
    return maps.numel() * maps.element_size() + sum(v.nbytes for v in views)


def readable(records: list[ImageRecord]) -> list[ImageRecord]:
    """The records whose image decodes; the others are reported by name and left out."""
    out = []
    for r in records:
        try:
            load_rgb(Path(r.path))
        except (BadImage, OSError) as e:
            print(f"warning: {r.file_name} skipped: {e}", file=sys.stderr)
            continue
        out.append(r)
    return out


def coarse_targets(cfg: Config, views: TrainingViews) -> torch.Tensor:
    """(N, h, w) bool: each image's training-free FOUND foreground on its training view, refined by the
    bilateral solver (kept only where its IoU with the coarse mask is >= method.training.min_iou)."""
    n_chunks = -(-len(views.records) // views.chunk)
    targets = []
    for chunk in tqdm(range(n_chunks), desc="found targets", unit="chunk", dynamic_ncols=True):
        maps, chunk_views, feats = views.compute(chunk)
        views.cache.put(chunk, (maps, chunk_views))
        coarse = torch.from_numpy(np.stack([views.method.foreground(f) for f in feats]))
        targets.append(
            refine_patch_masks(
                chunk_views, coarse, views.backbone.patch, cfg.refine.bilateral, cfg.method.training.min_iou
            )
        )
    return torch.cat(targets)


def load_or_make_targets(cfg: Config, views: TrainingViews, path: Path) -> torch.Tensor:
    """The coarse targets, read from ``path`` when an earlier run wrote them, else computed and written."""
    names = [r.file_name for r in views.records]
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["file_names"] == names:
            return saved["targets"]
    targets = coarse_targets(cfg, views)
    buffer = io.BytesIO()
    torch.save({"file_names": names, "targets": targets}, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return targets


def head_batches(
    cfg: Config, views: TrainingViews, targets: torch.Tensor, start_step: int, device: torch.device
) -> Iterator[FoundBatch]:
    """Endless batches from ``start_step`` on (``batch_indices``). The ``refine`` of a batch runs the
    bilateral solver once per distinct image in it: repeats of an image get the same prediction."""
    t = cfg.method.training
    step = start_step
    while True:
        indices = batch_indices(len(views.records), t.batch_size, cfg.seed, step)
        maps, pictures = views.get(indices)
        yield FoundBatch(maps.to(device), targets[indices], _refiner(indices, pictures, views, cfg))
        step += 1


def _refiner(
    indices: np.ndarray, pictures: list[np.ndarray], views: TrainingViews, cfg: Config
) -> Callable[[torch.Tensor], torch.Tensor]:
    first = {int(i): k for k, i in reversed(list(enumerate(indices)))}  # image -> its first batch position

    def refine(predicted: torch.Tensor) -> torch.Tensor:
        positions = list(first.values())
        refined = refine_patch_masks(
            [pictures[k] for k in positions],
            predicted[positions].cpu(),
            views.backbone.patch,
            cfg.refine.bilateral,
            cfg.method.training.min_iou,
        )
        by_image = dict(zip(first, refined, strict=True))
        return torch.stack([by_image[int(i)] for i in indices])

    return refine


def save_state(state: FoundState, path: Path) -> None:
    """The training state, written atomically (a reader never sees half a checkpoint)."""
    buffer = io.BytesIO()
    torch.save(state.state_dict(), buffer)
    atomic_write_bytes(path, buffer.getvalue())


def train_found(cfg: Config, on_step: Callable[[int], None] | None = None) -> Path:
    """Train (or resume) FOUND's head on the dataset's images; returns the checkpoint path. ``on_step(step)``
    after each step's checkpointing (tests stop a run there)."""
    if not isinstance(cfg.method, Found.Config):
        raise RunError(f"train-found trains FOUND's head: give --method found (not {cfg.method.name})")
    cfg = resolve_backbone(cfg)
    records = list_images(cfg.dataset)  # checks the dataset's files before the backbone is loaded
    t = cfg.method.training
    run_dir = RunDir.for_config(cfg, STAGE, USE_KEYS)
    checkpoint = run_dir.path / CHECKPOINT
    done = trained_steps(checkpoint)
    if done >= t.max_steps:
        print(f"FOUND head already trained for {done} steps: {checkpoint}", file=sys.stderr)
        return checkpoint
    records = readable(records)
    if not records:
        raise RunError(f"dataset '{cfg.dataset.name}' has no readable image under {cfg.dataset.root}")
    run_dir.start(cfg, records)
    backbone = load_backbone(cfg.backbone, cfg.seed)
    method = Found(replace(cfg, **{"method.head": None}).method)  # the training-free rule gives the targets
    views = TrainingViews(backbone, method, records, t.crop_size, cfg.backbone.batch_size, t.feature_cache_mb)
    print(
        f"FOUND head on {cfg.dataset.name}: {len(records)} images, {backbone.arch} views of {t.crop_size} "
        f"px, {t.max_steps} steps of {t.batch_size} -> {run_dir.path}",
        file=sys.stderr,
    )
    targets = load_or_make_targets(cfg, views, run_dir.path / TARGETS)
    schedule = t.schedule()
    device = backbone.device
    if done:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = FoundState.from_state_dict(saved, schedule, device)
    else:
        state = FoundState.new(views.get(np.array([0]))[0].shape[1], schedule, cfg.seed, device)
    with (
        tqdm(total=t.max_steps, initial=done, unit="step", desc="found head", dynamic_ncols=True) as bar,
        SummaryWriter(str(run_dir.path / "tensorboard"), purge_step=done + 1) as board,
    ):

        def progress(state: FoundState, losses: dict[str, float]) -> None:
            for name, value in losses.items():
                board.add_scalar(f"loss/{name}", value, state.step)
            board.add_scalar("learning_rate", state.scheduler.get_last_lr()[0], state.step)
            if state.step % t.checkpoint_every == 0 or state.step == t.max_steps:
                save_state(state, checkpoint)
            bar.update(1)
            bar.set_postfix(loss=f"{losses['total']:.4f}")
            if on_step is not None:
                on_step(state.step)

        train(state, head_batches(cfg, views, targets, done, device), schedule, progress)
    print(f"FOUND head -> {checkpoint}", file=sys.stderr)
    return checkpoint
