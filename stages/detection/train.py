"""The detector training stage: one round of class-agnostic (Cascade) Mask R-CNN on a COCO label file.

Everything here extends detectron2 through its public API: our config keys
(stages/detection/detectron_config.py), registered ROI heads (stages/detection/droploss.py), a DefaultTrainer
whose loader adds copy-paste (stages/detection/copy_paste.py), and datasets registered by name at run time.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from stages.common.io import atomic_write_bytes, read_json
from stages.common.paths import DETECTRON_CONFIGS
from stages.common.schema import fail, positive, section
from stages.common.state_dicts import read_torch_file


class TrainingError(RuntimeError):
    """Training inputs that cannot work (empty labels, missing images, mismatched files)."""


# ----------------------------------------------------------------------------------------------------------
# Configuration


@section
class TrainConfig:
    """Detector training and self-training (SPEC "CutLER training"); detectron2 values live in
    detectron_configs/."""

    # detectron_configs/<model>.yaml; auto: ViTDet on DINOv2 unless train.init is set (pipeline/selftrain.py)
    model: Literal[
        "auto",
        "cascade_mask_rcnn_R_50_FPN",
        "mask_rcnn_R_50_FPN",
        "cascade_mask_rcnn_vitdet_s14",
        "mask_rcnn_vitdet_s14",
    ]
    rounds: int  # round 0 on the pseudo-labels, then rounds - 1 self-training rounds
    init: str | None  # a DINO ResNet-50 checkpoint (torchvision layout) for the R50 models; None: see model
    schedule: list[str]  # more detectron_configs/<name>.yaml merged last (e.g. tiny_cpu)
    score_thresh: list[float]  # kept predictions per self-training round 1, 2, ...; the last one repeats
    merge_iou: float  # an old mask survives when its max IoU with the kept predictions is below this
    detections_per_image: int  # predictions per image when re-labelling
    num_gpus: int  # 0 = every visible GPU (none on a CPU machine)
    # CuVLER's soft target loss (Arica et al., CVPR 2024) in every round: labels weighted by their score
    # (MODEL.ROI_HEADS.SOFT_TARGET); off: CutLER's loss. Labels without a score count as score 1.
    soft_target: bool
    opts: list[Any]  # extra detectron2 overrides: KEY VALUE ... (checked by detectron2 when selftrain starts)

    def validate(self, key: str) -> None:
        positive(f"{key}.rounds", self.rounds)
        positive(f"{key}.detections_per_image", self.detections_per_image)
        if not self.score_thresh or not all(0 <= t <= 1 for t in self.score_thresh):
            fail(f"{key}.score_thresh", f"needs one or more values in [0, 1], got {self.score_thresh}")
        if not 0 < self.merge_iou <= 1:
            fail(f"{key}.merge_iou", f"must be in (0, 1], got {self.merge_iou}")
        if self.num_gpus < 0:
            fail(f"{key}.num_gpus", f"must be >= 0, got {self.num_gpus}")
        if len(self.opts) % 2:
            fail(f"{key}.opts", "needs KEY VALUE pairs")
        if self.init and "vitdet" in self.model:
            fail(f"{key}.init", f"is a ResNet-50 checkpoint; {self.model} starts from DINOv2 ViT-S/14")
        for name in self.schedule:
            if not (DETECTRON_CONFIGS / f"{name}.yaml").exists():
                fail(f"{key}.schedule", f"no detectron_configs/{name}.yaml")

    def thresh(self, round_index: int) -> float:
        """Score threshold of self-training round ``round_index`` >= 1."""
        return self.score_thresh[min(round_index, len(self.score_thresh)) - 1]


# The ROI heads implementing MODEL.ROI_HEADS.SOFT_TARGET (stages/detection/droploss.py); stock ones ignore it.
SOFT_TARGET_HEADS = ("DropLossCascadeROIHeads", "DropLossROIHeads")


def detectron_keys() -> list[str]:
    """Every dotted key of the detectron2 config our rounds start from (detectron2's own and ours)."""
    from stages.detection.detectron_config import cutler_cfg

    def walk(node, prefix: str):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    return list(walk(cutler_cfg(), ""))


def detectron_cfg(train: TrainConfig, round_index: int, output_dir: Path, weights: str, device: str):
    """The full detectron2 config of one round: model file, self-training overlay (rounds >= 1),
    ``train.soft_target``, schedule files, ``train.opts``; then what only the pipeline knows (device, weights,
    norm, output dir). Raises ValueError for a soft target on heads that do not implement it."""
    from stages.detection.detectron_config import cutler_cfg
    from stages.detection.vitdet import is_vitdet

    cfg = cutler_cfg()
    cfg.merge_from_file(str(DETECTRON_CONFIGS / f"{train.model}.yaml"))
    if round_index >= 1:
        cfg.merge_from_file(str(DETECTRON_CONFIGS / "selftrain.yaml"))
        if is_vitdet(cfg):  # selftrain.yaml's lr and weight decay are SGD values
            cfg.merge_from_file(str(DETECTRON_CONFIGS / "selftrain_vitdet.yaml"))
    cfg.MODEL.ROI_HEADS.SOFT_TARGET = train.soft_target
    for name in train.schedule:
        cfg.merge_from_file(str(DETECTRON_CONFIGS / f"{name}.yaml"))
    cfg.merge_from_list(list(train.opts))
    if cfg.MODEL.ROI_HEADS.SOFT_TARGET and cfg.MODEL.ROI_HEADS.NAME not in SOFT_TARGET_HEADS:
        raise ValueError(
            f"MODEL.ROI_HEADS.SOFT_TARGET needs the ROI heads {' or '.join(SOFT_TARGET_HEADS)}, "
            f"got '{cfg.MODEL.ROI_HEADS.NAME}'"
        )
    if train.init:  # BN statistics of the DINO ResNet-50 need BN layers; GN stays for random init
        processes = train.num_gpus or torch.cuda.device_count()  # as many as selftrain launches
        norm = "SyncBN" if processes > 1 and device == "cuda" else "BN"
        cfg.MODEL.RESNETS.NORM = cfg.MODEL.FPN.NORM = norm
    cfg.MODEL.DEVICE = device
    cfg.SOLVER.AMP.ENABLED = bool(cfg.SOLVER.AMP.ENABLED and device.startswith("cuda"))  # AMP is CUDA-only
    cfg.MODEL.WEIGHTS = weights
    cfg.TEST.EVAL_PERIOD = 0  # evaluation is the pipeline's, on its own ground truth
    cfg.OUTPUT_DIR = str(output_dir)
    return cfg


def register_labels(name: str, labels: Path, image_root: str) -> None:
    """Register a COCO label file as detectron2 dataset ``name`` (replacing an older registration), as
    detectron2's ``register_coco_instances`` does, but keeping each annotation's ``score`` (its COCO reader
    drops keys it does not know; the soft target loss reads them, stages/detection/soft_target.py)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import load_coco_json

    from stages.detection.soft_target import SCORE_KEY

    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(
        name, lambda: load_coco_json(str(labels), image_root, name, extra_annotation_keys=[SCORE_KEY])
    )
    MetadataCatalog.get(name).set(json_file=str(labels), image_root=image_root, evaluator_type="coco")


# ----------------------------------------------------------------------------------------------------------
# Inputs


def check_labels(labels: Path, image_root: str, dataset_files: set[str], scores: bool = False) -> dict:
    """Refuse to train on labels that cannot work (with ``scores``: a ``score`` that is not a number in
    [0, 1], which the soft target loss cannot use); returns the label file's content."""
    data = read_json(labels)
    if not data.get("annotations"):
        raise TrainingError(f"{labels} has no annotations: nothing to train on")
    if scores:
        _check_scores(labels, data["annotations"])
    names = [im["file_name"] for im in data["images"]]
    foreign = [n for n in names if n not in dataset_files]
    if foreign:
        raise TrainingError(
            f"{labels} does not belong to this dataset: {len(foreign)} of its images are not in it "
            f"(e.g. {foreign[:3]})"
        )
    missing = [n for n in names if not (Path(image_root) / n).is_file()]
    if missing:
        raise TrainingError(
            f"{len(missing)} training images are missing under {image_root} (e.g. {missing[:3]})"
        )
    return data


def _check_scores(labels: Path, annotations: list[dict]) -> None:
    from stages.detection.soft_target import SCORE_KEY

    for a in annotations:
        score = a.get(SCORE_KEY, 1.0)
        if isinstance(score, bool) or not isinstance(score, int | float) or not 0 <= score <= 1:
            raise TrainingError(
                f"{labels}: annotation {a.get('id')} has {SCORE_KEY} {score!r}; "
                "train.soft_target needs scores in [0, 1]"
            )


def _d2_name(key: str) -> str | None:
    """detectron2's name for a torchvision ResNet key: conv1/bn1 -> stem, layerN.b -> res{N+1}.b,
    downsample -> shortcut, bnK -> convK.norm; None for the classifier."""
    if key.startswith("fc."):
        return None  # the classifier is not part of the detector
    if key.startswith("conv1."):
        return "stem.conv1." + key[len("conv1.") :]
    if key.startswith("bn1."):
        return "stem.conv1.norm." + key[len("bn1.") :]
    m = re.match(r"^layer(\d)\.(\d+)\.(downsample\.0|downsample\.1|conv\d|bn\d)\.(.+)$", key)
    if not m:
        raise TrainingError(f"unexpected key '{key}' in the ResNet-50 checkpoint")
    stage, block, part, rest = int(m[1]) + 1, m[2], m[3], m[4]
    part = {"downsample.0": "shortcut", "downsample.1": "shortcut.norm"}.get(part) or (
        part if part.startswith("conv") else f"conv{part[2:]}.norm"
    )
    return f"res{stage}.{block}.{part}.{rest}"


def convert_resnet50(path: Path) -> dict[str, torch.Tensor]:
    """A DINO ResNet-50 checkpoint (torchvision names, optionally under 'state_dict'/'module.') as detectron2
    backbone weights (``backbone.bottom_up.*``). UnreadableCheckpoint when ``path`` is not a torch file."""
    state = read_torch_file(path)
    state = state.get("state_dict", state)
    out = {}
    for key, value in state.items():
        name = _d2_name(key.removeprefix("module."))
        if name is not None and not key.endswith("num_batches_tracked"):
            out[f"backbone.bottom_up.{name}"] = value
    return out


# ----------------------------------------------------------------------------------------------------------
# Training


def plain_loader(cfg):
    """detectron2's training loader over ``cfg.DATASETS.TRAIN``, images read by the project's decoder
    (ImageMapper, not detectron2's reader), without copy-paste."""
    from detectron2.data import build_detection_train_loader

    from stages.detection.detectron_data import ImageMapper

    return build_detection_train_loader(cfg, mapper=ImageMapper(cfg, is_train=True))


def train_loader(cfg):
    """``plain_loader`` with copy-paste between the images of each batch when ``INPUT.COPY_PASTE``
    enables it: what training reads."""
    from detectron2.utils import comm

    from stages.detection.copy_paste import CopyPasteLoader

    # Seeded per process (as detectron2 seeds each rank), so each GPU pastes differently.
    rng = np.random.default_rng(cfg.SEED + comm.get_rank() if cfg.SEED >= 0 else None)
    return CopyPasteLoader.from_config(cfg, plain_loader(cfg), rng)


def log_period(max_iter: int) -> int:
    """Iterations between two progress lines (losses, time per iteration, ETA): detectron2's 20, but about
    ten lines for a short round, where 20 iterations can be minutes on a CPU."""
    return min(20, max(1, max_iter // 10))


def progress_printer(max_iter: int):
    """detectron2's console line of losses, time and ETA, printed once per iteration: its PeriodicWriter
    writes again when training ends, and a second line at the same iteration divides by zero in the ETA
    while the iteration timer has no history (the first iterations), hiding what ended training."""
    from detectron2.utils.events import CommonMetricPrinter, get_event_storage

    class ProgressPrinter(CommonMetricPrinter):
        printed_at = None

        def write(self):
            iteration = get_event_storage().iter
            if iteration != self.printed_at:
                super().write()
                self.printed_at = iteration

    return ProgressPrinter(max_iter)


def build_trainer(cfg):
    from detectron2.engine import DefaultTrainer, hooks
    from detectron2.utils.events import CommonMetricPrinter

    class CutLERTrainer(DefaultTrainer):
        """detectron2's trainer on our training loader (``train_loader``)."""

        @classmethod
        def build_train_loader(cls, cfg):
            return train_loader(cfg)

        @classmethod
        def build_optimizer(cls, cfg, model):
            if cfg.SOLVER.OPTIMIZER == "SGD":
                return super().build_optimizer(cfg, model)
            from stages.detection.vitdet import build_optimizer  # AdamW with ViTDet's layer-wise lr decay

            return build_optimizer(cfg, model)

        def build_writers(self):
            self.writers = [
                progress_printer(self.max_iter) if isinstance(w, CommonMetricPrinter) else w
                for w in super().build_writers()
            ]
            return self.writers

        def build_hooks(self):
            return [self._hook(h) for h in super().build_hooks()]

        def _hook(self, h):
            # detectron2's PreciseBN hook (with BatchNorm layers only) reads build_train_loader, which
            # pastes here; CutLER pastes in its training step, so its BatchNorm statistics come from plain
            # training images: give the hook those (``plain_loader``).
            if isinstance(h, hooks.PreciseBN):
                return hooks.PreciseBN(
                    self.cfg.TEST.EVAL_PERIOD,
                    self.model,
                    plain_loader(self.cfg),
                    self.cfg.TEST.PRECISE_BN.NUM_ITER,
                )
            if isinstance(h, hooks.PeriodicWriter):  # the same writers, on the console more often
                return hooks.PeriodicWriter(self.writers, period=log_period(self.cfg.SOLVER.MAX_ITER))
            if isinstance(h, hooks.PeriodicCheckpointer):
                # Only the newest checkpoint is needed to resume (each holds the model and its optimizer
                # state: ~0.9 GB for ViTDet-S). fvcore deletes the older one after the newer is written and
                # tagged in last_checkpoint: a kill while saving leaves the older one to resume from.
                return hooks.PeriodicCheckpointer(
                    self.checkpointer, self.cfg.SOLVER.CHECKPOINT_PERIOD, max_to_keep=1
                )
            return h

    return CutLERTrainer(cfg)


class ConsoleDigest(logging.Filter):
    """Keeps hundreds of lines off the console that log.txt keeps whole: the model's structure is dropped,
    and a checkpoint's list of missing or unexpected parameters (expected for the heads when a round starts
    from backbone weights) becomes its first line and a count."""

    LISTS = ("Some model parameters or buffers are not found", "The checkpoint state_dict contains keys")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Model:\n"):
            return False
        if message.startswith(self.LISTS):
            # Mutates the record: the file handler, added before this one, has written it whole already.
            head, *groups = message.splitlines()
            note = ""
            if message.startswith(self.LISTS[0]):
                note = (
                    "; expected when a round starts from backbone weights: the rest is trained from scratch"
                )
            record.msg, record.args = (
                f"{head.rstrip(':')}: {len(groups)} groups (listed in log.txt{note})",
                None,
            )
        return True


_CONSOLE_DIGEST = ConsoleDigest()  # one instance: adding it to a handler twice is a no-op


@contextlib.contextmanager
def training_log(output_dir: str):
    """detectron2's iteration logs on the console (set up once) and in output_dir/log.txt (this round),
    with fvcore's checkpoint messages; long listings only in log.txt (``ConsoleDigest``)."""
    from detectron2.utils import comm
    from detectron2.utils.logger import setup_logger

    logger = setup_logger(distributed_rank=comm.get_rank(), name="detectron2")  # cached: console once
    for h in logger.handlers:
        if type(h) is logging.StreamHandler:
            h.addFilter(_CONSOLE_DIGEST)
    formatter = logging.Formatter("[%(asctime)s] %(name)s %(levelname)s: %(message)s")
    handler = logging.FileHandler(
        Path(output_dir) / f"log{'' if comm.is_main_process() else comm.get_rank()}.txt"
    )
    handler.setFormatter(formatter)
    # fvcore's checkpointer has no handler of its own (Python printed its warnings bare): file, then console.
    fvcore = logging.getLogger("fvcore")
    console = logging.StreamHandler()
    console.setFormatter(formatter)
    console.addFilter(_CONSOLE_DIGEST)
    console.setLevel(logging.WARNING)
    logger.addHandler(handler)
    fvcore.addHandler(handler)
    fvcore.addHandler(console)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        fvcore.removeHandler(handler)
        fvcore.removeHandler(console)
        handler.close()


FINAL_WEIGHTS = "model_final.pth"


def last_checkpoint(output_dir: str | Path) -> str | None:
    """The checkpoint file name detectron2 tagged as the newest in ``output_dir``, None before the first.
    The tag is written after the file is whole: model_final.pth there means the round's training ended (a
    file cut short by a kill does not count)."""
    tag = Path(output_dir) / "last_checkpoint"
    return tag.read_text().strip() if tag.is_file() else None


def keep_weights_only(path: Path) -> None:
    """Rewrite a finished round's checkpoint without detectron2's trainer state (optimizer moments and
    scheduler: half to two thirds of the file, needed only to resume training, which is over), atomically.
    Keeps ``model`` and ``iteration``; a file already without trainer state is left as it is."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if "trainer" not in checkpoint:
        return
    buffer = io.BytesIO()
    torch.save({k: v for k, v in checkpoint.items() if k != "trainer"}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def train(cfg) -> Path:
    """Train (or resume from the last checkpoint in cfg.OUTPUT_DIR); returns model_final.pth, which keeps
    the weights only (``keep_weights_only``). A round whose training has ended is not trained again.

    With cfg.SEED >= 0 the round is reproducible: torch, numpy and Python are seeded (seed + process rank,
    as detectron2's default_setup does) before the model's initialisation, the data order, the
    augmentations and the copy-paste generator draw from them."""
    from detectron2.utils import comm
    from detectron2.utils.env import seed_all_rng

    final = Path(cfg.OUTPUT_DIR) / FINAL_WEIGHTS
    # detectron2 would resume a finished round from its trainer state, which keep_weights_only dropped.
    newest = last_checkpoint(cfg.OUTPUT_DIR)
    if newest != FINAL_WEIGHTS:
        if newest is not None and comm.is_main_process():
            print(
                f"{Path(cfg.OUTPUT_DIR).name}: resuming training from {newest} (iterations after it are "
                "trained again)",
                file=sys.stderr,
            )
        with training_log(cfg.OUTPUT_DIR):
            if cfg.SEED >= 0:
                seed_all_rng(cfg.SEED + comm.get_rank())
            trainer = build_trainer(cfg)
            trainer.resume_or_load(resume=True)
            trainer.train()
        comm.synchronize()  # every rank has finished with the file before it is rewritten
    if comm.is_main_process():
        keep_weights_only(final)  # again after a kill between training's end and the rewrite
    return final
