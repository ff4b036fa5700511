"""FOUND (Siméoni et al., CVPR 2023, "Unsupervised object localization: observing the background to
discover objects"): look for the background instead of the objects.

Training-free step: the background seed is the patch the CLS token attends to least in the last layer,
with each head weighted by the sparsity of its attention (CroW-style, Kalantidis et al. 2016); the
background is every patch whose (equally head-weighted) key has cosine above ``tau`` with the seed's; the
foreground is the rest. Its light model: a single 1x1 convolution on the frozen patch keys, trained on
those coarse masks refined by the bilateral solver for the first steps, then on its own predictions
refined by the bilateral solver plus a self-training term on its own thresholded predictions.

Defaults (FOUND's code, configs/found_DUTS-TR.yaml and model.py): tau 0.3, head reweighting on, keys of
the last block; training: AdamW lr 0.05, StepLR every 50 steps x 0.95, batch 50, 500 steps, weight 1.5 on
the refined-prediction loss, 4.0 on the self-training loss, coarse-mask loss for the first 100 steps.
Pure torch: tensors in, masks and losses out; the caller reads images and writes checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stages.common.masks import components
from stages.common.schema import fail, positive, section
from stages.discovery.base import (
    METHODS,
    Family,
    ImageMethod,
    KeyTreatment,
    PatchFeatures,
    no_object_rule,
    treated_keys,
    validate_families,
    validate_image_settings,
)
from stages.discovery.no_object import NoObjectRule

HEAD_WEIGHT_EPS = 1e-10  # FOUND's epsilon in the head weights log(sum Q / Q)


def cls_attention(attention: torch.Tensor) -> torch.Tensor:
    """(heads, 1 + n, 1 + n) last-block attention (CLS first) -> (heads, n): the CLS token's attention to
    each patch."""
    return attention[:, 0, 1:]


def head_weights(cls_attn: torch.Tensor) -> torch.Tensor:
    """(heads, n) CLS attention -> (heads,) weights beta_h = log(sum_h' Q_h' / Q_h), Q_h = the fraction of
    patches whose attention in head h is above the mean over all heads and patches: heads that attend to
    few patches (object-focused) weigh more."""
    above = (cls_attn > cls_attn.mean()).float().mean(dim=1) + HEAD_WEIGHT_EPS
    return torch.log(above.sum() / above)


def background_seed(cls_attn: torch.Tensor, reweight: bool) -> int:
    """Index of the patch with the least (head-weighted, summed over heads) CLS attention."""
    weights = head_weights(cls_attn) if reweight else torch.ones(cls_attn.shape[0], device=cls_attn.device)
    return int((weights[:, None] * cls_attn).sum(dim=0).argmin())


def found(
    keys: torch.Tensor,
    cls_attn: torch.Tensor,
    grid: tuple[int, int],
    tau: float,
    reweight: bool,
    no_object: NoObjectRule | None = None,
) -> np.ndarray:
    """FOUND's training-free foreground of one image.

    keys: (h*w, C) last-block keys, heads concatenated (after any key treatment, stages/discovery/ncut.py
    ``treat_keys``); cls_attn: (heads, h*w) from ``cls_attention``; tau: the cosine above which a patch
    is background (0.3 in FOUND); reweight: weight heads by attention sparsity (FOUND: on). Returns the
    (h, w) bool foreground: every patch not similar to the background seed (possibly several objects).
    With a ``no_object`` rule, a foreground that separates nothing comes back empty.
    """
    heads = cls_attn.shape[0]
    if keys.shape[0] != grid[0] * grid[1] or cls_attn.shape[1] != keys.shape[0] or keys.shape[1] % heads:
        raise ValueError(f"keys {tuple(keys.shape)}, CLS attention {tuple(cls_attn.shape)}, grid {grid}")
    cls_attn = cls_attn.float()
    feats = keys.float().reshape(keys.shape[0], heads, -1)
    if reweight:
        feats = feats * head_weights(cls_attn)[None, :, None]
    feats = F.normalize(feats.reshape(keys.shape[0], -1), dim=1)
    seed = background_seed(cls_attn, reweight)
    background = (feats @ feats[seed]) > tau
    foreground = (~background).cpu().numpy().reshape(grid)
    if no_object is not None and not no_object.separates(foreground):
        return np.zeros_like(foreground)
    return foreground


# ----------------------------------------------------------------------------------------------------------
# The light model: one 1x1 convolution on frozen patch features


class FoundHead(nn.Module):
    """FOUND's decoder: a 1x1 convolution from C-channel patch features to one foreground logit."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) features -> (B, h, w) logits."""
        return self.conv(features)[:, 0]

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, h, w) bool foreground: sigmoid(logit) > 0.5."""
        return self.forward(features) > 0


def keys_to_map(keys: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(h*w, C) patch keys -> (C, h, w), the head's input layout."""
    return keys.T.reshape(keys.shape[1], *grid)


def head_foreground(
    head: FoundHead, keys: torch.Tensor, grid: tuple[int, int], no_object: NoObjectRule | None = None
) -> np.ndarray:
    """FOUND's foreground of one image by a trained head: (h*w, C) keys (after the same key treatment the
    head was trained on) -> (h, w) bool, sigmoid(logit) > 0.5. Computed on the CPU in float32 whatever
    the keys' device, so that a mask does not depend on where the backbone ran. With a ``no_object`` rule,
    a foreground that separates nothing comes back empty (as ``found``)."""
    if keys.shape[0] != grid[0] * grid[1] or keys.shape[1] != head.conv.in_channels:
        raise ValueError(
            f"keys {tuple(keys.shape)} on a {grid} grid do not fit a head of {head.conv.in_channels} channels"
        )
    foreground = head.predict(keys_to_map(keys.float().cpu(), grid)[None])[0].numpy()
    if no_object is not None and not no_object.separates(foreground):
        return np.zeros_like(foreground)
    return foreground


def load_head(path: str) -> FoundHead:
    """The head of a checkpoint written by ``make train-found`` (``FoundState.state_dict``), on the CPU in
    eval mode. FileNotFoundError when ``path`` is missing; KeyError / RuntimeError on another file."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    head = FoundHead(int(state["channels"]))
    head.load_state_dict(state["head"])
    return head.eval()


@dataclass(frozen=True)
class FoundTraining:
    """FOUND's training schedule (values: FOUND's configs/found_DUTS-TR.yaml)."""

    lr: float  # AdamW, 5e-2
    step_size: int  # StepLR, 50
    gamma: float  # StepLR, 0.95
    coarse_steps: int  # steps with the coarse-mask loss, 100 ('stop_bkg_loss')
    refined_weight: float  # loss on the refined own prediction, 1.5 ('w_bs_loss')
    self_weight: float  # self-training loss on the own prediction after coarse_steps, 4.0 ('w_self_loss')
    max_steps: int  # 500

    def __post_init__(self):
        for name in ("lr", "step_size", "gamma", "max_steps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"FoundTraining.{name} must be > 0, got {getattr(self, name)}")
        for name in ("coarse_steps", "refined_weight", "self_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"FoundTraining.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class FoundBatch:
    """One training batch: features (B, C, h, w), target (B, h, w) coarse masks (the training-free FOUND
    foreground, refined by the bilateral solver), and ``refine``: maps the head's (B, h, w) bool
    predictions to refined (B, h, w) bool masks (the bilateral solver on the batch's images, see
    ``refine_patch_masks``), or None to use the predictions unrefined."""

    features: torch.Tensor
    target: torch.Tensor
    refine: Callable[[torch.Tensor], torch.Tensor] | None = None


def found_loss(
    logits: torch.Tensor, batch: FoundBatch, step: int, cfg: FoundTraining
) -> dict[str, torch.Tensor]:
    """FOUND's losses at ``step`` for (B, h, w) logits (binary cross-entropy with logits, mean over
    patches): refined_weight * BCE(logits, refine(prediction)), plus BCE(logits, coarse target) while
    step < coarse_steps, else self_weight * BCE(logits, prediction). Returns the terms and their 'total'."""
    prediction = (logits.detach() > 0).float()
    refined = prediction if batch.refine is None else batch.refine(prediction.bool()).float().to(logits)
    terms = {"refined": cfg.refined_weight * F.binary_cross_entropy_with_logits(logits, refined)}
    if step < cfg.coarse_steps:
        terms["coarse"] = F.binary_cross_entropy_with_logits(logits, batch.target.float().to(logits))
    else:
        terms["self"] = cfg.self_weight * F.binary_cross_entropy_with_logits(logits, prediction)
    terms["total"] = sum(terms.values())
    return terms


def make_optimizer(
    head: FoundHead, cfg: FoundTraining
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """FOUND's AdamW and step learning-rate schedule for ``head``."""
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    return optimizer, scheduler


def train_step(
    head: FoundHead,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch: FoundBatch,
    step: int,
    cfg: FoundTraining,
) -> dict[str, float]:
    """One optimisation step on ``batch``; returns the loss terms as floats."""
    head.train()
    optimizer.zero_grad()
    terms = found_loss(head(batch.features), batch, step, cfg)
    terms["total"].backward()
    optimizer.step()
    scheduler.step()
    return {name: float(value.detach()) for name, value in terms.items()}


@dataclass
class FoundState:
    """Everything a resumed training needs: the head, its optimizer and schedule, the next step."""

    head: FoundHead
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: int = 0

    @classmethod
    def new(
        cls, channels: int, cfg: FoundTraining, seed: int, device: str | torch.device = "cpu"
    ) -> FoundState:
        """A fresh head (initial weights drawn from ``seed``) on ``device``, with its optimizer."""
        torch.manual_seed(seed)  # the convolution's initial weights
        head = FoundHead(channels).to(device)
        return cls(head, *make_optimizer(head, cfg))

    def state_dict(self) -> dict:
        """A checkpoint (torch.save-able): weights, optimizer, schedule, step and the input channels."""
        return {
            "channels": self.head.conv.in_channels,
            "head": self.head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
        }

    @classmethod
    def from_state_dict(
        cls, state: dict, cfg: FoundTraining, device: str | torch.device = "cpu"
    ) -> FoundState:
        """Rebuild a training on ``device`` from ``state_dict``'s output (raises KeyError on a checkpoint
        missing a part, RuntimeError on weights of another shape)."""
        head = FoundHead(state["channels"])
        head.load_state_dict(state["head"])
        head.to(device)
        optimizer, scheduler = make_optimizer(head, cfg)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        return cls(head, optimizer, scheduler, int(state["step"]))


def train(
    state: FoundState,
    batches: Iterable[FoundBatch],
    cfg: FoundTraining,
    on_step: Callable[[FoundState, dict[str, float]], None] | None = None,
) -> FoundState:
    """Train from ``state.step`` until cfg.max_steps or the batches run out; ``on_step(state, losses)``
    after every step (where the caller logs and writes checkpoints). A resumed training continues the
    step count, schedule and loss switch where the checkpoint left them."""
    iterator: Iterator[FoundBatch] = iter(batches)
    while state.step < cfg.max_steps:
        batch = next(iterator, None)
        if batch is None:
            break
        losses = train_step(state.head, state.optimizer, state.scheduler, batch, state.step, cfg)
        state.step += 1
        if on_step is not None:
            on_step(state, losses)
    return state


def refine_patch_masks(
    images: list[np.ndarray], masks: torch.Tensor, patch: int, bilateral, min_iou: float
) -> torch.Tensor:
    """The bilateral solver on (B, h, w) bool patch masks, as FOUND refines its targets and predictions.

    images: B (H, W, 3) uint8, the pictures the network saw (H <= h*patch, W <= w*patch: padding is cut
    off); bilateral: the solver's settings (sigma_spatial, sigma_luma, sigma_chroma, lam, cg_tol,
    cg_maxiter, confidence: the refine.bilateral config section). Each mask is upsampled to pixels,
    solved, thresholded at 0.5 with holes filled (every component kept, as FOUND does), and brought back
    to the patch grid by majority of its pixels; a refined mask whose IoU with the input is below
    ``min_iou`` (FOUND: 0.5) is replaced by the input. Returns (B, h, w) bool.
    """
    from scipy import ndimage

    from stages.refinement.bilateral_solver import bilateral_solve

    out = masks.clone().bool()
    for i, (image, mask) in enumerate(zip(images, masks.bool().cpu().numpy(), strict=True)):
        height, width = image.shape[:2]
        pixels = mask.repeat(patch, axis=0).repeat(patch, axis=1)[:height, :width]
        if not pixels.any() or pixels.all():
            continue
        confidence = np.full(pixels.shape, bilateral.confidence)
        solved = bilateral_solve(image, pixels.astype(np.float64), confidence, bilateral)
        refined = ndimage.binary_fill_holes(solved > 0.5)
        union = np.logical_or(refined, pixels).sum()
        if np.logical_and(refined, pixels).sum() < min_iou * union:
            continue
        padded = np.zeros((mask.shape[0] * patch, mask.shape[1] * patch))
        padded[:height, :width] = refined
        share = padded.reshape(mask.shape[0], patch, mask.shape[1], patch).mean(axis=(1, 3))
        out[i] = torch.from_numpy(share > 0.5)
    return out


# ----------------------------------------------------------------------------------------------------------
# The registered method


@section
class FoundTrainingConfig:
    """The head's training schedule (``FoundTraining``, with the batch size and the bilateral solver's
    IoU gate); values in configs/methods/found.yaml."""

    lr: float
    step_size: int
    gamma: float
    batch_size: int
    max_steps: int
    coarse_steps: int
    refined_weight: float
    self_weight: float
    min_iou: float
    crop_size: int  # the square training view's side in pixels (FOUND: 224 crops)
    checkpoint_every: int  # steps between checkpoints
    feature_cache_mb: int  # frozen backbone outputs kept in memory; beyond it recomputed per batch

    def validate(self, key: str) -> None:
        for name in ("lr", "step_size", "gamma", "batch_size", "max_steps", "crop_size", "checkpoint_every"):
            positive(f"{key}.{name}", getattr(self, name))
        if self.feature_cache_mb < 0:
            fail(f"{key}.feature_cache_mb", f"must be >= 0, got {self.feature_cache_mb}")
        for name in ("coarse_steps", "refined_weight", "self_weight"):
            if getattr(self, name) < 0:
                fail(f"{key}.{name}", f"must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.min_iou <= 1:
            fail(f"{key}.min_iou", f"must be in [0, 1], got {self.min_iou}")

    def schedule(self) -> FoundTraining:
        """The optimisation schedule of ``train``."""
        return FoundTraining(
            self.lr,
            self.step_size,
            self.gamma,
            self.coarse_steps,
            self.refined_weight,
            self.self_weight,
            self.max_steps,
        )


@section
class FoundConfig:
    name: Literal["found"]
    reference_backbone: str  # the paper's backbone, picked by backbone.arch=auto when its weights exist
    tau: float  # cosine above which a patch is background (FOUND: 0.3)
    reweight: bool  # heads weighted by the sparsity of their CLS attention (FOUND: on)
    keys: dict[Family, KeyTreatment]  # key treatment per backbone family: 'dino', 'dinov2'
    min_patches: int  # foreground components smaller than this many patches are not objects
    no_object: float | None  # the no-object rule's max_cosine (stages/discovery/no_object.py); null = off
    resize: int | None  # square side the image is resized to; None = keep the size, pad
    refine: str  # a refiner (stages/refinement/refine.py REFINERS): crf, bilateral, none
    training: FoundTrainingConfig  # the 1x1-convolution head (FOUND's light model)
    # A head checkpoint (make train-found) that predicts the foreground instead of the seed rule; null =
    # training-free; 'trained' = the one make train-found wrote for this dataset and backbone.
    head: str | None

    def validate(self, key: str) -> None:
        if not -1.0 <= self.tau < 1.0:
            fail(f"{key}.tau", f"must be in [-1, 1), got {self.tau}")
        validate_families(self.keys, f"{key}.keys")
        positive(f"{key}.min_patches", self.min_patches)
        validate_image_settings(self, key)
        self.training.validate(f"{key}.training")


@METHODS.register("found")
class Found(ImageMethod):
    """FOUND (Simeoni et al., CVPR 2023): the foreground is every patch unlike the least CLS-attended one
    (training-free), or, with ``method.head``, what its trained 1x1-convolution head predicts on the
    treated keys. Its objects are the foreground's 4-connected components of at least ``min_patches``
    patches, largest first (the first is what FOUND boxes for localisation)."""

    Config = FoundConfig
    needs = ("attention", "key_bias")
    trained = ("found_head",)  # method.head=trained: found by the pipeline (pipeline/resolve.py)

    def __init__(self, cfg: FoundConfig, head: FoundHead | None = None):
        super().__init__(cfg)
        self.head = head

    @classmethod
    def from_config(cls, cfg: FoundConfig) -> Found:
        """Built once per worker: the head checkpoint ``cfg.head`` (a resolved path) is read here.
        FileNotFoundError naming the key when it is missing."""
        if cfg.head is None:
            return cls(cfg)
        try:
            return cls(cfg, load_head(cfg.head))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"config key 'method.head': no such file '{cfg.head}'") from e

    def foreground(self, feats: PatchFeatures) -> np.ndarray:
        """The image's (h, w) bool foreground, before the split into objects."""
        c = self.cfg
        keys = treated_keys(feats, c.keys[feats.family])
        rule = no_object_rule(feats, c.no_object)
        if self.head is not None:
            return head_foreground(self.head, keys, feats.grid, rule)
        return found(keys, cls_attention(feats.attention), feats.grid, c.tau, c.reweight, rule)

    def __call__(self, feats: PatchFeatures) -> list[np.ndarray]:
        return [part for part in components(self.foreground(feats)) if part.sum() >= self.cfg.min_patches]
