"""ssl-vos (Ponimatkin, Samet et al., "A Simple and Powerful Global Optimization for Unsupervised Video
Object Segmentation", WACV 2023; public code ponimatkin/ssl-vos) as a registered video method: one
foreground track per video, without training.

Per video: optical flow between consecutive frames (cached per frame pair in the run directory by a stage
of its own, ``pair_cache``: the method reads the files), the frozen ViT's last-block keys at ``size``, power
iteration clustering of each frame's key + flow graph (``power_iteration.spectral_vectors``), the
flow-consistent global optimisation of the soft masks at the patch grid, then again at ``fine_size`` (the
public code's second, finer pass), a 2-means split of each soft mask (the smaller side is the object),
the mask at the frame's size and a refinement (the bilateral solver, as the public code's extract_masks.py).

Memory stays bounded on long videos: keys exist for ``window`` frames at a time (consecutive windows share
two frames, so every kept frame's flow features see both neighbours), flows are read from their files
window by window, and the fine pass works on ``optimise.window`` frames at a time. What grows with the
video: one patch-grid vector and one flow field at the patch grid per frame, and the frames and output ids
that every video method holds (``VideoMethod``).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from stages.common.paths import resolve
from stages.common.schema import fail, positive, section
from stages.discovery.base import METHODS
from stages.features.backbone import Backbone, prepare_image
from stages.refinement.refine import RefineConfig, refine_mask
from stages.video.ba import frame_input_size
from stages.video.base import PairCache, VideoMethod
from stages.video.flow_consistency import FlowConsistencyParams, flow_consistent_masks
from stages.video.optical_flow import DIS_PRESETS, RaftFlow, dis_flow, resize_flow
from stages.video.power_iteration import (
    SpectralInitParams,
    foreground,
    frame_windows,
    soft_masks,
    spectral_vectors,
)


@section
class GraphConfig:
    tau: float  # similarities at or below it become eps
    center_keys: bool  # subtract each frame's mean key before the cosine similarity


@section
class OptimiseConfig:
    """The global optimisation (stages/video/flow_consistency.py)."""

    init_weight: float
    flow_weight: float
    lr: float
    steps: int
    inner_steps: int
    history: int
    window: int
    overlap: int
    occlusion_check: bool

    def validate(self, key: str) -> None:
        for name in ("init_weight", "lr", "steps", "inner_steps", "history", "window"):
            positive(f"{key}.{name}", getattr(self, name))
        if self.flow_weight < 0:
            fail(f"{key}.flow_weight", f"must be >= 0, got {self.flow_weight}")
        if not 0 <= self.overlap < self.window:
            fail(f"{key}.overlap", f"must be in [0, window={self.window}), got {self.overlap}")

    def params(self) -> FlowConsistencyParams:
        return FlowConsistencyParams(
            init_weight=self.init_weight,
            flow_weight=self.flow_weight,
            lr=self.lr,
            steps=self.steps,
            inner_steps=self.inner_steps,
            history=self.history,
            window=self.window,
            overlap=self.overlap,
            occlusion_check=self.occlusion_check,
        )


@section
class FlowConfig:
    """Optical flow between consecutive frames: OpenCV's DIS, or torchvision's RAFT from a local file."""

    preset: str  # DIS preset: ultrafast, fast or medium
    weights: str | None  # a local torchvision RAFT checkpoint: RAFT instead of DIS (never downloaded)
    raft_small: bool  # the checkpoint is RAFT-small
    raft_iterations: int  # RAFT's recurrent refinement steps

    def validate(self, key: str) -> None:
        if self.preset not in DIS_PRESETS:
            fail(f"{key}.preset", f"unknown DIS preset '{self.preset}' (known: {', '.join(DIS_PRESETS)})")
        positive(f"{key}.raft_iterations", self.raft_iterations)
        if self.weights and not resolve(self.weights).is_file():
            fail(
                f"{key}.weights",
                f"RAFT checkpoint not found: {resolve(self.weights)} (a local torchvision RAFT checkpoint; "
                "weights are never downloaded; null = DIS flow)",
            )


@section
class SSLVOSConfig:
    """ssl-vos: spectral initialisation by power iteration clustering, then flow-consistent optimisation."""

    name: Literal["sslvos"]
    reference_backbone: str
    size: list[int]  # [height, width] frames are resized to for the ViT (each a multiple of the patch)
    graph: dict[str, GraphConfig]  # per backbone family: 'dino', 'dinov2'
    eps: float  # weight of the edges at or below tau
    graph_flow_weight: float  # weight of each of the forward and backward flow similarities in the graph
    tol: float  # PIC stops at acceleration <= tol / n
    max_steps: int  # PIC steps at most
    window: int  # frames whose keys and graphs exist at once
    optimise: OptimiseConfig
    fine_size: list[int] | None  # [height, width] of the second optimisation pass; None: no second pass
    refine: str  # a refiner (REFINERS) of the final masks: bilateral, crf, none
    flow: FlowConfig

    def validate(self, key: str) -> None:
        for name in ("size", "fine_size"):
            value = getattr(self, name)
            if value is not None and (len(value) != 2 or min(value) < 2):
                fail(f"{key}.{name}", f"expected [height, width] >= 2, got {value}")
        if set(self.graph) != {"dino", "dinov2"}:
            fail(f"{key}.graph", f"needs exactly the families dino and dinov2, got {sorted(self.graph)}")
        for name in ("eps", "tol", "max_steps"):
            positive(f"{key}.{name}", getattr(self, name))
        if self.graph_flow_weight < 0:
            fail(f"{key}.graph_flow_weight", f"must be >= 0, got {self.graph_flow_weight}")
        if self.window < 3:
            fail(f"{key}.window", f"must be >= 3 (windows share 2 frames), got {self.window}")
        self.optimise.validate(f"{key}.optimise")
        self.flow.validate(f"{key}.flow")


# ----------------------------------------------------------------------------------------------------------
# Optical flow per frame pair, cached


def flow_estimator(cfg: FlowConfig, device: str) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """(first, second) RGB frames -> (H, W, 2) float32 flow: RAFT when ``cfg.weights`` names a checkpoint,
    else DIS with ``cfg.preset``."""
    if cfg.weights:
        return RaftFlow(resolve(cfg.weights), cfg.raft_small, device, cfg.raft_iterations)
    return lambda first, second: dis_flow(first, second, cfg.preset)


def flow_file(forward: np.ndarray, backward: np.ndarray) -> bytes:
    """A frame pair's cached flows: forward (p -> p+1) and backward (p+1 -> p), each (H, W, 2), as one
    (2, H, W, 2) float16 .npy (half the bytes; 0.03 px steps up to 64 px). The method reads only these
    files, so a run from the cache and one that computed the flows see the same values."""
    out = io.BytesIO()
    np.save(out, np.stack((forward, backward)).astype(np.float16))
    return out.getvalue()


def read_flow_file(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(forward, backward) (H, W, 2) float32 flows of a ``flow_file``."""
    data = torch.from_numpy(np.load(path).astype(np.float32))
    if data.ndim != 4 or data.shape[0] != 2 or data.shape[3] != 2:
        raise ValueError(f"{path}: not a frame pair's flows (2, H, W, 2), got shape {tuple(data.shape)}")
    return data[0], data[1]


@dataclass(frozen=True)
class FlowCache(PairCache):
    """Optical flow of consecutive frames, one .npy per pair under flows/<estimator>/ (``flow_file``)."""

    flow: FlowConfig

    @property
    def folder(self) -> str:
        if self.flow.weights:
            return f"flows/raft{'-small' if self.flow.raft_small else ''}-{Path(self.flow.weights).stem}"
        return f"flows/dis-{self.flow.preset}"

    def worker(self, device: str) -> Callable[[np.ndarray, np.ndarray], bytes]:
        estimate = flow_estimator(self.flow, device)
        return lambda first, second: flow_file(estimate(first, second), estimate(second, first))


# ----------------------------------------------------------------------------------------------------------
# The method


def _grid_flows(paths: Sequence[str], grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(T-1, h, w, 2) forward and backward flows at the patch grid, in grid units, from the pair files."""
    forward, backward = [], []
    for path in paths:
        f, b = read_flow_file(path)
        forward.append(resize_flow(f, grid))
        backward.append(resize_flow(b, grid))
    return torch.stack(forward), torch.stack(backward)


def _upsample(masks: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(masks[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0].clamp(
        0, 1
    )


@METHODS.register("sslvos")
class SSLVOS(VideoMethod):
    """ssl-vos: one foreground track per video (module docstring). Holds the backbone."""

    Config = SSLVOSConfig
    uses = ("refine",)

    def __init__(self, backbone: Backbone, cfg: SSLVOSConfig, refine: RefineConfig, batch_size: int):
        self.backbone = backbone
        self.cfg = cfg
        self.refine = refine
        self.batch_size = batch_size
        graph = cfg.graph[backbone.family]
        self.spectral = SpectralInitParams(
            tau=graph.tau,
            eps=cfg.eps,
            flow_weight=cfg.graph_flow_weight,
            center=graph.center_keys,
            tol=cfg.tol,
            max_steps=cfg.max_steps,
            window=cfg.window,
        )

    @classmethod
    def from_config(cls, cfg: SSLVOSConfig, backbone: Backbone, sections: dict, batch_size: int) -> SSLVOS:
        return cls(backbone, cfg, sections["refine"], batch_size)

    @classmethod
    def pair_cache(cls, cfg: SSLVOSConfig) -> FlowCache:
        return FlowCache(cfg.flow)

    @classmethod
    def describe(cls, sections: dict) -> str:
        return ""

    def keys(self, frames: Sequence[np.ndarray]) -> tuple[torch.Tensor, tuple[int, int]]:
        """(W, n, C) last-block patch keys (CLS dropped) of frames resized to ``size``, and the grid."""
        p = self.backbone.patch
        h, w = frame_input_size(self.cfg.size, p)
        x = torch.stack(
            [
                prepare_image(np.array(Image.fromarray(f).resize((w, h), Image.BICUBIC)), p, None)
                for f in frames
            ]
        )
        keys = []
        for start in range(0, len(frames), self.batch_size):
            feats = self.backbone(x[start : start + self.batch_size], want=("keys",))
            keys.append(feats.keys[:, 1:])
        return torch.cat(keys), feats.grid

    def initial_masks(
        self, frames: list[np.ndarray], forward: torch.Tensor | None, backward: torch.Tensor | None
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """(T, n) PIC vectors of every frame as soft masks in [0, 1], and the patch grid; keys exist for
        ``window`` frames at a time."""
        out = []
        for start, stop, keep_from, keep_to in frame_windows(len(frames), self.cfg.window, 2):
            keys, grid = self.keys(frames[start:stop])
            keys = keys.to(self.backbone.device)
            pairs = slice(start, stop - 1)
            fwd = None if forward is None else forward[pairs].to(keys.device)
            bwd = None if backward is None else backward[pairs].to(keys.device)
            vectors = spectral_vectors(keys, fwd, bwd, self.spectral).vectors
            out.append(soft_masks(vectors)[keep_from - start : keep_to - start].cpu())
        return torch.cat(out), grid

    def fine_pass(self, coarse: torch.Tensor, pairs: Sequence[str]) -> torch.Tensor:
        """(T, h, w) soft masks -> (T, H', W') bool masks at ``fine_size``, optimised ``optimise.window``
        frames at a time with the flows at that size."""
        size = tuple(self.cfg.fine_size)
        params = self.cfg.optimise.params()
        device = self.backbone.device
        out = torch.zeros(coarse.shape[0], *size, dtype=torch.bool)
        for start, stop, keep_from, keep_to in frame_windows(coarse.shape[0], params.window, params.overlap):
            init = _upsample(coarse[start:stop].to(device), size)
            if stop - start > 1:
                fwd, bwd = zip(*(read_flow_file(p) for p in pairs[start : stop - 1]), strict=True)
                fwd = torch.stack([resize_flow(f.to(device), size) for f in fwd])
                bwd = torch.stack([resize_flow(b.to(device), size) for b in bwd])
                init = flow_consistent_masks(init, fwd, bwd, params)
            keep = slice(keep_from - start, keep_to - start)
            fg = foreground(init[keep].flatten(1), "two_means").reshape(-1, *size)
            out[keep_from:keep_to] = fg.cpu()
        return out

    def __call__(self, frames: list[np.ndarray], pairs: Sequence[str] = ()) -> np.ndarray:
        """Frames (HxWx3 uint8, same size) and the paths of their pairs' flow files (``FlowCache``; T-1 of
        them) -> (T, H, W) int64 ids at the frames' size: 1 on the foreground, 0 elsewhere."""
        if len(frames) > 1 and len(pairs) != len(frames) - 1:
            raise ValueError(f"{len(frames)} frames need {len(frames) - 1} flow files, got {len(pairs)}")
        with torch.no_grad():
            grid = self._grid(frames[0])
            forward = backward = None
            if len(frames) > 1:
                forward, backward = _grid_flows(pairs, grid)
            init, grid = self.initial_masks(frames, forward, backward)
        init = init.reshape(len(frames), *grid)
        if len(frames) > 1:  # on the backbone's device (a GPU when there is one)
            device = self.backbone.device
            init = flow_consistent_masks(
                init.to(device), forward.to(device), backward.to(device), self.cfg.optimise.params()
            ).cpu()
        if self.cfg.fine_size is not None:
            masks = self.fine_pass(init, pairs)
        else:
            masks = foreground(init.flatten(1), "two_means").reshape(init.shape)
        return np.stack(
            [
                self._pixels(frame, mask.numpy()).astype(np.int64)
                for frame, mask in zip(frames, masks, strict=True)
            ]
        )

    def _grid(self, frame: np.ndarray) -> tuple[int, int]:
        p = self.backbone.patch
        h, w = frame_input_size(self.cfg.size, p)
        return h // p, w // p

    def _pixels(self, frame: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """A (h, w) bool mask -> (H, W) bool at the frame's size, refined (kept unrefined when the refiner
        rejects it: a single-object method gives every frame its foreground)."""
        height, width = frame.shape[:2]
        soft = Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.BILINEAR)
        pixels = np.asarray(soft) > 127
        if not pixels.any() or pixels.all():
            return pixels
        refined = refine_mask(frame, pixels, self.cfg.refine, self.refine)
        return pixels if refined is None else refined
