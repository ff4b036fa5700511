"""Training SOLV (``stages.video.solv``) on batches of precomputed frozen-ViT features; resumable checkpoints.

The recipe (SOLV supplementary B.3, YTVIS19; the public code where the paper is silent):
- Adam at a peak learning rate of 4e-4 (1e-4 when fine-tuning on DAVIS17), gradient norm clipped at 1,
  batch 48 clips, about 300K steps. Here AdamW with weight decay on weight matrices only; decay 0 (the
  default asked of the config) is exactly the paper's Adam.
- Linear warm-up over the first 5% of the steps, then exponential decay; the paper gives no rate, the
  public code halves the rate every third of the decay phase (ends at 1/8 of the peak):
  ``final_lr_fraction``.
- Slot merging is applied to a clip with a probability that grows logarithmically: log(1 + e) / log(E)
  in period e of E (public code: e = epoch, E = 180 epochs on YTVIS19), so early, immature slots are
  rarely merged (B.3). Here the periods split the run's steps evenly.
- Token drop: half of each frame's patches, drawn anew every step.

Randomness and resume: token drop and the merge draws come from the trainer's own generator, seeded from
``seed``; dropout in the temporal transformer draws from torch's global generator. A checkpoint holds
the model, optimizer, scheduler, step and both generators' states (CUDA's too when used), so a run
stopped and resumed ends bit for bit where an uninterrupted one does, given the same batches.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from stages.common.io import atomic_write_bytes
from stages.video.solv import SOLV, drop_tokens, model_spec, reconstruction_loss


@dataclass(frozen=True)
class SOLVTrainConfig:
    """The optimisation schedule. Paper values (YTVIS19, B.3) in brackets."""

    steps: int  # optimizer steps in all [~300K]
    lr: float  # peak learning rate [4e-4; 1e-4 fine-tuning on DAVIS17]
    warmup_fraction: float  # share of the steps with linear warm-up [0.05]
    final_lr_fraction: float  # learning rate at the last step / peak [paper silent; public code 1/8]
    weight_decay: float  # AdamW, weight matrices only [paper: Adam, i.e. 0]
    grad_clip: float  # max gradient norm [1.0]
    merge_periods: int  # E of the merge probability log(1 + e) / log(E) [public code: 180 epochs]
    seed: int  # token drop and merge draws

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.lr <= 0 or self.grad_clip <= 0 or self.weight_decay < 0:
            raise ValueError("lr and grad_clip must be > 0 and weight_decay >= 0")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0 < self.final_lr_fraction <= 1:
            raise ValueError(f"final_lr_fraction must be in (0, 1], got {self.final_lr_fraction}")
        if self.merge_periods < 1:
            raise ValueError(f"merge_periods must be >= 1, got {self.merge_periods}")


class FeatureBatch(NamedTuple):
    features: torch.Tensor  # (B, 2n+1, N, D) full patch features of each clip's frames
    frame_valid: torch.Tensor  # (B, 2n+1) bool: False for padding beyond the video's ends


def lr_factor(step: int, cfg: SOLVTrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based) over the peak: linear warm-up to 1 over the
    first warmup_fraction of the steps, then exponential decay reaching final_lr_fraction at the end."""
    warmup = int(cfg.steps * cfg.warmup_fraction)
    if step < warmup:
        return (step + 1) / warmup
    decay_steps = max(1, cfg.steps - 1 - warmup)
    return cfg.final_lr_fraction ** (min(step - warmup, decay_steps) / decay_steps)


def merge_probability(step: int, cfg: SOLVTrainConfig) -> float:
    """Probability that a clip's slots are merged at ``step``: log(1 + e) / log(E), e = the period of
    the step (E periods split the steps evenly); always 1 when E = 1."""
    if cfg.merge_periods == 1:
        return 1.0
    period = min(cfg.merge_periods - 1, step * cfg.merge_periods // cfg.steps)
    return math.log(1 + period) / math.log(cfg.merge_periods)


class SOLVTrainer:
    """Model, optimizer, scheduler, step and random state of one training run."""

    def __init__(self, model: SOLV, cfg: SOLVTrainConfig):
        self.model, self.cfg, self.step = model, cfg, 0
        trained = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in trained if p.ndim >= 2]
        rest = [p for p in trained if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
            lr=cfg.lr,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.generator = torch.Generator().manual_seed(cfg.seed)

    @property
    def device(self) -> torch.device:
        return self.model.binder.slots.device

    def train_step(self, batch: FeatureBatch) -> dict[str, float]:
        """One optimizer step on a batch; returns its scalars: loss, lr (the rate this step used),
        num_slots (mean slots per clip after merging) and merge_probability."""
        features = batch.features.to(self.device, torch.float32)
        valid = batch.frame_valid.to(self.device, torch.bool)
        target = features[:, self.model.cfg.context]
        kept, index = drop_tokens(features, self.model.cfg.token_drop, self.generator)
        p_merge = merge_probability(self.step, self.cfg)
        merge = torch.rand(features.shape[0], generator=self.generator) < p_merge
        self.model.train()
        out = self.model(kept, valid, index, merge)
        loss = reconstruction_loss(out, target)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return {
            "loss": float(loss.detach()),
            "lr": lr,
            "num_slots": float(out.num_slots.float().mean()),
            "merge_probability": p_merge,
        }

    def state_dict(self) -> dict:
        rng = {"generator": self.generator.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "rng": rng,
            "spec": model_spec(self.model),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict``; ValueError if it was written for a model of another shape."""
        spec = model_spec(self.model)
        for key in spec:
            if state["spec"][key] != spec[key]:
                raise ValueError(
                    f"checkpoint is for another model: its {key} is {state['spec'][key]}, not {spec[key]}"
                )
        self.model.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.generator.set_state(state["rng"]["generator"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)

    def save(self, path: Path) -> None:
        """Write the state atomically (a reader never sees half a checkpoint)."""
        buffer = io.BytesIO()
        torch.save(self.state_dict(), buffer)
        atomic_write_bytes(Path(path), buffer.getvalue())

    def load(self, path: Path) -> None:
        self.load_state_dict(torch.load(Path(path), map_location="cpu", weights_only=True))


def train_solv(
    model: SOLV,
    batches: Iterable[FeatureBatch],
    cfg: SOLVTrainConfig,
    checkpoint: Path | None = None,
    checkpoint_every: int | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> SOLVTrainer:
    """Train ``model`` until cfg.steps optimizer steps are done in all; returns the trainer.

    checkpoint: when the file exists, the run resumes from it (``batches`` should then yield the batches
    of the remaining steps); it is written every ``checkpoint_every`` steps (None: only at the end) and
    at the end. on_step(step, scalars) is called after every step with ``SOLVTrainer.train_step``'s
    scalars (for TensorBoard and a progress bar). Stops early, checkpointing, if ``batches`` runs out.
    """
    trainer = SOLVTrainer(model, cfg)
    if checkpoint is not None and Path(checkpoint).is_file():
        trainer.load(checkpoint)
    start = trainer.step
    source = iter(batches)
    while trainer.step < cfg.steps:
        batch = next(source, None)
        if batch is None:
            break
        scalars = trainer.train_step(batch)
        if on_step is not None:
            on_step(trainer.step, scalars)
        if checkpoint is not None and checkpoint_every and trainer.step % checkpoint_every == 0:
            trainer.save(checkpoint)
    if checkpoint is not None and trainer.step > start:
        trainer.save(checkpoint)
    return trainer
