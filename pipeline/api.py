"""The Python API for notebooks: ``discover`` objects in one image with the CLI's defaults.

from pipeline import discover, load_detector
objects = discover("photo.jpg", method="tokencut")           # or an (H, W, 3) uint8 RGB array
objects.boxes, objects.masks                                  # [x, y, w, h] pixels; (H, W) bool masks
discover(rgb, n_masks=2, **{"backbone.arch": "dinov2_vits14"})  # method keys bare, others dotted
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import yaml

from pipeline.config import METHODS, ConfigError, load_config
from pipeline.resolve import resolve
from pipeline.runs import load_backbone
from stages.common.io import BadImage, as_rgb
from stages.features.backbone import Backbone, BackboneConfig
from stages.pseudolabels import Discoverer, ImageObjects


@functools.lru_cache(maxsize=4)
def _backbone(cfg: BackboneConfig, seed: int) -> Backbone:
    # Loaded once per (architecture, weights, device, ...): a notebook calls discover() image after image.
    return load_backbone(cfg, seed)


def _override(key: str, value: Any) -> str:
    dotted = key if "." in key else f"method.{key}"
    return f"{dotted}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def discover(
    image: str | Path | np.ndarray | PIL.Image.Image, method: str = "maskcut", **overrides: Any
) -> ImageObjects:
    """Objects of one image by a registered image method, as ``make pseudolabels`` finds them.

    image: a file path (decoded as every stage decodes, ``stages.common.io.load_rgb``), a PIL image or an
    (H, W, 3) uint8 RGB array (``stages.common.io.as_rgb``). method: a registered image method
    (configs/methods/<name>.yaml gives its defaults).
    overrides: config keys, bare for the method's own (``n_masks=2``), dotted for the others
    (``**{"backbone.arch": "dinov2_vits14", "backbone.device": "cuda"}``). The backbone's weights are
    found as the CLI finds them (WeightsError naming where to put them otherwise), and the loaded backbone
    is kept for the next call.

    Returns ImageObjects: ``boxes`` [x, y, w, h] in image pixels, one per discovered patch mask in
    discovery order, and ``masks`` the refined (H, W) bool masks (a mask that refinement rejects is left
    out). Raises ConfigError for bad settings or a video method, BadImage for an unusable image.
    """
    # Before loading: the config is loaded against the image dataset 'demo', whose error would name it.
    if method in METHODS and METHODS.get(method).modality != "image":
        raise ConfigError(f"{method} discovers objects in videos: use `make pseudolabels METHOD={method}`")
    cfg = resolve(load_config("demo", method, [_override(k, v) for k, v in overrides.items()]))
    rgb = as_rgb(image)
    discoverer = Discoverer.from_config(
        _backbone(cfg.backbone, cfg.seed), cfg.method, cfg.refine, cfg.run.max_patches
    )
    discoverer.check(rgb)
    (objects,) = discoverer([rgb], 1)
    if isinstance(objects, BadImage):
        raise objects
    return objects
