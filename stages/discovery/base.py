"""What a discovery method is: a class registered by name in ``METHODS``.

A method owns its config section (``Config``, a ``@section`` dataclass whose ``name`` is a ``Literal`` of
its registered name; the values live in ``configs/methods/<name>.yaml``), declares its modality ("image" or
"video") and what it needs from the backbone, and is built once per worker with ``from_config``. Image
methods are then called per image with its ``PatchFeatures`` and return patch masks; video methods are
called per video (``stages/video/base.py``). Adding a method is one module under ``stages/discovery/`` or
``stages/video/`` and one YAML file: nothing else names it.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import numpy as np
import torch

from stages.common.registry import Registry
from stages.common.schema import fail, positive, section
from stages.discovery.ncut import treat_keys
from stages.discovery.no_object import NoObjectRule, valid_patches

METHODS: Registry[type[DiscoveryMethod]] = Registry("discovery method")


class DiscoveryMethod:
    """Base of every registered method. Subclasses set the class attributes below."""

    Config: ClassVar[type]  # its config section
    modality: ClassVar[str]  # "image" or "video"
    # A number bumped whenever a change of the method's code changes its outputs: a run directory records
    # it per shard, and resuming with a different version recomputes those shards.
    version: ClassVar[int] = 1


@dataclass
class PatchFeatures:
    """One image's last-block features, as an image method receives them.

    keys: (h*w, C) patch keys, heads concatenated, CLS dropped, row-major over ``grid`` (h, w).
    The optional fields are filled when the method lists them in ``needs``: ``cls_key`` (C,), ``queries``
    (h*w, C), ``attention`` (heads, 1 + h*w, 1 + h*w) with CLS first, ``tokens`` (1 + h*w, C) the normalised
    output tokens, ``key_bias`` (C,) the last block's key bias, ``image`` the (H', W', 3) uint8 RGB the
    network saw (before padding) with ``patch`` its patch size in pixels.
    """

    keys: torch.Tensor
    grid: tuple[int, int]
    family: str
    patch: int | None = None
    image: np.ndarray | None = None
    cls_key: torch.Tensor | None = None
    queries: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    key_bias: torch.Tensor | None = None


@dataclass
class ScoredMask:
    """A mask on the patch grid, (h, w) bool, with its object score (FreeMask: decayed maskness; VoteCut:
    its share of the votes). An image method may return these instead of bare masks: the pseudo-label stage
    writes the score as the annotation's ``score``."""

    mask: np.ndarray
    score: float


class ImageMethod(DiscoveryMethod):
    """An image discovery method: ``PatchFeatures`` of one image -> its objects as (h, w) bool patch masks
    (or ``ScoredMask``s), in discovery order (the first is the method's main object). An empty mask means
    "no object" and is skipped."""

    modality = "image"
    # Backbone outputs it reads besides the keys: any of "queries", "attention", "tokens", "key_bias".
    needs: tuple[str, ...] = ()
    # Trained models it can discover with, which the pipeline finds by name before the run
    # (pipeline/resolve.py SECTION_RESOLVERS; FOUND's 'found_head' for method.head=trained).
    trained: tuple[str, ...] = ()

    def __init__(self, cfg: Any):
        self.cfg = cfg
        uses_bias = getattr(cfg, "no_object", None) is not None or "no_bias" in self.key_treatments()
        if uses_bias and "key_bias" not in self.needs:
            # The no-object rule and the 'no_bias' key treatment read the bias-free keys: the key bias is
            # fetched only when one of them is on.
            self.needs = (*self.needs, "key_bias")

    def key_treatments(self) -> tuple[str, ...]:
        """The key treatments (``KeyTreatment``) this method's config can apply, any backbone family; a
        method that reads the key bias for them unconditionally may leave this empty and list the bias in
        ``needs``."""
        return ()

    @classmethod
    def from_config(cls, cfg: Any) -> ImageMethod:
        return cls(cfg)

    def __call__(self, feats: PatchFeatures) -> list[np.ndarray] | list[ScoredMask]:
        raise NotImplementedError


def keys_to_masks(
    keys: torch.Tensor,
    grid: tuple[int, int],
    cfg: Any,
    family: str,
    key_bias: torch.Tensor | None = None,
) -> list[np.ndarray]:
    """Patch keys (h*w, C) of one image -> the (h, w) bool patch masks of the registered image method
    configured by ``cfg`` (its config section), for a backbone of ``family`` ('dino' or 'dinov2'). For
    methods that read only the keys (MaskCut, TokenCut, LOST): the others need the ``PatchFeatures`` the
    pseudo-label stage builds. ``key_bias`` (C,): the last block's key bias, needed when the family's key
    treatment is 'no_bias'."""
    return METHODS.get(cfg.name).from_config(cfg)(PatchFeatures(keys, grid, family, key_bias=key_bias))


KeyTreatment = Literal["raw", "centered", "no_bias"]  # stages/discovery/ncut.py treat_keys
Family = Literal["dino", "dinov2"]  # the backbone families (stages/features/backbone.py ARCHS)


@section
class GraphConfig:
    """How the patch affinity graph is built from keys, for one backbone family."""

    tau: float  # similarity threshold of the binary graph
    keys: KeyTreatment  # raw | centered (minus the image's mean key) | no_bias (minus the key bias)

    def validate(self, key: str) -> None:
        if not -1.0 <= self.tau < 1.0:
            fail(f"{key}.tau", f"must be in [-1, 1), got {self.tau}")


def validate_graphs(graph: dict[str, GraphConfig], key: str) -> None:
    """Graph settings are per backbone family: exactly 'dino' and 'dinov2'."""
    validate_families(graph, key)
    for family, g in graph.items():
        g.validate(f"{key}.{family}")


def validate_families(per_family: dict, key: str) -> None:
    """Settings given per backbone family: exactly 'dino' and 'dinov2'."""
    for family in sorted(set(per_family) ^ set(get_args(Family))):
        fail(f"{key}.{family}", "settings are needed for exactly the backbone families 'dino' and 'dinov2'")


def validate_max_cosine(value: float | None, key: str) -> None:
    """The no-object rule's threshold: None (off) or in (-1, 1]."""
    if value is not None and not -1.0 < value <= 1.0:
        fail(key, f"must be null (off) or in (-1, 1], got {value}")


def validate_image_settings(cfg: Any, key: str) -> None:
    """The settings every image method's section has: ``resize`` (null, or the square side > 0) and
    ``no_object`` (the no-object rule's max_cosine, ``validate_max_cosine``)."""
    if cfg.resize is not None:
        positive(f"{key}.resize", cfg.resize)
    validate_max_cosine(cfg.no_object, f"{key}.no_object")


def treated_keys(feats: PatchFeatures, treatment: str) -> torch.Tensor:
    """The image's keys after ``treatment`` (raw, centered, no_bias: ``treat_keys``); no_bias needs
    ``key_bias`` in the method's ``needs``."""
    return treat_keys(feats.keys, treatment, feats.key_bias)


def graph_keys(feats: PatchFeatures, treatment: str) -> tuple[torch.Tensor, bool]:
    """(keys, center) for the graph methods' pure functions (MaskCut, TokenCut: ``unit_keys(keys,
    center)``). 'centered' passes the raw keys with center=True, the path those functions always had (their
    outputs stay bit for bit the same); 'raw' and 'no_bias' pass ``treated_keys`` with center=False."""
    if treatment == "centered":
        return feats.keys, True
    return treated_keys(feats, treatment), False


def no_object_rule(feats: PatchFeatures, max_cosine: float | None) -> NoObjectRule | None:
    """The no-object rule (stages/discovery/no_object.py) for this image, judged on the patches inside the
    picture the network saw (padding excluded); None when ``max_cosine`` is None (off). Needs ``key_bias``
    and the image in ``feats``."""
    if max_cosine is None:
        return None
    if feats.key_bias is None or feats.image is None or feats.patch is None:
        raise ValueError("the no-object rule needs the key bias, the image and the patch size")
    valid = valid_patches(feats.grid, feats.patch, *feats.image.shape[:2])
    return NoObjectRule.for_image(feats.keys, feats.key_bias, feats.grid, max_cosine, valid)


def load_methods() -> Registry[type[DiscoveryMethod]]:
    """``METHODS`` with every method registered: imports each module of ``stages.discovery`` and
    ``stages.video`` once (a method registers itself where it is defined)."""
    for package in ("stages.discovery", "stages.video"):
        pkg = importlib.import_module(package)
        for info in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{package}.{info.name}")
    return METHODS
